"""The ``compress:*`` options: a block's saved activations stored in a narrower float format.

Lossy by design: opt-in with ``exact=False`` (:attr:`OptionKind.exact` is false), named in
``plan.inexact``, held by :func:`memfit.verify` to the plan's error budget instead of
``torch.equal``.

* ``compress:bf16``: each saved activation stored in ``bfloat16`` (8 bits of mantissa, float32's
  range), cast back to its dtype when backward unpacks it.
* ``compress:fp8``: stored in ``float8_e4m3fn`` with one float32 scale per row (the saved
  tensor's last dimension; per tensor where its storage is no contiguous grid of rows): each
  row divided by its largest magnitude over 448 (e4m3's largest finite value), multiplied back
  when unpacked.

How a block runs (:class:`Compressed`): its forward runs as it is under
``saved_tensors_hooks`` whose pack holds each saved tensor in a handle. Each saved *storage*
is narrowed once, when its first view is packed (the views autograd saves of one storage, as a
``q``/``k``/``v`` split or a transpose, share one compressed copy): the op that made it has just
written it, so the cast reads it from cache. When the forward ends, the handles take the narrow
copy and drop the original, unless the storage passes through unchanged, as it does when it is:

* not made by the block's graph: parameters and other leaves (alive anyway), and the storages of
  the block's arguments and of what it returns (the next block holds them);
* not a float, or already at or below the target's width (integer indices, bool masks, a
  ``bfloat16`` tensor under ``compress:bf16``);
* small (under :data:`MIN_NUMEL` elements: the scale and the call cost more than they save);
* changed in place since it was saved (backward then raises as autograd does), viewed with
  several dtypes, or holding a non-finite value (``compress:fp8``: a row's scale would be inf).

Float tensors that need no gradient (CPU dropout masks: zeros and one scale) are not rounded:
they are kept as a bool mask and their one value where they are exactly that
(:func:`memfit.runtime.rebuild.two_valued`, checked bit for bit), else as they are.

Backward decompresses a storage when it first unpacks it and keeps the value until autograd
drops the last handle of that storage, as a kept step holds the original until its last
reader's backward; the compressed copy goes at once. Handing the copies over at the end of
the forward (not at each pack) is what lets the block's outputs pass through (known only then)
and a storage changed after it was saved raise as autograd does; the block's forward peak is
therefore its kept forward's plus the copies. fp8's scales are one max and one min reduction,
and its decoding moves the bits into a float16 (:func:`fp8_halved`): torch's own float8 to
float32 cast runs element by element on CPU. A ``compress:*`` stage is a top-level option (hooks inside a checkpoint would take
the checkpoint's place; the planner keeps options out of recompute segments).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from memfit.measuring.step import storage_key
from memfit.runtime.options import Forward, OptionKind, StageWrapper, register_option
from memfit.runtime.rebuild.handles import geometry, unchanged_view
from memfit.runtime.rebuild.masks import two_valued

COMPRESS = "compress:"
BF16 = "compress:bf16"
FP8 = "compress:fp8"
FORMATS: dict[str, torch.dtype] = {BF16: torch.bfloat16, FP8: torch.float8_e4m3fn}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MIN_NUMEL = 4096  # below this a storage passes through
LOSSY_NOTE = "lossy: saved activations stored in {format}, not bit for bit"


def is_compress(option: str) -> bool:
    """Whether ``option`` names a ``compress:*`` option."""
    return option.startswith(COMPRESS)


def compress_format(option: str) -> torch.dtype:
    """The dtype ``option`` stores saved activations in.

    Raises:
        ValueError: not a known ``compress:`` option, listing them.
    """
    found = FORMATS.get(option)
    if found is None:
        raise ValueError(f"unknown compress option {option!r}; expected one of {sorted(FORMATS)}")
    return found


class _Stored:
    """One saved storage in the narrow format: ``value()`` is the whole storage again, as a
    flat tensor of its dtype, made once and held while any handle of it lives."""

    __slots__ = ("cached", "data", "dtype", "scale")

    def __init__(self, data: Any, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.data = data  # narrow tensor, or a two-valued mask
        self.scale = scale  # fp8: one float32 scale per row
        self.dtype = dtype
        self.cached: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        if self.cached is None:
            data = self.data
            if self.scale is not None:
                value = fp8_halved(data).mul_(self.scale * 256).to(self.dtype).reshape(-1)
            elif isinstance(data, torch.Tensor):
                value = data.to(self.dtype)
            else:
                value = data.rebuild()
            self.cached, self.data, self.scale = value, None, None
        return self.cached

    def nbytes(self) -> int:
        """Bytes held until backward unpacks it."""
        data = self.data
        if isinstance(data, torch.Tensor):
            scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
            return data.numel() * data.element_size() + scale
        return data.nonzero.numel() + data.value.element_size()


class _Handle:
    """What autograd keeps for one saved tensor: the tensor until the block's forward ends,
    then the tensor or its storage's :class:`_Stored`, with the view to take of it."""

    __slots__ = ("stored", "tensor", "version", "view")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor: torch.Tensor | None = tensor
        self.stored: _Stored | None = None
        self.view = geometry(tensor)
        self.version = tensor._version  # saved-tensor hooks switch autograd's own check off

    def unchanged(self) -> bool:
        return unchanged_view(self.tensor, self.version)

    def unpack(self) -> torch.Tensor:
        if self.stored is not None:
            return self.stored.value().as_strided(*self.view)
        tensor = self.tensor
        assert tensor is not None
        if tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: a tensor of shape {tuple(tensor.shape)} saved under "
                f"memfit's compress is at version {tensor._version}; expected version "
                f"{self.version}"
            )
        return tensor


