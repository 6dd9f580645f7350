"""The ``rebuild`` options: selective recompute at unpack time, without a checkpoint.

Many tensors autograd saves are cheap, deterministic functions of *other* tensors it saves
anyway: a GELU's output (the next matmul saves it) is a function of the GELU's input (the GELU
saves that), a LayerNorm's output of the LayerNorm's input. ``rebuild`` runs the block as it is,
under ``saved_tensors_hooks`` that hold every saved tensor in a handle. When the block's forward
ends, every saved storage that can be rebuilt from what stays saved is dropped, and backward
rebuilds it with the very same op on the very same inputs when it unpacks it (once: handles of
one storage share its rebuilt value). Unlike a checkpoint nothing else reruns: no dropout (no RNG
replay), no dispatch mode, no second pass of Python over the block.

What can be rebuilt (recipes):

* the outputs of autograd nodes that keep their own input: ``GeluBackward0``,
  ``SiluBackward0``, ``MishBackward0`` (``F.gelu``/``F.silu``/``F.mish`` anywhere in the block);
* the output of a pure module, rerun with the same arguments: torch's ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, ``GELU``, ``SiLU``, ``Mish``, and Hugging Face's norm and
  activation classes (``*LayerNorm``, ``*RMSNorm``, ``*GELUActivation``, ...); with
  ``rebuild+linear`` also ``nn.Linear`` and Hugging Face's ``Conv1D`` (one matmul each);
* the output of a chain of cheap ops, found from the aten ops the block ran (a dispatch mode
  records which op made each storage): pointwise ops (``torch.Tag.pointwise``: GPT-2's
  tanh-GELU written as Python arithmetic, SwiGLU's product, rotary multiplications, residual
  adds, mask arithmetic) and casts, concatenations, copies, means and sums, never random ops,
  rerun from storages the block keeps saved, parameters (autocast's weight copies) and small
  constants (wrapped Python scalars, copied); intermediate results nobody saved are rerun too
  (at most ``MAX_CHAIN`` ops). A storage written in place gets a new maker, so a chain never
  reruns an op on an argument's later value;
* a CPU tensor holding only zeros and one other value, with no autograd history (a dropout mask:
  on CPU a float tensor the size of the activation; CUDA's are bool already): kept as a bool mask
  and the value, a quarter of the bytes or less, checked bit for bit before it is dropped.

A storage is dropped only when every tensor its recipe reads is saved in the block too (kept, or
dropped and rebuilt in turn: LayerNorm -> Linear -> GELU chains rebuild in order) or is a
parameter, and never when the block returns it. Deciding at the end of the forward, with every
saved tensor known, is what makes chains safe; the price is that dropped tensors live until the
block's forward ends. The rebuilt tensor is bit-identical: the same kernel on the same values,
under the autocast state of the forward. Inputs changed in place after the forward are detected
(version counters) and raise, as autograd does.

``rebuild`` runs only at the top level of a plan (not inside recompute segments): hooks inside
a checkpointed function would replace the checkpoint's own and silently save everything.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils.parametrize
from torch import nn
from torch.nn.modules.module import (
    _global_forward_hooks_with_kwargs,
    register_module_forward_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from memfit.measuring.ops import written_arguments
from memfit.measuring.trace import bookkeeping, rerunning
from memfit.runtime.options import Forward, OptionKind, StageWrapper, register_option

REBUILD = "rebuild"
REBUILD_LINEAR = "rebuild+linear"
REBUILD_OPS = "rebuild+ops"

# autograd node type -> the op that made the node's output, rebuilt from the node's saved input
NODE_RECIPES: dict[str, Callable[[Any], torch.Tensor]] = {
    "GeluBackward0": lambda node: torch.ops.aten.gelu.default(
        node._saved_self, approximate=node._saved_approximate
    ),
    "SiluBackward0": lambda node: torch.ops.aten.silu.default(node._saved_self),
    "MishBackward0": lambda node: torch.ops.aten.mish.default(node._saved_self),
}

PURE_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)
# Hugging Face norm and activation classes: deterministic functions of input and parameters.
_HF_PURE_SUFFIXES = ("LayerNorm", "RMSNorm", "GELUActivation", "SiLUActivation", "GELUTanh")


def pure_module(module: nn.Module) -> bool:
    """Whether ``rebuild`` may rerun ``module`` to rebuild its output (deterministic, no RNG,
    no side effects)."""
    cls = type(module)
    return cls in PURE_MODULES or (
        cls.__module__.startswith("transformers.") and cls.__name__.endswith(_HF_PURE_SUFFIXES)
    )


def linear_module(module: nn.Module) -> bool:
    """Whether ``rebuild+linear`` may rerun ``module``: ``nn.Linear`` and Hugging Face's
    ``Conv1D`` (GPT-2's linear layers: one ``addmm``), exactly these classes."""
    cls = type(module)
    return cls is nn.Linear or (
        cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"
    )


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _strided(tensor: Any) -> bool:
    """A plain (or parameter) strided tensor with a storage of its own kind: what rebuild handles."""
    return (
        isinstance(tensor, torch.Tensor)
        and type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.layout == torch.strided
        and tensor.device.type != "meta"
    )


def _next_sequence_nr() -> int:
    """The sequence number the next autograd node made on this thread will get."""
    with torch.enable_grad(), bookkeeping():
        return int((torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()) + 1  # type: ignore[union-attr]


def _rerunnable(module: nn.Module, linear: bool) -> bool:
    """Whether rerunning ``module.forward`` gives its output again: a pure module of a known
    class (exactly, not a subclass), without hooks or parametrizations whose effects a bare
    ``forward`` would skip or repeat."""
    if not (pure_module(module) or (linear and linear_module(module))):
        return False
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or torch.nn.utils.parametrize.is_parametrized(module)
    )


Geometry = tuple[tuple[int, ...], tuple[int, ...], int]


def _geometry(tensor: torch.Tensor) -> Geometry:
    return (tuple(tensor.shape), tensor.stride(), int(tensor.storage_offset()))


class _Source:
    """One storage autograd saved and ``rebuild`` dropped: how to rebuild it (at most once per
    backward: the value is cached while anything that may still unpack it is alive)."""

    __slots__ = ("autocast", "cached", "checks", "geometry", "label", "make", "nbytes")

    def __init__(self, label: str, geometry: Geometry, nbytes: int) -> None:
        self.label = label  # what it rebuilds: the op (gelu) or the module class (LayerNorm)
        self.geometry = geometry  # of the tensor make() returns, on its storage
        self.nbytes = nbytes
        self.make: Callable[[], torch.Tensor] = _unset
        self.checks: tuple[tuple[torch.Tensor, int], ...] = ()  # (kept input, its version)
        self.autocast: tuple[str, bool, torch.dtype] | None = None  # (device, enabled, dtype)
        self.cached: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        if self.cached is not None:
            return self.cached
        for tensor, version in self.checks:
            if tensor._version != version:
                raise RuntimeError(
                    "memfit rebuild: a tensor needed to rebuild a saved activation was modified "
                    f"in place after the forward (version {version} -> {tensor._version}); "
                    "plan this stage without 'rebuild' or avoid the in-place change"
                )
        if self.autocast is None:
            with rerunning():
                value = self.make()
        else:
            device, enabled, dtype = self.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled), rerunning():
                value = self.make()
        if _geometry(value) != self.geometry or value.untyped_storage().nbytes() != self.nbytes:
            raise RuntimeError(
                f"memfit rebuild: the rebuilt {self.label} output has layout {_geometry(value)} "
                f"on {value.untyped_storage().nbytes()} bytes, the saved one had "
                f"{self.geometry} on {self.nbytes}; plan this stage without 'rebuild'"
            )
        self.cached = value
        return value


