"""Recording, during a block's forward under ``rebuild+ops``, which aten op made each storage,
and finding from it the chain of cheap ops that rebuilds a saved storage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memfit.measuring.ops import written_arguments
from memfit.runtime.rebuild.handles import _Handle, _ptr, _Recipe, _Source, _strided, geometry
from memfit.runtime.rebuild.ops import (
    _Arg,
    _aten_leaves,
    _aten_map,
    _Leaf,
    _Made,
    _OpCall,
    _OpRecipe,
    cheap_op,
)

MAX_CHAIN = 32  # ops rerun to rebuild one storage (GPT-2's tanh GELU: 8)
CONSTANT_NUMEL = 64  # tensors up to this size made outside dispatch (wrapped scalars): copied


def _whole(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers its whole storage."""
    return tensor.untyped_storage().nbytes() == tensor.nbytes


class _OpRecorder(TorchDispatchMode):
    """Records, during a block's forward under ``rebuild``, which op made each storage."""

    def __init__(self, op_makers: _OpMakers) -> None:
        super().__init__()
        self.op_makers = op_makers

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.op_makers.record_op(func, args, kwargs, out)
        return out


class _OpMakers:
    """What made each storage during one block's forward (recorded by :class:`_OpRecorder`),
    and the op-chain recipes built from it."""

    def __init__(self, thread: int) -> None:
        self.thread = thread  # the dispatch mode ignores ops of other threads
        # storage -> what made it last during the forward (an _OpCall, or _Made)
        self.makers: dict[int, Any] = {}
        # intermediates the recipes' chains read: id of the op call -> reading argument slots
        self.readers: dict[int, int] = {}

    def record_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Note which op made each fresh storage (and that in-place writes made new ones).

        Runs for every aten op of the block's forward, so it walks aten's flat argument lists
        itself (:func:`_aten_leaves`) rather than through pytree: 1.1 ms per GPT-2 block
        forward (72 ops) instead of 2.6 ms (``benchmarks/results/design-figures.md``, "Op-chain
        rebuild costs")."""
        if threading.get_ident() != self.thread:
            return
        for position, name in written_arguments(func):
            value = kwargs.get(name, args[position] if position < len(args) else None)
            for tensor in _aten_leaves((value,)):
                if _strided(tensor):
                    self.makers[_ptr(tensor)] = _Made()  # changed in place: the maker is stale
        outs = [t for t in _aten_leaves((out,)) if _strided(t)]
        if not outs:
            return
        inputs = {_ptr(t) for t in _aten_leaves(args, kwargs) if _strided(t)}
        fresh = [(t, ptr) for t in outs if (ptr := _ptr(t)) not in inputs]
        if not fresh:
            return  # a view, an in-place op, or no tensor
        call = None
        if len(fresh) == 1 and out is fresh[0][0] and cheap_op(func) and _whole(out):
            call = _OpCall(
                func,
                _aten_map(self._arg, args),
                {k: _aten_map(self._arg, (v,))[0] for k, v in kwargs.items()},
                geometry=geometry(out),
                nbytes=out.untyped_storage().nbytes(),
                dtype=out.dtype,
            )
        for _tensor, ptr in fresh:
            self.makers[ptr] = call if call is not None else _Made()

    def _arg(self, leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if not _strided(leaf):
            return _Made()  # an argument rebuild cannot stand in for: the call is not rerun
        ptr = _ptr(leaf)
        maker = self.makers.get(ptr)
        base = leaf if leaf._base is None else leaf._base
        constant = maker is None and leaf.numel() <= CONSTANT_NUMEL and not leaf.requires_grad
        if isinstance(base, nn.Parameter):
            return _Arg(ptr, geometry(leaf), leaf.dtype, maker, leaf, leaf._version)
        return _Arg(ptr, geometry(leaf), leaf.dtype, maker, leaf.clone() if constant else None)

    def recipe(
        self,
        ptr: int,
        base: torch.Tensor,
        handles: dict[int, list[_Handle]],
        bases: dict[int, torch.Tensor],
    ) -> _Recipe | None:
        """How to rebuild ``ptr`` by rerunning the cheap ops that made it, or ``None``
        (``handles`` and ``bases``: the block's saved storages)."""
        call = self.makers.get(ptr)
        if not isinstance(call, _OpCall) or call.dtype != base.dtype:
            return None
        # storages the chain reads that stay saved, with what made them (an intermediate the
        # chain reruns may have had the same address before it was freed)
        saved: dict[int, tuple[torch.Tensor, Any]] = {}
        state: list[tuple[torch.Tensor, int]] = []  # parameters read, at the version read
        pending, seen = [call], 0
        while pending:
            current = pending.pop()
            seen += 1
            if seen > MAX_CHAIN:
                return None
            for arg in _aten_leaves(current.args, current.kwargs, _Leaf):
                if isinstance(arg, _Made):
                    return None
                if not isinstance(arg, _Arg):
                    continue
                if arg.tensor is not None:
                    if arg.version is not None:
                        state.append((arg.tensor, arg.version))
                    continue
                if arg.ptr in handles and self.makers.get(arg.ptr) is arg.maker:
                    if bases[arg.ptr].dtype != arg.dtype:
                        return None
                    saved[arg.ptr] = (bases[arg.ptr], arg.maker)  # kept, or rebuilt
                elif isinstance(arg.maker, _OpCall):
                    pending.append(arg.maker)  # not saved: rerun what made it too
                else:
                    return None  # made before the block or by an op that cannot rerun

        def made(sources: dict[int, _Source]) -> tuple[Callable[[], torch.Tensor], Any]:
            table = {
                p: (sources.get(p), None if p in sources else tensor, maker)
                for p, (tensor, maker) in saved.items()
            }
            device = base.device.type
            # the ops as dispatched, after autocast: rerun without it
            recipe = _OpRecipe(call, table, geometry(base), self.readers)
            return recipe, (device, False, torch.get_autocast_dtype(device))

        return _Recipe(
            label=f"{call.func._schema.name.removeprefix('aten::')} chain",
            inputs=[tensor for tensor, _maker in saved.values()],
            shaped=base,
            state=tuple(state),
            made=made,
        )
