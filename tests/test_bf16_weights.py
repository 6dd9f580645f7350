"""A model whose weights are bf16 (``model.to(torch.bfloat16)``, no autocast): plans predict its
peak within 2% and keep its gradients bit for bit."""

from __future__ import annotations

import pytest
import torch

import memfit
from memfit.errors import InfeasibleBudgetError
from memfit.models import build
from memfit.verbs.verification import mismatched_gradients, seeded_gradients

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")


def _model(name: str) -> tuple[torch.nn.Module, object]:
    if name == "gpt":  # the built-in GPT: dropout 0.1
        return build("gpt", layers=4, width=64, heads=2, seq=64, batch=2)
    pytest.importorskip("transformers")
    from memfit.integrations.hf import build_hf

    return build_hf(name, layers=4, hidden=32, seq=64)  # library defaults


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_bf16_weights(name: str) -> None:
    model, sample = _model(name)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference_loss, reference_grads = seeded_gradients(model, sample, None, 0)
    prof = memfit.profile(model, sample, repeats=1)
    for budget in ("30%", "60%"):
        try:
            plan = memfit.plan(prof, budget=budget)
        except InfeasibleBudgetError as error:  # tiny models: 30% may lie below the floor
            plan = memfit.plan(prof, budget=error.min_feasible_bytes)
        memfit.apply(model, plan, sample)
        try:
            loss, grads = seeded_gradients(model, sample, None, 0)
            peak_bytes = memfit.measure(model, sample, repeats=1).peak_bytes
        finally:
            memfit.remove(model)
        assert torch.equal(loss, reference_loss)
        assert not mismatched_gradients(reference_grads, grads), plan.tree
        assert plan.budget_bytes is not None and peak_bytes <= plan.budget_bytes
        assert abs(plan.predicted_peak_bytes / peak_bytes - 1.0) <= 0.02, (budget, plan.tree)
