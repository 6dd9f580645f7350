"""Offloaded skips (``Segment.offload_skips``): a skip that a top-level segment's no-save
forward leaves held by the model waits in host memory instead, from its maker's next stage's
forward to its reader's forward; the simulator's events and the optimal solver against brute
force over every tree and every choice of offloading."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfit.errors import InfeasibleBudgetError
from memfit.planning.costs import ChainCosts, Skip, uniform_chain
from memfit.planning.offload import host_bytes, offloads_skips, skip_pairs
from memfit.planning.optimal import Planner, solve_optimal
from memfit.planning.plan import Plan, Segment, Stage, Tree
from memfit.planning.simulate import Simulation, simulate
from memfit.planning.solve import min_peak_bytes
from tests.helpers.strategies import UNIT, all_trees, assert_optimal_matches_brute_force, chains


def _flat(start: int, stop: int, *offload_skips: tuple[int, int]) -> Segment:
    inner = tuple(Stage(i) for i in range(start, stop))
    return Segment(start, stop, inner, offload_skips=offload_skips)


def _hosted(costs: ChainCosts) -> ChainCosts:
    """``costs`` with a host (1 B/s: a copy of n bytes takes n seconds) and no other offload
    (no segment input may go: the brute force below does not try those)."""
    stages = [replace(stage, input_offloadable=False) for stage in costs.stages]
    return replace(costs, stages=stages, host_bytes_per_s=1.0)


def test_an_offloaded_skip_leaves_after_the_next_stage_and_comes_back_for_its_reader() -> None:
    """Five stages of 1 B outputs and 4 B saved; stage 0's output read again by stage 4. Held,
    it adds 1 B from stage 1's no-save forward to stage 4's; offloaded, it goes when stage 1's
    forward ends and is back for stage 4's forward only. The copies cost what their windows
    (stage 1's no-save forward, stage 4's forward: 1 s each) do not hide."""
    plain = _hosted(uniform_chain(5, activation_bytes=1, saved_bytes=4))
    skipped = replace(plain, skips=(Skip(0, 4),))
    held, hosted = _flat(0, 4), _flat(0, 4, (0, 4))
    levels = {
        name: dict(simulate(costs, (segment, Stage(4)), timeline=True).timeline)
        for name, costs, segment in [
            ("plain", plain, held),
            ("held", skipped, held),
            ("hosted", skipped, hosted),
        ]
    }
    inside = " inside segment [0, 4)"
    nosave = [f"forward (no save) of stage {i} (stage{i}){inside}" for i in range(4)]
    assert [levels["held"][k] - levels["plain"][k] for k in nosave] == [0, 1, 1, 1]
    assert [levels["hosted"][k] - levels["plain"][k] for k in nosave] == [0, 1, 0, 0]
    assert (
        levels["hosted"][f"forward: skip of stage 0 (stage0) to host{inside}"]
        == (levels["plain"][nosave[1]])
    )
    fetched = "forward: skips for stage 4 (stage4) fetched from host"
    assert levels["hosted"][fetched] == levels["plain"][nosave[3]] + 1
    kept = "forward of stage 4 (stage4)"
    assert levels["hosted"][kept] == levels["held"][kept] == levels["plain"][kept] + 1
    run = {
        name: simulate(costs, (segment, Stage(4)))
        for name, costs, segment in [("held", skipped, held), ("hosted", skipped, hosted)]
    }
    assert run["hosted"].host_peak_bytes == 1 and run["held"].host_peak_bytes == 0
    assert run["hosted"].step_s == run["held"].step_s  # 1 B at 1 B/s hides in 1 s windows
    slow = replace(skipped, host_bytes_per_s=0.25)  # 4 s a copy: 3 s exposed, twice
    assert simulate(slow, (hosted, Stage(4))).step_s == run["held"].step_s + 6


def test_offloading_skips_is_refused_where_it_cannot_run() -> None:
    costs = _hosted(replace(uniform_chain(5), skips=(Skip(1, 4),)))
    with pytest.raises(ValueError, match="no host to offload to"):
        simulate(replace(costs, host_bytes_per_s=0.0), (Stage(0), _flat(1, 4, (1, 4)), Stage(4)))
    with pytest.raises(ValueError, match=r"leaves only \[\] on the device"):
        simulate(costs, (_flat(0, 2, (1, 4)), _flat(2, 4), Stage(4)))
    with pytest.raises(ValueError, match=r"offloads skip \(0, 4\)"):
        simulate(costs, (Stage(0), _flat(1, 4, (0, 4)), Stage(4)))
    nested = Segment(0, 4, (Stage(0), _flat(1, 4, (1, 4))))
    with pytest.raises(ValueError, match="top-level segments only"):
        simulate(costs, (nested, Stage(4)))


def test_plan_json_keeps_offload_skips() -> None:
    tree = (Stage(0), _flat(1, 4, (1, 4)), Stage(4))
    plan = Plan.from_tree([f"s{i}" for i in range(5)], tree, "hand")
    again = Plan.from_json(plan.to_json())
    assert again.tree == tree
    assert json.loads(plan.to_json())["tree"][1]["offload_skips"] == [[1, 4]]


def _two_skips() -> ChainCosts:
    """Five stages of 4 B outputs and 1 B saved; stages 0 and 1 read again by stages 3 and 4:
    a segment over them holds them through its forward, up to where the recompute of another
    does not reach."""
    base = uniform_chain(5, activation_bytes=4, saved_bytes=1)
    return _hosted(replace(base, skips=(Skip(0, 3), Skip(1, 4))))


def test_offloading_skips_lowers_the_floor_within_the_host_budget() -> None:
    """The smallest peak drops from 17 B (skips held) to 14 B (offloaded); with no host memory
    to spare the planner holds them."""
    costs = _two_skips()
    without = replace(costs, host_bytes_per_s=0.0)
    assert (min_peak_bytes(costs), min_peak_bytes(without)) == (14, 17)
    solution = solve_optimal(costs, 14)
    assert solution.simulation.peak_bytes <= 14
    assert any(isinstance(item, Segment) and item.offload_skips for item in solution.tree)
    no_host = Planner(costs, host_budget_bytes=0)
    with pytest.raises(InfeasibleBudgetError):
        no_host.solve(16)
    assert host_bytes(costs, no_host.solve(17).tree) == 0


@pytest.mark.slow  # brute force over 5 stages (make quick leaves it out)
def test_optimal_matches_brute_force_at_every_budget_where_offloading_pays() -> None:
    """Every budget from the floor to the fastest tree's peak gets the fastest of all trees
    and offloading choices that fit; copies as slow as a block (4 B at 1 B/s against 1 s
    windows: 3 s exposed each) make the choice a trade."""
    costs = _two_skips()
    runs = [simulate(costs, twin) for tree in all_trees(costs) for twin in _twins(costs, tree)]
    plain = [simulate(costs, tree) for tree in all_trees(costs)]
    assert min(run.peak_bytes for run in runs) < min(run.peak_bytes for run in plain)
    for budget in range(min(run.peak_bytes for run in runs), max(r.peak_bytes for r in runs) + 1):
        solution = solve_optimal(costs, budget)
        assert solution.simulation.peak_bytes <= budget
        assert solution.simulation.step_s == min(r.step_s for r in runs if r.peak_bytes <= budget)


def _twins(costs: ChainCosts, tree: Tree) -> Iterator[Tree]:
    """``tree`` with every subset of its top-level segments that may offload skips doing so."""
    places = [
        k
        for k, item in enumerate(tree)
        if isinstance(item, Segment) and offloads_skips(costs, item)
    ]
    for chosen in itertools.product([False, True], repeat=len(places)):
        items = list(tree)
        for place, offload in zip(places, chosen, strict=True):
            pairs = skip_pairs(costs, items[place]) if offload else ()  # type: ignore[arg-type]
            items[place] = replace(items[place], offload_skips=pairs)
        yield tuple(items)


def _widen(costs: ChainCosts, index: int, extra: int) -> ChainCosts:
    """``costs`` with stage ``index``'s output ``extra`` bytes larger, consistently (its next
    stage's input, its forward peaks, what its backward frees)."""
    stages = list(costs.stages)
    stage = stages[index]
    options = {
        name: replace(
            option,
            forward_peak_bytes=option.forward_peak_bytes + extra,
            backward_delta_bytes=option.backward_delta_bytes - extra,
        )
        for name, option in stage.options.items()
    }
    stages[index] = replace(stage, output_bytes=stage.output_bytes + extra, options=options)
    after = stages[index + 1]
    stages[index + 1] = replace(after, input_bytes=after.input_bytes + extra)
    return replace(costs, stages=stages)


