"""Chains with skip connections (:class:`memfit.planning.costs.Skip`): the simulator holds a
skip from the no-save forward that would free it to its reader's forward, and the optimal
solver against brute force over every tree."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfit.errors import InfeasibleBudgetError
from memfit.planning.costs import ChainCosts, Skip, uniform_chain
from memfit.planning.optimal import solve_optimal
from memfit.planning.plan import Segment, Stage
from memfit.planning.simulate import Simulation, simulate
from memfit.planning.solve import min_peak_bytes
from tests.helpers.strategies import UNIT, all_trees, assert_optimal_matches_brute_force, chains


def examples(count: int) -> settings:
    return settings(deadline=None, max_examples=count, suppress_health_check=[HealthCheck.too_slow])


def _flat(start: int, stop: int) -> Segment:
    return Segment(start, stop, tuple(Stage(i) for i in range(start, stop)))


def test_a_skip_inside_a_segment_is_held_until_its_reader() -> None:
    """Four stages of 1 B outputs and 4 B saved; stage 0's output is read again by stage 3.
    The segment [0, 3) frees stage 0's output after stage 1's no-save forward in a chain; with
    the skip it stays until stage 3's forward has read it: 1 B more from there to there."""
    plain = uniform_chain(4, activation_bytes=1, saved_bytes=4)
    skipped = replace(plain, skips=(Skip(0, 3),))
    tree = (_flat(0, 3), Stage(3))
    levels = dict(simulate(skipped, tree, timeline=True).timeline)
    before = dict(simulate(plain, tree, timeline=True).timeline)
    name = "forward (no save) of stage {0} (stage{0}) inside segment [0, 3)"
    assert [levels[name.format(i)] - before[name.format(i)] for i in range(3)] == [0, 1, 1]
    assert levels["forward of stage 3 (stage3)"] == before["forward of stage 3 (stage3)"] + 1
    assert levels["forward: skips read by stage 3 (stage3) freed"] == 6
    # kept stages and a segment that starts after the maker hold it anyway: nothing changes
    for kept in [tuple(Stage(i) for i in range(4)), (Stage(0), _flat(1, 3), Stage(3))]:
        assert simulate(skipped, kept) == simulate(plain, kept)


def test_the_skip_raises_the_floor_and_the_solver_plans_for_it() -> None:
    """Stage 0's and 1's outputs both read by stage 3: a segment over stages 0-2 now holds
    them through stage 3's forward, so the floor rises; every budget from there gets the
    fastest tree of all that fit, and one below it is refused naming the floor."""
    plain = uniform_chain(4, activation_bytes=4, saved_bytes=1)
    skipped = replace(plain, skips=(Skip(0, 3), Skip(1, 3)))
    runs = [simulate(skipped, tree) for tree in all_trees(skipped)]
    floor = min(run.peak_bytes for run in runs)
    assert floor > min(simulate(plain, tree).peak_bytes for tree in all_trees(plain))
    with pytest.raises(InfeasibleBudgetError) as error:
        solve_optimal(skipped, floor - 1)
    assert error.value.min_feasible_bytes == floor == min_peak_bytes(skipped)
    for budget in range(floor, max(run.peak_bytes for run in runs) + 1):
        solution = solve_optimal(skipped, budget)
        assert solution.simulation.peak_bytes <= budget
        assert solution.simulation == simulate(skipped, solution.tree)
        assert solution.simulation.step_s == min(r.step_s for r in runs if r.peak_bytes <= budget)


def test_costs_with_skips_round_trip_through_json() -> None:
    costs = replace(uniform_chain(5), skips=(Skip(1, 4), Skip(0, 3)))
    again = ChainCosts.from_json(costs.to_json())
    assert again == costs
    assert again.skips == (Skip(0, 3), Skip(1, 4))


@pytest.mark.parametrize(
    ("skips", "expected"),
    [
        ((Skip(0, 5),), "reads past the last of the 5 stages"),
        ((Skip(0, 3), Skip(0, 4)), "one skip per maker"),
    ],
)
def test_malformed_skips_are_refused(skips: tuple[Skip, ...], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        replace(uniform_chain(5), skips=skips)
    with pytest.raises(ValueError, match="reader > maker \\+ 1"):
        Skip(2, 3)


def test_a_plain_chain_never_takes_the_skip_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chains without skips keep the plain sweep (and its speed)."""
    import memfit.planning.optimal as optimal

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the skip sweep ran on a chain without skips")

    monkeypatch.setattr(optimal, "solve_top_skips", refuse)
    solution = solve_optimal(uniform_chain(8, activation_bytes=1, saved_bytes=4), 14)
    assert solution.info["source"] == "dp"


@st.composite
def chain_with_skips(draw: st.DrawFn) -> tuple[ChainCosts, int, list[Simulation]]:
    constraints = draw(st.booleans())
    costs = draw(chains(min_stages=3, max_stages=5, max_options=2, constraints=constraints))
    n = len(costs.stages)
    makers = draw(st.lists(st.integers(0, n - 3), unique=True, min_size=1, max_size=n - 2))
    skips = tuple(Skip(maker, draw(st.integers(maker + 2, n - 1))) for maker in makers)
    costs = replace(costs, skips=skips)
    runs = [simulate(costs, tree) for tree in all_trees(costs)]  # once: the test reads them too
    known = sorted({run.peak_bytes for run in runs})
    budget = draw(st.one_of(st.sampled_from(known), st.integers(known[0] - UNIT, known[-1] + UNIT)))
    return costs, budget, runs


@pytest.mark.slow  # brute force (make quick leaves it out)
@examples(60)
@given(case=chain_with_skips())
def test_optimal_matches_brute_force_with_skips(
    case: tuple[ChainCosts, int, list[Simulation]],
) -> None:
    assert_optimal_matches_brute_force(*case)
