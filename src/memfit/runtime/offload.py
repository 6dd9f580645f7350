"""Offload: saved activations wait in host memory between a block's forward and its backward.

Two uses, both at the top level of a plan (:mod:`memfit.planning.offload` has their costs):

* ``Stage(i, "offload")``: every tensor block ``i``'s forward saves for backward;
* ``Segment(s, t, inner, offload=True)``: only the segment's input, the one tensor its
  checkpoint keeps ("checkpoint to CPU"); the hooks sit *outside* the checkpoint, whose own
  hooks take every tensor saved inside it.

How (one :class:`Offloader` per planned model, held by the executor):

* **Pack** (``torch.autograd.graph.saved_tensors_hooks``): parameters and views of them, leaves
  that require grad, tensor subclasses (FSDP2's ``DTensor``), tensors below
  :data:`~memfit.measuring.offload.MIN_OFFLOAD_BYTES` and broadcast (stride-0) tensors stay where they are. Any other
  tensor's *storage* is copied once per step: a second tensor on the same storage (a view, a
  transpose, a ``q``/``k``/``v`` split) shares the copy, keyed by the storage itself (a weak
  reference, so a new storage at a freed one's address is never taken for it), not by pointer
  and dtype; unpacking rebuilds each tensor's own view (offset, sizes, strides, dtype) on the
  storage that comes back.
* **Copies** run on a side CUDA stream into pinned host buffers from a pool (pinning memory
  per tensor would synchronise the device every time). The side stream first waits for the
  compute stream (the tensor is written there), and the device tensor is held until the
  compute stream has *waited for the copy's event*; only then is it let go, so the allocator
  cannot hand its memory to a later op while the copy still reads it (torchtune's NaN
  gradients, fixed there with ``record_stream``). The compute stream is read at every call,
  never cached (torchtune's stream bug under recompute).
* **When**: a stage's copies are waited for when the next block's forward ends (they overlap
  it), a segment input's when its own forward ends. In backward, an item's bytes are fetched
  when the next item's output gets its gradient (the start of that item's backward, one item
  ahead of need), or at the start of its own backward when no block follows (``<post>``).
* **Lifetime**: each packed handle counts as a user of its storage's copy; when autograd frees
  the last one (after its backward, or when the graph is dropped after an exception), the
  device copy is let go and the host buffer goes back to the pool. Nothing outlives the step
  but the pool's free buffers (``Offloader.clear`` drops them; ``memfit.remove`` does).

On a CPU model there is no device memory to free: the same code runs with host-to-host copies
and no streams (:class:`HostCopies`), which is what the tests drive; the planner never offers
offload there.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from memfit.measuring.offload import offloadable
from memfit.measuring.step import storage_key
from memfit.runtime.skip_offload import SkipTrips

logger = logging.getLogger(__name__)


class HostPool:
    """Free host buffers by size, reused from step to step (activations repeat their sizes).

    Args:
        pin: pin the buffers (CUDA: asynchronous copies need pinned memory).
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = {}
        self.allocated = 0  # buffers ever allocated (tests: reuse means this stops growing)
        self.held_bytes = 0  # bytes of every buffer the pool made, free or in use
        self.taken: dict[int, int] = {}  # buffers taken per size since the last trim

    def take(self, nbytes: int) -> torch.Tensor:
        self.taken[nbytes] = self.taken.get(nbytes, 0) + 1
        bucket = self.free.get(nbytes)
        if bucket:
            return bucket.pop()
        self.allocated += 1
        self.held_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        self.free.setdefault(buffer.numel(), []).append(buffer)

    def trim(self) -> None:
        """Keep no more free buffers of a size than the last step took (shapes that change
        from step to step, e.g. sequence lengths, would otherwise add buffers for ever); only
        between steps, when every buffer is back (gradient accumulation's later forwards run
        with the earlier ones' buffers in use)."""
        if sum(nbytes * len(bucket) for nbytes, bucket in self.free.items()) != self.held_bytes:
            return
        for nbytes, bucket in list(self.free.items()):
            extra = len(bucket) - self.taken.get(nbytes, 0)
            if extra > 0:
                del bucket[:extra]
                self.held_bytes -= extra * nbytes
            if not bucket:
                del self.free[nbytes]
        self.taken = {}

    def clear(self) -> None:
        for bucket in self.free.values():
            self.held_bytes -= sum(buffer.numel() for buffer in bucket)
        self.free.clear()


