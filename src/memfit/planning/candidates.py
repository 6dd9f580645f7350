"""Other plans that fit the same budget, for timing side by side with the optimal one.

The DP is optimal over the *predicted* costs. Those come from steps that ran every block one
way, and a plan that mixes ways pays costs no such step shows (the allocator's state between
stages, a rebuilt stage's unpack landing beside a recompute): on a Llama config the optimal
plan at 30% of activation memory, with ``rebuild+ops`` beside recompute segments, measured
+35.9% while the plan made without that option measured +28.7%
(``benchmarks/results/eager-2026-12-02-4.md``). :func:`alternatives` gives
the plans a user would weigh against the optimal one: the optimal plans over menus without
each option the plans found so far rely on, one at a time (then without all of them), each
within the same budget. Timing them on the model (:func:`memfit.plan` with ``candidates=``)
lets measurements, not predictions, choose among them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from memfit.errors import InfeasibleBudgetError
from memfit.planning.costs import KEEP, ChainCosts
from memfit.planning.offload import OFFLOAD, without_offload
from memfit.planning.plan import Item, Plan, Segment, Stage
from memfit.planning.solve import solve


def used_options(tree: Sequence[Item]) -> set[str]:
    """Every option a schedule tree uses, nested segments included (``offload`` for a segment
    that moves its input to host memory); ``keep`` and plain recompute are not options."""
    found: set[str] = set()

    def walk(items: Sequence[Item]) -> None:
        for item in items:
            if isinstance(item, Stage):
                if item.option != KEEP:
                    found.add(item.option)
            elif isinstance(item, Segment):
                if item.offload:
                    found.add(OFFLOAD)
                walk(item.inner)

    walk(tree)
    return found


def without(costs: ChainCosts, options: set[str]) -> ChainCosts:
    """``costs`` with ``options`` taken out of every stage's menu (``offload``: no host)."""
    if OFFLOAD in options:
        costs = without_offload(costs)
    stages = [
        replace(stage, options={k: v for k, v in stage.options.items() if k not in options})
        if options & stage.options.keys()
        else stage
        for stage in costs.stages
    ]
    return replace(costs, stages=stages)


def alternatives(
    costs: ChainCosts, budget_bytes: int | None, count: int, **options: Any
) -> list[Plan]:
    """Up to ``count`` distinct plans within ``budget_bytes``, the optimal one first, then in
    order of predicted step time: the optimal plans over menus without options the optimal
    plan uses (each alone, then all of them; breadth first over what those plans use in
    turn), then, while fewer than ``count``, the optimal plans at ever lower peaks (each just
    below the one before, down to the floor). ``options`` go to
    :func:`~memfit.planning.solve.solve` (``host_budget_bytes``...).

    Raises:
        InfeasibleBudgetError: not even the optimal plan fits.
        ValueError: ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1 (the optimal plan); got {count}")
    best = solve(costs, budget_bytes, "optimal", **options)
    found = {best.tree: best}
    tried: set[frozenset[str]] = {frozenset()}
    queue = deque([(frozenset[str](), best)])
    # each menu is a DP of its own (0.3-0.5 s at 100 stages: benchmarks/results/solver-*.md)
    solves = 0  # at most this many
    limit = count * (len(used_options(best.tree)) + 1)
    while queue and len(found) < count and solves < limit:
        removed, plan = queue.popleft()
        for taken in _removals(removed, used_options(plan.tree)):
            if taken in tried or solves >= limit:
                continue
            tried.add(taken)
            solves += 1
            try:
                other = solve(without(costs, set(taken)), budget_bytes, "optimal", **options)
            except InfeasibleBudgetError:
                continue  # the budget needs one of these options
            queue.append((taken, other))
            found.setdefault(other.tree, other)
    below, steps = best, 0
    while len(found) < count and steps < count:
        steps += 1
        # menus ran out (a plan of keep and recompute only): the optimal plans just below the
        # one before, down the frontier; each fits the budget, and timing may prefer one
        try:
            lower = solve(costs, below.predicted_peak_bytes - 1, "optimal", **options)
        except InfeasibleBudgetError:
            break  # the floor
        below = replace(lower, budget_bytes=budget_bytes)
        found.setdefault(below.tree, below)
    rest = sorted((p for p in found.values() if p is not best), key=lambda p: p.predicted_step_s)
    return [best, *rest][:count]


def _removals(removed: frozenset[str], used: set[str]) -> Iterator[frozenset[str]]:
    """Menus to try next: each option the plan uses taken out too, then all of them."""
    for option in sorted(used):
        yield removed | {option}
    if len(used) > 1:
        yield removed | used
