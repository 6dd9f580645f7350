"""Offloaded skips: a skip connection the model holds waits in host memory until its reader.

A skip (``ChainCosts.skips``: a U-Net's down-block output, read again by an up block) whose
maker's next block runs inside a top-level segment (``Segment.offload_skips``) is held by the
model alone from there to its reader (:mod:`memfit.planning.offload` has the costs). No
saved-tensor hook sees it: the model keeps the tensor itself (in a list of skips), so the
tensor stays and its *storage* goes. Its bytes are copied to a host buffer from the offloader's
pool when its maker's forward ends (on CUDA on the side stream, after the compute stream), the
storage is resized to nothing when the next block's forward ends (the compute stream having
waited for the copy), and in the reader's forward the storage is resized back and the bytes
copied in (on the side stream, waited for when that forward ends, before the model reads it).
The backward never reads it: a segment's recompute makes its own.

The tensor must own its storage (a view of a larger one, or a storage the next block's output
shares, would take other tensors' bytes with it): otherwise :class:`~memfit.errors.
PlanMismatchError`. A model that reads the skip between its next block and its reader reads a
storage of no bytes: torch raises there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memfit.errors import PlanMismatchError

if TYPE_CHECKING:
    from memfit.runtime.offload import Offloader


@dataclass(eq=False)
class Trip:
    """One skip's trip to host memory and back, within one forward."""

    maker: str
    reader: int
    tensor: torch.Tensor  # the model's own tensor (its storage leaves and comes back)
    nbytes: int
    host: torch.Tensor
    event: Any = None


class SkipTrips:
    """The offloaded skips of one planned model's current forward (held by its offloader)."""

    def __init__(self, offloader: Offloader) -> None:
        self.offloader = offloader
        self.leaving: dict[int, Trip] = {}  # maker stage -> its copy to host, running
        self.hosted: dict[int, list[Trip]] = {}  # reader stage -> skips in host memory
        self.arriving: dict[int, list[Trip]] = {}  # reader stage -> copies back, running

    def reset(self) -> None:
        """A new forward: what a cut-short one left goes (buffers back to the pool)."""
        trips = [*self.leaving.values()]
        trips += [trip for group in self.hosted.values() for trip in group]
        trips += [trip for group in self.arriving.values() for trip in group]
        for trip in trips:
            self._wait(trip)
            self.offloader.pool_for(trip.tensor.device).give(trip.host)
        self.leaving, self.hosted, self.arriving = {}, {}, {}

    def leave(self, maker: int, name: str, reader: int, tensor: torch.Tensor | None) -> None:
        """Stage ``maker``'s forward ended with ``tensor``, a skip read by ``reader``: copy it."""
        if tensor is None or not _owns_storage(tensor):
            raise PlanMismatchError(
                f"the plan offloads the output of stage {name!r}, a skip connection, but it "
                f"{'is no tensor' if tensor is None else 'is a view of a larger storage'}: "
                f"moving its storage would take other tensors' bytes with it. Plan without "
                f"offloading skips (memfit.plan(..., host_budget=0))"
            )
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        host = self.offloader.pool_for(tensor.device).take(nbytes)
        trip = Trip(name, reader, tensor, nbytes, host)
        source = _bytes_of(tensor)
        if tensor.is_cuda:
            side = self._side(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # written there
            with torch.cuda.stream(side):
                host.copy_(source, non_blocking=True)
                trip.event = torch.cuda.Event()
                trip.event.record(side)
        else:
            host.copy_(source)
        self.leaving[maker] = trip

    def release(self, maker: int, after: torch.Tensor | None) -> None:
        """The forward of the block after ``maker`` ended with ``after``: the skip's device
        bytes go, once the compute stream has waited for their copy."""
        trip = self.leaving.pop(maker, None)
        if trip is None:
            return
        if after is not None and _same_storage(after, trip.tensor):
            self.offloader.pool_for(trip.tensor.device).give(trip.host)
            raise PlanMismatchError(
                f"the plan offloads the output of stage {trip.maker!r}, a skip connection, "
                f"but the next block's output shares its storage: it must stay. Plan without "
                f"offloading skips (memfit.plan(..., host_budget=0))"
            )
        self._wait(trip)
        trip.tensor.untyped_storage().resize_(0)
        self.hosted.setdefault(trip.reader, []).append(trip)

    def fetch(self, reader: int) -> None:
        """Stage ``reader``'s forward starts: its skips' bytes come back (copies started)."""
        trips = self.hosted.pop(reader, None)
        if not trips:
            return
        for trip in trips:
            trip.tensor.untyped_storage().resize_(trip.nbytes)
            target = _bytes_of(trip.tensor)
            if trip.tensor.is_cuda:
                device = trip.tensor.device
                side = self._side(device)
                side.wait_stream(torch.cuda.current_stream(device))  # its memory is made there
                with torch.cuda.stream(side):
                    target.copy_(trip.host, non_blocking=True)
                    trip.event = torch.cuda.Event()
                    trip.event.record(side)
            else:
                target.copy_(trip.host)
        self.arriving[reader] = trips

    def arrived(self, reader: int) -> None:
        """Stage ``reader``'s forward ended: the compute stream waits for its skips' copies,
        and their host buffers go back to the pool."""
        for trip in self.arriving.pop(reader, ()):
            self._wait(trip)
            self.offloader.pool_for(trip.tensor.device).give(trip.host)

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        copies = self.offloader.copies_for("cuda")
        return copies.side(device)  # type: ignore[attr-defined]

    def _wait(self, trip: Trip) -> None:
        if trip.event is not None:
            torch.cuda.current_stream(trip.tensor.device).wait_event(trip.event)
            trip.event = None


def _owns_storage(tensor: torch.Tensor) -> bool:
    storage = tensor.untyped_storage()
    return (
        tensor.storage_offset() == 0
        and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() == storage.nbytes()
        and storage.resizable()
    )


def _same_storage(one: torch.Tensor, other: torch.Tensor) -> bool:
    return one.untyped_storage().data_ptr() == other.untyped_storage().data_ptr() != 0


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as a flat uint8 tensor (the copies' source and target)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
