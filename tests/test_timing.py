"""Choosing among plans within a budget by timing them (``memfit.plan(..., candidates=N)``).

The choice itself is tested with scripted step times (the rule: medians of per-round ratios
to the first plan, a 1% margin, rounds that start at another plan each time, failures of
other plans dropped); real timing only in smoke tests that assert what timing cannot change.
"""

from __future__ import annotations

import pytest
import torch

import memfit
import memfit.verbs.timing
from memfit.errors import InfeasibleBudgetError
from memfit.integrations.hf import build_hf
from memfit.planning.candidates import alternatives, used_options
from memfit.planning.frontier import frontier
from memfit.report.tables import plan_table
from memfit.runtime.apply import applied_plan
from memfit.verbs.bench import bench
from memfit.verbs.timing import ALONE, MARGIN, fastest


@pytest.fixture(scope="module")
def gpt2():
    # library defaults (dropout on, cache on, default attention); only sizes are small
    return build_hf("gpt2", layers=4, hidden=64, heads=4, seq=64, batch=4)


@pytest.fixture(scope="module")
def prof(gpt2):
    """The model's profile (timed: ``repeats=1``), shared by the tests that only read it."""
    model, sample = gpt2
    return memfit.profile(model, sample, repeats=1)


@pytest.fixture(scope="module")
def three(prof):
    """Three distinct real plans of the model (what they are does not matter here)."""
    return [memfit.plan(prof, budget=None, strategy=s) for s in ("none", "all", "every:2")]


def scripted(monkeypatch: pytest.MonkeyPatch, seconds) -> list[int]:
    """Make every timed step take ``seconds(plan_index, round)``; returns the call order."""
    calls: list[int] = []
    plans: list[memfit.Plan] = []

    def fake(model, sample, plan, loop=None, target=None):
        if plan not in plans:
            plans.append(plan)
        index = next(i for i, p in enumerate(plans) if p is plan)
        calls.append(index)
        return seconds(index, calls.count(index) - 1)

    monkeypatch.setattr(memfit.verbs.timing, "timed_step_under", fake)
    return calls


@pytest.mark.parametrize(("ratio", "chosen"), [(0.995, 0), (1 - MARGIN - 0.005, 1), (1.3, 0)])
def test_another_plan_must_win_by_the_margin(gpt2, three, monkeypatch, ratio, chosen) -> None:
    model, sample = gpt2
    scripted(monkeypatch, lambda i, r: [1.0, ratio, 1.5][i])
    result = fastest(model, sample, three)
    assert result.tree == three[chosen].tree
    timed = result.info["timed"]
    assert [e["chosen"] for e in timed] == [i == chosen for i in range(3)]
    assert timed[1]["ratio_to_optimal"] == pytest.approx(ratio)
    assert result.info["chosen_by"] == "timing"


def test_the_choice_is_the_median_of_per_round_ratios(gpt2, three, monkeypatch) -> None:
    model, sample = gpt2
    # plan 1 is 5% faster in 3 rounds of 5 and twice as slow in the other 2: a mean would
    # reject it, the median takes it; the machine's drift (all slower in round 3) cancels
    drift = [1.0, 1.0, 3.0, 1.0, 1.0]
    own = {0: [1.0] * 5, 1: [0.95, 2.0, 0.95, 2.0, 0.95], 2: [1.2] * 5}
    scripted(monkeypatch, lambda i, r: own[i][r] * drift[r])
    result = fastest(model, sample, three, rounds=5)
    assert result.tree == three[1].tree
    assert result.info["timed"][1]["ratio_to_optimal"] == pytest.approx(0.95)
    assert result.info["timed"][2]["measured_step_s"] == pytest.approx(1.2)


def test_each_round_starts_at_another_plan(gpt2, three, monkeypatch) -> None:
    model, sample = gpt2
    calls = scripted(monkeypatch, lambda i, r: 1.0)
    fastest(model, sample, three, rounds=4)
    assert calls == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]


def test_a_failing_alternative_is_dropped_the_first_plan_is_not(gpt2, three, monkeypatch):
    model, sample = gpt2

    def seconds(index: int, round_: int) -> float:
        if index == 1:
            raise torch.OutOfMemoryError("out of memory (scripted)")
        return [1.0, 0.5, 1.2][index]

    scripted(monkeypatch, seconds)
    result = fastest(model, sample, three)
    assert result.tree == three[0].tree
    entry = result.info["timed"][1]
    assert "OutOfMemoryError" in entry["error"] and entry["measured_step_s"] is None
    assert not entry["chosen"]

    def first_fails(index: int, round_: int) -> float:
        raise InfeasibleBudgetError(1, 2)

    scripted(monkeypatch, first_fails)
    with pytest.raises(InfeasibleBudgetError):
        fastest(model, sample, three)


