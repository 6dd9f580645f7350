"""Op chains for ``rebuild+ops``: the aten calls recorded during a block's forward, and the
recipe that reruns the chain of cheap ops that made a saved storage."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memfit.measuring.ops import in_place_twin
from memfit.runtime.rebuild.handles import Geometry, _Source, geometry

# Ops whose outputs ``rebuild`` may compute again in backward from what the block saves anyway:
# pointwise ops (``torch.Tag.pointwise``) and these cheap ones; never random ones.
CHEAP_OPS = frozenset(
    {
        "aten::_to_copy",
        "aten::cat",
        "aten::clone",
        "aten::mean",
        "aten::sum",
    }
)


@functools.cache
def cheap_op(func: Any) -> bool:
    """Whether ``rebuild`` may rerun the aten op ``func`` (pointwise or in :data:`CHEAP_OPS`,
    not random); asked once per op overload."""
    tags = getattr(func, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    name = getattr(getattr(func, "_schema", None), "name", "")
    return torch.Tag.pointwise in tags or name in CHEAP_OPS


class _Made:
    """One generation of a storage made during the block's forward by an op that cannot be
    rerun (a matmul, a random op, an in-place write): its storage pointer may be read, never
    rebuilt."""

    __slots__ = ()


@dataclass(slots=True, eq=False)
class _OpCall:
    """A cheap op's call that made a fresh storage: ``func(*args, **kwargs)`` with its tensor
    arguments as :class:`_Arg` (what made each, at the time of the call)."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    geometry: Geometry
    nbytes: int
    dtype: torch.dtype


@dataclass(slots=True, eq=False)
class _Arg:
    """A tensor argument of a recorded op: its view on its storage and what made the storage
    (``maker``: an :class:`_OpCall`, a :class:`_Made`, or ``None`` when made before the block),
    or the tensor itself for a parameter (alive anyway) or a small constant (copied)."""

    ptr: int
    geometry: Geometry
    dtype: torch.dtype
    maker: Any
    tensor: torch.Tensor | None = None
    version: int | None = None  # a parameter's, when the op read it: checked before a rerun


_Leaf = (torch.Tensor, _Arg, _Made)


def _aten_leaves(
    args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, kinds: Any = torch.Tensor
) -> list[Any]:
    """The leaves of kind ``kinds`` in an aten call's arguments: each a leaf or a list/tuple of
    leaves (``Tensor[]``, ``Tensor?[]``), never deeper."""
    found = []
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, kinds):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [leaf for leaf in value if isinstance(leaf, kinds)]
    return found