def _unset() -> torch.Tensor:
    raise AssertionError("a rebuild source was used before the block's forward ended")


class _Handle:
    """A saved tensor, or where to rebuild it from: what autograd keeps for each saved tensor
    (the tensor until the block's forward ends, then the tensor or its storage's source), and
    what a module recipe keeps for each tensor argument."""

    __slots__ = ("dtype", "source", "tensor", "version", "view")

    def __init__(self, tensor: torch.Tensor, source: _Source | None = None) -> None:
        self.tensor: torch.Tensor | None = tensor if source is None else None
        self.source = source
        self.view = _geometry(tensor)
        self.dtype = tensor.dtype
        self.version = tensor._version  # autograd skips its own check when hooks are set

    def plain(self) -> bool:
        """Whether the saved tensor is a plain strided view of its storage, unchanged since."""
        tensor = self.tensor
        return (
            tensor is not None
            and tensor._version == self.version
            and not tensor.is_conj()
            and not tensor.is_neg()
        )

    def drop(self, source: _Source) -> None:
        self.tensor, self.source = None, source

    def unpack(self) -> torch.Tensor:
        if self.source is None:
            assert self.tensor is not None
            if self.tensor._version != self.version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by "
                    f"an inplace operation: a tensor of shape {tuple(self.tensor.shape)} saved "
                    f"under memfit's rebuild is at version {self.tensor._version}; expected "
                    f"version {self.version}"
                )
            return self.tensor
        return self.source.value().as_strided(*self.view)


