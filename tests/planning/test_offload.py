"""Offload in the planner: the simulator's events and prices, and the DP against brute force."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from itertools import pairwise, product

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfit.errors import InfeasibleBudgetError
from memfit.planning import baselines
from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts
from memfit.planning.offload import (
    OFFLOAD,
    host_bytes,
    in_flight_bytes,
    offload_option,
    with_offload,
    without_offload,
)
from memfit.planning.optimal import Planner, solve_optimal
from memfit.planning.plan import Plan, Segment, Stage, Tree, recompute_one
from memfit.planning.simulate import simulate
from tests.helpers.strategies import UNIT, all_trees, chains


def examples(count: int) -> settings:
    return settings(deadline=None, max_examples=count, suppress_health_check=[HealthCheck.too_slow])


def block_chain(
    blocks: int = 3, *, rate: float = 1.0, moved: int = 3, activation: int = 1
) -> ChainCosts:
    """``<pre>``, ``blocks`` blocks and ``<post>``: inputs and outputs ``activation`` bytes, a
    block saves 4 (``moved`` of them offloadable), ``<pre>`` and ``<post>`` nothing, forward
    1 s, backward 2 s; copies at ``rate`` bytes/s."""

    def stage(name: str, block: bool) -> StageCosts:
        saved = 4 if block else 0
        keep = OptionCosts(
            forward_s=1.0,
            backward_s=2.0,
            saved_bytes=saved,
            forward_peak_bytes=saved + activation,
            backward_peak_bytes=saved + activation,
            backward_delta_bytes=-saved - activation,
        )
        return StageCosts(
            name=name,
            input_bytes=activation,
            output_bytes=activation,
            options={KEEP: keep},
            nosave_forward_s=1.0,
            nosave_forward_peak_bytes=saved + activation,
            checkpointable=block,
            offload_bytes=moved if block else 0,
        )

    stages = [stage("<pre>", False), *(stage(f"b{i}", True) for i in range(blocks))]
    stages.append(stage("<post>", False))
    return with_offload(ChainCosts(stages=stages, host_bytes_per_s=rate))


def test_offload_option_is_derived_from_keep() -> None:
    costs = block_chain(rate=1.0)
    option = costs.stages[1].options[OFFLOAD]
    keep = costs.stages[1].options[KEEP]
    assert option.saved_bytes == keep.saved_bytes - 3
    assert option.backward_peak_bytes == keep.backward_peak_bytes + 3
    assert option.backward_delta_bytes == keep.backward_delta_bytes + 3
    # 3 bytes at 1 byte/s next to the next block's 1 s forward and 2 s backward
    assert option.forward_s == keep.forward_s + 2.0
    assert option.backward_s == keep.backward_s + 1.0
    # the last block's next stage is <post>: nothing runs ahead, the copies are all exposed
    assert offload_option(costs, 3).forward_s == keep.forward_s + 3.0
    assert OFFLOAD not in costs.stages[0].options and OFFLOAD not in costs.stages[4].options


def test_no_host_no_offload() -> None:
    costs = block_chain(rate=0.0)
    assert all(OFFLOAD not in stage.options for stage in costs.stages)
    tree = (Stage(0), Segment(1, 2, (Stage(1),), offload=True), Stage(2), Stage(3), Stage(4))
    with pytest.raises(ValueError, match="no host to offload to"):
        simulate(costs, tree)
    assert in_flight_bytes(costs) == 0


def test_nested_offload_is_refused() -> None:
    costs = block_chain()
    inner = (Segment(1, 2, (Stage(1),), offload=True), Stage(2))
    with pytest.raises(ValueError, match="inside another segment"):
        simulate(costs, (Stage(0), Segment(1, 3, inner), Stage(3), Stage(4)))


def test_segment_input_leaves_in_forward_and_returns_one_item_ahead() -> None:
    costs = block_chain(rate=1.0)
    plain = (Stage(0), recompute_one(1), recompute_one(2), Stage(3), Stage(4))
    tree = (Stage(0), Segment(1, 2, (Stage(1),), offload=True), *plain[2:])
    base, run = simulate(costs, plain, timeline=True), simulate(costs, tree, timeline=True)
    events = [label for label, _ in run.timeline]
    left = events.index("forward: input of stage 1 (b0) to host")
    assert events[left - 1] == "forward (no save) of stage 1 (b0) inside segment [1, 2)"
    fetched = events.index("backward: stage 1 (b0) fetched from host")
    # fetched when the next item's backward starts (its recompute), before that item runs
    assert events[fetched + 1].startswith("recompute") and "segment [2, 3)" in events[fetched + 1]
    levels = dict(run.timeline)
    assert (
        levels["forward of stage 4 (<post>)"]
        == dict(base.timeline)["forward of stage 4 (<post>)"] - 1
    )
    assert run.host_peak_bytes == 1 and base.host_peak_bytes == 0
    # 1 byte at 1 byte/s: hidden by the 1 s no-save forward and by the next 3 s backward
    assert run.step_s == base.step_s


def test_offloaded_stage_waits_for_the_next_forward() -> None:
    costs = block_chain(rate=1.0)
    kept = tuple(Stage(i) for i in range(5))
    tree = (Stage(0), Stage(1, OFFLOAD), *kept[2:])
    run = simulate(costs, tree, timeline=True)
    events = [label for label, _ in run.timeline]
    done = events.index("forward: copies to host before stage 2 (b1) done")
    assert events[done - 1] == "forward of stage 2 (b1)"
    levels = dict(run.timeline)
    base = dict(simulate(costs, kept, timeline=True).timeline)
    assert levels["forward of stage 2 (b1)"] == base["forward of stage 2 (b1)"]
    assert levels["forward of stage 4 (<post>)"] == base["forward of stage 4 (<post>)"] - 3
    # 3 bytes at 1 byte/s: 2 s exposed next to a 1 s forward, none next to a 2 s backward... 1 s
    assert run.step_s == simulate(costs, kept).step_s + 2.0 + 1.0
    assert run.host_peak_bytes == 3


def test_plan_json_keeps_offload() -> None:
    tree = (Stage(0), Segment(1, 3, (Stage(1), recompute_one(2)), offload=True), Stage(3))
    plan = Plan.from_tree(["a", "b", "c", "d"], tree, "hand")
    again = Plan.from_json(plan.to_json())
    assert again.tree == tree
    assert again.options["b"] == "recompute+offload"
    assert '"offload": true' in plan.to_json()


def test_offload_makes_low_budgets_fast() -> None:
    """Near the floor, nested recompute reruns blocks many times; offloading each block's input
    instead costs only what its copies do not hide (4 bytes at 4 bytes/s next to 1 s no-save
    forwards and 3 s backwards: nothing)."""
    costs = block_chain(blocks=8, rate=4.0, activation=4)
    plain = without_offload(dataclasses.replace(costs, host_bytes_per_s=0.0))
    floor = Planner(plain).floor_simulation.peak_bytes
    planner = Planner(costs)
    assert planner.floor_simulation.peak_bytes <= floor
    solution = planner.solve(floor)
    slow = solve_optimal(plain, floor).simulation.step_s
    assert solution.simulation.peak_bytes <= floor
    recompute_all_time = 10 * 3.0 + 8 * 1.0
    assert solution.simulation.step_s <= recompute_all_time < slow


def test_host_budget_is_respected() -> None:
    costs = block_chain(blocks=6, rate=100.0, activation=4)
    free = Planner(costs)
    budget = free.floor_simulation.peak_bytes
    unlimited = free.solve(budget)
    assert host_bytes(costs, unlimited.tree) > 4
    limited = Planner(costs, host_budget_bytes=4)
    try:
        solution = limited.solve(budget)
    except InfeasibleBudgetError:
        return
    assert host_bytes(costs, solution.tree) <= 4
    assert solution.simulation.peak_bytes <= budget


def test_host_budget_rounds_do_not_leak_into_later_budgets() -> None:
    """A budget whose tree had to give up offloads (host budget) leaves the planner as it was:
    the frontier solves many budgets with one planner."""
    costs = block_chain(blocks=6, rate=100.0, activation=4)
    planner = Planner(costs, host_budget_bytes=16)
    planner.solve(Planner(costs).floor_simulation.peak_bytes)  # drops offloads to fit 16
    for budget in (39, 49):
        fresh = Planner(costs, host_budget_bytes=16).solve(budget)
        assert planner.solve(budget).simulation.step_s == fresh.simulation.step_s


def test_offloaded_inputs_are_found_near_the_floor() -> None:
    """The full menu's in-flight reserve is a block's offloadable bytes (3 here, an input 1):
    near the floor it leaves the DP no room, and the inputs-only DP (reserve: one input) finds
    what every block recomputed with its input offloaded gives, or better."""
    costs = block_chain(blocks=8, rate=1.0, moved=3, activation=1)
    every = baselines.recompute_all_offload(costs)
    for budget in (12, 13):
        assert simulate(costs, every).peak_bytes <= budget
        solution = Planner(costs).solve(budget)
        assert solution.simulation.peak_bytes <= budget
        assert solution.simulation.step_s <= simulate(costs, every).step_s


def test_inputs_that_stay_are_never_offloaded() -> None:
    """A block whose input the block before saves too (not ``input_offloadable``): offloading it would
    free nothing, so no tree offloads it and the simulator refuses one that does."""
    costs = block_chain(blocks=4, rate=100.0, activation=4)
    stays = dataclasses.replace(
        costs,
        stages=[
            dataclasses.replace(stage, input_offloadable=index not in (2, 3))
            for index, stage in enumerate(costs.stages)
        ],
    )
    with pytest.raises(ValueError, match="stays on the device"):
        simulate(
            stays,
            (
                Stage(0),
                Stage(1),
                Segment(2, 3, (Stage(2),), offload=True),
                *[Stage(i) for i in (3, 4, 5)],
            ),
        )
    every = baselines.recompute_all_offload(stays)
    assert [item.start for item in every if isinstance(item, Segment) and item.offload] == [1, 4]
    planner = Planner(stays)
    for budget in range(planner.floor_simulation.peak_bytes, 40):
        tree = planner.solve(budget).tree
        simulate(stays, tree)  # valid: no offloaded input that stays
        assert not any(
            isinstance(item, Segment) and item.offload and item.start in (2, 3) for item in tree
        )


# ---- brute force on small chains --------------------------------------------------------


@st.composite
def offload_chains(draw: st.DrawFn, fast: bool) -> ChainCosts:
    costs = draw(chains(min_stages=2, max_stages=5, max_options=2))
    stages = [
        dataclasses.replace(
            stage,
            offload_bytes=draw(st.integers(0, max(0, stage.options[KEEP].saved_bytes // UNIT)))
            * UNIT,
        )
        for stage in costs.stages
    ]
    rate = 1e18 if fast else draw(st.sampled_from([UNIT / 2, UNIT * 2, UNIT * 8]))
    return with_offload(dataclasses.replace(costs, stages=stages, host_bytes_per_s=rate))


def with_offloaded_segments(tree: Tree) -> Iterator[Tree]:
    """``tree`` with every subset of its top-level segments offloading their input."""
    places = [i for i, item in enumerate(tree) if isinstance(item, Segment)]
    for flags in product((False, True), repeat=len(places)):
        items = list(tree)
        for place, flag in zip(places, flags, strict=True):
            item = items[place]
            assert isinstance(item, Segment)
            items[place] = Segment(item.start, item.stop, item.inner, offload=flag)
        yield tuple(items)


def every_tree(costs: ChainCosts) -> list[tuple[Tree, int, float]]:
    out = []
    for tree in all_trees(costs):
        for variant in with_offloaded_segments(tree):
            run = simulate(costs, variant)
            out.append((variant, run.peak_bytes, run.step_s))
    return out


# Brute force: every tree with every subset of offloaded segment inputs, simulated (up to
# 14,000 trees for a chain of 5 stages), hence slow, and 60 examples each (the DP's offload
# rules are also held by the chains of 3-8 blocks above, in make quick).
@pytest.mark.slow
@examples(60)
@given(costs=offload_chains(fast=False), data=st.data())
def test_offload_dp_is_safe_and_never_slower_than_without(
    costs: ChainCosts, data: st.DataObject
) -> None:
    runs = every_tree(costs)
    plain = [run for run in runs if not _offloads(run[0])]
    budget = data.draw(st.sampled_from(sorted({peak for _, peak, _ in runs})))
    best_plain = min((s for _, p, s in plain if p <= budget), default=None)
    try:
        solution = Planner(costs).solve(budget)
    except InfeasibleBudgetError as error:
        assert best_plain is None
        assert error.min_feasible_bytes > budget
        return
    assert solution.simulation.peak_bytes <= budget
    assert simulate(costs, solution.tree).peak_bytes == solution.simulation.peak_bytes
    if best_plain is not None:
        assert solution.simulation.step_s <= best_plain


@pytest.mark.slow
@examples(60)
@given(costs=offload_chains(fast=True), data=st.data())
def test_offload_dp_is_optimal_within_its_reserve_when_copies_are_free(
    costs: ChainCosts, data: st.DataObject
) -> None:
    """With copies that hide behind any compute, the DP's prices are the simulator's: it finds
    the fastest tree among those that fit with one item's bytes in flight to spare."""
    runs = every_tree(costs)
    reserve = in_flight_bytes(costs)
    budget = data.draw(st.sampled_from(sorted({peak for _, peak, _ in runs})))
    roomy = [s for tree, p, s in runs if p + reserve <= budget and _stage_offloads_ok(tree)]
    try:
        solution = Planner(costs).solve(budget)
    except InfeasibleBudgetError:
        assert not roomy
        return
    assert solution.simulation.peak_bytes <= budget
    if roomy:
        assert solution.simulation.step_s <= min(roomy)


def _offloads(tree: Tree) -> bool:
    return any(
        (isinstance(item, Segment) and item.offload)
        or (isinstance(item, Stage) and item.option == OFFLOAD)
        for item in tree
    )


def _stage_offloads_ok(tree: Tree) -> bool:
    return True


def test_frontier_with_offload_reaches_lower_and_stays_pareto() -> None:
    from memfit.planning.frontier import frontier

    costs = block_chain(blocks=8, rate=4.0, activation=4)
    plain = without_offload(costs)
    with_it, without = frontier(costs, points=12), frontier(plain, points=12)
    assert with_it[0].peak_bytes <= without[0].peak_bytes
    assert with_it[0].step_s < without[0].step_s  # the low end costs less time
    for lower, higher in pairwise(with_it):
        assert lower.peak_bytes < higher.peak_bytes and lower.step_s > higher.step_s
    for point in with_it:
        assert simulate(costs, point.tree).peak_bytes == point.peak_bytes
