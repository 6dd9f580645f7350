"""The optimal solver against brute force, and its properties."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfit.errors import InfeasibleBudgetError
from memfit.planning import baselines
from memfit.planning.costs import ChainCosts, uniform_chain
from memfit.planning.min_peak import min_peak
from memfit.planning.optimal import fastest_tree, solve_optimal
from memfit.planning.simulate import simulate
from tests.helpers.strategies import UNIT, all_trees, best_time, chains, pareto_summaries, peaks


def examples(count: int) -> settings:
    return settings(deadline=None, max_examples=count, suppress_health_check=[HealthCheck.too_slow])


@examples(40)
@given(costs=chains(min_stages=3, max_stages=4, max_options=2))
def test_pareto_reference_matches_enumeration(costs: ChainCosts) -> None:
    """The fast reference used below equals plain enumeration plus the simulator."""
    runs = [simulate(costs, tree) for tree in all_trees(costs)]
    for budget in sorted({run.peak_bytes for run in runs}):
        expected = min(run.step_s for run in runs if run.peak_bytes <= budget)
        assert best_time(costs, budget) == expected
    summaries = pareto_summaries(costs)
    assert all(simulate(costs, s[3]).peak_bytes == costs.held_bytes + s[0] for s in summaries)


@st.composite
def chain_and_budget(draw: st.DrawFn, **kwargs: int) -> tuple[ChainCosts, int]:
    costs = draw(chains(**kwargs))
    known = peaks(costs)
    budget = draw(st.one_of(st.sampled_from(known), st.integers(known[0] - UNIT, known[-1] + UNIT)))
    return costs, budget


@pytest.mark.slow  # brute force (make quick leaves it out)
@examples(400)
@given(case=chain_and_budget(min_stages=1, max_stages=7, max_options=3))
def test_optimal_matches_brute_force(case: tuple[ChainCosts, int]) -> None:
    _check_against_brute_force(*case)


@pytest.mark.slow  # brute force
@examples(250)
@given(case=chain_and_budget(min_stages=5, max_stages=7, max_options=3))
def test_optimal_matches_brute_force_on_longer_chains(case: tuple[ChainCosts, int]) -> None:
    _check_against_brute_force(*case)


def _check_against_brute_force(costs: ChainCosts, budget: int) -> None:
    expected = best_time(costs, budget)
    if expected is None:
        with pytest.raises(InfeasibleBudgetError) as error:
            solve_optimal(costs, budget)
        assert error.value.min_feasible_bytes == peaks(costs)[0]
        return
    solution = solve_optimal(costs, budget)
    assert solution.simulation.peak_bytes <= budget
    assert solution.simulation.step_s == expected
    assert solution.info["source"] in ("dp", "fastest")


# brute force (make test) checks every budget's time on chains of up to 7 stages: this samples
@examples(20)
@given(costs=chains(min_stages=2, max_stages=7), data=st.data())
def test_more_budget_never_costs_time(costs: ChainCosts, data: st.DataObject) -> None:
    known = peaks(costs)
    budgets = sorted(data.draw(st.lists(st.integers(known[0], known[-1]), min_size=2, max_size=4)))
    times = [solve_optimal(costs, budget).simulation.step_s for budget in budgets]
    assert times == sorted(times, reverse=True)


@examples(60)
@given(costs=chains(min_stages=1, max_stages=7), extra=st.integers(0, 10 * UNIT))
def test_keep_all_budget_gives_keep_all(costs: ChainCosts, extra: int) -> None:
    keep = simulate(costs, baselines.keep_all(costs))
    solution = solve_optimal(costs, keep.peak_bytes + extra)
    assert solution.tree == baselines.keep_all(costs) == fastest_tree(costs)
    assert solution.simulation.step_s == keep.step_s


@examples(40)  # brute force covers chains of up to 7 stages: optimal at every budget
@given(costs=chains(min_stages=1, max_stages=9), k=st.integers(1, 4))
def test_never_worse_than_baselines(costs: ChainCosts, k: int) -> None:
    for tree in (
        baselines.keep_all(costs),
        baselines.recompute_all(costs),
        baselines.sqrt_segments(costs),
        baselines.every_k(costs, k),
    ):
        baseline = simulate(costs, tree)
        assert solve_optimal(costs, baseline.peak_bytes).simulation.step_s <= baseline.step_s


@examples(30)  # brute force checks the floor named for every budget below it up to 7 stages
@given(costs=chains(min_stages=1, max_stages=12))
def test_min_peak_is_tight(costs: ChainCosts) -> None:
    floor = min_peak(costs).peak_bytes
    assert solve_optimal(costs, floor).simulation.peak_bytes == floor
    with pytest.raises(InfeasibleBudgetError) as error:
        solve_optimal(costs, floor - 1)
    assert (error.value.budget_bytes, error.value.min_feasible_bytes) == (floor - 1, floor)


@examples(40)
@given(
    costs=chains(min_stages=8, max_stages=30, unit=1, constraints=True),
    fraction=st.floats(0.0, 1.0),
)
def test_coarse_grid_stays_within_budget(costs: ChainCosts, fraction: float) -> None:
    """Sizes that share no unit force a rounded grid: the plan still fits."""
    odd = _jitter(costs)
    low = simulate(odd, min_peak(odd).tree()).peak_bytes
    high = simulate(odd, baselines.keep_all(odd)).peak_bytes
    budget = int(low + fraction * (high - low))
    solution = solve_optimal(odd, budget, slots=50)
    assert solution.simulation.peak_bytes <= budget
    for tree in (baselines.recompute_all(odd), baselines.sqrt_segments(odd)):
        baseline = simulate(odd, tree)
        assert baseline.peak_bytes > budget or solution.simulation.step_s <= baseline.step_s


def _jitter(costs: ChainCosts) -> ChainCosts:
    """Scale every byte figure by a prime, then add a few odd bytes to peaks."""
    stages = []
    for i, stage in enumerate(costs.stages):
        options = {
            name: dataclasses.replace(
                o,
                saved_bytes=o.saved_bytes * 1009,
                forward_peak_bytes=o.forward_peak_bytes * 1009 + i + 1,
                backward_peak_bytes=o.backward_peak_bytes * 1009 + 2 * i + 1,
                backward_delta_bytes=o.backward_delta_bytes * 1009,
            )
            for name, o in stage.options.items()
        }
        stages.append(
            dataclasses.replace(
                stage,
                input_bytes=stage.input_bytes * 1009,
                output_bytes=stage.output_bytes * 1009,
                nosave_forward_peak_bytes=stage.nosave_forward_peak_bytes * 1009 + 3,
                recompute_peak_bytes=stage.recompute_peak() * 1009 + 5,
                recompute_lead_bytes=stage.recompute_lead_bytes * 1009,
                options=options,
            )
        )
    return dataclasses.replace(costs, stages=stages, held_bytes=costs.held_bytes * 1009)


def test_uniform_chain_known_points() -> None:
    costs = uniform_chain(8, activation_bytes=1, saved_bytes=4)
    assert solve_optimal(costs, 45).simulation.step_s == 24.0
    assert solve_optimal(costs, 21).simulation.step_s == 30.0
    assert solve_optimal(costs, 11).simulation.peak_bytes == 11


@examples(150)
@given(case=chain_and_budget(min_stages=1, max_stages=7, max_options=3, consistent=False))
def test_inconsistent_costs_stay_within_budget(case: tuple[ChainCosts, int]) -> None:
    """Where options disagree on what backward frees, the DP is safe, maybe not optimal."""
    costs, budget = case
    expected = best_time(costs, budget)
    try:
        solution = solve_optimal(costs, budget)
    except InfeasibleBudgetError as error:
        assert error.min_feasible_bytes > budget
        return
    assert solution.simulation.peak_bytes <= budget
    assert expected is not None and solution.simulation.step_s >= expected