@dataclass(slots=True)
class _Plan:
    """How one storage would be rebuilt: ``made(sources)`` gives ``(make, autocast)``."""

    label: str
    inputs: list[torch.Tensor]  # what a rebuild reads: must stay saved (or be rebuilt in turn)
    shaped: torch.Tensor  # the tensor make() returns again (its layout on the storage)
    state: tuple[tuple[torch.Tensor, int], ...]  # module parameters/buffers and their versions
    made: Callable[[dict[int, _Source]], tuple[Callable[[], torch.Tensor], Any]]


@dataclass(slots=True)
class _Call:
    """A pure module's call seen during the block's forward (its output is alive meanwhile)."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    version: int  # of the output when the module returned it
    state: tuple[tuple[torch.Tensor, int], ...]  # the module's parameters and buffers, versions
    autocast: tuple[str, bool, torch.dtype]


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
MAX_CHAIN = 32  # ops rerun to rebuild one storage (GPT-2's tanh GELU: 8)
CONSTANT_NUMEL = 64  # tensors up to this size made outside dispatch (wrapped scalars): copied


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


def _whole(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers its whole storage."""
    return tensor.untyped_storage().nbytes() == tensor.nbytes


class _OpRecorder(TorchDispatchMode):
    """Records, during a block's forward under ``rebuild``, which op made each storage."""

    def __init__(self, state: _BlockForward) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.state.record_op(func, args, kwargs, out)
        return out


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
    if not isinstance(out, torch.Tensor) or _geometry(out) != call.geometry:
        raise RuntimeError(
            f"memfit rebuild: {call.func} gave another layout than in the forward; plan this "
            f"stage without 'rebuild'"
        )
    return out


@functools.cache
def _in_place(func: Any) -> Any:
    """The in-place overload of the pointwise aten op ``func`` (``mul.Tensor`` ->
    ``mul_.Tensor``), or ``None``: same kernel, same values, written into ``self``."""
    if torch.Tag.pointwise not in getattr(func, "tags", ()):
        return None
    packet = getattr(torch.ops.aten, func.overloadpacket.__name__ + "_", None)
    return getattr(packet, func._overloadname, None) if packet is not None else None


class _OpRecipe:
    """Rebuilds one storage by rerunning the chain of cheap ops that made it, from storages
    the block keeps saved (or rebuilds in turn), parameters and small constants.

    An op whose first argument is an intermediate this recipe has just made (nobody saved it,
    nothing else holds it) runs in place on it when its output has that argument's dtype and
    layout: GPT-2's tanh chain then allocates 2 tensors instead of 5, and fresh memory is what
    a rebuild pays most for on a CPU (the chain: 3.0 -> 1.9 ms warm at width 768)."""

    def __init__(
        self,
        call: _OpCall,
        saved: dict[int, tuple[_Source | None, torch.Tensor | None, Any]],
        geometry: Geometry,
    ) -> None:
        self.call = call
        # saved storage -> (its source when dropped, else its base tensor; what made it)
        self.saved = saved
        self.geometry = geometry  # of the saved base on the storage (a reshape's, say)

    def _saved(self, arg: _Arg) -> bool:
        """Whether ``arg`` is a saved storage, not a rerun intermediate that had its address."""
        entry = self.saved.get(arg.ptr)
        return entry is not None and entry[2] is arg.maker

    def resolve(self, arg: _Arg) -> torch.Tensor:
        if arg.tensor is not None:
            return arg.tensor
        if self._saved(arg):
            source, base, _maker = self.saved[arg.ptr]
            whole = source.value() if source is not None else base
            assert whole is not None
            return whole.as_strided(*arg.geometry)
        assert isinstance(arg.maker, _OpCall)  # checked when the recipe was made
        return self.evaluate(arg.maker).as_strided(*arg.geometry)

    def evaluate(self, call: _OpCall) -> torch.Tensor:
        first = call.args[0] if call.args else None
        func = _in_place(call.func)
        if (
            func is not None
            and isinstance(first, _Arg)
            and first.tensor is None
            and not self._saved(first)  # made by this recipe, just now
            and isinstance(first.maker, _OpCall)
            and first.maker.geometry == first.geometry == call.geometry
            and first.maker.nbytes == call.nbytes
            and first.dtype == call.dtype
        ):
            return _evaluate(call, self.resolve, func)
        return _evaluate(call, self.resolve)

    def __call__(self) -> torch.Tensor:
        # the op made the whole storage (checked when recorded): the saved base is a view of it
        return self.evaluate(self.call).as_strided(*self.geometry)


