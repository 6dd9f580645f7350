"""The time DP's tables over a memory grid (the recurrence is documented in
:mod:`memfit.plan.optimal`).

``TimeTables`` fills, for every subproblem and every number of free slots ``m`` (``m *
slot_bytes`` bytes above the subproblem's starting level), the least seconds of a tree that fits,
and the choice that reaches it; ``tree(m)`` walks the choices back into a schedule tree.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from memfit.plan._chain import Candidates, ChainArrays
from memfit.plan.plan import Item, Segment, Stage, Tree


def ceil_slots(values: np.ndarray, slot_bytes: int) -> np.ndarray:
    """Bytes to slots, rounded up (so that every requirement is conservative)."""
    return -((-np.asarray(values, dtype=np.int64)) // slot_bytes)


class TimeTables:
    """The solved time DP on a grid of ``slots + 1`` memory levels of ``slot_bytes`` each.

    Args:
        arrays: the chain's arrays (their segment cap defines the class of trees).
        slot_bytes: bytes per slot.
        slots: the top of the grid (the budget above ``held_bytes``, in slots).
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
        self.top = np.zeros((n + 1, slots + 1))  # [start]: subproblem [start, n), no drop
        self.top_choice = np.zeros((n, slots + 1), dtype=dtype)
        inner = np.zeros((cap + 1, slots + 1))
        for start in range(n - 1, -1, -1):
            row = start % self.ring
            self.allowed[row, 0] = 0.0
            for length in range(1, int(arrays.max_length[start]) + 1):
                stop = start + length
                best, choice = self._evaluate(start, stop, False, inner)
                inner[length], self.inner_choice[start, length] = best, choice
                whole = self._full_segment(start, length, best)
                self.full[start, length] = whole < best
                self.allowed[row, length] = np.minimum(whole, best)
            self.top[start], self.top_choice[start] = self._evaluate(start, n, True, inner)

    def _shift(self, rows: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """``out[r, m] = rows[r, m - shifts[r]]``: infinite below 0, the last column above."""
        top = self.slots
        shifts = np.clip(shifts, -top, top + 1)
        left, right = max(0, int(shifts.max())), max(0, -int(shifts.min()))
        padded = np.empty((rows.shape[0], left + top + 1 + right))
        padded[:, :left] = np.inf
        padded[:, left : left + top + 1] = rows
        padded[:, left + top + 1 :] = rows[:, -1:]
        windows = sliding_window_view(padded, top + 1, axis=1)
        return windows[np.arange(rows.shape[0]), left - shifts]

    def _candidates(self, start: int, stop: int, top: bool) -> Candidates:
        return self.arrays.candidates(start, stop, drop=not top, full=top)

    def _evaluate(
        self, start: int, stop: int, top: bool, inner: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        cand = self._candidates(start, stop, top)
        rest = cand.rest_start
        rest_rows = self.top[rest] if top else self.allowed[rest % self.ring, stop - rest]
        values = self._shift(rest_rows, ceil_slots(cand.residue, self.slot_bytes))
        options = cand.options
        if len(rest) > options:
            inner_rows = inner[1 : len(rest) - options + 1]
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
        back_offset = arrays.segment_residue[start, length] + arrays.total(stop, stop, True)
        return int(ceil_slots(back_offset, self.slot_bytes))

    def _full_segment(self, start: int, length: int, inner: np.ndarray) -> np.ndarray:
        arrays = self.arrays
        shifted = self._shift(inner[None, :], np.array([self._full_offset(start, length)]))[0]
        need = int(ceil_slots(arrays.segment_peak[start, length], self.slot_bytes))
        shifted[: max(0, need)] = np.inf
        return shifted + arrays.segment_time[start, length]

    def tree(self, free_slots: int) -> Tree:
        """The tree the tables chose for the whole chain with ``free_slots`` slots.

        Raises:
            ValueError: no tree fits that many slots on this grid.
        """
        if not np.isfinite(self.top[0, free_slots]):
            raise ValueError(f"no tree fits {free_slots} slots of {self.slot_bytes} bytes")
        return tuple(self._build(0, self.arrays.n, free_slots, top=True, allow_full=True))

    def _build(
        self, start: int, stop: int, free: int, *, top: bool, allow_full: bool
    ) -> list[Item]:
        items: list[Item] = []
        arrays = self.arrays
        while start < stop:
            assert 0 <= free <= self.slots, (start, stop, free)
            if top:
                choice = int(self.top_choice[start, free])
            else:
                length = stop - start
                if allow_full and self.full[start, length, free]:
                    inner_free = min(self.slots, free - self._full_offset(start, length))
                    inner = self._build(start, stop, inner_free, top=False, allow_full=False)
                    items.append(Segment(start, stop, tuple(inner)))
                    return items
                choice = int(self.inner_choice[start, length, free])
            cand = self._candidates(start, stop, top)
            if choice < cand.options:
                items.append(Stage(start, arrays.option_names[start][choice]))
            else:
                end = int(cand.rest_start[choice])
                offset = int(ceil_slots(cand.back_offset[choice], self.slot_bytes))
                inner_free = min(self.slots, free - offset)
                inner = self._build(start, end, inner_free, top=False, allow_full=False)
                items.append(Segment(start, end, tuple(inner)))
            free = min(self.slots, free - int(ceil_slots(cand.residue[choice], self.slot_bytes)))
            start = int(cand.rest_start[choice])
            allow_full = True
        return items
