"""The memory meter: peak bytes of a region of code, to the byte, on CPU and CUDA alike.

PyTorch keeps no allocator counters for the CPU, so the meter records every allocation and free
of the device's allocator inside the region with the profiler (``profile_memory=True``) and
replays them in order, counting only memory allocated inside the region (the profiler's running
totals are process-global and unusable). ``mark(label)`` drops a named boundary into the same
event stream, so a region can be cut into spans (the stages of a step) with a start, peak and end
level each.

CUDA goes the same way: the caching allocator reports every block it hands out or takes back to
the profiler (host side, in program order, sizes as ``memory_allocated`` counts them). Reading
``max_memory_allocated`` instead would need ``reset_peak_memory_stats`` at every mark, which
destroys the user's own peak statistics; the meter never resets them.

A meter that does not name the op at the peak (``ops=False``, what profiling uses) records
only the allocations and its own ranges (torch's user scope), not every op: the same bytes, and
the profiler's stop and the replay take about a quarter of the time, which each way of running
a model pays in a profile (``benchmarks/results/setup-*.md``).

The profiler is one per process: the meter runs under memfit's process-wide lock, refuses to
start inside the user's own profiler session, and keeps the profiler's start and stop lines
off stderr (:mod:`memfit.measuring.session`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter_ns
from types import TracebackType
from typing import Any

import torch
from torch._C._profiler import RecordScope
from torch.autograd import profiler as autograd_profiler
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import _disable_current_modes

from memfit.measuring.session import PROFILER_LOCK, quiet_stderr, refuse_inside_profiler

MARK_PREFIX = "memfit::mark::"
RANGE_PREFIX = "memfit::range::"
RECOMPUTE_RANGE = "recompute:"  # + stage name: a block's rerun in backward (runtime.replay)
_meters = 0  # meters running now (under PROFILER_LOCK): ranges are recorded only then
_ENGINE_PREFIX = "autograd::engine::evaluate_function: "


@dataclass(frozen=True, slots=True)
class Span:
    """Memory over one span of a region, in bytes allocated inside the region and still live.

    Attributes:
        label: the mark that opened the span (``"<start>"`` for the region's first span).
        start_bytes: level when the span opened.
        peak_bytes: highest level inside the span (at least ``start_bytes``).
        end_bytes: level when the span closed.
    """

    label: str
    start_bytes: int
    peak_bytes: int
    end_bytes: int


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """What the meter saw.

    Attributes:
        peak_bytes: peak of bytes allocated inside the region and live at the same time.
        end_bytes: bytes allocated inside the region and still live at its end.
        peak_op: the op that made the allocation at the peak.
        spans: the region cut at every ``mark``, in order.
        device: ``"cpu"`` or ``"cuda"``.
        freed: name given to :meth:`MemoryMeter.watch` -> the label of the span in which the
            watched storage was freed (from the span it was watched in on) and the bytes that
            freed; names whose storage stayed live to the end, or was allocated before the
            region, are absent.
        ranges: the code that ran inside :func:`metered_range` during the region, in the order
            the ranges opened: level at the range's start, peak inside it, level at its end.
    """

    peak_bytes: int
    end_bytes: int
    peak_op: str
    spans: tuple[Span, ...] = field(default=())
    device: str = "cpu"
    freed: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    ranges: tuple[Span, ...] = field(default=())

    def span(self, label: str) -> Span:
        for span in self.spans:
            if span.label == label:
                return span
        raise KeyError(f"no span {label!r}; spans are {[s.label for s in self.spans]}")


@contextmanager
def metered_range(label: str) -> Iterator[None]:
    """Code inside is one range of a running :class:`MemoryMeter`'s reading
    (``reading.ranges``): its start, peak and end level, wherever it runs (inside a span, across
    marks, in backward). Costs nothing when no meter runs. An exception leaving the range ends it
    there (torch's checkpoint stops a recompute by raising once it has what backward needs)."""
    if not _meters:
        yield
        return
    # outside the dispatch modes active here (a selective checkpoint's, a trace's): the
    # profiler's own ops are no op of the block's
    record = record_function(f"{RANGE_PREFIX}{label}")
    with _disable_current_modes():
        record.__enter__()
    try:
        yield
    finally:
        with _disable_current_modes():
            record.__exit__(None, None, None)


class _RangesOnly(autograd_profiler.profile):
    """torch's profiler recording allocations and user-scope ranges (``record_function``: the
    meter's marks and ranges) but no op: its start with a scope filter, otherwise torch's."""

    def _start_trace(self) -> None:
        self.entered = True
        autograd_profiler._run_on_profiler_start()
        # the binding takes the scopes to record (its signature says so); torch's stub omits them
        torch._C._autograd._enable_profiler(  # type: ignore[call-arg]
            self.config(create_trace_id=False), self.kineto_activities, {RecordScope.USER_SCOPE}
        )
        self.profiling_start_time_ns = perf_counter_ns()


class MemoryMeter:
    """Context manager measuring memory of the code inside it.

    ``ops``: ``True`` (default): the reading names the op at the peak (``peak_op``), which
    needs the profiler to record every op; ``False``: ``peak_op`` is ``""`` and the same bytes
    cost the profiler a quarter of the time after the region.

    Example:
        >>> with MemoryMeter("cpu") as meter:
        ...     x = torch.empty(1024, dtype=torch.uint8)
        ...     meter.mark("second")
        ...     y = torch.empty(4096, dtype=torch.uint8)
        ...     del y
        >>> meter.reading.peak_bytes, meter.reading.end_bytes
        (5120, 1024)
    """

    def __init__(self, device: str | torch.device = "cpu", *, ops: bool = True) -> None:
        self.device = torch.device(device)
        self.ops = ops
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"MemoryMeter measures 'cpu' or 'cuda'; got device {device!r}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._profiler: Any = None
        self._labels: list[str] = []
        self._watched: list[tuple[int, int, str]] = []
        self._reading: MemoryReading | None = None

    @property
    def reading(self) -> MemoryReading:
        if self._reading is None:
            raise RuntimeError("the meter has no reading yet: read it after the `with` block")
        return self._reading

    def __enter__(self) -> MemoryMeter:
        self._reading = None
        self._labels = []
        self._watched = []
        PROFILER_LOCK.acquire()  # released in __exit__ (reentrant: entry points hold it already)
        try:
            refuse_inside_profiler()
            if self.device.type == "cuda":
                # Allocations are recorded when the host asks for them; syncing only keeps
                # kernels queued before the region from running inside it.
                torch.cuda.synchronize(self.device)
            # Host activity only: the CUDA allocator's events are reported without CUPTI.
            if self.ops:
                self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            else:
                self._profiler = _RangesOnly(use_cpu=True, profile_memory=True, use_kineto=True)
            with quiet_stderr():
                self._profiler.__enter__()
            global _meters
            _meters += 1
        except BaseException:
            PROFILER_LOCK.release()
            raise
        return self

    def mark(self, label: str) -> None:
        """Close the current span and open one called ``label``."""
        self._labels.append(label)
        with record_function(f"{MARK_PREFIX}{len(self._labels) - 1}"):
            pass

    def watch(self, name: str, tensor: torch.Tensor) -> None:
        """Note in which span the storage behind ``tensor`` is freed, from the current span on
        (``reading.freed[name]``): whether a stage lets its input go, say."""
        # an address, not a storage_key: the profiler's free events report addresses
        ptr = tensor.untyped_storage().data_ptr()
        self._watched.append((ptr, len(self._labels), name))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        global _meters
        _meters -= 1
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            profiler, self._profiler = self._profiler, None
            with quiet_stderr():
                profiler.__exit__(exc_type, exc, traceback)
        finally:
            PROFILER_LOCK.release()
        if exc_type is None:
            results = profiler.profiler.kineto_results if self.ops else profiler.kineto_results
            roots = results.experimental_event_tree()
            self._reading = _replay(roots, self._labels, self.device, self._watched)


def _replay(
    roots: list[Any],
    labels: list[str],
    device: torch.device,
    watched: Sequence[tuple[int, int, str]] = (),
) -> MemoryReading:
    """Replay the allocation events on ``device`` of a finished profiler run, in time order.

    Args:
        roots: the profiler's event tree (``kineto_results.experimental_event_tree()``).
        labels: the marks' labels, in the order :meth:`MemoryMeter.mark` was called.
        device: whose allocations count (``cuda`` with its index).
        watched: ``(storage pointer, span index, name)`` of :meth:`MemoryMeter.watch`.
    """
    from torch._C._profiler import _EventType

    allocation = _EventType.Allocation
    order = 0
    stack: list[tuple[Any, str]] = [(root, "") for root in reversed(roots)]
    allocations: list[tuple[int, int, int, int, str]] = []
    marks: list[tuple[int, int, int]] = []
    ranges: list[tuple[int, int, int, int, str]] = []  # start, order, end, end order, label
    # Every attribute of a profiler event is a call into C++ (microseconds each, and a step has
    # thousands of events): each is read once, and only where it is used. An allocation is a
    # leaf (an instant, nothing nests in it): its children and name are never read.
    while stack:
        event, parent = stack.pop()
        order += 1
        if event.tag == allocation:
            fields = event.extra_fields
            if fields.device.type == device.type and (
                device.index is None or fields.device.index == device.index
            ):
                allocations.append(
                    (event.start_time_ns, order, int(fields.alloc_size), int(fields.ptr), parent)
                )
            continue
        event_name = event.name
        if event_name.startswith(MARK_PREFIX):
            marks.append((event.start_time_ns, order, int(event_name[len(MARK_PREFIX) :])))
        elif event_name.startswith(RANGE_PREFIX):
            label = event_name[len(RANGE_PREFIX) :]
            # ends after everything inside it at the same nanosecond
            ranges.append((event.start_time_ns, order, event.end_time_ns, 1 << 62, label))
        # an op is named by its outermost event and its own: "AddmmBackward0 > aten::mm"
        if parent:
            name = f"{parent.split(' > ')[0]} > {event_name}"
        else:
            name = event_name.removeprefix(_ENGINE_PREFIX)
        children = event.children
        if children:
            stack.extend((child, name) for child in reversed(children))
    timeline = sorted(
        [(t, o, 0, size, ptr, op) for t, o, size, ptr, op in allocations]
        + [(t, o, 1, index, 0, "") for t, o, index in marks]
        + [(t, o, 2, index, 0, "") for index, (t, o, _e, _eo, _l) in enumerate(ranges)]
        + [(e, eo + index, 3, index, 0, "") for index, (_t, _o, e, eo, _l) in enumerate(ranges)]
    )
    open_ranges: dict[int, list[int]] = {}  # range -> [start level, peak]
    closed: dict[int, Span] = {}
    watching: dict[int, list[tuple[int, str]]] = {}
    for ptr, since, name in watched:
        watching.setdefault(ptr, []).append((since, name))
    freed: dict[str, tuple[str, int]] = {}
    span_index = 0
    live: dict[int, int] = {}
    level = peak = 0
    peak_op = ""
    spans: list[Span] = []
    span_label, span_start, span_peak = "<start>", 0, 0
    for _time, _order, kind, value, ptr, op in timeline:
        if kind == 1:
            spans.append(Span(span_label, span_start, span_peak, level))
            span_label, span_start, span_peak = labels[value], level, level
            span_index = value + 1
            continue
        if kind == 2:
            open_ranges[value] = [level, level]
            continue
        if kind == 3:
            start, top = open_ranges.pop(value, [level, level])
            closed[value] = Span(ranges[value][4], start, top, level)
            continue
        if value > 0:
            live[ptr] = value
            level += value
        elif ptr in live:  # frees of memory allocated before the region do not count
            size = live.pop(ptr)
            level -= size
            for since, name in watching.get(ptr, ()):
                if since <= span_index and name not in freed:
                    freed[name] = (span_label, size)
        if level > span_peak:
            span_peak = level
        for levels in open_ranges.values():
            levels[1] = max(levels[1], level)
        if level > peak:
            peak, peak_op = level, op
    spans.append(Span(span_label, span_start, span_peak, level))
    return MemoryReading(
        peak_bytes=peak,
        end_bytes=level,
        peak_op=peak_op,
        spans=tuple(spans),
        device=device.type,
        freed=freed,
        ranges=tuple(closed[index] for index in sorted(closed)),
    )