@st.composite
def hosted_chain(draw: st.DrawFn) -> tuple[ChainCosts, int, list[Simulation]]:
    costs = draw(chains(min_stages=4, max_stages=5, max_options=2, constraints=draw(st.booleans())))
    n = len(costs.stages)
    makers = draw(st.lists(st.integers(0, n - 3), unique=True, min_size=1, max_size=n - 2))
    skips = tuple(Skip(maker, draw(st.integers(maker + 2, n - 1))) for maker in makers)
    for maker in makers:  # skips as wide as a U-Net's, where holding them sets the peak
        costs = _widen(costs, maker, draw(st.integers(0, 12)) * UNIT)
    rate = draw(st.sampled_from([0.5, 1.0, 2.0])) * UNIT  # whole and half seconds: exact sums
    costs = replace(_hosted(replace(costs, skips=skips)), host_bytes_per_s=rate)
    runs = [simulate(costs, twin) for tree in all_trees(costs) for twin in _twins(costs, tree)]
    known = sorted({run.peak_bytes for run in runs})
    budget = draw(st.one_of(st.sampled_from(known), st.integers(known[0] - UNIT, known[-1] + UNIT)))
    return costs, budget, runs


@pytest.mark.slow  # brute force (make quick leaves it out)
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(case=hosted_chain())
def test_optimal_matches_brute_force_with_offloaded_skips(
    case: tuple[ChainCosts, int, list[Simulation]],
) -> None:
    assert_optimal_matches_brute_force(*case)
