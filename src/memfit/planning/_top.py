"""The top level of the time DP: a forward sweep over the chain with exact byte levels.

The whole chain's tree is a sequence of items (stage options and segments). The forward sweep
keeps, at every stage boundary ``s``, the Pareto set of ``(level, seconds so far)`` over the ways
to cover ``[0, s)``. Every constraint of an item is known when it is chosen: its forward peak
above the current level, and its backward, which runs after the whole rest of the chain at
``level + residue + Tot(rest)`` (``Tot`` as in :mod:`memfit.planning.optimal`); a segment's inner tree
is read from :class:`~memfit.planning._tables.SegmentTables` at the bytes left there. So levels stay
exact at the top, where most items of a long chain sit, and only segments are rounded to slots.
Sets larger than ``max_states`` keep the lowest and the fastest state of each level bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memfit.planning._chain import Candidates, ChainArrays
from memfit.planning._tables import SegmentTables
from memfit.planning.plan import Item, Segment, Stage, Tree


def _pareto(level: np.ndarray, seconds: np.ndarray, max_states: int) -> np.ndarray:
    """Indices of the states no other state beats in both level and seconds."""
    # Chunks arrive sorted by level, which a stable sort (timsort) merges fast; equal levels in
    # any order: at worst a redundant state survives.
    order = np.argsort(level, kind="stable")
    best = np.minimum.accumulate(seconds[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = seconds[order][1:] < best[:-1]
    kept = order[keep]
    if len(kept) > max_states:
        low, high = level[kept[0]], level[kept[-1]]
        bucket = (level[kept] - low) * (max_states // 2) // (high - low + 1)
        edge = bucket[1:] != bucket[:-1]
        kept = kept[np.concatenate([[True], edge]) | np.concatenate([edge, [True]])]
    return kept


@dataclass(frozen=True, slots=True)
class OffloadRows:
    """Top-level segments that may offload their input (``Segment(..., offload=True)``).

    Attributes:
        moved: ``[s]``: bytes segment ``[s, ...)`` moves to host (its input; 0: not allowed).
        extra_s: ``[s, length]``: seconds its transfers add (priced as in
            :mod:`memfit.planning.offload`).
    """

    moved: np.ndarray
    extra_s: np.ndarray


def _with_offload(cand: Candidates, boundary: int, rows: OffloadRows | None) -> Candidates:
    """``cand`` plus, after its rows, each segment row again with its input offloaded: a lower
    level after its forward, the same backward (the input is back before it)."""
    if rows is None or not rows.moved[boundary] or len(cand.time_s) == cand.options:
        return cand
    moved = int(rows.moved[boundary])
    segments = slice(cand.options, None)
    lengths = cand.rest_start[segments] - boundary
    twin = Candidates(
        options=cand.options,
        time_s=np.concatenate(
            [cand.time_s, cand.time_s[segments] + rows.extra_s[boundary, lengths]]
        ),
        forward_peak=np.concatenate([cand.forward_peak, cand.forward_peak[segments]]),
        residue=np.concatenate([cand.residue, cand.residue[segments] - moved]),
        back_offset=np.concatenate([cand.back_offset, cand.back_offset[segments]]),
        back_peak=np.concatenate([cand.back_peak, cand.back_peak[segments]]),
        rest_start=np.concatenate([cand.rest_start, cand.rest_start[segments]]),
    )
    return twin


def solve_top(
    arrays: ChainArrays,
    tables: SegmentTables,
    budget_bytes: int,
    suffix_peak: np.ndarray,
    max_states: int = 2048,
    offload: OffloadRows | None = None,
) -> tuple[Tree, float] | None:
    """The fastest tree within ``budget_bytes`` and its seconds (``None``: none found).

    Args:
        arrays: the chain's arrays.
        tables: the solved segment tables.
        budget_bytes: the peak cap.
        suffix_peak: ``[s]``: the least peak of any tree over ``[s, n)`` above its start level
            (states that cannot finish within the budget are dropped early).
        max_states: the most states kept per boundary.
        offload: segments that may offload their input (their rows follow the plain ones).
    """
    n = arrays.n
    incoming: list[list[np.ndarray]] = [[] for _ in range(n + 1)]
    start_state = np.array([[arrays.held_bytes, 0, -1, -1, -1]], dtype=np.float64)
    incoming[0].append(start_state)
    fronts: list[np.ndarray] = []  # rows: level, seconds, parent boundary, parent row, choice
    for boundary in range(n + 1):
        states = np.concatenate(incoming[boundary]) if incoming[boundary] else np.empty((0, 5))
        incoming[boundary] = []
        states = states[_pareto(states[:, 0], states[:, 1], max_states)]
        fronts.append(states)
        if boundary == n or len(states) == 0:
            continue
        cand = _with_offload(
            arrays.candidates(boundary, n, drop=False, full=True), boundary, offload
        )
        level, seconds = states[:, 0], states[:, 1]
        # The item must fit, and so must the least-peak way to finish after it.
        need = np.maximum(cand.forward_peak, cand.back_offset + cand.back_peak)
        need = np.maximum(need, cand.residue + suffix_peak[cand.rest_start])
        fits = level[None, :] + need[:, None] <= budget_bytes
        total = seconds[None, :] + cand.time_s[:, None]
        options = cand.options
        if len(cand.time_s) > options:
            free = budget_bytes - level[None, :] - cand.back_offset[options:, None]
            slots = np.minimum(free // tables.slot_bytes, tables.slots).astype(np.intp)
            lengths = (cand.rest_start[options:] - boundary)[:, None]
            inner = tables.inner[boundary, lengths, np.maximum(slots, 0)]
            total[options:] += np.where(free < 0, np.inf, inner)
        fits &= np.isfinite(total)
        rows = np.arange(len(states))
        for choice in range(len(cand.time_s)):
            ok = fits[choice]
            if ok.any():
                new = np.empty((int(ok.sum()), 5))
                new[:, 0] = level[ok] + cand.residue[choice]
                new[:, 1] = total[choice, ok]
                new[:, 2], new[:, 3], new[:, 4] = boundary, rows[ok], choice
                incoming[int(cand.rest_start[choice])].append(new)
    if len(fronts[n]) == 0:
        return None
    row = int(np.argmin(fronts[n][:, 1]))
    tree = _walk_back(arrays, tables, budget_bytes, fronts, row, offload)
    return tree, float(fronts[n][row, 1])


def _walk_back(
    arrays: ChainArrays,
    tables: SegmentTables,
    budget_bytes: int,
    fronts: list[np.ndarray],
    row: int,
    offload: OffloadRows | None,
) -> Tree:
    items: list[Item] = []
    boundary = arrays.n
    while boundary > 0:
        _, _, parent, parent_row, choice_value = fronts[boundary][row]
        start, row, choice = int(parent), int(parent_row), int(choice_value)
        plain = arrays.candidates(start, arrays.n, drop=False, full=True)
        cand = _with_offload(plain, start, offload)
        if choice < cand.options:
            items.append(Stage(start, arrays.option_names[start][choice]))
        else:
            level = int(fronts[start][row, 0])
            free = budget_bytes - level - int(cand.back_offset[choice])
            stop = int(cand.rest_start[choice])
            inner = tables.inner_tree(start, stop, tables.free_slots(free))
            items.append(Segment(start, stop, inner, offload=choice >= len(plain.time_s)))
        boundary = start
    return tuple(reversed(items))