class HostCopies:
    """Copies without streams: the host-to-host stand-in that runs the offload code on CPU."""

    pin = False

    def copy_out(self, entry: Entry) -> None:
        assert entry.host is not None and entry.device is not None
        entry.host.copy_(entry.device)

    def wait_out(self, entry: Entry) -> None:
        """The compute stream waits for ``entry``'s copy to host (nothing to wait for here)."""

    def copy_in(self, entry: Entry) -> None:
        assert entry.host is not None
        entry.fetched = entry.host.to(entry.place, copy=True)

    def wait_in(self, entry: Entry) -> None:
        """The compute stream waits for ``entry``'s copy back (nothing to wait for here)."""


class CudaCopies(HostCopies):
    """Copies on a side stream per device, ordered against the compute stream by events."""

    pin = True

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def copy_out(self, entry: Entry) -> None:
        assert entry.host is not None and entry.device is not None
        device = entry.device.device
        side = self.side(device)
        side.wait_stream(torch.cuda.current_stream(device))  # the tensor is written there
        with torch.cuda.stream(side):
            entry.host.copy_(entry.device, non_blocking=True)
            entry.event = torch.cuda.Event()
            entry.event.record(side)

    def wait_out(self, entry: Entry) -> None:
        if entry.event is not None and entry.device is not None:
            torch.cuda.current_stream(entry.device.device).wait_event(entry.event)

    def copy_in(self, entry: Entry) -> None:
        assert entry.host is not None
        device = entry.place
        compute = torch.cuda.current_stream(device)
        fetched = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)  # on compute
        side = self.side(device)
        side.wait_stream(compute)  # the new buffer's memory may still be read there
        with torch.cuda.stream(side):
            fetched.copy_(entry.host, non_blocking=True)
            entry.event = torch.cuda.Event()
            entry.event.record(side)
        entry.fetched = fetched

    def wait_in(self, entry: Entry) -> None:
        if entry.event is not None:
            torch.cuda.current_stream(entry.place).wait_event(entry.event)


@dataclass(eq=False)
class Entry:
    """One storage's trip to host memory and back, within one step."""

    offloader: Offloader
    weak: StorageWeakRef
    nbytes: int
    place: torch.device  # where the storage lives
    device: torch.Tensor | None  # the original storage as bytes, until the copy is waited for
    host: torch.Tensor | None = None
    fetched: torch.Tensor | None = None
    event: Any = None
    users: int = 0
    kept: bool = False  # still on the device (the item's output): no copy back needed
    group: Group | None = None  # the item that made the copy

    @property
    def device_type(self) -> str:
        return self.place.type

    def release(self) -> None:
        """The last packed handle is gone: let everything go, once the compute stream waits for
        a copy still using the memory (a fetch no unpack waited for: a node backward never ran,
        an exception; a forward cut short before its copies were waited for), so that the
        allocator cannot hand the memory to an op while the side stream writes or reads it."""
        self.offloader.forget(self)
        copies = self.offloader.copies_for(self.device_type)
        if self.fetched is not None:
            copies.wait_in(self)
        elif self.device is not None:
            copies.wait_out(self)
        if self.host is not None:
            self.offloader.pool_for(self.place).give(self.host)
        self.host = self.device = self.fetched = None
        self.event = None


@dataclass(eq=False)
class Group:
    """What one top-level item offloads in one forward."""

    name: str
    entries: list[Entry] = field(default_factory=list)
    drained: bool = False
    fetching: bool = False
    # each offloaded tensor and its version when saved, until the copies are waited for
    # (with saved-tensor hooks autograd no longer checks in-place changes itself)
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)


class Packed:
    """What autograd keeps for an offloaded tensor: its storage's entry and its own view."""

    __slots__ = ("__weakref__", "dtype", "entry", "group", "offset", "size", "stride")

    def __init__(self, entry: Entry, group: Group, tensor: torch.Tensor) -> None:
        self.entry, self.group = entry, group
        self.dtype, self.offset = tensor.dtype, tensor.storage_offset()
        self.size, self.stride = tuple(tensor.shape), tuple(tensor.stride())
        entry.users += 1

    def __del__(self) -> None:
        entry = self.entry
        entry.users -= 1
        if entry.users == 0:
            entry.release()


