"""One block's forward under ``rebuild``: its saved tensors held by handles, and the storages
that can be rebuilt from what stays saved dropped when the forward ends."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    _global_forward_hooks_with_kwargs,
    register_module_forward_hook,
)
from torch.utils._pytree import tree_leaves

from memfit.measuring.trace import bookkeeping
from memfit.runtime.rebuild.handles import (
    _Handle,
    _ptr,
    _Recipe,
    _Source,
    _strided,
    _unpack,
    geometry,
)
from memfit.runtime.rebuild.masks import pack_two_valued
from memfit.runtime.rebuild.modules import _Call, _rerunnable, module_recipe, node_recipe
from memfit.runtime.rebuild.op_recorder import _OpMakers, _OpRecorder


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node made on this thread will get."""
    with torch.enable_grad(), bookkeeping():
        return int((torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()) + 1  # type: ignore[union-attr]


class _BlockSaves:
    """What one forward of one block under ``rebuild`` saves: every saved tensor is held by a
    handle, and when the forward ends, the storages that can be rebuilt from what stays saved
    are dropped."""

    def __init__(self, linear: bool = False, inputs: Any = None, ops: bool = False) -> None:
        self.linear = linear  # also rebuild nn.Linear outputs (one matmul each)
        self.ops = ops  # also rebuild chains of cheap aten ops (recorded by _OpRecorder)
        self.thread = threading.get_ident()  # the global module hook ignores other threads
        self.first_node = _next_sequence_nr()  # autograd nodes made before are not the block's
        # storages of the block's arguments: made (and kept alive) outside, never dropped
        self.inputs = {_ptr(t) for t in tree_leaves(inputs) if _strided(t)}
        self.handles: dict[int, list[_Handle]] = {}  # storage -> the handles that save it
        self.bases: dict[int, torch.Tensor] = {}  # storage -> the tensor owning it
        self.calls: dict[int, _Call] = {}  # output storage of a pure module call -> the call
        self.dropped: dict[str, int] = {}  # label -> bytes freed
        self.outputs: Any = None  # what the block returned: never dropped
        self.op_makers = _OpMakers(self.thread)  # what made each storage (with ``ops``)

    def module_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad and _strided(output)):
            return
        if threading.get_ident() != self.thread or not _rerunnable(module, self.linear):
            return
        device = output.device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        state = tuple((t, t._version) for t in (*module.parameters(), *module.buffers()))
        self.calls[_ptr(output)] = _Call(
            module, args, dict(kwargs), output, output._version, state, autocast
        )

    def pack(self, tensor: torch.Tensor) -> Any:
        if not _strided(tensor):  # sparse, meta, tensor subclasses: saved as they are
            return tensor
        handle = _Handle(tensor)
        ptr = _ptr(tensor)
        self.handles.setdefault(ptr, []).append(handle)
        self.bases.setdefault(ptr, tensor if tensor._base is None else tensor._base)
        return handle

    def finish(self) -> None:
        """Decide, now that every saved tensor of the block is known, what to drop."""
        outputs = {_ptr(t) for t in tree_leaves(self.outputs) if _strided(t)}
        keep = outputs | self.inputs
        recipes: dict[int, _Recipe] = {}
        for ptr, base in self.bases.items():
            if ptr in keep or not all(h.plain() for h in self.handles[ptr]):
                continue  # returned, passed in, or changed in place since it was saved
            recipe = self._recipe(ptr, base)
            if recipe is not None and self._usable(recipe):
                recipes[ptr] = recipe
        sources = {
            ptr: _Source(
                recipe.label, geometry(recipe.shaped), recipe.shaped.untyped_storage().nbytes()
            )
            for ptr, recipe in recipes.items()
        }
        for ptr, recipe in recipes.items():
            source = sources[ptr]
            kept = [t for t in recipe.inputs if _ptr(t) not in sources]
            source.checks = (*((t, t._version) for t in kept), *recipe.state)
            source.make, source.autocast = recipe.made(sources)
        del recipes
        packed = pack_two_valued(self.bases, self.handles, keep, sources)
        for ptr, source in sources.items():
            freed = source.nbytes - packed.get(ptr, 0)
            self.dropped[source.label] = self.dropped.get(source.label, 0) + freed
            for handle in self.handles[ptr]:
                handle.drop(source)
        self.handles.clear()
        self.bases.clear()
        self.calls.clear()
        self.op_makers.makers.clear()
        self.outputs = None

    def _usable(self, recipe: _Recipe) -> bool:
        """Every tensor the recipe reads is saved in this block unchanged (kept, or rebuilt in
        turn) or is a parameter, and every saved view of the storage has the recipe's dtype."""
        for tensor in recipe.inputs:
            if isinstance(tensor, nn.Parameter):
                continue
            handles = self.handles.get(_ptr(tensor))
            if not handles or not all(h.plain() for h in handles):
                return False
        return all(h.dtype == recipe.shaped.dtype for h in self.handles[_ptr(recipe.shaped)])

    def _recipe(self, ptr: int, base: torch.Tensor) -> _Recipe | None:
        recipe = node_recipe(base, self.first_node)
        if recipe is not None:
            return recipe
        call = self.calls.get(ptr)
        if self.ops:
            # the ops that made it, from what stays saved, rather than the whole module again:
            # a Python-arithmetic GELU's output is one mul of two saved (rebuilt) storages,
            # whose rerun as a module would recompute all 8 ops a second time (GPT-2: +2.3 ms a
            # block; benchmarks/results/design-figures.md, "Op-chain rebuild costs")
            recipe = self.op_makers.recipe(ptr, base, self.handles, self.bases)
            if recipe is not None:
                return recipe
        if call is None or call.output._version != call.version:
            # no pure module made it (or it was changed in place after): the ops that did
            if self.ops:
                return None
            return self.op_makers.recipe(ptr, base, self.handles, self.bases)
        return module_recipe(call)


_logs: list[list[dict[str, int]]] = []


@contextmanager
def recording() -> Iterator[list[dict[str, int]]]:
    """Collect, for every forward run under ``rebuild`` meanwhile (in call order), the bytes it
    did not save: label (``gelu``, ``LayerNorm``, ``masks as bool``) -> bytes freed."""
    log: list[dict[str, int]] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


@contextmanager
def rebuilding(
    linear: bool = False, inputs: Any = None, ops: bool = False
) -> Iterator[_BlockSaves]:
    """Run a forward under ``rebuild`` (``linear``: ``rebuild+linear``). ``inputs``: the block's
    arguments, never dropped (made outside, they would stay alive anyway); set ``.outputs`` of
    the yielded state to what the block returns, for the same reason."""
    state = _BlockSaves(linear, inputs, ops)
    hook = register_module_forward_hook(state.module_hook, with_kwargs=True)
    recorder = _OpRecorder(state.op_makers) if ops else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(state.pack, _unpack), recorder:
            yield state
    finally:
        hook.remove()
        # torch 2.13's handle forgets the with_kwargs flag it set: left behind, it made every
        # later torch.compile(module) call warn about global hooks (one entry per rebuilt block)
        _global_forward_hooks_with_kwargs.pop(hook.id, None)
    state.finish()  # only when the forward succeeded: on an error everything stays saved
    for log in _logs:
        log.append(dict(state.dropped))
