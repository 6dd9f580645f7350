"""Handles for the tensors a ``rebuild`` block saves, the sources that rebuild dropped
storages, and the per-storage recipe the block forward decides with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit.measuring.step import storage_key
from memfit.measuring.trace import rerunning


def _ptr(tensor: torch.Tensor) -> int:
    """The key of the storage behind ``tensor`` (:func:`~memfit.measuring.step.storage_key`)."""
    return storage_key(tensor)


def _strided(tensor: Any) -> bool:
    """A plain (or parameter) strided tensor with a storage of its own kind: what rebuild handles."""
    return (
        isinstance(tensor, torch.Tensor)
        and type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.layout == torch.strided
        and tensor.device.type != "meta"
    )


Geometry = tuple[tuple[int, ...], tuple[int, ...], int]


def geometry(tensor: torch.Tensor) -> Geometry:
    """The view a saved tensor takes of its storage: shape, stride, offset."""
    return (tuple(tensor.shape), tensor.stride(), int(tensor.storage_offset()))


def unchanged_view(tensor: torch.Tensor | None, version: int) -> bool:
    """Whether a saved tensor is still a plain strided view of its storage, unchanged since its
    ``_version`` was ``version`` (saved-tensor hooks switch autograd's own check off)."""
    return (
        tensor is not None
        and tensor._version == version
        and not tensor.is_conj()
        and not tensor.is_neg()
    )


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
        if geometry(value) != self.geometry or value.untyped_storage().nbytes() != self.nbytes:
            raise RuntimeError(
                f"memfit rebuild: the rebuilt {self.label} output has layout {geometry(value)} "
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
        self.view = geometry(tensor)
        self.dtype = tensor.dtype
        self.version = tensor._version  # autograd skips its own check when hooks are set

    def plain(self) -> bool:
        """Whether the saved tensor is a plain strided view of its storage, unchanged since."""
        return unchanged_view(self.tensor, self.version)

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


def _unpack(packed: Any) -> torch.Tensor:
    return packed.unpack() if isinstance(packed, _Handle) else packed


@dataclass(slots=True)
class _Recipe:
    """How one storage would be rebuilt: ``made(sources)`` gives ``(make, autocast)``."""

    label: str
    inputs: list[torch.Tensor]  # what a rebuild reads: must stay saved (or be rebuilt in turn)
    shaped: torch.Tensor  # the tensor make() returns again (its layout on the storage)
    state: tuple[tuple[torch.Tensor, int], ...]  # module parameters/buffers and their versions
    made: Callable[[dict[int, _Source]], tuple[Callable[[], torch.Tensor], Any]]
