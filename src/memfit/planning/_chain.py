"""The chain's costs as numpy arrays, and the candidate first items of a subproblem.

Shared by the exact min-peak DP (:mod:`memfit.planning.min_peak`) and the time DP
(:mod:`memfit.planning.optimal`), so that both read the same geometry: for a subproblem "run a tree
over ``[start, stop)`` forward then backward (dropping ``output_bytes[stop-1]`` in between when
``drop``)", the candidate first items are each stage option of ``start`` and each recompute segment
``[start, start + length)``; the rest of the interval is a subproblem of the same kind.

All peaks are *effective* (never below the level the event leaves, see
:mod:`memfit.planning.simulate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memfit.planning.costs import CHECKPOINT, KEEP, ChainCosts, StageCosts

Int = np.int64


def default_segment_cap(n: int) -> int:
    """The longest recompute segment the solvers consider for ``n`` stages.

    Why 16, measured on synthetic 100- and 1000-stage chains (:mod:`memfit.planning.synthetic`)
    at 5-80% of the activation memory: a cap of 32 (or none, on 100 stages) found plans at most
    0.2% faster and the same minimal peak within 0.3%, at twice the solve time or more (the
    segment tables grow with the cap squared, and one grid then spans longer segments); a cap
    of 8 was up to 0.3% slower on 1000 stages (``benchmarks/results/design-figures.md``,
    "Segment cap").
    """
    return min(n, 16)


def menu_names(stage: StageCosts) -> tuple[str, ...]:
    """The options the solvers weigh for ``stage``, ``keep`` first. A block no gradient
    reaches that the profile offers under a checkpoint (:data:`CHECKPOINT`) runs that way
    only: the same forward, no rerun ever, less held to the end of the step. Its level after
    the step then depends on its option, which the DPs' totals (one upper bound per stage,
    :meth:`ChainArrays.total`) would charge as kept: LLaVA's floor was 17 KB high with both."""
    if not stage.checkpointable and CHECKPOINT in stage.options:
        return (CHECKPOINT,)
    return (KEEP, *(name for name in stage.options if name != KEEP))


@dataclass(frozen=True, slots=True)
class Candidates:
    """The first items of subproblem ``[start, stop)``: ``options`` stage options, then segments.

    Segment row ``options + j`` is ``Segment(start, start + j + 1)``.

    Attributes:
        options: how many rows are stage options.
        time_s: seconds the item adds besides its inner tree (option time, or no-save forward).
        forward_peak: the item's forward peak above the level at its start.
        residue: the level the item's forward leaves (rest runs on top of it).
        back_offset: level at the start of the item's backward: residue + total of the rest.
        back_peak: the stage option's backward peak (0 for segments: their inner tree's peak adds).
        rest_start: where the rest of the interval starts.
    """

    options: int
    time_s: np.ndarray
    forward_peak: np.ndarray
    residue: np.ndarray
    back_offset: np.ndarray
    back_peak: np.ndarray
    rest_start: np.ndarray


