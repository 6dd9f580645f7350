"""The time DP's tables for recompute segments, over a memory grid (the recurrence is documented
in :mod:`memfit.planning.optimal`).

``SegmentTables`` fills, for every segment ``[start, start + length)`` and every number of free
slots ``m`` (``m * slot_bytes`` bytes above the level where its inner tree starts), the least
seconds of an inner tree that fits, and the choice that reaches it; ``inner_tree`` walks the
choices back into a tree. The grid only reaches the memory where every inner tree can run at its
fastest: lookups above read the last column.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from memfit.planning._chain import Candidates, ChainArrays
from memfit.planning.plan import Item, Segment, Stage, Tree


def ceil_slots(values: np.ndarray, slot_bytes: int) -> np.ndarray:
    """Bytes to slots, rounded up (so that every requirement is conservative)."""
    return -((-np.asarray(values, dtype=np.int64)) // slot_bytes)


class SegmentTables:
    """The solved segment DP on a grid of ``slots + 1`` memory levels of ``slot_bytes`` each.

    Args:
        arrays: the chain's arrays (their segment cap defines the class of trees).
        slot_bytes: bytes per slot.
        slots: the top of the grid.
    """

    def __init__(self, arrays: ChainArrays, slot_bytes: int, slots: int) -> None:
        self.arrays, self.slot_bytes, self.slots = arrays, slot_bytes, slots
        n, cap = arrays.n, arrays.cap
        self.ring = cap + 1
        self.levels = np.arange(slots + 1)
        choices = max(len(names) for names in arrays.option_names) + cap
        dtype = np.uint8 if choices < 256 else np.uint16
        # allowed[start % ring, length]: subproblem [start, start + length) with drop, the full
        # segment allowed; rows of starts more than `cap` ahead are no longer read.
        self.allowed = np.zeros((self.ring, cap + 1, slots + 1))
        self.inner_choice = np.zeros((n, cap + 1, slots + 1), dtype=dtype)
        self.full = np.zeros((n, cap + 1, slots + 1), dtype=bool)
        # inner[start, length]: the inner tree of segment [start, start + length) (with drop).
        self.inner = np.full((n, cap + 1, slots + 1), np.inf)
        for start in range(n - 1, -1, -1):
            row = start % self.ring
            self.allowed[row, 0] = 0.0
            for length in range(1, int(arrays.max_length[start]) + 1):
                best, choice = self._evaluate(start, start + length)
                self.inner[start, length], self.inner_choice[start, length] = best, choice
                whole = self._full_segment(start, length, best)
                self.full[start, length] = whole < best
                self.allowed[row, length] = np.minimum(whole, best)

    def _shift(self, rows: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """``out[r, m] = rows[r, m - shifts[r]]``: infinite below 0, the last column above."""
        top = self.slots
        shifts = np.minimum(np.maximum(shifts, -top), top + 1)
        left, right = max(0, int(shifts.max())), max(0, -int(shifts.min()))
        count = rows.shape[0]
        padded = np.empty((count, left + top + 1 + right))
        padded[:, :left] = np.inf
        padded[:, left : left + top + 1] = rows
        padded[:, left + top + 1 :] = rows[:, -1:]
        step = padded.strides[1]
        windows = as_strided(
            padded, (count, left + right + 1, top + 1), (padded.strides[0], step, step)
        )
        return windows[np.arange(count), left - shifts]

    def _candidates(self, start: int, stop: int) -> Candidates:
        return self.arrays.candidates(start, stop, drop=True, full=False)

    def _evaluate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        cand = self._candidates(start, stop)
        rest = cand.rest_start
        rest_rows = self.allowed[rest % self.ring, stop - rest]
        values = self._shift(rest_rows, ceil_slots(cand.residue, self.slot_bytes))
        options = cand.options
        if len(rest) > options:
            inner_rows = self.inner[start, 1 : len(rest) - options + 1]
            inner_shift = ceil_slots(cand.back_offset[options:], self.slot_bytes)
            values[options:] += self._shift(inner_rows, inner_shift)
        need = np.maximum(cand.forward_peak, cand.back_offset + cand.back_peak)
        values[self.levels[None, :] < ceil_slots(need, self.slot_bytes)[:, None]] = np.inf
        values += cand.time_s[:, None]
        choice = np.argmin(values, axis=0)
        return values[choice, self.levels], choice

    def _full_offset(self, start: int, length: int) -> int:
        arrays = self.arrays
        stop = start + length
        back_offset = (
            arrays.segment_residue[start, length]
            + arrays.total(stop, stop, True)
            + arrays.checkpoint_bytes  # the RNG state saved around the recompute
        )
        return int(ceil_slots(back_offset, self.slot_bytes))

    def _full_segment(self, start: int, length: int, inner: np.ndarray) -> np.ndarray:
        arrays = self.arrays
        shifted = self._shift(inner[None, :], np.array([self._full_offset(start, length)]))[0]
        need = int(ceil_slots(np.array(arrays.full_segment_peak(start, length)), self.slot_bytes))
        shifted[: max(0, need)] = np.inf
        return shifted + arrays.segment_time[start, length]

    def free_slots(self, free_bytes: int) -> int:
        """Slots that fit in ``free_bytes`` (-1 when negative; the top of the grid at most)."""
        return -1 if free_bytes < 0 else min(self.slots, free_bytes // self.slot_bytes)

    def inner_tree(self, start: int, stop: int, free: int) -> Tree:
        """The inner tree the tables chose for segment ``[start, stop)`` with ``free`` slots."""
        return tuple(self._build(start, stop, free, allow_full=False))

    def _build(self, start: int, stop: int, free: int, *, allow_full: bool) -> list[Item]:
        items: list[Item] = []
        arrays = self.arrays
        while start < stop:
            assert 0 <= free <= self.slots, (start, stop, free)
            length = stop - start
            if allow_full and self.full[start, length, free]:
                inner_free = min(self.slots, free - self._full_offset(start, length))
                items.append(Segment(start, stop, self.inner_tree(start, stop, inner_free)))
                return items
            choice = int(self.inner_choice[start, length, free])
            cand = self._candidates(start, stop)
            if choice < cand.options:
                items.append(Stage(start, arrays.option_names[start][choice]))
            else:
                end = int(cand.rest_start[choice])
                offset = int(ceil_slots(cand.back_offset[choice], self.slot_bytes))
                inner = self.inner_tree(start, end, min(self.slots, free - offset))
                items.append(Segment(start, end, inner))
            free = min(self.slots, free - int(ceil_slots(cand.residue[choice], self.slot_bytes)))
            start = int(cand.rest_start[choice])
            allow_full = True
        return items
