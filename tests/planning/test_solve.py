"""The public planning API: strategies, budgets, errors, JSON, frontier, doctests."""

from __future__ import annotations

import doctest
import importlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings

from memfit.errors import InfeasibleBudgetError
from memfit.planning import (
    Plan,
    Strategy,
    frontier,
    keep_tree,
    min_peak_bytes,
    parse_strategy,
    simulate,
    solve,
)
from memfit.planning.costs import ChainCosts, uniform_chain
from memfit.planning.synthetic import heterogeneous_chain
from tests.helpers.strategies import chains, peaks

CHAIN = uniform_chain(8, activation_bytes=1, saved_bytes=4)


@pytest.mark.parametrize("strategy", ["none", "all", "every:2", "every:3", "sqrt", "optimal"])
def test_every_strategy_plans_and_predicts(strategy: str) -> None:
    plan = solve(CHAIN, None, strategy)
    assert plan.strategy == strategy
    assert plan.budget_bytes is None
    result = simulate(CHAIN, plan.tree)
    assert (plan.predicted_peak_bytes, plan.predicted_step_s) == (result.peak_bytes, result.step_s)


def test_strategy_enum_and_parsing() -> None:
    assert Strategy.choices() == ["none", "all", "all+offload", "every:k", "sqrt", "optimal"]
    assert parse_strategy("every:4") == (Strategy.EVERY, 4)
    assert parse_strategy(Strategy.SQRT) == (Strategy.SQRT, 0)
    assert parse_strategy(" Optimal ") == (Strategy.OPTIMAL, 0)
    assert solve(CHAIN, 30, Strategy.OPTIMAL).predicted_peak_bytes <= 30


@pytest.mark.parametrize("bad", ["fastest", "every", "every:0", "every:x", "sqrt:2", ""])
def test_bad_strategy_lists_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="strategy") as error:
        solve(CHAIN, None, bad)
    if bad in ("fastest", ""):
        assert "none, all, all+offload, every:k, sqrt, optimal" in str(error.value)


def test_bad_budgets() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        solve(CHAIN, -1)
    with pytest.raises(TypeError, match="int or None"):
        solve(CHAIN, 12.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only apply to strategy 'optimal'"):
        solve(CHAIN, None, "sqrt", slots=10)


def test_baseline_over_budget_says_what_fits() -> None:
    with pytest.raises(InfeasibleBudgetError) as error:
        solve(CHAIN, 30, "none")
    assert (error.value.budget_bytes, error.value.min_feasible_bytes) == (30, 45)
    assert "strategy 'optimal' fits budgets down to" in str(error.value)


def test_optimal_infeasible_carries_min_peak() -> None:
    floor = min_peak_bytes(CHAIN)
    assert solve(CHAIN, floor).predicted_peak_bytes == floor
    with pytest.raises(InfeasibleBudgetError) as error:
        solve(CHAIN, floor - 1)
    assert error.value.min_feasible_bytes == floor


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(costs=chains(min_stages=1, max_stages=7))
def test_plan_json_round_trip(costs: ChainCosts) -> None:
    for strategy in ("optimal", "sqrt"):
        plan = solve(costs, None if strategy == "sqrt" else peaks(costs)[0], strategy)
        again = Plan.from_json(plan.to_json())
        assert again == plan
        assert simulate(costs, again.tree).peak_bytes == plan.predicted_peak_bytes


def test_plan_from_json_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(ValueError, match="format"):
        Plan.from_json('{"format": 99}')


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(costs=chains(min_stages=1, max_stages=7))
def test_frontier_is_pareto_and_exact(costs: ChainCosts) -> None:
    front = frontier(costs, points=6)
    known = peaks(costs)
    assert front[0].peak_bytes == known[0]
    for before, after in itertools.pairwise(front):
        assert before.peak_bytes < after.peak_bytes and before.step_s > after.step_s
    for point in front:
        result = simulate(costs, point.tree)
        assert (result.peak_bytes, result.step_s) == (point.peak_bytes, point.step_s)
        assert solve(costs, point.peak_bytes).predicted_step_s <= point.step_s


def test_frontier_on_a_long_chain() -> None:
    costs = heterogeneous_chain(40)
    front = frontier(costs, points=8)
    assert 2 <= len(front) <= 8
    assert front[-1].step_s == simulate(costs, keep_tree(0, 40)).step_s
    with pytest.raises(ValueError, match="points"):
        frontier(costs, points=1)


@pytest.mark.parametrize(
    "module",
    [
        "simulate",
        "baselines",
        "optimal",
        "frontier",
        "solve",
        "synthetic",
        "min_peak",
        "shape_fits",
        "shape_costs",
        "plan",
        "costs",
    ],
)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"memfit.planning.{module}"))
    assert result.failed == 0


def test_fragmentation_is_kept_free_under_the_budget() -> None:
    """CUDA profiles carry the allocator's measured slack: plans leave that much room."""
    import dataclasses

    from memfit.planning.costs import uniform_chain

    costs = uniform_chain(8, activation_bytes=1 << 20, saved_bytes=4 << 20)
    slack = dataclasses.replace(costs, fragmentation_bytes=3 << 20)
    budget = solve(costs, None, "none").predicted_peak_bytes - (8 << 20)
    tight, roomy = solve(costs, budget, "optimal"), solve(slack, budget, "optimal")
    assert tight.predicted_peak_bytes <= budget
    assert roomy.predicted_peak_bytes + (3 << 20) <= budget
    assert roomy.predicted_step_s >= tight.predicted_step_s


def test_plan_summary_counts_blocks_and_names_the_ends() -> None:
    from memfit.planning import Segment, Stage

    names = ["<pre>", "b0", "b1", "b2", "<post>"]
    tree = (
        Stage(0),
        Segment(1, 2, (Stage(1),)),
        Stage(2, "rebuild"),
        Stage(3, "rebuild"),
        Stage(4, "head:lean-loss"),
    )
    plan = Plan.from_tree(names, tree, "by hand")
    assert plan.summary == "2 rebuild, 1 recompute; <post> head:lean-loss"
    assert Plan.from_tree(names, tuple(Stage(i) for i in range(5)), "x").summary == "3 keep"
