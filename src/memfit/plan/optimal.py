"""The optimal schedule: least step time under a peak budget, by dynamic programming.

Algorithm: the Rotor dynamic program of Beaumont, Eyraud-Dubois, Herrmann, Joly and Shilova,
"Optimal checkpointing for heterogeneous chains: how to train deep neural networks with limited
memory" (2019), recast over memfit's schedule trees (:mod:`memfit.plan.plan`: nested recompute
segments, per-stage option menus, ``checkpointable``/``joins_previous``) and derived from the
simulator's semantics (:mod:`memfit.plan.simulate`), so that the two agree.

Subproblem ``P(s, t, drop)``: run a tree over ``[s, t)`` forward then backward, dropping
``output_bytes[t-1]`` in between when ``drop`` (a segment's inner tree; the whole chain has no
drop). Peel the first item ``X`` (a stage option, or ``Segment(s, e, inner)``) off the rest
``R = P(s', t, drop)``; the simulator runs ``F(X), F(R), [drop], B(R), B(X)``, so with ``a(X)``
the level ``X``'s forward leaves and ``Tot(R)`` the level change of the whole of ``R``:

    peak(X + R) = max(fpeak(X), a(X) + peak(R), a(X) + Tot(R) + bpeak(X))

where a segment's ``fpeak``/``a`` are its no-save forward's and its ``bpeak`` is the peak of
``P(s, e, drop=True)`` for its inner tree. ``Tot(R)`` does not depend on ``R``'s choices when every
option of a stage frees in backward what it saved in forward and each stage's input is the
previous output (true of measured profiles): then, with ``T(s, t, m)`` the least seconds of
``P(s, t, .)`` within ``m`` free bytes,

    T(s, t, m) = min over X of  time(X) + T_inner(X, m - a(X) - Tot(R)) + T(s', t, m - a(X))
                 subject to fpeak(X) <= m and a(X) + Tot(R) + bpeak_stage(X) <= m

(``T_inner`` is 0 for a stage option). Otherwise ``Tot(R)`` is replaced by an upper bound and
the DP stays safe but may miss the optimum (see below). A segment's inner tree is never a segment
of the same range (that only reruns the same forward), which keeps the class finite.

Memory is a grid of slots; every byte figure is rounded up to slots, so every tree the DP accepts
fits. The grid depends on the chain, not the budget (slots of the fastest tree's activation
memory), so more budget never costs time. When every byte figure is a multiple of one unit and
that memory spans at most ``EXACT_SLOTS`` units, the unit is the slot and the DP is exact. The
returned tree is re-simulated; budgets at or above the fastest tree's peak get that tree.

Known inefficiencies:

* rounding up loses up to one slot per item along a path of the tree, so on a coarse grid the DP
  may pick a slower tree than the optimum near the budget, or none at all. The result is then the
  fastest that fits among the DP's tree, the exact min-peak tree and the baselines: never worse
  than a baseline, but possibly far from optimal within a few slots of the minimal peak;
* time is ``O(n K (K + k) M)`` and memory ``O(n K M)`` for ``n`` stages, ``k`` options per stage,
  segments capped at ``K`` stages and ``M`` slots; long chains get a segment cap
  (:func:`default_segment_cap`), which also bounds how low the peak can go;
* a stage's backward is assumed to free what its forward saved whatever the option; where costs
  say otherwise the DP uses an upper bound and stays safe but may miss the optimum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from memfit.errors import InfeasibleBudgetError
from memfit.plan import baselines
from memfit.plan._chain import ChainArrays
from memfit.plan._tables import TimeTables
from memfit.plan.costs import ChainCosts
from memfit.plan.min_peak import MinPeak
from memfit.plan.plan import Stage, Tree
from memfit.plan.simulate import Simulation, simulate

EXACT_SLOTS = 4096


def default_segment_cap(n: int) -> int:
    """The longest segment the DP considers for ``n`` stages: all of them up to 128 stages."""
    return n if n <= 128 else 32


def default_slots(n: int) -> int:
    """Memory slots of the grid for ``n`` stages (when the costs do not fit an exact grid)."""
    return 1000 if n <= 128 else 500


@dataclass(frozen=True, kw_only=True, slots=True)
class Solution:
    """A solved schedule.

    Attributes:
        tree: the schedule tree.
        simulation: its exact simulated peak and time.
        info: how it was found (grid, cap, source, solve seconds), JSON-serialisable.
    """

    tree: Tree
    simulation: Simulation
    info: dict[str, Any] = field(default_factory=dict)


def unit_bytes(costs: ChainCosts) -> int:
    """The largest unit that every byte figure of the chain is a multiple of (at least 1)."""
    values: list[int] = []
    for stage in costs.stages:
        values += [stage.input_bytes, stage.output_bytes, stage.nosave_forward_peak_bytes]
        for option in stage.options.values():
            values += [
                option.saved_bytes,
                option.forward_peak_bytes,
                option.backward_peak_bytes,
                option.backward_delta_bytes,
            ]
    return max(1, int(np.gcd.reduce(np.abs(np.array(values, dtype=np.int64)))))


def grid(costs: ChainCosts, span_bytes: int, slots: int) -> tuple[int, bool]:
    """``(slot_bytes, exact)`` for budgets up to ``span_bytes`` above ``held_bytes``.

    The grid depends on the chain only, not on the budget, so that more budget never costs time.
    """
    unit = unit_bytes(costs)
    if span_bytes // unit <= max(EXACT_SLOTS, slots):
        return unit, True
    return max(unit, math.ceil(span_bytes / slots)), False


def fastest_tree(costs: ChainCosts) -> Tree:
    """The unconstrained fastest tree: every stage's fastest option (``keep`` on ties), no
    recompute (a segment only adds its no-save forward)."""
    items = []
    for index, stage in enumerate(costs.stages):
        names = sorted(stage.options, key=lambda name: (name != "keep", name))
        best = min(
            names, key=lambda name: stage.options[name].forward_s + stage.options[name].backward_s
        )
        items.append(Stage(index, best))
    return tuple(items)


def _fallbacks(costs: ChainCosts, floor: MinPeak) -> dict[str, Callable[[], Tree]]:
    makers: dict[str, Callable[[], Tree]] = {
        "min-peak": floor.tree,
        "none": partial(baselines.keep_all, costs),
        "all": partial(baselines.recompute_all, costs),
        "sqrt": partial(baselines.sqrt_segments, costs),
    }
    for k in (2, 3, 4):
        makers[f"every:{k}"] = partial(baselines.every_k, costs, k)
    return makers


def solve_optimal(
    costs: ChainCosts,
    budget_bytes: int,
    *,
    slots: int | None = None,
    max_segment_stages: int | None = None,
) -> Solution:
    """The fastest schedule tree whose simulated peak fits ``budget_bytes``.

    Args:
        costs: the chain.
        budget_bytes: the peak cap, ``held_bytes`` included.
        slots: memory slots of the grid (default :func:`default_slots`).
        max_segment_stages: the longest recompute segment (default :func:`default_segment_cap`).

    Returns:
        The :class:`Solution`.

    Raises:
        InfeasibleBudgetError: no tree of the class fits; carries the minimal peak.

    Example:
        >>> from memfit.plan import uniform_chain
        >>> costs = uniform_chain(4, activation_bytes=1, saved_bytes=4)
        >>> solution = solve_optimal(costs, 20)
        >>> solution.simulation.peak_bytes <= 20
        True
    """
    started = time.perf_counter()
    n = len(costs.stages)
    cap = default_segment_cap(n) if max_segment_stages is None else max_segment_stages
    slots = default_slots(n) if slots is None else slots
    if cap < 1 or slots < 1:
        raise ValueError(f"max_segment_stages and slots must be >= 1; got {cap} and {slots}")
    fastest = fastest_tree(costs)
    fastest_sim = simulate(costs, fastest)
    info: dict[str, Any] = {"max_segment_stages": cap}
    if fastest_sim.peak_bytes <= budget_bytes:
        info.update(source="fastest", solve_time_s=time.perf_counter() - started)
        return Solution(tree=fastest, simulation=fastest_sim, info=info)
    arrays = ChainArrays(costs, cap)
    floor = MinPeak(arrays)
    floor_peak = simulate(costs, floor.tree()).peak_bytes
    if floor_peak > budget_bytes:
        raise InfeasibleBudgetError(budget_bytes, floor_peak)
    slot_bytes, exact = grid(costs, fastest_sim.peak_bytes - costs.held_bytes, slots)
    top = (budget_bytes - costs.held_bytes) // slot_bytes
    tables = TimeTables(arrays, slot_bytes, top)
    info.update(slot_bytes=slot_bytes, slots=top, exact_grid=exact)
    trees = {"dp": tables.tree(top)} if np.isfinite(tables.top[0, top]) else {}
    trees.update({name: make() for name, make in _fallbacks(costs, floor).items()})
    simulations = {name: simulate(costs, tree) for name, tree in trees.items()}
    fits = [name for name, sim in simulations.items() if sim.peak_bytes <= budget_bytes]
    source = min(fits, key=lambda name: simulations[name].step_s)  # dp first on ties
    info.update(source=source, solve_time_s=time.perf_counter() - started)
    return Solution(tree=trees[source], simulation=simulations[source], info=info)