def _unpack(packed: Any) -> torch.Tensor:
    return packed.unpack() if isinstance(packed, _Handle) else packed


def _plain(tensor: Any) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and tensor.device.type != "meta"
    )


def _whole(tensor: torch.Tensor) -> torch.Tensor | None:
    """The whole storage behind ``tensor`` as a flat tensor of its dtype (``None`` when the
    storage is no whole number of elements)."""
    storage = tensor.untyped_storage()
    size = tensor.element_size()
    if storage.nbytes() % size:
        return None
    flat = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return flat.set_(storage, 0, (storage.nbytes() // size,), (1,))


def _rows(tensor: torch.Tensor, numel: int) -> int:
    """Elements per fp8 scale: the saved tensor's last dimension when the storage is a
    contiguous grid of such rows, else all of it."""
    base = tensor if tensor._base is None else tensor._base
    last = base.shape[-1] if base.dim() else 1
    if base.is_contiguous() and base.numel() == numel and last > 0 and numel % last == 0:
        return int(last)
    return numel


def fp8_halved(data: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn`` values times 2**-8 as float32, exactly, for every finite code.

    torch's own ``float8_e4m3fn`` to float32 cast runs element by element on CPU (about 15x
    a memory copy); this moves the bits into a float16 instead (e4m3's 4 exponent and 3
    mantissa bits as the low exponent and top mantissa bits of float16's 5 and 10, which is
    the value times 2**-8, subnormals included) and casts that, both vectorised. The caller
    folds the 2**8 back into its scale. The two NaN codes come out finite: a storage with a
    non-finite value is never narrowed."""
    bits = data.view(torch.int8).to(torch.int16)  # sign-extended: bits 8-15 copy the sign
    bits <<= 7  # sign to bits 14 and 15, exponent to 10-13, mantissa to 7-9
    bits &= ~(1 << 14)  # bit 14 is the top exponent bit, 0 for every e4m3 value
    return bits.view(torch.float16).to(torch.float32)


def _row_peaks(rows: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude (NaN where a row has one), as float32: a max and a min
    reduction, each a vectorised pass (a norm of order inf runs several times slower)."""
    peak = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())
    return peak.to(torch.float32)


def _narrow(tensor: torch.Tensor, target: torch.dtype) -> _Stored | None:
    """``tensor``'s storage in ``target``; ``None`` where it passes through."""
    flat = _whole(tensor)
    if flat is None or flat.numel() < MIN_NUMEL:
        return None
    if target != torch.float8_e4m3fn:
        return _Stored(flat.to(target), None, flat.dtype)
    rows = flat.view(-1, _rows(tensor, flat.numel()))
    peak = _row_peaks(rows)
    if not bool(torch.isfinite(peak).all()):
        return None
    scale = torch.where(peak > 0, peak / FP8_MAX, torch.ones_like(peak))
    return _Stored((rows / scale).to(target), scale, flat.dtype)


class _BlockSaves:
    """One forward of one block under a ``compress:`` option."""

    def __init__(self, target: torch.dtype, inputs: Any) -> None:
        self.target = target
        self.width = torch.empty(0, dtype=target).element_size()
        self.inputs = {storage_key(t) for t in tree_leaves(inputs) if _plain(t)}
        self.handles: dict[int, list[_Handle]] = {}
        self.first: dict[int, torch.Tensor] = {}  # storage -> the first tensor saved of it
        self.narrowed: dict[int, _Stored | None] = {}  # storage -> its copy, made at first pack
        self.stored_bytes = 0  # what the compressed storages hold
        self.original_bytes = 0  # what they held before

    def pack(self, tensor: torch.Tensor) -> Any:
        if not (_plain(tensor) and tensor.is_floating_point()):
            return tensor  # integer indices, bool masks, tensor subclasses: as they are
        if tensor.element_size() <= self.width and tensor.requires_grad:
            return tensor  # already at or below the target's width
        if tensor.requires_grad and tensor.grad_fn is None:
            return tensor  # parameters and other leaves: alive anyway
        key = storage_key(tensor)
        if key in self.inputs:
            return tensor  # the block's argument: its caller holds it
        handle = _Handle(tensor)
        self.handles.setdefault(key, []).append(handle)
        if key not in self.first:
            self.first[key] = tensor
            # narrowed now, while the op that made it has just written it (in cache: several
            # times cheaper than at the end of the forward); used at the end only if the
            # storage is still unchanged and not returned
            self.narrowed[key] = self._store(tensor)
        return handle

    def finish(self, outputs: Any) -> None:
        """Hand each saved storage's narrow copy to its handles now that the forward has ended,
        unless the block returns the storage or it changed since it was saved."""
        keep = {storage_key(t) for t in tree_leaves(outputs) if _plain(t)}
        for key, handles in self.handles.items():
            tensor = self.first[key]
            stored = self.narrowed[key]
            if stored is None or key in keep or not all(h.unchanged() for h in handles):
                continue
            if any(h.tensor is not None and h.tensor.dtype != tensor.dtype for h in handles):
                continue
            self.stored_bytes += stored.nbytes()
            self.original_bytes += tensor.untyped_storage().nbytes()
            for handle in handles:
                handle.tensor, handle.stored = None, stored
        self.handles.clear()
        self.first.clear()
        self.narrowed.clear()

    def _store(self, tensor: torch.Tensor) -> _Stored | None:
        if tensor.requires_grad:
            return _narrow(tensor, self.target)
        mask = two_valued(tensor)  # no gradient: a mask is kept exactly, or not at all
        return None if mask is None else _Stored(mask, None, tensor.dtype)


_logs: list[list[tuple[int, int]]] = []


@contextmanager
def compress_log() -> Iterator[list[tuple[int, int]]]:
    """Collect, for every forward run under ``compress:*`` meanwhile (in call order), the bytes
    of the storages it compressed before and after: ``(original, stored)``."""
    log: list[tuple[int, int]] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


@contextmanager
def compressing(target: torch.dtype, inputs: Any = None) -> Iterator[_BlockSaves]:
    """Run a forward with its saved tensors held by handles; then call ``finish`` on the
    yielded state with what the block returned, which stores them in ``target``. ``inputs``
    (the block's arguments) and the returned tensors pass through."""
    state = _BlockSaves(target, inputs)
    with torch.autograd.graph.saved_tensors_hooks(state.pack, _unpack):
        yield state


class Compressed:
    """A block's forward under a ``compress:`` option; a plain object, so planned models
    pickle."""

    def __init__(self, forward: Forward, option: str) -> None:
        self.forward = forward
        self.option = option
        self.target = compress_format(option)

    # saved-tensor hooks cannot live in a compiled region (as rebuild's): a model compiled
    # around a plan runs this stage eagerly
    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        with compressing(self.target, (args, kwargs)) as state:
            out = self.forward(*args, **kwargs)
        state.finish(out)
        for log in _logs:
            log.append((state.original_bytes, state.stored_bytes))
        return out


def _compress(option: str) -> StageWrapper:
    compress_format(option)  # a malformed name fails here, before anything changes
    return functools.partial(Compressed, option=option)


register_option(
    OptionKind(
        prefix=COMPRESS,
        form="compress:<format>",
        recomputes=False,
        wrapper=_compress,
        hooks_inside=True,
        exact=False,
    )
)
