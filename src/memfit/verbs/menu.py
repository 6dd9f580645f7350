"""The profile's menu: which options :func:`memfit.profile` measures, checked before anything runs.

The menu is ``keep`` and ``recompute`` (always), the block options (``rebuild*``,
``selective:*``, ``compile-budget:*``: ``"auto"`` picks them from the blocks' op profile), the
``<post>`` options (``head:*``) and ``offload``. This module refuses what cannot be measured
(an unknown name, an option inexact to rounding without ``exact=False``, hooks on compiled
blocks) with a usage error, and leaves out, with a note saying why, what ``"auto"`` would offer
but this model cannot run. Measuring the menu is :mod:`memfit.verbs.profiling`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memfit.measuring.ops import draws_random
from memfit.measuring.step import split_sample
from memfit.planning.offload import OFFLOAD
from memfit.runtime import stage_wrapper
from memfit.runtime.compiled import COMPILE_BUDGETS, is_compile_budget
from memfit.runtime.compress import FORMATS
from memfit.runtime.head import (
    CHUNKED,
    HEAD_OPTIONS,
    INEXACT_NOTE,
    LEAN_LOSS,
    chunked_head_support,
    head_option,
    is_head_option,
)
from memfit.runtime.options import hooks_inside, is_exact

__all__ = [
    "COMPILED_HEAD_NOTE",
    "COMPILED_NOTE",
    "LOSSY_OPTIONS",
    "NO_LOSS",
    "OFFLOAD_NOTE",
    "RANDOM_NOTE",
    "TIMED_NOTE",
    "Menu",
    "check_options",
    "compiled_menu",
    "menu_for",
]

COMPILED_NOTE = (
    "blocks compiled (torch.compile {options}): rebuild and selective:* left out of the menu, "
    "their saved-tensor hooks and dispatch modes cannot see inside a compiled block; keep, "
    "recompute (checkpoints around the compiled blocks) and compile-budget:<fraction> "
    "(compile's own activation_memory_budget per block) remain"
)


COMPILED_HEAD_NOTE = (
    "head:* left out too: a compile around the planned model (supported for plans with "
    "compiled blocks) would trace the head option's hooks and run the head as it is, so the "
    "plan's peak would not hold; profile with compile=False for them"
)


OFFLOAD_NOTE = (
    "offload left out of the menu: the model is on {device}, and offload moves saved "
    "activations from a CUDA device's memory to host memory; there is nothing to move to here"
)


RANDOM_NOTE = (
    "compile-budget:* left out too: the model draws random numbers in training (dropout), and "
    "compile's activation_memory_budget recomputes them in backward with other numbers than the "
    "forward's (torch 2.13, CPU: gradients off by 2e-2 against the same compile without it; "
    "equal with dropout off)"
)


TIMED_NOTE = (
    "{options} not measured: selective options picked by the blocks' measured op times; "
    "profile with thorough=True (CLI --thorough) to measure them"
)


# the lossy block options ``"auto"`` measures with ``exact=False``
LOSSY_OPTIONS = tuple(FORMATS)

# why a <post> option that ran took no effect: it found no loss it knows inside the forward
NO_LOSS = {
    LEAN_LOSS: "no F.cross_entropy over 2-D logits ran inside the model's forward after its "
    "last block (a loss computed afterwards, by loss_fn or the training loop, is out of its "
    "reach)",
    CHUNKED: "the model's loss_function never computed a loss from the head (no labels in "
    "the sample?)",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Menu:
    """What a profile measures beside keep and recompute.

    Attributes:
        blocks: the block options: ``"auto"`` (picked from the blocks' op profile when they
            run) or the names to measure.
        heads: the ``<post>`` options (``head:*``) to measure.
        offload: whether offload is in the menu (its costs derive from keep's, CUDA only).
        lossy: block options that are not bit-identical (``compress:*``), measured beside
            ``blocks``; only with ``exact=False``.
        notes: why options were left out, for the profile's and its plans' notes.
    """

    blocks: Literal["auto"] | tuple[str, ...]
    heads: tuple[str, ...] = ()
    offload: bool = True
    lossy: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def check_options(
    options: Sequence[str] | str, exact: bool, compiling: Mapping[str, Any] | None
) -> Literal["auto"] | tuple[str, ...]:
    """``options`` as :func:`memfit.profile` takes them, checked against ``exact`` and the
    blocks' ``torch.compile`` settings (``compiling``, ``None``: eager): ``"auto"`` or a tuple
    of names. What can be checked without the model is checked here, before anything runs.

    Raises:
        ValueError: a string other than ``"auto"``; an unknown option name; a ``head:`` option
            exact only to rounding while ``exact``; hooks on compiled blocks; a ``head:``
            option with compiled blocks; ``compile-budget:*`` without them.
    """
    if isinstance(options, str):
        if options != "auto":
            raise ValueError(f'options must be "auto" or a list of option names; got {options!r}')
        return "auto"
    names = tuple(options)
    for name in names:  # a bad name fails here, before anything is measured or changed
        if not is_head_option(name):
            stage_wrapper(name)
    heads = [name for name in names if is_head_option(name)]
    for name in heads:
        if not head_option(name).exact and exact:
            raise ValueError(f"option {name!r} is {INEXACT_NOTE}; pass exact=False to measure it")
    blocks = [name for name in names if not is_head_option(name) and name != OFFLOAD]
    lossy = [name for name in blocks if not is_exact(name)]
    if lossy and exact:
        raise ValueError(
            f"options {lossy} are lossy (saved activations stored in fewer bits: gradients "
            f"not bit-identical); pass exact=False to measure them"
        )
    hooked = [name for name in blocks if hooks_inside(name)]
    if compiling is not None and hooked:
        raise ValueError(
            f"options {hooked} cannot run on compiled blocks (saved-tensor hooks and dispatch "
            f"modes do not see inside compiled code); profile with compile=False for them, or "
            f"leave them out"
        )
    if compiling is not None and heads:
        raise ValueError(
            f"options {heads} cannot be planned with compiled blocks: "
            f"{COMPILED_HEAD_NOTE.partition(': ')[2]}"
        )
    budgets = [name for name in blocks if is_compile_budget(name)]
    if compiling is None and budgets:
        raise ValueError(
            f"options {budgets} compile the blocks with compile's activation_memory_budget; "
            f"profile with compile=True (or a dict of torch.compile arguments) for them"
        )
    return names


def menu_for(model: nn.Module, options: Literal["auto"] | tuple[str, ...], exact: bool) -> Menu:
    """The menu of checked ``options`` (see :func:`check_options`) on ``model``: the
    ``<post>`` options it cannot run (``head:chunked`` on a model that is no Hugging Face
    causal LM) left out with a note, and with ``"auto"`` and ``exact`` a note that
    ``head:chunked`` needs ``exact=False``."""
    if options == "auto":
        blocks: Literal["auto"] | tuple[str, ...] = "auto"
        heads = [name for name, head in HEAD_OPTIONS.items() if head.exact or not exact]
        offload = True
        lossy = () if exact else LOSSY_OPTIONS
    else:
        named = [n for n in options if not is_head_option(n) and n != OFFLOAD]
        blocks = tuple(n for n in named if is_exact(n))
        lossy = tuple(n for n in named if not is_exact(n))
        heads = [name for name in options if is_head_option(name)]
        # offload's costs come from keep's and two measured figures (CUDA), not a step
        offload = OFFLOAD in options
    notes = []
    if CHUNKED in heads:
        reason = chunked_head_support(model)
        if reason is not None:
            heads.remove(CHUNKED)
            notes.append(f"{CHUNKED} left out: {reason}")
    elif exact and options == "auto" and chunked_head_support(model) is None:
        notes.append(f"{CHUNKED} not measured: it is {INEXACT_NOTE}; exact=False offers it")
    return Menu(blocks=blocks, heads=tuple(heads), offload=offload, lossy=lossy, notes=tuple(notes))


def compiled_menu(menu: Menu, compiling: Mapping[str, Any], model: nn.Module, sample: Any) -> Menu:
    """``menu`` for blocks compiled with ``torch.compile(**compiling)``: ``"auto"`` measures
    the compile budgets in place of the hooked options (which cannot see inside a compiled
    block), and none when the model draws random numbers in training (one forward without
    gradients tells); the ``<post>`` options go. Notes say why, in place of the ``<post>``
    options' own.

    Raises:
        ValueError: compile budgets named on a model that draws random numbers in training.
    """
    blocks = list(COMPILE_BUDGETS) if menu.blocks == "auto" else list(menu.blocks)
    notes = [COMPILED_NOTE.format(options=compiling)]
    if any(map(is_compile_budget, blocks)) and _draws_random(model, sample):
        if menu.blocks != "auto":
            raise ValueError(
                f"options {[o for o in blocks if is_compile_budget(o)]} would give wrong "
                f"gradients here: {RANDOM_NOTE.partition(': ')[2]}; leave them out or turn "
                f"dropout off"
            )
        blocks, notes = [], [*notes, RANDOM_NOTE]
    if menu.heads or menu.notes:
        notes.append(COMPILED_HEAD_NOTE)
    # compress:* work through saved-tensor hooks too: nothing to see inside a compiled block
    return replace(menu, blocks=tuple(blocks), heads=(), lossy=(), notes=tuple(notes))


class _RandomDraws(TorchDispatchMode):
    """Notes whether any op drawn through it draws random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.found = self.found or draws_random(func, args, kwargs)
        return func(*args, **kwargs)


def _draws_random(model: nn.Module, sample: Any) -> bool:
    """Whether one training forward of the model draws random numbers (dropout on)."""
    args, kwargs = split_sample(sample)
    with torch.no_grad(), _RandomDraws() as mode:  # the RNG state is restored by the caller
        model(*args, **kwargs)
    return mode.found
