"""Checks that keep a planned step honest: each raises rather than let gradients go silently wrong.

* :func:`same_side_inputs`: a multi-block segment reuses its first block's side inputs (masks,
  rotary tables) for every block, which is only right when every block gets the same ones.
* :func:`guard_input`: recompute reruns a stage from its input, which is only right when nobody
  changed that input in place since the forward.
* :func:`rng_state` / :func:`same_rng_state`: a multi-block segment runs its blocks back to back,
  which keeps the random stream only when the model draws no random numbers between blocks
  (LayerDrop does; the profile sees such draws, :attr:`memfit.measuring.chain.Chain.draws_before`,
  and plans never join blocks across them: this check catches hand-made plans).
* :class:`Watch`: recompute reruns a block in backward, which is only right when its first run
  changed neither its arguments in place (a mask) nor its modules' state in a way the rerun
  cannot replay: the rerun would read the changed values and write them again. Attributes the
  first run rebinds (``self.calls += 1``, ``self.x_min = ...``, a tensor attribute, a buffer
  assigned anew) are replayed (:mod:`memfit.runtime.state_replay`); in-place writes to a
  module's tensors (``self.seen.add_(1)``), replaced parameters and rebound attributes of other
  types are refused. Checked around the first run of every recomputed top-level item, before
  any backward.
  The common case (nothing changed) costs identity and version comparisons of flat lists
  (:class:`Reading`); a change is then looked at attribute by attribute to name it.

What the watch cannot see: Python containers changed in place (``self.log.append(x)``), state
outside the block's modules (globals, other modules), and tensors reached through containers.
The running statistics of norm layers (``_NormBase``: BatchNorm, InstanceNorm with
``track_running_stats``) are not state writes here: the runtime restores them after every rerun
(:mod:`memfit.runtime.replay`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from itertools import chain, compress, repeat
from operator import is_
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._pytree import tree_leaves

from memfit.errors import MemfitError, UnsupportedModelError
from memfit.measuring.carry import output_items
from memfit.measuring.chain import (
    Inputs,
    main_tensor,
    rng_state,
    same_rng_state,
    same_side_inputs,
)
from memfit.measuring.step import sharded
from memfit.runtime.state_replay import ABSENT, Write, replayable

__all__ = [
    "Inputs",
    "Watch",
    "guard_input",
    "rng_state",
    "same_rng_state",
    "same_side_inputs",
]

NamedModules = Sequence[tuple[str, nn.Module]]
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def guard_input(out: Any, watched: Any, stage: str) -> Any:
    """Make the backward of ``out`` check that ``watched`` (the stage's input) kept its version.

    The check runs when the gradient of the stage's output arrives, just before autograd
    recomputes the stage. torch notices such a change only when the input requires grad;
    with frozen embeddings the first block's input does not, and recompute would silently
    read the changed values.

    Not while torch.compile traces (a hook reading version counters breaks the graph): a
    compiled region saves its inputs through autograd, whose own version check then holds.

    Returns:
        ``out``, unchanged.
    """
    if torch.compiler.is_compiling():
        return out
    main = main_tensor(out)
    if main is None:  # a block carrying several tensors may return None first (SD3's last)
        main = next((item for item in output_items(out) if isinstance(item, torch.Tensor)), None)
    if not (isinstance(watched, torch.Tensor) and main is not None and main.requires_grad):
        return out
    version, watched_ref = watched._version, weakref.ref(watched)  # never keep it alive

    def check(grad: torch.Tensor) -> None:
        alive = watched_ref()
        if alive is not None and alive._version != version:
            raise MemfitError(
                f"the input of stage {stage!r} was modified in place after its forward; "
                f"recomputing the stage from it would give wrong gradients. Avoid the in-place "
                f"op on the block's input (write x = x * 2, not x.mul_(2)) or keep this stage"
            )

    main.register_hook(check)
    return out


def _arguments(main: Any, rest: tuple[Any, ...], side: dict[str, Any]) -> list[tuple[str, Any]]:
    labelled = [("the hidden state", main)]
    labelled += [(f"positional argument {i + 1}", value) for i, value in enumerate(rest)]
    labelled += [(f"argument {name!r}", value) for name, value in side.items()]
    return [
        (label, leaf)
        for label, value in labelled
        for leaf in tree_leaves(value)
        if isinstance(leaf, torch.Tensor)
    ]


def _tensors_in(
    module: nn.Module,
    attributes: dict[str, Any],
    parameters: dict[str, Any],
    buffers: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The tensors among a module's attributes, parameters and buffers (norm statistics
    excepted), given its three dicts."""
    tensors = {k: v for k, v in attributes.items() if isinstance(v, torch.Tensor)}
    tensors.update((k, v) for k, v in parameters.items() if v is not None)
    tensors.update((k, v) for k, v in buffers.items() if v is not None)
    if isinstance(module, _NormBase):  # restored after every rerun (memfit.runtime.replay)
        for name in RUNNING_STATS:
            tensors.pop(name, None)
    return tensors


def _running_stats(module: nn.Module) -> list[torch.Tensor]:
    """A norm layer's running statistics (restored after every rerun: memfit.runtime.replay)."""
    if not isinstance(module, _NormBase):
        return []
    return [t for t in map(module._buffers.get, RUNNING_STATS) if isinstance(t, torch.Tensor)]


def _tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters, buffers and tensor attributes (norm statistics excepted)."""
    return _tensors_in(module, vars(module), module._parameters, module._buffers)


def _dicts(modules: Sequence[nn.Module]) -> list[dict[str, Any]]:
    """The attribute, parameter and buffer dicts of ``modules``, three a module (the live
    ones: read them again to see a change)."""
    return [
        own for module in modules for own in (vars(module), module._parameters, module._buffers)
    ]


class Reading(NamedTuple):
    """The attribute, parameter and buffer dicts of an item's modules, flat: three dicts a
    module, in order. Two readings are :meth:`same` exactly when every dict holds the very
    objects under the same names in the same order: identity comparisons of flat lists, a few
    list operations a module. A reading holds the objects, so their identities stay
    comparable while it lives."""

    sizes: list[int]
    keys: list[str]
    values: list[Any]

    @classmethod
    def of(cls, modules: Sequence[nn.Module]) -> Reading:
        dicts = _dicts(modules)
        return cls(
            list(map(len, dicts)),
            list(chain.from_iterable(dicts)),
            list(chain.from_iterable(map(dict.values, dicts))),
        )

    def same(self, other: Reading) -> bool:
        return (
            self.sizes == other.sizes
            and self.keys == other.keys
            and all(map(is_, self.values, other.values))
        )

    def dicts(self) -> list[dict[str, Any]]:
        """Copies of the dicts as they were read."""
        out, at = [], 0
        for size in self.sizes:
            keys, values = self.keys[at : at + size], self.values[at : at + size]
            out.append(dict(zip(keys, values, strict=True)))
            at += size
        return out


class Watch:
    """What a recomputed top-level item may not change in its first run, read before it.

    Args:
        stage: the item's first stage, for messages.
        modules: the item's blocks and their submodules, with their fqns.
        main, rest, side: the item's arguments (the hidden state, positional, keyword).

    The common case costs identity and version comparisons of flat lists (:class:`Reading`,
    :meth:`_unchanged`); only a run that changed something is looked at attribute by
    attribute (:meth:`_written`), to name the write or replay it.

    While torch.compile traces the item (a compiled model or block around memfit's runtime) it
    watches nothing: reading version counters and attribute dicts would break the graph, and a
    compiled region's recompute replays the traced graph, not the module's Python.
    """

    def __init__(
        self,
        stage: str,
        modules: NamedModules,
        main: Any,
        rest: tuple[Any, ...],
        side: Any,
    ) -> None:
        self.stage = stage
        self.names = [name for name, _ in modules]
        self.modules = [module for _, module in modules]
        self.inputs: list[tuple[str, torch.Tensor, int]] = []
        self.reading = Reading([], [], [])
        self.tensors: list[torch.Tensor] = []  # every module tensor watched, flat
        self.versions: list[int] = []  # their versions before the run
        if torch.compiler.is_compiling():
            self.names, self.modules = [], []
            return
        self.inputs = [(label, t, t._version) for label, t in _arguments(main, rest, side)]
        self.reading = Reading.of(self.modules)
        values = self.reading.values
        self.tensors = list(compress(values, map(isinstance, values, repeat(torch.Tensor))))
        if any(map(isinstance, self.modules, repeat(_NormBase))):
            restored = {id(t) for module in self.modules for t in _running_stats(module)}
            self.tensors = [t for t in self.tensors if id(t) not in restored]
        self.versions = [t._version for t in self.tensors]

    def check(self) -> list[Write]:
        """Raise if the run changed an argument in place or wrote to its modules' state in a
        way a rerun cannot replay; return the attributes it rebound (to replay).

        Raises:
            UnsupportedModelError: naming the stage, what changed and what to do.
        """
        changed = sorted({label for label, t, version in self.inputs if t._version != version})
        if changed:
            raise UnsupportedModelError(
                f"stage {self.stage!r} changes its {', '.join(changed)} in place; recomputing it "
                f"in backward would read the changed values (wrong gradients, or an error from "
                f"autograd deep in backward). Make the "
                f"block compute a new tensor instead (mask = mask.masked_fill(...), not "
                f"mask.masked_fill_(...)), or keep this stage in the plan (no recompute)"
            )
        if self._unchanged():
            return []
        rebound, written = self._written()
        if written:
            raise UnsupportedModelError(
                f"stage {self.stage!r} writes to its modules' state in forward ({', '.join(written[:3])}"
                f"{', ...' if len(written) > 3 else ''}) in a way memfit cannot replay (a "
                f"tensor written in place, a parameter replaced, or an attribute that is no "
                f"tensor, number, string or None); recomputing it in backward would run "
                f"the write again and read the changed state, so the step would differ from an "
                f"unplanned one. Assign new values instead (self.x = self.x + 1, not "
                f"self.x.add_(1): memfit replays those), move the write out of the block's "
                f"forward (e.g. into a hook on the model), or keep this stage in the plan (no "
                f"recompute)"
            )
        return rebound

    def _unchanged(self) -> bool:
        """Whether the run left every watched module as it found it: the same objects under the
        same names in its attribute, parameter and buffer dicts, in the same order, and the
        same versions of its tensors. Whatever :meth:`_written` reports changes an identity or
        a version compared here, so where this finds nothing, so would it."""
        return (
            Reading.of(self.modules).same(self.reading)
            and [t._version for t in self.tensors] == self.versions
        )

    def _written(self) -> tuple[list[Write], list[str]]:
        """The attributes the run rebound to values a rerun can replay, and the names of every
        other write (in place, a parameter, another type)."""
        rebound: dict[str, Write] = {}
        written: set[str] = set()
        version_before = {id(t): v for t, v in zip(self.tensors, self.versions, strict=True)}
        dicts = self.reading.dicts()
        for index, (name, module) in enumerate(zip(self.names, self.modules, strict=True)):
            attributes, parameters, buffers = dicts[3 * index : 3 * index + 3]
            tensors = _tensors_in(module, attributes, parameters, buffers)
            prefix = f"{name}." if name else ""
            current = _tensors_of(module)
            for key in tensors.keys() | current.keys():
                old, tensor = tensors.get(key), current.get(key)
                if old is not None and tensor is not None and (sharded(old) or sharded(tensor)):
                    continue  # FSDP2 gathered or resharded the block's parameters meanwhile
                if old is not None and old._version != version_before.get(id(old), old._version):
                    written.add(prefix + key)  # written in place: the value before is gone
                elif key in module._parameters and tensor is not old:
                    written.add(prefix + key)  # a parameter replaced
            now = vars(module)
            for key in attributes.keys() | now.keys():
                before, after = attributes.get(key, ABSENT), now.get(key, ABSENT)
                if after is not before:
                    rebound[prefix + key] = Write(module, prefix + key, key, before, after)
            for key in buffers.keys() | module._buffers.keys():
                before, after = buffers.get(key, ABSENT), module._buffers.get(key, ABSENT)
                if after is not before:
                    rebound[prefix + key] = Write(module, prefix + key, key, before, after)
        for key, write in list(rebound.items()):
            if key in written or not (replayable(write.before) and replayable(write.after)):
                written.add(key)
                del rebound[key]
        return list(rebound.values()), sorted(written)
