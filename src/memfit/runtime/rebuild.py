"""The ``rebuild`` option: selective recompute at unpack time, without a checkpoint.

Many tensors autograd saves are cheap, deterministic functions of *other* tensors it saves
anyway: a GELU's output (the next matmul saves it) is a function of the GELU's input (the GELU
saves that), a LayerNorm's output of the LayerNorm's input. ``rebuild`` runs the block as it is,
under ``saved_tensors_hooks``: when autograd saves such an output whose inputs are saved already,
the hook keeps a recipe instead of the tensor, and backward rebuilds the tensor with the very
same op on the very same inputs when it unpacks it. So the tensor's memory is freed from forward
to backward at the price of one cheap op, and unlike a checkpoint nothing else reruns: no
matmuls, no dropout (no RNG replay), no dispatch mode, no second pass of Python.

What can be rebuilt (recipes):

* autograd nodes that keep their own input: ``GeluBackward0``, ``SiluBackward0``,
  ``MishBackward0`` (``F.gelu``/``F.silu``/``F.mish`` anywhere in the block);
* the output of a pure module, rerun with the same arguments: torch's ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, ``GELU``, ``SiLU``, ``Mish``, and Hugging Face's norm and
  activation classes (``*LayerNorm``, ``*RMSNorm``, ``*GELUActivation``, ...).

* a CPU tensor holding only zeros and one other value, with no autograd history (a dropout mask:
  on CPU a float tensor the size of the activation; CUDA's are bool already): kept as a bool mask
  and the value, a quarter of the bytes or less, checked bit for bit before it is dropped.

A recipe is used only when every tensor it needs is saved by autograd already in this block (or
is a parameter), so keeping it costs nothing. The rebuilt tensor is bit-identical: the same
kernel on the same values, under the autocast state of the forward. Inputs changed in place
after the forward are detected (version counters) and raise, as autograd does.

``rebuild`` runs only at the top level of a plan (not inside recompute segments): hooks inside
a checkpointed function would replace the checkpoint's own and silently save everything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.utils._pytree import tree_leaves

from memfit.runtime.options import Forward, OptionKind, StageWrapper, register_option

REBUILD = "rebuild"

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
    return isinstance(module, PURE_MODULES) or (
        cls.__module__.startswith("transformers.") and cls.__name__.endswith(_HF_PURE_SUFFIXES)
    )


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@dataclass(slots=True)
class _Recipe:
    """How to rebuild one saved tensor: ``make()`` rebuilds its base, then the same view."""

    label: str  # what it rebuilds: the op (gelu) or the module class (LayerNorm)
    make: Callable[[], torch.Tensor]
    inputs: tuple[tuple[torch.Tensor, int], ...]  # (tensor, version at save time)
    base_geometry: tuple[tuple[int, ...], tuple[int, ...]]
    view: tuple[tuple[int, ...], tuple[int, ...], int]
    autocast: tuple[str, bool, torch.dtype]  # (device type, enabled, dtype) to rebuild under

    def rebuild(self) -> torch.Tensor:
        for tensor, version in self.inputs:
            if tensor._version != version:
                raise RuntimeError(
                    "memfit rebuild: a tensor needed to rebuild a saved activation was modified "
                    f"in place after the forward (version {version} -> {tensor._version}); "
                    "plan this stage without 'rebuild' or avoid the in-place change"
                )
        device, enabled, dtype = self.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            base = self.make()
        if (tuple(base.shape), base.stride()) != self.base_geometry:
            raise RuntimeError(
                f"memfit rebuild: the rebuilt tensor has shape/strides {tuple(base.shape)}/"
                f"{base.stride()}, the saved one had {self.base_geometry}; plan this stage "
                "without 'rebuild'"
            )
        size, stride, offset = self.view
        return base.as_strided(size, stride, offset)


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
TWO_VALUED_MIN_NUMEL = 4096
TWO_VALUED_LABEL = "masks as bool"  # below this the check costs more than it could save


@dataclass(slots=True)
class _TwoValued:
    """A tensor of zeros and one other value, as a bool mask and that value (bit for bit)."""

    nonzero: torch.Tensor
    value: torch.Tensor  # 0-dim, the tensor's dtype
    view: tuple[tuple[int, ...], tuple[int, ...], int]

    def rebuild(self) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.value.dtype, device=self.value.device)
        base = torch.where(self.nonzero, self.value, zero)
        size, stride, offset = self.view
        return base.as_strided(size, stride, offset)


def two_valued(tensor: torch.Tensor) -> _TwoValued | None:
    """``tensor`` as a :class:`_TwoValued` when every element is bitwise +0 or one value."""
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
    early = bool(head_nonzero.any())
    if early:
        first = int(head_nonzero.to(torch.uint8).argmax())
        if not bool((head[head_nonzero] == head[first]).all()):
            return None  # most tensors are rejected here, at the price of 256 elements
    nonzero = ints != 0
    if not early:
        first = int(nonzero.to(torch.uint8).argmax())
    value = ints[first]
    if not bool(torch.logical_or(~nonzero, ints == value).all()):
        return None
    return _TwoValued(
        nonzero=nonzero.view(tensor.shape),
        value=tensor.reshape(-1)[first].clone(),
        view=(tuple(tensor.shape), tensor.stride(), 0),
    )


class _BlockForward:
    """The state of one forward of one block under ``rebuild``."""

    def __init__(self) -> None:
        self.dropped: dict[str, int] = {}  # what was not saved as it was: label -> bytes
        self.saved: set[int] = set()  # storages autograd saves as they are (alive to backward)
        # output node of a pure module call -> (module, args, kwargs), for this forward only
        self.calls: dict[Any, tuple[nn.Module, tuple[Any, ...], dict[str, Any]]] = {}

    def module_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None and pure_module(module):
            self.calls[output.grad_fn] = (module, args, dict(kwargs))

    def _available(self, tensors: list[torch.Tensor]) -> bool:
        return all(isinstance(t, nn.Parameter) or _ptr(t) in self.saved for t in tensors)

    def pack(self, tensor: torch.Tensor) -> Any:
        ptr = _ptr(tensor)
        if ptr in self.saved or tensor.device.type == "meta":
            return tensor
        base = tensor if tensor._base is None else tensor._base
        recipe = self._recipe(base, tensor)
        if recipe is not None:
            self._count(recipe.label, base.untyped_storage().nbytes())
            return recipe
        if tensor.grad_fn is None and not isinstance(tensor, nn.Parameter):
            packed = two_valued(tensor)
            if packed is not None:
                kept = packed.nonzero.numel() + packed.value.element_size()
                freed = tensor.untyped_storage().nbytes() - kept
                self._count(TWO_VALUED_LABEL, freed)
                return packed
        self.saved.add(ptr)
        return tensor

    def _count(self, label: str, nbytes: int) -> None:
        self.dropped[label] = self.dropped.get(label, 0) + nbytes

    def _recipe(self, base: torch.Tensor, tensor: torch.Tensor) -> _Recipe | None:
        node = base.grad_fn
        if node is None:
            return None
        make: Callable[[], torch.Tensor]
        device = base.device.type
        # node recipes call the aten op the node recorded, on the input it received: no autocast
        autocast = (device, False, torch.get_autocast_dtype(device))
        node_type = type(node).__name__
        node_recipe = NODE_RECIPES.get(node_type)
        if node_recipe is not None:
            inputs = [node._saved_self]  # type: ignore[attr-defined]  # saved by autograd
            make = functools.partial(node_recipe, node)
            label = node_type.removesuffix("Backward0").lower()
        elif node in self.calls:
            module, args, kwargs = self.calls[node]
            label = type(module).__name__
            inputs = [
                leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)
            ]
            make = functools.partial(_rerun, module, args, kwargs)
            # the module reruns its own ops: under the autocast state of the forward
            autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        else:
            return None
        if not self._available(inputs):
            return None
        return _Recipe(
            label=label,
            make=make,
            inputs=tuple((t, t._version) for t in inputs),
            base_geometry=(tuple(base.shape), base.stride()),
            view=(tuple(tensor.shape), tensor.stride(), int(tensor.storage_offset())),
            autocast=autocast,
        )


def _rerun(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    # .forward, not __call__: the user's hooks saw this call once already
    out = module.forward(*args, **kwargs)
    assert isinstance(out, torch.Tensor)
    return out


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    assert isinstance(packed, _Recipe | _TwoValued)
    return packed.rebuild()


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
def rebuilding() -> Iterator[_BlockForward]:
    """Run a forward under ``rebuild``: saved outputs of cheap ops become recipes."""
    state = _BlockForward()
    handle = register_module_forward_hook(state.module_hook, with_kwargs=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(state.pack, _unpack):
            yield state
    finally:
        handle.remove()
        state.calls.clear()
        for log in _logs:
            log.append(dict(state.dropped))


def _rebuild(option: str) -> StageWrapper:
    if option != REBUILD:
        raise ValueError(f"unknown option {option!r}; expected {REBUILD!r}")

    def wrap(forward: Forward) -> Forward:
        def rebuilt(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            with rebuilding():
                return forward(*args, **kwargs)

        return rebuilt

    return wrap


register_option(OptionKind(prefix=REBUILD, form=REBUILD, recomputes=False, wrapper=_rebuild))