def _aten_map(fn: Callable[[Any], Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with ``fn`` applied to every tensor-like leaf, one list level deep."""

    def one(value: Any) -> Any:
        if isinstance(value, _Leaf):
            return fn(value)
        if isinstance(value, (list, tuple)):
            return type(value)(fn(v) if isinstance(v, _Leaf) else v for v in value)
        return value

    return tuple(one(value) for value in args)


def _evaluate(
    call: _OpCall, resolve: Callable[[_Arg], torch.Tensor], func: Any = None
) -> torch.Tensor:
    """``call`` again, on its arguments as ``resolve`` gives them (``func``: its in-place
    overload instead, writing into the first argument)."""

    def value(leaf: Any) -> Any:
        return resolve(leaf) if isinstance(leaf, _Arg) else leaf

    args = _aten_map(value, call.args)
    kwargs = {k: _aten_map(value, (v,))[0] for k, v in call.kwargs.items()}
    out = (func or call.func)(*args, **kwargs)
    if not isinstance(out, torch.Tensor) or geometry(out) != call.geometry:
        raise RuntimeError(
            f"memfit rebuild: {call.func} gave another layout than in the forward; plan this "
            f"stage without 'rebuild'"
        )
    return out


class _OpRecipe:
    """Rebuilds one storage by rerunning the chain of cheap ops that made it, from storages
    the block keeps saved (or rebuilds in turn), parameters and small constants.

    Each op runs once per rebuild, as in the forward: an intermediate that several ops read,
    in this chain (RecurrentGemma's rotary table, ``cat((freqs, freqs))``) or in the chains of
    other storages of the block rebuilt meanwhile (its recurrence's ``log_a``, read by
    ``exp(log_a)`` and ``exp(2 * log_a)``, both saved), is computed once per rebuild run and
    handed to each (computed once per reader, the rebuild ran ops the forward did not run, and
    the op trace differed from the plain step's).

    An op whose first argument is an intermediate this recipe has just made (nobody saved it,
    nothing else holds it, no other op of the block's chains reads it) runs in place on it when its
    output has that argument's dtype and layout: GPT-2's tanh chain then allocates 2 tensors
    instead of 5, and fresh memory is what a rebuild pays most for on a CPU (the chain: 1.9 ms
    warm instead of 3.0 ms at width 768; ``benchmarks/results/design-figures.md``, "Op-chain
    rebuild costs")."""

    def __init__(
        self,
        call: _OpCall,
        saved: dict[int, tuple[_Source | None, torch.Tensor | None, Any]],
        geometry: Geometry,
        readers: dict[int, int],
    ) -> None:
        self.call = call
        # saved storage -> (its source when dropped, else its base tensor; what made it)
        self.saved = saved
        self.geometry = geometry  # of the saved base on the storage (a reshape's, say)
        # the block's: intermediate (id of the op call that makes it) -> argument slots of the
        # chains of its rebuilt storages that read it, this chain's added now
        self.readers = readers
        for key, count in self._readers().items():
            readers[key] = readers.get(key, 0) + count

    def _saved(self, arg: _Arg) -> bool:
        """Whether ``arg`` is a saved storage, not a rerun intermediate that had its address."""
        entry = self.saved.get(arg.ptr)
        return entry is not None and entry[2] is arg.maker

    def _readers(self) -> dict[int, int]:
        """How many argument slots of the chain read each intermediate it reruns
        (``id`` of the op call that makes it -> count)."""
        readers: dict[int, int] = {}
        pending, seen = [self.call], set()
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            for arg in _aten_leaves(current.args, current.kwargs, _Arg):
                if arg.tensor is None and not self._saved(arg):
                    assert isinstance(arg.maker, _OpCall)  # checked when the recipe was made
                    readers[id(arg.maker)] = readers.get(id(arg.maker), 0) + 1
                    pending.append(arg.maker)
        return readers

    def resolve(self, arg: _Arg) -> torch.Tensor:
        if arg.tensor is not None:
            return arg.tensor
        if self._saved(arg):
            source, base, _maker = self.saved[arg.ptr]
            whole = source.value() if source is not None else base
            assert whole is not None
            return whole.as_strided(*arg.geometry)
        assert isinstance(arg.maker, _OpCall)  # checked when the recipe was made
        made = _run.made.get(id(arg.maker)) if _run.made is not None else None
        if made is None:
            made = self.evaluate(arg.maker)
            if _run.made is not None and self.readers.get(id(arg.maker), 0) > 1:
                _run.made[id(arg.maker)] = made
        return made.as_strided(*arg.geometry)

    def evaluate(self, call: _OpCall) -> torch.Tensor:
        first = call.args[0] if call.args else None
        func = in_place_twin(call.func)
        if (
            func is not None
            and isinstance(first, _Arg)
            and first.tensor is None
            and not self._saved(first)  # made by this recipe, just now
            and isinstance(first.maker, _OpCall)
            and self.readers.get(id(first.maker), 0) == 1  # read by this op alone
            and first.maker.geometry == first.geometry == call.geometry
            and first.maker.nbytes == call.nbytes
            and first.dtype == call.dtype
        ):
            return _evaluate(call, self.resolve, func)
        return _evaluate(call, self.resolve)

    def __call__(self) -> torch.Tensor:
        # the op made the whole storage (checked when recorded): the saved base is a view of it
        if _run.made is not None:  # inside another rebuild: its run
            return self.evaluate(self.call).as_strided(*self.geometry)
        _run.made = {}
        try:
            return self.evaluate(self.call).as_strided(*self.geometry)
        finally:
            _run.made = None


class _Run(threading.local):
    """The intermediates made so far in the rebuild running now (outermost recipe call), that
    more than one op reads: ``id`` of the op call -> its output."""

    made: dict[int, torch.Tensor] | None = None


_run = _Run()
