"""What offload could move, measured: the saved activations per block and the copy bandwidth.

The planner's ``offload`` costs (:mod:`memfit.planning.offload`) derive from a kept block's
costs plus two measured figures: the bytes of the tensors the block's forward saves that the
runtime would move (:func:`saved_activation_bytes`, with the runtime's own filter
:func:`offloadable`) and the host-device copy bandwidth (:func:`host_bandwidth`). Both are
measured on CUDA only: a CPU model has no device memory to move out of.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit.measuring.chain import split_main
from memfit.measuring.step import storage_key

MIN_OFFLOAD_BYTES = 1 << 16  # smaller tensors stay on the device: copying them costs more


def offloadable(tensor: torch.Tensor) -> bool:
    """Whether a saved tensor is an activation worth moving: not a parameter, a leaf that
    wants its gradient, a tensor subclass (FSDP2's ``DTensor``, fake tensors), a sparse or
    nested tensor (no plain storage), a lazy conjugate or negative view (the view rebuilt on
    the storage that comes back would lose the bit), a tensor whose storage is below
    :data:`MIN_OFFLOAD_BYTES`, nor a broadcast (stride-0) view."""
    if isinstance(tensor, nn.Parameter) or type(tensor) is not torch.Tensor:
        return False
    if tensor.layout != torch.strided or tensor.is_nested or tensor.is_conj() or tensor.is_neg():
        return False
    if tensor.is_leaf and tensor.requires_grad:
        return False
    if tensor.device.type == "meta" or tensor.untyped_storage().nbytes() < MIN_OFFLOAD_BYTES:
        return False
    pairs = zip(tensor.shape, tensor.stride(), strict=True)
    return all(stride != 0 or size == 1 for size, stride in pairs)


def storage_keys(tensors: Iterable[torch.Tensor]) -> frozenset[int]:
    """Storage keys (:func:`~memfit.measuring.step.storage_key`) of ``tensors`` (parameters and
    buffers stay put)."""
    return frozenset(storage_key(t) for t in tensors if t.device.type != "meta")


def module_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    """A module's parameters and buffers."""
    yield from module.parameters()
    yield from module.buffers()


@dataclass(frozen=True, kw_only=True, slots=True)
class SavedActivations:
    """What offload would move and free, per block stage (see :func:`saved_activations`).

    Attributes:
        offload_bytes: stage -> bytes the ``offload`` option moves and frees.
        inputs_stay: stages whose main input stays on the device if a segment starting there
            offloads it: something else saves it too, or the runtime would not move it.
    """

    offload_bytes: dict[int, int]
    inputs_stay: frozenset[int]


def saved_activation_bytes(
    blocks: dict[int, nn.Module], forward: Callable[[], Any]
) -> dict[int, int]:
    """Per block stage, the bytes :func:`saved_activations` finds the ``offload`` option
    moves and frees."""
    return saved_activations(blocks, forward).offload_bytes


def saved_activations(blocks: dict[int, nn.Module], forward: Callable[[], Any]) -> SavedActivations:
    """Per block stage, bytes of the distinct storages its forward saves for backward that the
    runtime's ``offload`` would move *and free*: :func:`offloadable` ones, not its parameters'
    or buffers', nor its output's (the next block holds that one on the device), nor any that
    the forward saves outside the block too (e.g. its input when the block before saves its
    own output, as a final ``tanh`` does: that storage stays on the device for the other);
    and the blocks whose input stays on the device that way.

    Args:
        blocks: stage index -> block module.
        forward: runs the model's forward with gradients (the graph is dropped after).
    """
    current: list[int] = []
    sizes: dict[int, int] = {}  # storage -> bytes
    savers: dict[int, set[int | None]] = {}  # storage -> blocks that save it (None: no block)
    inputs: dict[int, int | None] = {}  # block -> its input's storage (None: not moved)
    outputs: dict[int, int] = {}  # block -> its output's storage
    keep: dict[int, frozenset[int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if offloadable(tensor):
            index = current[-1] if current else None
            key = storage_key(tensor)
            if index is None or key not in keep[index]:
                sizes[key] = tensor.untyped_storage().nbytes()
                savers.setdefault(key, set()).add(index)
        return tensor

    def enter(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            keep[index] = storage_keys(module_tensors(module))
            current.append(index)
            main = split_main(args, kwargs)[0]
            moved = isinstance(main, torch.Tensor) and offloadable(main)
            inputs[index] = storage_key(main) if moved else None

        return hook

    def leave(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            current.pop()
            main = output if isinstance(output, torch.Tensor) else None
            if main is None and isinstance(output, tuple | list) and output:
                main = output[0] if isinstance(output[0], torch.Tensor) else None
            if main is not None:
                outputs[index] = storage_key(main)

        return hook

    handles = []
    try:
        for index, block in blocks.items():
            handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
            handles.append(block.register_forward_hook(leave(index)))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
    finally:
        for handle in handles:
            handle.remove()
    moved = dict.fromkeys(blocks, 0)
    for storage, owners in savers.items():
        owner = next(iter(owners)) if len(owners) == 1 else None
        if owner is not None and outputs.get(owner) != storage:
            moved[owner] += sizes[storage]
    stay = set()
    for index, held in inputs.items():
        if held is None or savers.get(held, set()) - {index}:
            stay.add(index)
    return SavedActivations(offload_bytes=moved, inputs_stay=frozenset(stay))


def host_bandwidth(device: torch.device, nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes per second of pinned host-device copies on ``device``: the slower direction's
    median over ``repeats`` copies of ``nbytes``."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for copy in (
        lambda: dev.copy_(host, non_blocking=True),
        lambda: host.copy_(dev, non_blocking=True),
    ):
        copy()
        torch.cuda.synchronize(device)
        seconds = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            copy()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        rates.append(nbytes / statistics.median(seconds))
    return min(rates)


def available_host_bytes() -> int:
    """Host memory available now (Linux: ``MemAvailable``; elsewhere free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
