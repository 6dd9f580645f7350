"""The memory meter: peak bytes of a region of code, on CPU to the byte, on CUDA from the allocator.

CPU: PyTorch keeps no allocator counters for the CPU, so the meter records every allocation and
free of the CPU allocator inside the region with the profiler (``profile_memory=True``) and
replays them in order, counting only memory allocated inside the region (the profiler's running
totals are process-global and unusable). ``mark(label)`` drops a named boundary into the same
event stream, so a region can be cut into spans (the stages of a step) with a start, peak and end
level each. CUDA: the caching allocator's own counters, read and reset at every mark.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter on stderr

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MARK_PREFIX = "memfit::mark::"
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
        peak_op: the op that made the allocation at the peak (CPU only; ``""`` on CUDA).
        spans: the region cut at every ``mark``, in order.
        device: ``"cpu"`` or ``"cuda"``.
    """

    peak_bytes: int
    end_bytes: int
    peak_op: str
    spans: tuple[Span, ...] = field(default=())
    device: str = "cpu"

    def span(self, label: str) -> Span:
        for span in self.spans:
            if span.label == label:
                return span
        raise KeyError(f"no span {label!r}; spans are {[s.label for s in self.spans]}")


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration (C++ logging bypasses Python)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class MemoryMeter:
    """Context manager measuring memory of the code inside it.

    Example:
        >>> with MemoryMeter("cpu") as meter:
        ...     x = torch.empty(1024, dtype=torch.uint8)
        ...     meter.mark("second")
        ...     y = torch.empty(4096, dtype=torch.uint8)
        ...     del y
        >>> meter.reading.peak_bytes, meter.reading.end_bytes
        (5120, 1024)
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"MemoryMeter measures 'cpu' or 'cuda'; got device {device!r}")
        self._profiler: Any = None
        self._labels: list[str] = []
        self._cuda_spans: list[Span] = []
        self._cuda_open: tuple[str, int] = ("<start>", 0)
        self._cuda_base = 0
        self._reading: MemoryReading | None = None

    @property
    def reading(self) -> MemoryReading:
        if self._reading is None:
            raise RuntimeError("the meter has no reading yet: read it after the `with` block")
        return self._reading

    def __enter__(self) -> MemoryMeter:
        self._reading = None
        self._labels = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
            self._cuda_spans = []
            self._cuda_open = ("<start>", 0)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _quiet_stderr():  # kineto logs every start and stop on fd 2
                self._profiler.__enter__()
        return self

    def mark(self, label: str) -> None:
        """Close the current span and open one called ``label``."""
        if self.device.type == "cuda":
            self._close_cuda_span()
            self._cuda_open = (label, self._cuda_level())
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._labels.append(label)
            with record_function(f"{MARK_PREFIX}{len(self._labels) - 1}"):
                pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._close_cuda_span()
            spans = tuple(self._cuda_spans)
            self._reading = MemoryReading(
                peak_bytes=max(span.peak_bytes for span in spans),
                end_bytes=self._cuda_level(),
                peak_op="",
                spans=spans,
                device="cuda",
            )
            return
        with _quiet_stderr():
            self._profiler.__exit__(exc_type, exc, traceback)
        if exc_type is None:
            self._reading = _replay(self._profiler, self._labels)
        self._profiler = None

    def _cuda_level(self) -> int:
        return torch.cuda.memory_allocated(self.device) - self._cuda_base

    def _close_cuda_span(self) -> None:
        label, start = self._cuda_open
        peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_base
        end = self._cuda_level()
        self._cuda_spans.append(Span(label, start, max(peak, start, end), end))


def _replay(profiler: Any, labels: list[str]) -> MemoryReading:
    """Replay the CPU allocation events of a finished profiler run, in time order."""
    from torch._C._profiler import _EventType

    order = 0
    roots = profiler.profiler.kineto_results.experimental_event_tree()
    stack: list[tuple[Any, str]] = [(root, "") for root in reversed(roots)]
    allocations: list[tuple[int, int, int, int, str]] = []
    marks: list[tuple[int, int, int]] = []
    while stack:
        event, parent = stack.pop()
        order += 1
        if event.typed[0] == _EventType.Allocation:
            fields = event.typed[1]
            if fields.device.type == "cpu":
                allocations.append(
                    (event.start_time_ns, order, int(fields.alloc_size), int(fields.ptr), parent)
                )
        elif event.name.startswith(MARK_PREFIX):
            marks.append((event.start_time_ns, order, int(event.name[len(MARK_PREFIX) :])))
        # an op is named by its outermost event and its own: "AddmmBackward0 > aten::mm"
        top = parent.split(" > ")[0] if parent else event.name.removeprefix(_ENGINE_PREFIX)
        name = top if not parent else f"{top} > {event.name}"
        for child in reversed(event.children):
            stack.append((child, name))
    timeline = sorted(
        [(t, o, 0, size, ptr, op) for t, o, size, ptr, op in allocations]
        + [(t, o, 1, index, 0, "") for t, o, index in marks]
    )
    live: dict[int, int] = {}
    level = peak = 0
    peak_op = ""
    spans: list[Span] = []
    span_label, span_start, span_peak = "<start>", 0, 0
    for _time, _order, kind, value, ptr, op in timeline:
        if kind == 1:
            spans.append(Span(span_label, span_start, span_peak, level))
            span_label, span_start, span_peak = labels[value], level, level
            continue
        if value > 0:
            live[ptr] = value
            level += value
        elif ptr in live:  # frees of memory allocated before the region do not count
            level -= live.pop(ptr)
        if level > span_peak:
            span_peak = level
        if level > peak:
            peak, peak_op = level, op
    spans.append(Span(span_label, span_start, span_peak, level))
    return MemoryReading(
        peak_bytes=peak, end_bytes=level, peak_op=peak_op, spans=tuple(spans), device="cpu"
    )
