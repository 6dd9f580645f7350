"""Lossy options (``exact=False`` with ``compress:*``) through shape profiles: ``memfit.estimate``
and ``memfit.auto(..., shapes="dynamic")``."""

from __future__ import annotations

import torch

import memfit
from memfit.models import gpt
from memfit.planning.shape_fits import Shape
from memfit.runtime import BF16, FP8
from memfit.runtime.dynamic import shape_plans

SHAPES = [(4, 16), (2, 16), (4, 32), (2, 32)]
LOSSY = {BF16, FP8}


def _marked(plan: memfit.Plan) -> bool:
    """A plan says it is lossy exactly when it uses a lossy option, naming each stage."""
    stages = {plan.stage_names[s.index] for s in plan.tree if getattr(s, "option", "") in LOSSY}
    return plan.exact == (not stages) and stages <= set(plan.inexact)


def test_estimate_fits_lossy_options_with_their_error_and_plans_within_budget() -> None:
    model, sample = gpt(layers=2, width=64, heads=2, vocab=64, seq=32, batch=4)
    shaped = memfit.profile_shapes(
        model, sample, shapes=SHAPES, exact=False, options=(BF16, FP8), repeats=1
    )
    for stage in shaped.fitted.costs_at(Shape(4, 24)).stages[1:-1]:  # the blocks
        assert set(stage.options) >= LOSSY
        for option in LOSSY:
            detail = stage.options[option].detail
            assert detail["exact"] is False and 0 < detail["error"] < 0.1
            assert stage.options[option].saved_bytes < stage.options["keep"].saved_bytes
    result = memfit.estimate(shaped, shapes=[(4, 24), (4, 32)], budget="70%")
    for row in result.rows:
        assert row.plan is not None and row.plan.predicted_peak_bytes <= row.budget_bytes
        assert _marked(row.plan)


def test_dynamic_plans_with_lossy_options_are_marked_and_train() -> None:
    model, sample = gpt(layers=2, width=64, heads=2, vocab=64, seq=32, batch=4)
    applied = memfit.auto(
        model,
        sample,
        budget="85%",
        shapes="dynamic",
        bucket=16,
        exact=False,
        options=(BF16,),
        shapes_profiled=SHAPES,
        repeats=1,
    )
    try:
        assert _marked(applied)
        tokens, targets = sample
        model(tokens[:2], targets[:2]).backward()  # another shape: its own plan
        plans = shape_plans(model)
        assert plans is not None
        assert all(_marked(p) for p in plans.plans.values())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    finally:
        memfit.remove(model)