class _BlockForward:
    """One forward of one block under ``rebuild``: every saved tensor is held by a handle, and
    when the forward ends, the storages that can be rebuilt from what stays saved are dropped."""

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
        # storage -> what made it last during the forward (an _OpCall, or _Made)
        self.makers: dict[int, Any] = {}

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

    def record_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Note which op made each fresh storage (and that in-place writes made new ones).

        Runs for every aten op of the block's forward, so it walks aten's flat argument lists
        itself (:func:`_aten_leaves`) rather than through pytree: 2.6 -> 1.1 ms per GPT-2
        block forward (72 ops)."""
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
                geometry=_geometry(out),
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
            return _Arg(ptr, _geometry(leaf), leaf.dtype, maker, leaf, leaf._version)
        return _Arg(ptr, _geometry(leaf), leaf.dtype, maker, leaf.clone() if constant else None)

    def _op_plan(self, ptr: int, base: torch.Tensor) -> _Plan | None:
        """How to rebuild ``ptr`` by rerunning the cheap ops that made it, or ``None``."""
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
                if arg.ptr in self.handles and self.makers.get(arg.ptr) is arg.maker:
                    if self.bases[arg.ptr].dtype != arg.dtype:
                        return None
                    saved[arg.ptr] = (self.bases[arg.ptr], arg.maker)  # kept, or rebuilt
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
            recipe = _OpRecipe(call, table, _geometry(base))
            return recipe, (device, False, torch.get_autocast_dtype(device))

        return _Plan(
            label=f"{call.func._schema.name.removeprefix('aten::')} chain",
            inputs=[tensor for tensor, _maker in saved.values()],
            shaped=base,
            state=tuple(state),
            made=made,
        )

    def finish(self) -> None:
        """Decide, now that every saved tensor of the block is known, what to drop."""
        outputs = {_ptr(t) for t in tree_leaves(self.outputs) if _strided(t)}
        keep = outputs | self.inputs
        plans: dict[int, _Plan] = {}
        for ptr, base in self.bases.items():
            if ptr in keep or not all(h.plain() for h in self.handles[ptr]):
                continue  # returned, passed in, or changed in place since it was saved
            plan = self._plan(ptr, base)
            if plan is not None and self._usable(plan):
                plans[ptr] = plan
        sources = {
            ptr: _Source(plan.label, _geometry(plan.shaped), plan.shaped.untyped_storage().nbytes())
            for ptr, plan in plans.items()
        }
        for ptr, plan in plans.items():
            source = sources[ptr]
            kept = [t for t in plan.inputs if _ptr(t) not in sources]
            source.checks = (*((t, t._version) for t in kept), *plan.state)
            source.make, source.autocast = plan.made(sources)
        del plans
        packed = self._pack_two_valued(keep, sources)
        for ptr, source in sources.items():
            freed = source.nbytes - packed.get(ptr, 0)
            self.dropped[source.label] = self.dropped.get(source.label, 0) + freed
            for handle in self.handles[ptr]:
                handle.drop(source)
        self.handles.clear()
        self.bases.clear()
        self.calls.clear()
        self.makers.clear()
        self.outputs = None

    def _usable(self, plan: _Plan) -> bool:
        """Every tensor the recipe reads is saved in this block unchanged (kept, or rebuilt in
        turn) or is a parameter, and every saved view of the storage has the recipe's dtype."""
        for tensor in plan.inputs:
            if isinstance(tensor, nn.Parameter):
                continue
            handles = self.handles.get(_ptr(tensor))
            if not handles or not all(h.plain() for h in handles):
                return False
        return all(h.dtype == plan.shaped.dtype for h in self.handles[_ptr(plan.shaped)])

    def _plan(self, ptr: int, base: torch.Tensor) -> _Plan | None:
        node = base.grad_fn
        node_recipe = NODE_RECIPES.get(type(node).__name__) if node is not None else None
        # only nodes made in this block: reading an older node's input would unpack (and
        # maybe rebuild) a tensor saved by an earlier block
        if node_recipe is not None and node._sequence_nr() >= self.first_node:  # type: ignore[union-attr]
            device = base.device.type
            # the aten op the node recorded, on the input it received: no autocast around it
            off = (device, False, torch.get_autocast_dtype(device))
            make = functools.partial(node_recipe, node)
            # the node's input is unpacked through its own handle: kept, or rebuilt in turn
            return _Plan(
                label=type(node).__name__.removesuffix("Backward0").lower(),
                inputs=[node._saved_self],  # type: ignore[union-attr]
                shaped=base,
                state=(),
                made=lambda _sources: (make, off),
            )
        call = self.calls.get(ptr)
        if self.ops:
            # the ops that made it, from what stays saved, rather than the whole module again:
            # a Python-arithmetic GELU's output is one mul of two saved (rebuilt) storages,
            # whose rerun as a module recomputed all 8 ops a second time (GPT-2: +2.3 ms/block)
            plan = self._op_plan(ptr, base)
            if plan is not None:
                return plan
        if call is None or call.output._version != call.version:
            # no pure module made it (or it was changed in place after): the ops that did
            return None if self.ops else self._op_plan(ptr, base)
        found = call  # for the closure: a call whose output owns this storage

        def made(sources: dict[int, _Source]) -> tuple[Callable[[], torch.Tensor], Any]:
            def ref(leaf: Any) -> Any:
                if isinstance(leaf, torch.Tensor):
                    return _Handle(leaf, sources.get(_ptr(leaf)))
                return leaf

            args, kwargs = tree_map(ref, (found.args, found.kwargs))
            return functools.partial(_rerun, found.module, args, kwargs), found.autocast

        return _Plan(
            label=type(call.module).__name__,
            inputs=[
                t for t in tree_leaves((call.args, call.kwargs)) if isinstance(t, torch.Tensor)
            ],
            shaped=call.output,
            state=call.state,
            made=made,
        )

    def _pack_two_valued(self, keep: set[int], sources: dict[int, _Source]) -> dict[int, int]:
        """Tensors of zeros and one value (dropout masks) as bool masks; storage -> bytes kept."""
        kept_bytes: dict[int, int] = {}
        for ptr, base in self.bases.items():
            if ptr in keep or ptr in sources or base.grad_fn is not None:
                continue
            handles = self.handles[ptr]
            if not all(h.plain() and h.dtype == base.dtype for h in handles):
                continue
            if isinstance(base, nn.Parameter) or base.untyped_storage().nbytes() != base.nbytes:
                continue
            packed = two_valued(base)
            if packed is None:
                continue
            source = _Source(TWO_VALUED_LABEL, _geometry(base), base.untyped_storage().nbytes())
            source.make = packed.rebuild
            sources[ptr] = source
            kept_bytes[ptr] = packed.nonzero.numel() + packed.value.element_size()
        return kept_bytes


