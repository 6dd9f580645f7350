"""Choosing among plans within a budget by timing them (``memfit.plan(..., candidates=N)``)."""

from __future__ import annotations

import pytest
import torch

import memfit
from memfit.integrations.hf import build_hf
from memfit.planning.candidates import used_options
from memfit.runtime.apply import applied_plan
from memfit.timing import MARGIN, fastest


@pytest.fixture(scope="module")
def gpt2():
    # library defaults (dropout on, cache on, default attention); only sizes are small
    return build_hf("gpt2", layers=4, hidden=64, heads=4, seq=64, batch=4)


def test_fastest_picks_the_plan_that_measures_faster(gpt2) -> None:
    model, sample = gpt2
    prof = memfit.profile(model, sample, repeats=1)
    slow = memfit.plan(prof, budget=None, strategy="all")  # every block recomputed
    quick = memfit.plan(prof, budget=None, strategy="none")
    state = torch.get_rng_state()
    chosen = fastest(model, sample, [slow, quick])
    assert chosen.tree == quick.tree
    timed = chosen.info["timed"]
    assert [entry["chosen"] for entry in timed] == [False, True]
    assert timed[0]["ratio_to_optimal"] == 1.0
    assert timed[1]["ratio_to_optimal"] < 1.0 - MARGIN
    assert all(entry["measured_step_s"] > 0 for entry in timed)
    # the first plan stays when no other beats it
    assert fastest(model, sample, [quick, slow]).tree == quick.tree
    # the model is left as it was: unplanned, no gradients, the RNG where it stood
    assert applied_plan(model) is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), state)


def test_a_single_plan_is_returned_untimed(gpt2) -> None:
    model, sample = gpt2
    prof = memfit.profile(model, sample, repeats=1)
    only = memfit.plan(prof, budget=None, strategy="none")
    chosen = fastest(model, sample, [only])
    assert chosen.tree == only.tree
    assert "timed" not in chosen.info
    assert chosen.info["chosen_by"].startswith("prediction")


def test_plan_with_candidates_times_plans_within_the_budget(gpt2) -> None:
    model, sample = gpt2
    plan = memfit.plan(model, sample, budget="50%", candidates=3, repeats=1)
    timed = plan.info["timed"]
    assert 1 <= len(timed) <= 3
    assert sum(entry["chosen"] for entry in timed) == 1
    assert plan.info["chosen_by"] == "timing" or len(timed) == 1
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert plan.keep_output  # the loop the profile measured, as plan() records it
    # the chosen plan runs within budget with bit-identical gradients
    memfit.apply(model, plan, sample)
    try:
        report = memfit.verify(model, sample, repeats=1)
    finally:
        memfit.remove(model)
    assert report.gradients_equal
    assert report.measured_peak_bytes <= plan.budget_bytes


def test_auto_with_candidates_applies_the_choice(gpt2) -> None:
    model, sample = gpt2
    plan = memfit.auto(model, sample, budget="60%", candidates=2, repeats=1)
    try:
        assert applied_plan(model) is not None
        assert applied_plan(model).tree == plan.tree
        assert "chosen_by" in plan.info
    finally:
        memfit.remove(model)


def test_candidates_errors(gpt2) -> None:
    model, sample = gpt2
    prof = memfit.profile(model, sample, repeats=1)
    with pytest.raises(ValueError, match="candidates must be an integer >= 1"):
        memfit.plan(prof, budget="50%", candidates=0)
    with pytest.raises(ValueError, match=r"memfit.plan\(model, sample"):
        memfit.plan(prof, budget="50%", candidates=2)
    with pytest.raises(ValueError, match="strategy 'all' makes one plan"):
        memfit.plan(model, sample, budget="50%", strategy="all", candidates=2)
    with pytest.raises(ValueError, match='not with shapes="dynamic"'):
        memfit.auto(model, sample, budget="50%", shapes="dynamic", candidates=2)
    with pytest.raises(ValueError, match="at least one plan"):
        fastest(model, sample, [])
    assert applied_plan(model) is None


def test_used_options_of_a_real_plan(gpt2) -> None:
    model, sample = gpt2
    prof = memfit.profile(model, sample, repeats=1)
    plan = memfit.plan(prof, budget="40%")
    assert used_options(plan.tree) <= set(plan.options.values()) - {"keep", "recompute"}
