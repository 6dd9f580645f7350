"""Clocks for stage spans: marks with times, CPU time on the CPU, and the factors that put those
times back in wall seconds or take the profiler's cost off them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch

from memfit.measuring.step import synchronize

WALL, CPU = "wall", "cpu"  # a CPU clock's whole-step seconds, beside its stage labels


class Clock:
    """Marks with times (synchronising CUDA so spans hold their own kernels).

    ``cpu=True`` on the CPU: spans are the process's CPU time (every thread's), which other
    processes' load does not enter as it enters wall time, and the durations carry the step's
    wall and CPU seconds under :data:`WALL` and :data:`CPU` (for :func:`wall_scaled`). On
    CUDA the device's work is what counts: wall time, synchronised.
    """

    def __init__(self, device: torch.device, cpu: bool = False) -> None:
        self.device = device
        self.cpu = cpu and device.type == "cpu"
        self.marks: list[tuple[str, float, float]] = []

    def mark(self, label: str) -> None:
        synchronize(self.device)
        self.marks.append((label, time.perf_counter(), time.process_time() if self.cpu else 0.0))

    def durations(self) -> dict[str, float]:
        at = 1 if self.cpu else 0  # after the label: wall, CPU
        spans = {
            label: later[at] - now[at]
            for (label, *now), (_next, *later) in zip(self.marks, self.marks[1:], strict=False)
        }
        if self.cpu and len(self.marks) > 1:
            spans[WALL] = self.marks[-1][1] - self.marks[0][1]
            spans[CPU] = self.marks[-1][2] - self.marks[0][2]
        return spans


def wall_factor(clocks: Mapping[str, Sequence[Mapping[str, float]]]) -> float:
    """The median of the steps' wall / CPU seconds over all ways (1.0 for wall-time clocks)."""
    ratios = [
        step[WALL] / step[CPU]
        for steps in clocks.values()
        for step in steps
        if step.get(CPU, 0.0) > 0.0
    ]
    return statistics.median(ratios) if ratios else 1.0


def profiler_share(metered: Mapping[str, float], plain: Mapping[str, float]) -> float:
    """Plain over metered seconds of one way's step: what a time taken under the meter (the
    profiler records every op and allocation) is multiplied by to stand for a plain step.
    CPU seconds on a CPU clock, else the spans' sum; 1.0 when either clock is empty. At most
    1.0: the profiler only adds work, so a plain step slower than the metered one is the
    machine's noise, which must not make every other way dearer."""
    if CPU in metered and CPU in plain:
        metered_s, plain_s = metered[CPU], plain[CPU]
    else:
        metered_s, plain_s = sum(metered.values()), sum(plain.values())
    return min(1.0, plain_s / metered_s) if metered_s > 0.0 and plain_s > 0.0 else 1.0


def wall_scaled(
    clocks: Mapping[str, Sequence[Mapping[str, float]]],
) -> dict[str, list[dict[str, float]]]:
    """CPU-time clocks (:func:`stage_clock`) in seconds of wall time: every span times one
    factor (:func:`wall_factor`), the median of the steps' wall / CPU seconds over all ways.
    One factor keeps the ways' order as their CPU times have it (a way timed while another
    process ran is not slower for it), and puts predicted step times back in the seconds a
    user waits. Wall-time clocks (CUDA) come back as they are."""
    factor = wall_factor(clocks)
    return {
        way: [
            {label: value * factor for label, value in step.items() if label not in (WALL, CPU)}
            for step in steps
        ]
        for way, steps in clocks.items()
    }