def test_a_single_plan_is_returned_untimed(gpt2, three, monkeypatch) -> None:
    model, sample = gpt2
    calls = scripted(monkeypatch, lambda i, r: 1.0)
    chosen = fastest(model, sample, three[:1])
    assert chosen.tree == three[0].tree
    assert "timed" not in chosen.info and chosen.info["chosen_by"] == ALONE
    assert calls == []


def test_real_timing_leaves_the_model_as_found(gpt2, three) -> None:
    model, sample = gpt2
    state = torch.get_rng_state()
    chosen = fastest(model, sample, three[:2], rounds=2)
    assert chosen.tree in {p.tree for p in three[:2]}
    assert all(e["measured_step_s"] > 0 for e in chosen.info["timed"])
    assert applied_plan(model) is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training


def test_plan_with_candidates_on_a_real_model(gpt2) -> None:
    model, sample = gpt2
    # a loop that keeps only the loss: every candidate is made and timed for that loop
    prof = memfit.profile(model, sample, repeats=1, keep_output=False)
    # a budget with room for optimal plans below the best one whatever the measured times: the
    # frontier's middle point, above its floor (50% of activation memory lay at the floor in
    # one CI run, where only one plan fits; the bytes, and so the floor, repeat exactly)
    points = sorted(frontier(prof.costs), key=lambda point: point.peak_bytes)
    assert len(points) >= 2
    budget = points[len(points) // 2].peak_bytes
    within = alternatives(prof.costs, budget, 3)
    assert len(within) >= 2  # this budget leaves room for other plans
    plan = memfit.plan(model, sample, budget=budget, candidates=3, repeats=1, keep_output=False)
    # an optimal plan of keep and recompute only still has the plans below it to time
    timed = plan.info["timed"]
    assert len(timed) >= 2 and sum(e["chosen"] for e in timed) == 1
    assert plan.info["chosen_by"] == "timing"
    assert not plan.keep_output
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert "chosen" in str(_render(plan_table(plan)))
    # every plan that could have been chosen fits and keeps gradients bit for bit
    for candidate in within:
        memfit.apply(model, candidate, sample)
        try:
            report = memfit.verify(model, sample, repeats=1, keep_output=False)
        finally:
            memfit.remove(model)
        assert report.gradients_equal
        assert report.measured_peak_bytes <= candidate.budget_bytes


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_auto_with_candidates_applies_the_choice(gpt2) -> None:
    model, sample = gpt2
    plan = memfit.auto(model, sample, budget="60%", candidates=2, repeats=1)
    try:
        assert applied_plan(model) is not None
        assert applied_plan(model).tree == plan.tree
        assert "chosen_by" in plan.info
    finally:
        memfit.remove(model)


def test_bench_rows_chosen_by_timing(gpt2, prof) -> None:
    model, sample = gpt2
    result = bench(model, sample, prof, budgets=["50%"], strategies=("optimal-timed",), repeats=1)
    (row,) = result.rows
    assert row.label == "optimal, candidates timed"
    assert row.gradients_equal and row.measured_peak_bytes <= row.budget_bytes
    assert "chosen_by" in row.plan["info"]
    with pytest.raises(ValueError, match="at least 2 plans"):
        bench(model, sample, prof, budgets=["50%"], strategies=("optimal-timed",), candidates=1)


def test_candidates_errors(gpt2, prof) -> None:
    model, sample = gpt2
    with pytest.raises(ValueError, match="candidates must be an integer >= 1"):
        memfit.plan(prof, budget="50%", candidates=0)
    for wrong in (True, 2.0, "3"):
        with pytest.raises(TypeError, match="candidates must be an integer"):
            memfit.plan(prof, budget="50%", candidates=wrong)
    with pytest.raises(ValueError, match=r"memfit.plan\(model, sample"):
        memfit.plan(prof, budget="50%", candidates=2)
    with pytest.raises(ValueError, match="strategy 'all' makes one plan"):
        memfit.plan(model, sample, budget="50%", strategy="all", candidates=2)
    with pytest.raises(ValueError, match='not with shapes="dynamic"'):
        memfit.auto(model, sample, budget="50%", shapes="dynamic", candidates=2)
    with pytest.raises(TypeError, match="candidates must be an integer"):
        memfit.auto(model, sample, budget="50%", shapes="dynamic", candidates=True)
    with pytest.raises(ValueError, match="at least one plan"):
        fastest(model, sample, [])
    assert applied_plan(model) is None


def test_used_options_of_a_real_plan(prof) -> None:
    menus = {name for stage in prof.costs.stages for name in stage.options}
    for budget in ("40%", "50%", "60%", "70%"):
        plan = memfit.plan(prof, budget=budget)
        expected = {o for o in plan.options.values() if o not in ("keep", "recompute")}
        assert expected <= used_options(plan.tree) <= menus - {"keep"}
