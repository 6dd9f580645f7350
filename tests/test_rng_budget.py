"""A checkpoint's RNG state counts: on a toy model where 5,056 bytes per checkpoint matter, every
optimal plan's measured peak is within its budget and the prediction within 2%."""

import pytest
import torch

import memfit
from memfit.models import build
from memfit.planning.solve import min_peak_bytes


@pytest.fixture(scope="module")
def toy():
    model, sample = build("mlp", layers=10, width=8, hidden=32, batch=64)
    return model, sample, memfit.profile(model, sample, repeats=1, options=())


def test_the_rng_state_of_a_checkpoint_is_measured(toy) -> None:
    _model, _sample, prof = toy
    assert prof.costs.checkpoint_bytes == torch.get_rng_state().untyped_storage().nbytes()
    # the recompute step keeps one state per block until its backward: the simulator agrees
    plan = memfit.plan(prof, budget=None, strategy="all")
    measured = prof.recompute_measurement
    assert measured is not None
    assert abs(plan.predicted_peak_bytes / measured.peak_bytes - 1) <= 0.02


@pytest.mark.parametrize("between", [0.0, 0.1, 0.3])
def test_optimal_plans_on_a_toy_model_fit_their_budget(toy, between: float) -> None:
    """Budgets from the smallest feasible peak (0.0) towards the unplanned one: the parameter
    gradients allocated in backward dominate this toy, so percentages would all be infeasible."""
    model, sample, prof = toy
    floor = min_peak_bytes(prof.costs)
    budget = floor + int(between * (prof.measurement.peak_bytes - floor))
    plan = memfit.plan(prof, budget=budget)
    memfit.apply(model, plan, sample)
    try:
        report = memfit.verify(model, sample, repeats=1)
    finally:
        memfit.remove(model)
    assert report.gradients_equal and report.loss_equal, report.mismatched
    assert plan.budget_bytes is not None
    assert report.measured_peak_bytes <= plan.budget_bytes, plan.tree
    assert abs(report.prediction_error) <= 0.02, plan.tree