def _rerun(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The module's output again, from its arguments (``_Handle`` leaves resolved now)."""

    def resolve(leaf: Any) -> Any:
        return leaf.unpack() if isinstance(leaf, _Handle) else leaf

    resolved_args, resolved_kwargs = tree_map(resolve, (args, kwargs))
    # .forward, not __call__: the user's hooks saw this call once already
    out = module.forward(*resolved_args, **resolved_kwargs)
    assert isinstance(out, torch.Tensor)
    return out


def _unpack(packed: Any) -> torch.Tensor:
    return packed.unpack() if isinstance(packed, _Handle) else packed


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
TWO_VALUED_MIN_NUMEL = 4096  # below this the check costs more than it could save
TWO_VALUED_LABEL = "masks as bool"


@dataclass(slots=True)
class _TwoValued:
    """A tensor of zeros and one other value, as a bool mask and that value (bit for bit)."""

    nonzero: torch.Tensor
    value: torch.Tensor  # 0-dim, the tensor's dtype
    view: tuple[tuple[int, ...], tuple[int, ...], int]

    def rebuild(self) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.value.dtype, device=self.value.device)
        with bookkeeping():  # the mask as it was, checked bit for bit when it was packed
            base = torch.where(self.nonzero, self.value, zero)
        size, stride, offset = self.view
        return base.as_strided(size, stride, offset)


