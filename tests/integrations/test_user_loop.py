"""Plans hold in the loop users write: ``out = model(**batch); out.loss.backward()`` keeps the
output (the logits) alive through backward, and memfit measures and plans that loop by default."""

import pytest
import torch

import memfit
from memfit.measuring.meter import MemoryMeter
from memfit.measuring.step import held_bytes
from memfit.planning.plan import Plan

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")


def bert() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A small BERT built with the library's defaults, a vocabulary large enough for the logits
    to matter (2 x 128 tokens x 1,000 words: 1 MB, the logits, 5% of the activations)."""
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=8,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    model = transformers.BertForMaskedLM(config).train()
    tokens = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": tokens, "labels": tokens.clone()}


def user_loop_peak(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Peak bytes of the user's loop, the output alive until backward ends (after a warm-up)."""
    for metered in (False, True):
        model.zero_grad(set_to_none=True)
        held = held_bytes(model, batch)
        with MemoryMeter("cpu") as meter:
            out = model(**batch)
            out.loss.backward()
            del out
        if metered:
            return held + meter.reading.peak_bytes
    raise AssertionError("unreachable")


def test_a_plan_holds_in_the_users_loop() -> None:
    model, batch = bert()
    prof = memfit.profile(model, batch, repeats=1, options=())
    kept = prof.measurement
    dropped = memfit.measure(model, batch, repeats=1, keep_output=False)
    assert kept.keep_output and not dropped.keep_output
    assert kept.peak_bytes - dropped.peak_bytes >= 2 * 128 * 1000 * 4  # the logits, at least
    plan = memfit.plan(prof, budget="30%")
    assert plan.keep_output and "output kept" in plan.loop
    assert Plan.from_json(plan.to_json()).keep_output
    memfit.apply(model, plan, batch)
    try:
        peak = user_loop_peak(model, batch)
        report = memfit.verify(model, batch, repeats=1)
    finally:
        memfit.remove(model)
    assert plan.budget_bytes is not None
    assert peak <= plan.budget_bytes
    assert abs(plan.predicted_peak_bytes / peak - 1) <= 0.02
    assert report.planned.keep_output  # verify measured the loop the plan was made for
    assert report.gradients_equal and report.loss_equal, report.mismatched
    assert report.measured_peak_bytes == peak


def test_a_plan_for_the_loss_only_step_breaks_its_budget_in_the_users_loop() -> None:
    """What memfit did before: its step dropped the output, so the user's loop went over."""
    model, batch = bert()
    prof = memfit.profile(model, batch, repeats=1, options=(), keep_output=False)
    plan = memfit.plan(prof, budget="30%")
    memfit.apply(model, plan, batch)
    try:
        peak = user_loop_peak(model, batch)
    finally:
        memfit.remove(model)
    assert plan.budget_bytes is not None and peak > plan.budget_bytes


def test_a_plan_for_a_loss_only_loop_says_so() -> None:
    model, batch = bert()
    plan = memfit.plan(model, batch, budget="50%", repeats=1, options=(), keep_output=False)
    assert not plan.keep_output and "only the loss" in plan.loop
    again = Plan.from_json(plan.to_json())
    assert not again.keep_output and not again.accumulate
    memfit.apply(model, plan, batch)
    try:
        report = memfit.verify(model, batch, repeats=1)
    finally:
        memfit.remove(model)
    assert not report.planned.keep_output and not report.baseline.keep_output
    assert plan.budget_bytes is not None and report.measured_peak_bytes <= plan.budget_bytes
    assert abs(report.prediction_error) <= 0.02
