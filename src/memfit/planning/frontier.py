"""The Pareto frontier of (peak, step time) over all budgets.

The optimal solver's budget-independent work (the min-peak DP and the segment tables, see
:mod:`memfit.planning.optimal`) is done once; then the top-level sweep runs at ``points`` budgets
spread evenly between the minimal peak and the fastest plan's peak. Every tree is re-simulated
exactly and dominated points are dropped, so each point is a real plan: no plan found is both
lower and faster, though a finer spread of budgets may find points in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from memfit.planning.costs import ChainCosts
from memfit.planning.optimal import Planner
from memfit.planning.plan import Tree


@dataclass(frozen=True, kw_only=True, slots=True)
class FrontierPoint:
    """One plan on the frontier.

    Attributes:
        peak_bytes: its simulated step peak, ``held_bytes`` included.
        step_s: its simulated step time.
        tree: its schedule tree.
    """

    peak_bytes: int
    step_s: float
    tree: Tree


def frontier(costs: ChainCosts, points: int = 24, **options: Any) -> list[FrontierPoint]:
    """The Pareto set of (peak, time) over budgets from the minimal peak to the fastest plan.

    Args:
        costs: the chain.
        points: how many budgets to solve (at least 2); the result has at most ``points``
            points, fewer where plans coincide or dominate one another.
        **options: passed to :class:`~memfit.planning.optimal.Planner` (``slots``,
            ``max_segment_stages``, ``max_states``: 512 here, where it costs at most 0.1% of
            step time on a synthetic 100-stage chain and runs 1.5 times faster than 2048;
            ``benchmarks/results/design-figures.md``, "Top-level states").

    Returns:
        The points, lowest peak first (so slowest first), each strictly faster than the one
        before.

    Raises:
        ValueError: ``points`` below 2.

    Example:
        >>> from memfit.planning import uniform_chain
        >>> front = frontier(uniform_chain(8, activation_bytes=1, saved_bytes=4), points=4)
        >>> [(point.peak_bytes, point.step_s) for point in front]
        [(11, 52.0), (22, 29.0), (31, 27.0), (45, 24.0)]
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2; got {points!r}")
    planner = Planner(costs, **{"max_states": 512, **options})
    low = planner.floor_simulation.peak_bytes
    high = planner.fastest_simulation.peak_bytes
    found: dict[Tree, FrontierPoint] = {}
    for budget in sorted({int(b) for b in np.linspace(low, max(low, high), points)}):
        solution = planner.solve(budget)
        found[solution.tree] = FrontierPoint(
            peak_bytes=solution.simulation.peak_bytes,
            step_s=solution.simulation.step_s,
            tree=solution.tree,
        )
    front: list[FrontierPoint] = []
    for point in sorted(found.values(), key=lambda p: (p.peak_bytes, p.step_s)):
        if not front or point.step_s < front[-1].step_s:
            front.append(point)
    return front
