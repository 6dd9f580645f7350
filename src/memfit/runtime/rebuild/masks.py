"""Two-valued tensors (CPU dropout masks) kept as a bool mask and their one nonzero value."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memfit.measuring.trace import bookkeeping
from memfit.runtime.rebuild.handles import _Handle, _Source, geometry

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

    The check counts instead of comparing element-wise twice: ``ne``, ``eq`` and two counts,
    under half the time of a ``logical_or``, ``all`` form
    (``benchmarks/results/design-figures.md``, "Op-chain rebuild costs"). It runs on every
    mask, even one "known" from the ops that made it (``bernoulli_``, then a scalar scale):
    writes the recorder cannot see (another thread, a NumPy view, a partial or overflowing
    scale, a view of another dtype) would otherwise go unchecked."""
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


def pack_two_valued(
    bases: dict[int, torch.Tensor],
    handles: dict[int, list[_Handle]],
    keep: set[int],
    sources: dict[int, _Source],
) -> dict[int, int]:
    """Saved tensors of zeros and one value (dropout masks) as bool masks, added to
    ``sources`` (``bases``, ``handles``: the block's saved storages; ``keep``: storages never
    dropped); storage -> bytes kept."""
    kept_bytes: dict[int, int] = {}
    for ptr, base in bases.items():
        if ptr in keep or ptr in sources or base.grad_fn is not None:
            continue
        if not all(h.plain() and h.dtype == base.dtype for h in handles[ptr]):
            continue
        if isinstance(base, nn.Parameter) or base.untyped_storage().nbytes() != base.nbytes:
            continue
        packed = two_valued(base)
        if packed is None:
            continue
        source = _Source(TWO_VALUED_LABEL, geometry(base), base.untyped_storage().nbytes())
        source.make = packed.rebuild
        sources[ptr] = source
        kept_bytes[ptr] = packed.nonzero.numel() + packed.value.element_size()
    return kept_bytes
