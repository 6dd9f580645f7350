"""The top level of the time DP for chains with skip connections (:class:`~memfit.planning.costs.Skip`).

A skip is a stage output that the model reads again stages later (a U-Net's down-block
outputs). It changes one thing in the memory model: in the step's no-save forward of a
top-level segment, the output of an inner stage is not freed when it is a skip; the model holds
it until its reader's forward. In a recompute (backward) the segment's blocks hand their
outputs on as in a plain chain, and every skip is read before the backward starts, so the
segment tables (:mod:`memfit.planning._tables`), every backward constraint and the min-peak
bounds of the plain sweep (:mod:`memfit.planning._top`) stay exact; only forward peaks rise.

This sweep is :func:`~memfit.planning._top.solve_top` with the skips held as part of the
state: at every stage boundary, per set of held skips (reader -> bytes) and of skips waiting
in host memory, the Pareto set of ``(level, seconds)``. An item's forward peak is its plain
one plus what the held skips and the skips it makes add, and its seconds the plain ones plus
its skips' exposed copies (:func:`~memfit.planning.simulate.skip_forward`, the simulator
itself, once per item and state); the item's level change is the plain one, and the skips it
holds past its end, on the device or in host memory, join the state. With a host to offload
to (``offload_skips``), every top-level segment that leaves skips held has a twin that
offloads them (``Segment.offload_skips``): held in host memory instead, fetched back in their
readers' forwards. A chain without skips never comes here: the plain sweep keeps its speed.

Known inefficiencies: states with different held sets are never compared (a state holding a
subset at a lower level and time would dominate), so the sets grow with the number of skips
that a top-level segment can hold at once (2 ** 6 at most on a U-Net with six skips, times
the sets waiting in host memory where segments may offload them); the
extra is exact when an item's plain forward peak is the simulator's (synthetic chains), and a
bound otherwise (side inputs, tails): every tree is re-simulated before it is returned.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from memfit.planning._chain import Candidates, ChainArrays
from memfit.planning._tables import SegmentTables
from memfit.planning._top import _pareto
from memfit.planning.costs import ChainCosts
from memfit.planning.offload import offloads_skips, skip_pairs
from memfit.planning.plan import Item, Segment, Stage, Tree
from memfit.planning.simulate import skip_forward

Held = tuple[tuple[int, int], ...]  # (reader, bytes), sorted: a state's held skips
State = tuple[Held, Held]  # skips held on the device, skips waiting in host memory


def _item(
    costs: ChainCosts,
    arrays: ChainArrays,
    cand: Candidates,
    boundary: int,
    choice: int,
    offload: bool = False,
) -> Item:
    """The candidate as an item (a segment with a flat inner tree: its forward is the same)."""
    if choice < cand.options:
        return Stage(boundary, arrays.option_names[boundary][choice])
    stop = int(cand.rest_start[choice])
    inner = tuple(Stage(i) for i in range(boundary, stop))
    segment = Segment(boundary, stop, inner)
    if not offload:
        return segment
    return replace(segment, offload_skips=skip_pairs(costs, segment))


def _offloading(
    costs: ChainCosts, arrays: ChainArrays, cand: Candidates, boundary: int
) -> list[int]:
    """The segment candidates at ``boundary`` that may offload their skips."""
    return [
        choice
        for choice in range(cand.options, len(cand.time_s))
        if offloads_skips(costs, Segment(boundary, int(cand.rest_start[choice]), ()))
    ]


def solve_top_skips(
    costs: ChainCosts,
    arrays: ChainArrays,
    tables: SegmentTables,
    budget_bytes: int,
    suffix_peak: np.ndarray,
    max_states: int = 2048,
    offload_skips: bool = False,
) -> tuple[Tree, float] | None:
    """The fastest tree within ``budget_bytes`` over a chain with skips, and its seconds
    (``None``: none found). Arguments as :func:`~memfit.planning._top.solve_top`'s, with the
    costs (their skips); ``offload_skips``: segments may offload the skips they leave held
    (the costs need a host: ``host_bytes_per_s > 0``)."""
    n = arrays.n
    incoming: list[dict[State, list[np.ndarray]]] = [{} for _ in range(n + 1)]
    incoming[0][((), ())] = [np.array([[arrays.held_bytes, 0, -1, -1, -1, -1]], dtype=np.float64)]
    # per boundary: (state, rows) groups; rows: level, seconds, parent boundary, parent group,
    # parent row, choice (a segment's offloading twin: choice + the candidates)
    fronts: list[list[tuple[State, np.ndarray]]] = []
    extras: dict[tuple[int, int, State], tuple[int, float, State]] = {}
    for boundary in range(n + 1):
        groups = []
        for held, chunks in incoming[boundary].items():
            states = np.concatenate(chunks)
            groups.append((held, states[_pareto(states[:, 0], states[:, 1], max_states)]))
        incoming[boundary] = {}
        fronts.append(groups)
        if boundary == n or not groups:
            continue
        cand = arrays.candidates(boundary, n, drop=False, full=True)
        plain_need = np.maximum(
            cand.back_offset + cand.back_peak, cand.residue + suffix_peak[cand.rest_start]
        )
        count = len(cand.time_s)
        twins = _offloading(costs, arrays, cand, boundary) if offload_skips else []
        for group, (state, states) in enumerate(groups):
            level, seconds = states[:, 0], states[:, 1]
            rows = np.arange(len(states))
            for coded in [*range(count), *(count + twin for twin in twins)]:
                choice = coded % count
                key = (boundary, coded, state)
                if key not in extras:
                    item = _item(costs, arrays, cand, boundary, choice, offload=coded >= count)
                    effect = skip_forward(costs, item, dict(state[0]), dict(state[1]))
                    after = (
                        tuple(sorted(effect.held.items())),
                        tuple(sorted(effect.hosted.items())),
                    )
                    extras[key] = (effect.extra_bytes, effect.extra_s, after)
                extra, extra_s, after = extras[key]
                need = max(int(cand.forward_peak[choice]) + extra, int(plain_need[choice]))
                fits = level + need <= budget_bytes
                total = seconds + cand.time_s[choice] + extra_s
                if choice >= cand.options:
                    free = budget_bytes - level - cand.back_offset[choice]
                    slots = np.minimum(free // tables.slot_bytes, tables.slots).astype(np.intp)
                    length = int(cand.rest_start[choice]) - boundary
                    inner = tables.inner[boundary, length, np.maximum(slots, 0)]
                    total = total + np.where(free < 0, np.inf, inner)
                fits &= np.isfinite(total)
                if not fits.any():
                    continue
                new = np.empty((int(fits.sum()), 6))
                new[:, 0] = level[fits] + cand.residue[choice]
                new[:, 1] = total[fits]
                new[:, 2], new[:, 3], new[:, 4], new[:, 5] = boundary, group, rows[fits], coded
                incoming[int(cand.rest_start[choice])].setdefault(after, []).append(new)
    ends = [group for group, (_, states) in enumerate(fronts[n]) if len(states)]
    if not ends:
        return None
    group = min(ends, key=lambda g: float(fronts[n][g][1][:, 1].min()))
    row = int(np.argmin(fronts[n][group][1][:, 1]))
    seconds = float(fronts[n][group][1][row, 1])
    return _walk_back(costs, arrays, tables, budget_bytes, fronts, group, row), seconds


def _walk_back(
    costs: ChainCosts,
    arrays: ChainArrays,
    tables: SegmentTables,
    budget_bytes: int,
    fronts: list[list[tuple[State, np.ndarray]]],
    group: int,
    row: int,
) -> Tree:
    items: list[Item] = []
    boundary = arrays.n
    while boundary > 0:
        _, _, parent, parent_group, parent_row, choice_value = fronts[boundary][group][1][row]
        start, group, row, coded = (
            int(parent),
            int(parent_group),
            int(parent_row),
            int(choice_value),
        )
        cand = arrays.candidates(start, arrays.n, drop=False, full=True)
        choice = coded % len(cand.time_s)
        if choice < cand.options:
            items.append(Stage(start, arrays.option_names[start][choice]))
        else:
            level = int(fronts[start][group][1][row, 0])
            free = budget_bytes - level - int(cand.back_offset[choice])
            stop = int(cand.rest_start[choice])
            inner = tables.inner_tree(start, stop, tables.free_slots(free))
            segment = Segment(start, stop, inner)
            if coded >= len(cand.time_s):
                segment = replace(segment, offload_skips=skip_pairs(costs, segment))
            items.append(segment)
        boundary = start
    return tuple(reversed(items))
