"""Stage options: a registry from option names to how a block's forward is wrapped.

Option names are self-describing, so a plan's JSON is all ``apply`` needs. Built in:

* ``keep``: the block runs untouched; autograd saves what it always saves.
* ``checkpoint``: the block under one non-reentrant ``checkpoint``, for blocks that no
  gradient reaches whose graph outlives the forward (LLaVA's last vision layer, whose output
  the model returns): the graph then keeps the checkpoint's inputs and RNG state instead of
  every tensor the block saves, and no rerun ever runs. The profile offers it for such blocks
  only (``memfit.measuring.profile``); on a block that a gradient reaches it would be a
  one-block recompute segment.
* ``selective:<policy>``: torch's selective checkpoint (non-reentrant ``checkpoint`` with a
  ``CheckpointPolicy`` function as ``context_fn``): the outputs of the policy's ops are saved,
  everything else is recomputed in backward. Policies: ``selective:matmul`` (matmuls,
  convolutions, attention kernels) and ``selective:save=<op>+<op>...`` (exactly these aten ops,
  short names as :func:`memfit.measuring.ops.short_op_name` writes them, e.g. ``addmm+gelu``).

A new family (``offload``, say) is one :func:`register_option` call; a new named selective
policy is one :func:`register_selective_policy` call. Random ops (torch's ``nondeterministic_seeded``
tag, :func:`memfit.measuring.ops.is_random_op`) are never saved, so recompute replays all of them
in order and dropout masks come out bit-identical: naming one is an error, and attention kernels
are saved only at calls with dropout off.

A saved output that the stage's forward then writes in place (``scores /= sqrt(d)`` after a
``bmm``) is copied into the cache just before the write, so the recompute does not apply the
write twice: see :mod:`memfit.runtime.saved_writes`.

Known gap: around a compiled function, selective checkpointing sees ``aten.mm.out`` instead of
``aten.mm.default``. Saving an ``.out`` op is unsafe (the recompute would return the cached
tensor without writing the ``out=`` buffer the compiled code reads; torch 2.13 raises "cached
tensor has been mutated"), so such ops are recomputed and a warning is logged once per stage.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from memfit.measuring.ops import MATMUL_OPS, draws_random, full_op_name, saveable
from memfit.planning.costs import CHECKPOINT, KEEP
from memfit.planning.offload import OFFLOAD
from memfit.runtime.saved_writes import SavedWrites

logger = logging.getLogger(__name__)

Forward = Callable[..., Any]
StageWrapper = Callable[[Forward], Forward]

SELECTIVE = "selective:"
# OFFLOAD: the executor runs it (memfit.runtime.offload): the block itself here


@dataclass(frozen=True, kw_only=True, slots=True)
class OptionKind:
    """One family of stage options.

    Attributes:
        prefix: the whole option name (``keep``), or its prefix ending in ``:`` (``selective:``)
            for a family whose names carry a parameter.
        form: how the option is written, for error messages (``selective:<policy>``).
        recomputes: whether the stage reruns its forward from its input in backward; then the
            runtime watches that input for in-place changes.
        wrapper: option name -> wrapper of a block's forward. Raises ``ValueError`` for a
            malformed name; called when a plan is applied, before anything changes.
        hooks_inside: whether the option works inside the block's forward through saved-tensor
            hooks or dispatch modes (``rebuild``, ``selective:``): it sees nothing of a compiled
            block, so profiles and plans of compiled blocks leave it out.
        exact: whether the option's gradients are bit-identical to the unplanned model's.
            ``False`` (``compress:*``, lossy): measured and planned only with ``exact=False``,
            and named in ``plan.inexact``.
    """

    prefix: str
    form: str
    recomputes: bool
    wrapper: Callable[[str], StageWrapper]
    hooks_inside: bool = False
    exact: bool = True

    def __post_init__(self) -> None:
        if not self.prefix or (":" in self.prefix and not self.prefix.endswith(":")):
            raise ValueError(f"prefix {self.prefix!r}: expected 'name' or 'family:'")


_KINDS: dict[str, OptionKind] = {}
# name -> the aten ops (full overload names) that the policy saves
_SELECTIVE_POLICIES: dict[str, frozenset[str]] = {}


def register_option(kind: OptionKind) -> None:
    """Make a family of stage options available to plans.

    Raises:
        ValueError: the prefix is registered already.
    """
    if kind.prefix in _KINDS:
        raise ValueError(f"stage option {kind.prefix!r} is registered already")
    _KINDS[kind.prefix] = kind


def register_selective_policy(name: str, ops: frozenset[str]) -> None:
    """Make ``selective:<name>`` save the outputs of ``ops`` (``aten.mm.default``-style names).

    Raises:
        ValueError: the name is taken or malformed, or an op may not be saved (random, in-place).
    """
    if name in _SELECTIVE_POLICIES or not name or "=" in name:
        raise ValueError(f"selective policy name {name!r} is taken or malformed")
    _check_saveable(f"{SELECTIVE}{name}", ops)
    _SELECTIVE_POLICIES[name] = frozenset(ops)


def option_kind(option: str) -> OptionKind:
    """The family an option name belongs to.

    Raises:
        ValueError: an option memfit does not know, listing the registered forms.
    """
    family = option if option in _KINDS else option.partition(":")[0] + ":"
    kind = _KINDS.get(family)
    if kind is None:
        forms = ", ".join(repr(k.form) for k in _KINDS.values())
        raise ValueError(f"unknown stage option {option!r}; expected one of {forms}")
    return kind


def hooks_inside(option: str) -> bool:
    """Whether ``option`` works through hooks inside the block's forward
    (:attr:`OptionKind.hooks_inside`); ``False`` for an option memfit does not know (the
    registry's own checks reject it)."""
    kind = _KINDS.get(option if option in _KINDS else option.partition(":")[0] + ":")
    return kind is not None and kind.hooks_inside


def is_exact(option: str) -> bool:
    """Whether ``option`` gives gradients bit-identical to the unplanned model's
    (:attr:`OptionKind.exact`); ``True`` for a name memfit does not know (the registry's own
    checks reject it)."""
    kind = _KINDS.get(option if option in _KINDS else option.partition(":")[0] + ":")
    return kind is None or kind.exact


def is_selective(option: str) -> bool:
    """Whether ``option`` is one of torch's selective checkpoints (``selective:<policy>``)."""
    return option.startswith(SELECTIVE)


def stage_wrapper(option: str) -> StageWrapper:
    """How a stage with ``option`` runs: a function from the block's forward to the new one.

    Raises:
        ValueError: unknown or malformed option.
    """
    return option_kind(option).wrapper(option)


def _check_saveable(option: str, ops: frozenset[str]) -> None:
    unsafe = sorted(op for op in ops if not saveable(op))
    if unsafe:
        raise ValueError(
            f"option {option!r} saves {unsafe}: random or in-place ops cannot be saved, nor "
            f"factories (a random op must rerun in backward for the recompute to draw the same "
            f"numbers); drop them from the option: they are recomputed"
        )


def saved_ops(option: str) -> frozenset[str]:
    """The aten ops a ``selective:`` option saves.

    Raises:
        ValueError: not a ``selective:`` option, an unknown policy, or unsafe ops.
    """
    policy = option.removeprefix(SELECTIVE)
    if option.startswith(SELECTIVE) and policy in _SELECTIVE_POLICIES:
        return _SELECTIVE_POLICIES[policy]
    if option.startswith(SELECTIVE + "save="):
        names = [name for name in policy.removeprefix("save=").split("+") if name]
        ops = frozenset(full_op_name(name) for name in names)
        _check_saveable(option, ops)
        if ops:
            return ops
    policies = [f"{SELECTIVE}{name}" for name in _SELECTIVE_POLICIES]
    raise ValueError(
        f"unknown selective option {option!r}; expected one of {policies} or "
        f"'selective:save=<op>+<op>' (aten op names such as addmm+gelu)"
    )


class SelectivePolicy:
    """The ``CheckpointPolicy`` function of ``create_selective_checkpoint_contexts`` for ``ops``.

    ``.out`` variants of saved ops (seen around compiled code) are recomputed, never saved:
    see the module docstring. Calls that draw random numbers (an attention kernel with dropout
    on) are recomputed too, so the recompute replays the RNG stream in the forward's order. A
    plain object (not a closure), so planned models pickle.
    """

    def __init__(self, ops: frozenset[str], option: str) -> None:
        self.ops = ops
        self.option = option
        self.warned = False  # one log line per stage

    def saves(self, op: Any, args: Any, kwargs: Any) -> bool:
        """Whether this call's output is saved."""
        return str(op) in self.ops and not draws_random(op, args, kwargs)

    def __call__(self, _ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if self.saves(op, args, kwargs):
            return CheckpointPolicy.MUST_SAVE
        name = str(op)
        if (
            not self.warned
            and name.endswith(".out")
            and name[: -len("out")] + "default" in self.ops
        ):
            self.warned = True
            logger.warning(
                "%s: %s (an out= variant, as compiled code calls it) cannot be saved safely; "
                "it is recomputed, so this stage saves less and recomputes more than planned",
                self.option,
                name,
            )
        return CheckpointPolicy.PREFER_RECOMPUTE


def _keep(_option: str) -> StageWrapper:
    return lambda forward: forward


class Selective:
    """A block's forward under torch's selective checkpoint with one policy.

    Its first forward also runs under :class:`~memfit.runtime.saved_writes.SavedWrites`, which
    keeps saved outputs that the forward then changes in place out of torch's cache (a copy
    stands in), so the recompute does not apply those writes twice.
    """

    def __init__(self, forward: Forward, ops: frozenset[str], option: str) -> None:
        self.forward = forward
        self.stage = getattr(forward, "stage", "?")
        # a policy per wrapped stage, so its one-time warning names every stage's problem
        self.policy = SelectivePolicy(ops, option)

    def contexts(self) -> tuple[Any, Any]:
        """The ``context_fn`` of one checkpointed call: (first forward, recompute) contexts."""
        caching, cached = create_selective_checkpoint_contexts(self.policy)
        writes = SavedWrites(self.policy.saves, caching.storage, self.stage, self.policy.option)
        return _Stacked(writes, caching), cached

    # SavedWrites is a Python dispatch mode, which torch.compile cannot trace: a model compiled
    # around a plan runs a selective stage eagerly, one graph break at its boundary.
    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(
            self.forward, *args, use_reentrant=False, context_fn=self.contexts, **kwargs
        )


class _Stacked:
    """Enters ``inner`` then ``outer`` (so ``outer``'s dispatch mode sees ops first), and
    leaves them in the reverse order."""

    def __init__(self, inner: Any, outer: Any) -> None:
        self.inner = inner
        self.outer = outer

    def __enter__(self) -> None:
        self.inner.__enter__()
        try:
            self.outer.__enter__()
        except BaseException:
            self.inner.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.outer.__exit__(*exc)
        finally:
            self.inner.__exit__(*exc)


class Checkpointed:
    """A block's forward under one non-reentrant checkpoint (the ``checkpoint`` option). A
    plain object (not a closure), so planned models pickle."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def _checkpointed(_option: str) -> StageWrapper:
    return Checkpointed


def _selective(option: str) -> StageWrapper:
    ops = saved_ops(option)
    return functools.partial(Selective, ops=ops, option=option)


register_option(OptionKind(prefix=KEEP, form=KEEP, recomputes=False, wrapper=_keep))
register_option(
    OptionKind(prefix=CHECKPOINT, form=CHECKPOINT, recomputes=True, wrapper=_checkpointed)
)
register_option(OptionKind(prefix=OFFLOAD, form=OFFLOAD, recomputes=False, wrapper=_keep))
register_option(
    OptionKind(
        prefix=SELECTIVE,
        form="selective:<policy>",
        recomputes=True,
        wrapper=_selective,
        hooks_inside=True,
    )
)
register_selective_policy("matmul", MATMUL_OPS)