def two_valued(tensor: torch.Tensor) -> _TwoValued | None:
    """``tensor`` as a :class:`_TwoValued` when every element is bitwise +0 or one value.

    The check counts instead of comparing element-wise twice: ``ne``, ``eq`` and two counts
    (0.7 ms for a 4 x 4 x 256 x 256 mask on 2 cores, against 1.9 ms for the ``logical_or``,
    ``all`` form it replaced; ``all`` alone took 0.38 ms). It runs on every mask: skipping it
    for masks "known" from the ops that made them (``bernoulli_``, then a scalar scale) was
    tried and reviewed out, since writes the recorder cannot see (another thread, a NumPy
    view, a partial or overflowing scale, a view of another dtype) then went unchecked."""
    bits = _BITS.get(tensor.element_size())
    if (
        bits is None
        or tensor.device.type != "cpu"  # elsewhere masks are bool already, and checks would sync
        or not tensor.is_floating_point()
        or tensor.requires_grad
        or tensor.numel() < TWO_VALUED_MIN_NUMEL
        or tensor._base is not None
        or not tensor.is_contiguous()
        or tensor.storage_offset() != 0
    ):
        return None
    ints = tensor.view(bits).reshape(-1)
    head = ints[:256]
    head_nonzero = head != 0
    if bool(head_nonzero.any()):
        first = int(head_nonzero.to(torch.uint8).argmax())
        if not bool((head[head_nonzero] == head[first]).all()):
            return None  # most tensors are rejected here, at the price of 256 elements
        nonzero = ints != 0
    else:
        nonzero = ints != 0
        where = torch.nonzero(nonzero)  # rare: the first 256 elements are all zero
        first = int(where[0, 0]) if len(where) else 0
    value = ints[first]
    if bool(value != 0):
        count = torch.count_nonzero(nonzero)
        # every nonzero element equals the value: as many of those as nonzero ones
        if not bool(torch.count_nonzero(ints == value) == count):
            return None
    return _TwoValued(
        nonzero=nonzero.view(tensor.shape),
        value=tensor.reshape(-1)[first].clone(),
        view=(tuple(tensor.shape), tensor.stride(), 0),
    )


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
) -> Iterator[_BlockForward]:
    """Run a forward under ``rebuild`` (``linear``: ``rebuild+linear``). ``inputs``: the block's
    arguments, never dropped (made outside, they would stay alive anyway); set ``.outputs`` of
    the yielded state to what the block returns, for the same reason."""
    state = _BlockForward(linear, inputs, ops)
    hook = register_module_forward_hook(state.module_hook, with_kwargs=True)
    recorder = _OpRecorder(state) if ops else contextlib.nullcontext()
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


class Rebuilt:
    """A block's forward under ``rebuild`` (``linear``: ``rebuild+linear``); a plain object, so
    planned models pickle."""

    def __init__(self, forward: Forward, linear: bool, ops: bool = False) -> None:
        self.forward = forward
        self.linear = linear
        self.ops = ops

    # Saved-tensor hooks cannot live in a compiled region (torch.compile disables them while it
    # traces, and tracing these hooks recompiled until Dynamo's limit): a model compiled around
    # a plan runs a rebuilt stage eagerly, one graph break at its boundary.
    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        with rebuilding(self.linear, (args, kwargs), getattr(self, "ops", False)) as state:
            out = self.forward(*args, **kwargs)
            state.outputs = out
        return out


def _rebuild(option: str) -> StageWrapper:
    if option not in (REBUILD, REBUILD_LINEAR, REBUILD_OPS):
        raise ValueError(
            f"unknown option {option!r}; expected {REBUILD!r}, {REBUILD_LINEAR!r} or "
            f"{REBUILD_OPS!r}"
        )
    return functools.partial(Rebuilt, linear=option == REBUILD_LINEAR, ops=option == REBUILD_OPS)


register_option(OptionKind(prefix=REBUILD, form=REBUILD, recomputes=False, wrapper=_rebuild))
register_option(
    OptionKind(prefix=REBUILD_OPS, form=REBUILD_OPS, recomputes=False, wrapper=_rebuild)
)
register_option(
    OptionKind(prefix=REBUILD_LINEAR, form=REBUILD_LINEAR, recomputes=False, wrapper=_rebuild)
)