class ChainArrays:
    """Per-stage and per-segment numbers of a :class:`ChainCosts`, with segments capped in length.

    Args:
        costs: the chain.
        max_segment_stages: the longest recompute segment considered.
    """

    def __init__(self, costs: ChainCosts, max_segment_stages: int) -> None:
        stages = costs.stages
        n = self.n = len(stages)
        self.held_bytes = int(costs.held_bytes)
        # a checkpoint's RNG state: held by a segment from its forward on, and once more during
        # its backward (see simulate); nested segments' states in the no-save forward are not
        # counted here, so the simulator may refuse a DP tree and a fallback then serves
        self.checkpoint_bytes = int(costs.checkpoint_bytes)
        self.option_names = [menu_names(stage) for stage in stages]
        self.output = np.array([stage.output_bytes for stage in stages], dtype=Int)
        inputs = np.array([stage.input_bytes for stage in stages], dtype=Int)
        # what a stage's no-save forward keeps past the checkpoint's hooks: held by the step's
        # graph from a top-level segment's forward to the stage's backward; so a recompute of
        # the stage (kept) leaves that much less than its kept forward (see simulate)
        self.held = np.array([stage.nosave_held_bytes for stage in stages], dtype=Int)
        self.held_prefix = np.concatenate([[0], np.cumsum(self.held)]).astype(Int)
        self.option_time: list[np.ndarray] = []
        self.option_forward_peak: list[np.ndarray] = []
        self.stage_forward_peak: list[np.ndarray] = []  # as measured (not effective)
        self.option_residue: list[np.ndarray] = []
        self.option_back_peak: list[np.ndarray] = []
        # kept as the last stage of a segment's recompute: torch's early stop ends the rerun
        # at the last tensor backward needs (see simulate)
        self.recompute_peak = np.zeros(n, dtype=Int)
        # as measured (not effective): a recompute's keep leaves less (nosave_held_bytes)
        self.rerun_peak = np.array([stage.recompute_peak() for stage in stages], dtype=Int)
        # held through a recompute whose segment ends at the stage: every peak in it is higher
        self.recompute_lead = np.array([stage.recompute_lead_bytes for stage in stages], dtype=Int)
        totals = np.zeros(n, dtype=Int)
        for i, stage in enumerate(stages):
            menu = [stage.options[name] for name in self.option_names[i]]
            residue = np.array([o.saved_bytes + stage.output_bytes for o in menu], dtype=Int)
            delta = np.array([o.backward_delta_bytes for o in menu], dtype=Int)
            self.option_time.append(np.array([o.forward_s + o.backward_s for o in menu]))
            forward_peak = np.array([o.forward_peak_bytes for o in menu], dtype=Int)
            self.stage_forward_peak.append(forward_peak)
            self.option_forward_peak.append(np.maximum(forward_peak, residue))
            self.recompute_peak[i] = max(stage.recompute_peak(), int(residue[0]))
            self.option_residue.append(residue)
            back_peak = np.array([o.backward_peak_bytes for o in menu], dtype=Int)
            self.option_back_peak.append(np.maximum(back_peak, delta))
            totals[i] = (residue + delta).max()
        self.total_prefix = np.concatenate([[0], np.cumsum(totals)]).astype(Int)
        # Inside a segment, a boundary j|j+1 where output_bytes[j] exceeds input_bytes[j+1]
        # leaves bytes behind once per enclosing segment: bounded by the interval's length.
        gaps = np.maximum(0, self.output[:-1] - inputs[1:])
        self.gap_prefix = np.concatenate([[0], np.cumsum(gaps)]).astype(Int)
        self._segments(costs, inputs, max_segment_stages)
        self._first = [self._first_items(start) for start in range(n)]

    def _segments(self, costs: ChainCosts, inputs: np.ndarray, cap: int) -> None:
        n = self.n
        stages = costs.stages
        self.max_length = np.zeros(n, dtype=np.intp)
        for s in range(n - 1, -1, -1):
            if not stages[s].checkpointable:
                continue
            joined = s + 1 < n and stages[s + 1].checkpointable and stages[s + 1].joins_previous
            self.max_length[s] = min(cap, 1 + (self.max_length[s + 1] if joined else 0))
        self.cap = max(1, int(self.max_length.max(initial=0)))
        shape = (n, self.cap + 1)
        nosave_peak = np.array([stage.nosave_forward_peak_bytes for stage in stages], dtype=Int)
        nosave_s = np.array([stage.nosave_forward_s for stage in stages])
        # [0]: a segment inside another's recompute; [1]: a top-level one, whose no-save
        # forward (the step's) also keeps nosave_held_bytes, freed by each stage's backward
        peaks, residues = [], []
        for held in (np.zeros(n, dtype=Int), self.held):
            level = np.full(n, self.checkpoint_bytes, dtype=Int)
            peak = level.copy()
            segment_peak = np.zeros(shape, dtype=Int)
            segment_residue = np.zeros(shape, dtype=Int)
            seconds = np.zeros(n)
            self.segment_time = np.zeros(shape)
            for length in range(1, self.cap + 1):
                first = np.arange(n - length + 1)
                last = first + length - 1
                delta = self.output[last] - (inputs[last] if length > 1 else 0)
                step_peak = np.maximum(nosave_peak[last], delta)
                peak[first] = np.maximum(peak[first], level[first] + step_peak)
                level[first] += delta
                peak[first] = np.maximum(peak[first], level[first] + held[last])
                level[first] += held[last]
                seconds[first] += nosave_s[last]
                # several stages: the runtime's RNG check between them when the forward ends
                check = 2 * self.checkpoint_bytes if length > 1 else 0
                segment_peak[first, length] = np.maximum(peak[first], level[first] + check)
                segment_residue[first, length] = level[first]
                self.segment_time[first, length] = seconds[first]
            peaks.append(segment_peak)
            residues.append(segment_residue)
        self.segment_peak, self.segment_top_peak = peaks
        self.segment_residue, self.segment_top_residue = residues

    def full_segment_peak(self, start: int, length: int) -> int:
        """The forward peak of ``Segment(start, start + length)`` as the whole inner tree of a
        recompute over the same stages (its no-save forward, above that recompute's lead)."""
        return int(self.segment_peak[start, length] + self.recompute_lead[start + length - 1])

    def total(self, start: np.ndarray | int, stop: np.ndarray | int, drop: bool) -> np.ndarray:
        """Upper bound on the level change of a whole subproblem ``[start, stop)`` (exact when
        option totals agree and inputs equal the previous outputs, as in measured profiles)."""
        start, stop = np.asarray(start, dtype=Int), np.asarray(stop, dtype=Int)
        last = np.maximum(stop - 1, 0)
        gaps = self.gap_prefix[last] - self.gap_prefix[np.minimum(start, last)]
        out = self.total_prefix[stop] - self.total_prefix[start] + (stop - start) * gaps
        if drop:  # inside a recompute: each stage frees what the step's no-save forward kept
            return out - self.output[last] - (self.held_prefix[stop] - self.held_prefix[start])
        return out

    def fastest_segment_peak(self) -> int:
        """The largest peak of a segment's inner tree run at its fastest (every stage kept with
        its fastest option): above it, more memory never makes an inner tree faster."""
        fastest = [int(np.argmin(times)) for times in self.option_time]
        peak_after = np.zeros(self.n + 1, dtype=Int)  # [stop]: peak of [start + 1, stop)
        largest = 0
        for start in range(self.n - 1, -1, -1):
            choice, stops = fastest[start], start + 1 + np.arange(self.max_length[start])
            residue = self.option_residue[start][choice]
            peak_after[start + 1] = 0
            # kept, a stage may end a recompute instead, at its early-stop peak
            forward_peak = max(self.option_forward_peak[start][choice], self.recompute_peak[start])
            peak = np.maximum(
                np.maximum(forward_peak, residue + peak_after[stops]),
                residue + self.total(start + 1, stops, True) + self.option_back_peak[start][choice],
            )
            peak_after[stops] = peak
            largest = max(largest, int(peak.max(initial=0)))
        return largest + int(self.recompute_lead.max(initial=0))

    def _first_items(self, start: int) -> Candidates:
        lengths = np.arange(1, int(self.max_length[start]) + 1)
        options = len(self.option_names[start])
        return Candidates(
            options=options,
            time_s=np.concatenate([self.option_time[start], self.segment_time[start, lengths]]),
            forward_peak=np.concatenate(
                [self.option_forward_peak[start], self.segment_top_peak[start, lengths]]
            ),
            residue=np.concatenate(
                [self.option_residue[start], self.segment_top_residue[start, lengths]]
            ),
            back_offset=np.zeros(0, dtype=Int),
            back_peak=np.concatenate([self.option_back_peak[start], np.zeros(len(lengths), Int)]),
            rest_start=np.concatenate([np.full(options, start + 1), start + lengths]),
        )

    def candidates(self, start: int, stop: int, drop: bool, full: bool) -> Candidates:
        """The first items of subproblem ``[start, stop)``.

        Args:
            start: first stage of the interval.
            stop: end of the interval (exclusive).
            drop: whether ``output_bytes[stop-1]`` is dropped between forward and backward.
            full: whether ``Segment(start, stop)`` itself is a candidate.
        """
        every = self._first[start]
        longest = min(int(self.max_length[start]), stop - start - (0 if full else 1))
        # Inside a segment (drop) a stage can only be kept: an option's own saving would be
        # undone by the segment's no-save forward (see simulate.check_tree).
        options = 1 if drop else every.options
        rows = np.r_[0:options, every.options : every.options + longest]
        residue, rest_start = every.residue[rows], every.rest_start[rows]
        forward_peak = every.forward_peak[rows]
        if drop:
            # a recompute: keep leaves what the step's no-save forward kept less (nested
            # segments keep nothing more); the last stage stops early; all of it above the
            # last stage's lead
            lengths = np.arange(1, longest + 1)
            keep = self.option_residue[start][:1] - self.held[start]
            measured = self.stage_forward_peak[start][:1]
            if stop == start + 1:
                measured = self.rerun_peak[start : start + 1]
            residue = np.concatenate([keep, self.segment_residue[start, lengths]])
            forward_peak = np.concatenate(
                [np.maximum(measured, keep), self.segment_peak[start, lengths]]
            )
            forward_peak += self.recompute_lead[stop - 1]
        return Candidates(
            options=options,
            time_s=every.time_s[rows],
            forward_peak=forward_peak,
            residue=residue,
            back_offset=residue
            + self.total(rest_start, stop, drop)
            + np.where(np.arange(len(rows)) >= options, self.checkpoint_bytes, 0),
            back_peak=every.back_peak[rows],
            rest_start=rest_start,
        )
