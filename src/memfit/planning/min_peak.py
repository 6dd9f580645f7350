"""The smallest peak any schedule tree reaches: an exact dynamic program, no discretisation.

Same subproblems and candidates as the time DP (:mod:`memfit.planning.optimal`, which documents the
recurrence), with the peak as the objective: for a first item ``X`` and the rest ``R``,

    peak(X + R) = max(forward_peak(X), residue(X) + peak(R), back_offset(X) + back_peak(X))

where ``back_peak`` of a segment is the peak of its inner tree. Ties go to the faster tree.
Cost: ``O(n * K^2)`` integer operations for ``n`` stages and segments of at most ``K`` stages.
"""

from __future__ import annotations

import numpy as np

from memfit.planning._chain import ChainArrays, Int, default_segment_cap
from memfit.planning.costs import ChainCosts
from memfit.planning.plan import Item, Segment, Stage, Tree


class MinPeak:
    """The min-peak DP over a chain, solved on construction.

    Args:
        arrays: the chain's arrays (their segment cap defines the class of trees).

    Attributes:
        peak_bytes: the minimal peak of the step, ``held_bytes`` included.
        top: ``[s]``: the minimal peak of a tree over ``[s, n)`` above its starting level
            (``top[n] == 0``).
    """

    def __init__(self, arrays: ChainArrays) -> None:
        self.arrays = arrays
        n, cap = arrays.n, arrays.cap
        # [s, L]: subproblem [s, s + L) with drop; "inner" excludes the full segment.
        self.inner = np.zeros((n + 1, cap + 1), dtype=Int)
        self.allowed = np.zeros((n + 1, cap + 1), dtype=Int)
        self.inner_time = np.zeros((n + 1, cap + 1))
        self.allowed_time = np.zeros((n + 1, cap + 1))
        self.inner_choice = np.zeros((n + 1, cap + 1), dtype=np.intp)
        self.top = np.zeros(n + 1, dtype=Int)  # [s]: subproblem [s, n) without drop
        self.top_time = np.zeros(n + 1)
        self.top_choice = np.zeros(n + 1, dtype=np.intp)
        for start in range(n - 1, -1, -1):
            for length in range(1, int(arrays.max_length[start]) + 1):
                self._interval(start, start + length)
            self._top(start)
        self.peak_bytes = arrays.held_bytes + int(self.top[0])

    def _evaluate(
        self, start: int, stop: int, drop: bool, full: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        arrays = self.arrays
        cand = arrays.candidates(start, stop, drop, full)
        rest = cand.rest_start
        if drop:
            rest_peak = self.allowed[rest, stop - rest]
            rest_time = self.allowed_time[rest, stop - rest]
        else:
            rest_peak, rest_time = self.top[rest], self.top_time[rest]
        lengths = np.arange(1, len(rest) - cand.options + 1)
        inner_peak = np.concatenate([np.zeros(cand.options, Int), self.inner[start, lengths]])
        inner_time = np.concatenate([np.zeros(cand.options), self.inner_time[start, lengths]])
        peak = np.maximum(
            np.maximum(cand.forward_peak, cand.residue + rest_peak),
            cand.back_offset + cand.back_peak + inner_peak,
        )
        return peak, cand.time_s + rest_time + inner_time

    def _interval(self, start: int, stop: int) -> None:
        length = stop - start
        peak, seconds = self._evaluate(start, stop, True, False)
        best = int(np.lexsort((seconds, peak))[0])
        self.inner[start, length], self.inner_time[start, length] = peak[best], seconds[best]
        self.inner_choice[start, length] = best
        arrays = self.arrays
        full = max(
            arrays.full_segment_peak(start, length),
            int(arrays.segment_residue[start, length])
            + int(arrays.total(np.array(stop), stop, True))
            + arrays.checkpoint_bytes  # the RNG state saved around the recompute
            + int(self.inner[start, length]),
        )
        full_time = arrays.segment_time[start, length] + self.inner_time[start, length]
        if (full, full_time) < (int(peak[best]), float(seconds[best])):
            self.allowed[start, length], self.allowed_time[start, length] = full, full_time
            self.inner_choice[start, length] = -1 - best  # full segment around the best inner
        else:
            self.allowed[start, length] = peak[best]
            self.allowed_time[start, length] = seconds[best]

    def _top(self, start: int) -> None:
        peak, seconds = self._evaluate(start, self.arrays.n, False, True)
        best = int(np.lexsort((seconds, peak))[0])
        self.top[start], self.top_time[start] = peak[best], seconds[best]
        self.top_choice[start] = best

    def tree(self) -> Tree:
        """The min-peak schedule tree (ties broken towards less time)."""
        return tuple(self._build(0, self.arrays.n, top=True, allow_full=True))

    def _build(self, start: int, stop: int, *, top: bool, allow_full: bool) -> list[Item]:
        items: list[Item] = []
        arrays = self.arrays
        while start < stop:
            if top:
                choice = int(self.top_choice[start])
            else:
                choice = int(self.inner_choice[start, stop - start])
                if choice < 0:
                    if allow_full:
                        inner = self._build(start, stop, top=False, allow_full=False)
                        items.append(Segment(start, stop, tuple(inner)))
                        return items
                    choice = -1 - choice
            options = len(arrays.option_names[start]) if top else 1  # inner: keep only
            if choice < options:
                items.append(Stage(start, arrays.option_names[start][choice]))
                start += 1
            else:
                end = start + choice - options + 1
                inner = self._build(start, end, top=False, allow_full=False)
                items.append(Segment(start, end, tuple(inner)))
                start = end
            allow_full = True
        return items


def min_peak(costs: ChainCosts, max_segment_stages: int | None = None) -> MinPeak:
    """Solve the min-peak DP.

    Args:
        costs: the chain.
        max_segment_stages: the longest recompute segment considered (default:
            :func:`~memfit.planning._chain.default_segment_cap`, as the time DP).

    Returns:
        The solved :class:`MinPeak`; ``.tree()`` gives a tree reaching ``.peak_bytes``.
    """
    n = len(costs.stages)
    cap = default_segment_cap(n) if max_segment_stages is None else max_segment_stages
    return MinPeak(ChainArrays(costs, cap))
