"""Other plans within the same budget (``planning/candidates.py``), for timing side by side."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfit.errors import InfeasibleBudgetError
from memfit.planning import Segment, Stage, simulate, solve
from memfit.planning.candidates import alternatives, used_options, without
from memfit.planning.costs import ChainCosts
from memfit.planning.synthetic import heterogeneous_chain
from tests.helpers.strategies import chains, peaks


def _check(costs: ChainCosts, budget: int, count: int) -> None:
    plans = alternatives(costs, budget, count)
    best = solve(costs, budget, "optimal")
    assert plans[0].tree == best.tree  # the optimal plan first, as solve makes it
    assert 1 <= len(plans) <= count
    assert len({p.tree for p in plans}) == len(plans)  # distinct schedules
    for plan in plans:
        result = simulate(costs, plan.tree)
        assert result.peak_bytes <= budget
        assert (plan.predicted_peak_bytes, plan.predicted_step_s) == (
            result.peak_bytes,
            result.step_s,
        )
    for plan in plans[1:]:
        # each alternative does without something the optimal plan relies on, or is a plan of
        # the frontier below it
        lower = plan.predicted_peak_bytes < best.predicted_peak_bytes
        assert used_options(best.tree) - used_options(plan.tree) or lower
        assert plan.budget_bytes == budget
    times = [p.predicted_step_s for p in plans[1:]]
    assert times == sorted(times)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_alternatives_fit_the_budget_and_differ(data: st.DataObject) -> None:
    costs = data.draw(chains(max_stages=5, max_options=3))
    budget = data.draw(st.sampled_from(peaks(costs)))
    _check(costs, budget, data.draw(st.integers(1, 5)))


def test_alternatives_on_a_heterogeneous_chain() -> None:
    costs = heterogeneous_chain(8, options=4, seed=3)
    low, high = (simulate(costs, solve(costs, None, s).tree).peak_bytes for s in ("all", "none"))
    counts = []
    for fraction in (0.1, 0.35, 0.5, 0.7, 0.9):
        budget = int(low + fraction * (high - low))
        _check(costs, budget, 4)
        plans = alternatives(costs, budget, 4)
        counts.append(len(plans))
        best_used = used_options(plans[0].tree)
        if not best_used:
            # nothing to do without: the optimal plans below the optimal one's peak
            assert all(p.predicted_peak_bytes < plans[0].predicted_peak_bytes for p in plans[1:])
            continue
        # the menus without one option the optimal plan uses, each alone
        menus = {solve(without(costs, {o}), budget, "optimal").tree for o in best_used}
        assert menus - {plans[0].tree} <= {p.tree for p in plans} or len(plans) == 4
    assert max(counts) > 1  # some budgets leave room for other plans


def test_a_plan_of_keep_and_recompute_gets_the_plans_below_it() -> None:
    costs = heterogeneous_chain(8, options=1, seed=1)
    assert all(stage.options.keys() <= {"keep"} for stage in costs.stages)
    floor = simulate(costs, solve(costs, None, "all").tree).peak_bytes
    high = simulate(costs, solve(costs, None, "none").tree).peak_bytes
    budget = (floor + high) // 2
    plans = alternatives(costs, budget, 3)
    assert len(plans) == 3
    peaks_found = [p.predicted_peak_bytes for p in plans]
    assert peaks_found[1:] and all(peak < peaks_found[0] for peak in peaks_found[1:])
    # each is at least as fast as what the DP finds at its own peak (the DP rounds bytes up to
    # slots, so a budget a little above a plan's peak can find a faster one than its peak)
    for plan in plans[1:]:
        optimal = solve(costs, plan.predicted_peak_bytes, "optimal")
        assert plan.predicted_step_s <= optimal.predicted_step_s


def test_the_search_is_bounded() -> None:
    costs = heterogeneous_chain(8, options=4, seed=3)
    low = simulate(costs, solve(costs, None, "all").tree).peak_bytes
    high = simulate(costs, solve(costs, None, "none").tree).peak_bytes
    budget = (low + high) // 2
    many = alternatives(costs, budget, 1000)  # more than exist: stops at the floor
    assert len({p.tree for p in many}) == len(many)
    two = alternatives(costs, budget, 2)
    assert two[0].tree == many[0].tree  # the optimal plan first, whatever the count
    assert {p.tree for p in two} <= {p.tree for p in many}


def test_used_options_walks_nested_segments_and_offload() -> None:
    tree = (
        Stage(0, "keep"),
        Segment(1, 3, (Stage(1, "rebuild"), Segment(2, 3, (Stage(2, "selective:0"),))), True),
        Stage(3, "head:lean-loss"),
    )
    assert used_options(tree) == {"rebuild", "selective:0", "offload", "head:lean-loss"}


def test_without_takes_options_out_of_every_menu() -> None:
    costs = heterogeneous_chain(5, options=3)
    lean = without(costs, {"selective:0"})
    assert all("selective:0" not in stage.options for stage in lean.stages)
    assert all("keep" in stage.options for stage in lean.stages)
    assert costs.stages[1].options.keys() >= {"selective:0"}  # the original is untouched


def test_alternatives_errors() -> None:
    costs = heterogeneous_chain(5)
    with pytest.raises(ValueError, match="count must be at least 1"):
        alternatives(costs, None, 0)
    with pytest.raises(InfeasibleBudgetError):
        alternatives(costs, 1, 3)