class Offloader:
    """Offload state of one planned model: the host pools, the copies of the current step, and
    which item's copies wait for the next item."""

    def __init__(self) -> None:
        self.pools: dict[str, HostPool] = {}
        self.copies: dict[str, HostCopies] = {}
        self.storages: dict[int, Entry] = {}  # storage cdata -> its entry, this step
        self.copying: Group | None = None  # a stage's copies, waited for by the next item
        self.waiting: Group | None = None  # fetched when the next item's backward starts
        self.log: list[tuple[str, str]] | None = None  # (event, group) when tests ask
        self.told = False  # the host-to-host warning, once
        self.skips = SkipTrips(self)  # offloaded skip connections (runtime.skip_offload)

    def __getstate__(self) -> dict[str, Any]:
        return {}  # buffers and per-step state are never copied or pickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def pool_for(self, device: torch.device) -> HostPool:
        """The pool of ``device``'s copies: one per device, since only one side stream orders
        a buffer's copies (a buffer another device's stream took could be written while this
        one's copy back still read it)."""
        key = str(device)
        if key not in self.pools:
            self.pools[key] = HostPool(pin=device.type == "cuda")
        return self.pools[key]

    def copies_for(self, device_type: str) -> HostCopies:
        if device_type not in self.copies:
            self.copies[device_type] = CudaCopies() if device_type == "cuda" else HostCopies()
        return self.copies[device_type]

    def clear(self) -> None:
        """Drop the pools' free buffers."""
        for pool in self.pools.values():
            pool.clear()

    def note(self, event: str, group: Group) -> None:
        if self.log is not None:
            self.log.append((event, group.name))

    def forget(self, entry: Entry) -> None:
        key = entry.weak.cdata
        if self.storages.get(key) is entry:
            del self.storages[key]

    # ---- forward --------------------------------------------------------------------------

    def start_forward(self) -> None:
        """A new forward begins (its first planned block): what the last one left waiting
        for a next item is settled (a forward cut short by an exception leaves such state)."""
        if self.copying is not None:  # left by a forward that never reached the next block
            self.copying.versions.clear()
            self.drain(self.copying)
        self.copying = self.waiting = None
        self.skips.reset()
        for pool in self.pools.values():
            pool.trim()

    @contextmanager
    def saving(
        self,
        group: Group,
        *,
        keep: Callable[[torch.Tensor], bool],
    ) -> Iterator[None]:
        """Offload what is saved for backward inside the block, but what ``keep`` says."""

        def pack(tensor: torch.Tensor) -> Any:
            if keep(tensor) or not offloadable(tensor):
                return tensor
            return self.pack(tensor, group)

        with torch.autograd.graph.saved_tensors_hooks(pack, self.unpack):
            yield

    def pack(self, tensor: torch.Tensor, group: Group) -> Packed:
        storage = tensor.untyped_storage()
        key = storage_key(tensor)
        entry = self.storages.get(key)
        if entry is None or entry.weak.expired() or entry.host is None:
            device = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            entry = Entry(
                offloader=self,
                weak=StorageWeakRef(storage),
                nbytes=storage.nbytes(),
                place=tensor.device,
                device=device,
            )
            if entry.device_type == "cpu" and not self.told:
                self.told = True
                logger.warning(
                    "memfit offload on a CPU model copies host to host and frees nothing; "
                    "memfit's own plans never offload there"
                )
            entry.host = self.pool_for(entry.place).take(entry.nbytes)
            self.copies_for(entry.device_type).copy_out(entry)
            self.storages[key] = entry
            entry.group = group
            group.entries.append(entry)
            self.note("copy out", group)
        elif entry.group is not group and not entry.kept:
            # saved by another item too (a table every block uses, a block's input that the
            # block before saves): held there, it stays on the device for both, as the
            # planner counts it (measuring.offload.saved_activations), and is never fetched
            entry.kept = True
            if entry.device is None:
                entry.device = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
        if not entry.kept:  # detached: the same version counter, not the graph
            group.versions.append((tensor.detach(), tensor._version))
        return Packed(entry, group, tensor)

    def item_done(self, output: Any, own: Group | None, *, segment: bool, ahead: bool) -> None:
        """A top-level item's forward ended with ``output`` (its main tensor).

        ``own``: what the item offloaded; ``segment``: it is a segment (its copies are waited
        for now); ``ahead``: a planned block follows it (which then waits for a stage's
        copies and fetches the bytes ahead of the backward).
        """
        if self.copying is not None and self.copying is not own:
            self.drain(self.copying)
            self.copying = None
        # at this item's backward start: its own bytes when no block follows to fetch them
        # ahead (they are needed first), then the previous item's
        fetched = [own] if own is not None and not ahead else []
        if self.waiting is not None and self.waiting is not own:
            fetched.append(self.waiting)
            self.waiting = None
        if fetched and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(_FetchHook(self, fetched))
        if own is None:
            return
        if isinstance(output, torch.Tensor):  # the output stays on the device for the next
            storage = storage_key(output)
            for entry in own.entries:
                if entry.weak.cdata == storage:
                    entry.kept = True
        if segment or not ahead:
            self.drain(own)
        else:
            self.copying = own
        if ahead:
            self.waiting = own

    def abandon(self) -> None:
        """A planned item's forward raised: let what waits for a next item go (its copies
        waited for), without checking versions, so that nothing outlives the failed step."""
        if self.copying is not None:
            self.copying.versions.clear()
            self.drain(self.copying)
        self.copying = self.waiting = None

    def drain(self, group: Group) -> None:
        """The compute stream waits for the group's copies; then the device memory goes."""
        if group.drained:
            return
        group.drained = True
        versions, group.versions = group.versions, []
        for entry in group.entries:
            if entry.device is not None and not entry.kept:
                self.copies_for(entry.device_type).wait_out(entry)
                entry.device = None
        self.note("drained", group)
        changed = [
            tuple(tensor.shape) for tensor, version in versions if tensor._version != version
        ]
        if changed:
            raise RuntimeError(
                f"memfit offload: {group.name!r} saved a tensor of shape {changed[0]} for "
                f"backward and then changed it in place (autograd would raise 'modified by an "
                f"inplace operation' in backward; its saved-tensor hooks skip that check, so "
                f"memfit checks here): its copy in host memory may hold either value. Do not "
                f"offload this block, or make the in-place op out of place"
            )

    # ---- backward -------------------------------------------------------------------------

    def fetch(self, group: Group) -> None:
        """Start copying the group's bytes back (on the side stream, ahead of their use)."""
        if group.fetching:
            return
        group.fetching = True
        self.drain(group)  # never fetch over a copy still running out
        for entry in group.entries:
            if entry.host is not None and entry.device is None and entry.fetched is None:
                self.bring_back(entry)
        self.note("fetch", group)

    def bring_back(self, entry: Entry) -> None:
        """Start the entry's copy back, unless its storage is still on the device (something
        else kept it alive: a table every block saves, an input that a kept block before
        saves too): then it is used as it is, as the planner counts it, with no second copy
        on the device."""
        storage = torch.UntypedStorage._new_with_weak_ptr(entry.weak.cdata)
        if storage is not None:
            entry.device = torch.empty(0, dtype=torch.uint8, device=entry.place).set_(storage)
        else:
            self.copies_for(entry.device_type).copy_in(entry)

    def unpack(self, packed: Packed | torch.Tensor) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):  # kept where it was
            return packed
        entry = packed.entry
        if entry.host is None:
            raise RuntimeError(
                "memfit offload: a saved tensor was used after its step ended (a second "
                "backward through the same graph?); offloaded tensors are freed after their "
                "backward: run the forward again, or do not offload this block"
            )
        data: torch.Tensor | None
        if entry.device is None and entry.fetched is None:
            self.fetch(packed.group)
            if entry.device is None and entry.fetched is None:  # an earlier group's copy
                self.bring_back(entry)
        if entry.device is not None:  # on the device (kept, not yet waited for, or alive)
            data = entry.device
        else:
            self.copies_for(entry.device_type).wait_in(entry)
            data = entry.fetched
        assert data is not None
        self.note("unpack", packed.group)
        view = torch.empty(0, dtype=packed.dtype, device=data.device)
        return view.set_(data.untyped_storage(), packed.offset, packed.size, packed.stride)


class _FetchHook:
    """A gradient hook on the next item's output: fetch the group when its backward starts."""

    def __init__(self, offloader: Offloader, groups: list[Group]) -> None:
        self.offloader = weakref.ref(offloader)
        self.groups = [weakref.ref(group) for group in groups]

    def __call__(self, _grad: torch.Tensor) -> None:
        offloader = self.offloader()
        for ref in self.groups:
            group = ref()
            if offloader is not None and group is not None:
                offloader.fetch(group)
