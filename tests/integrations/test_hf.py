"""Hugging Face models built from small configs (random weights, no downloads)."""

import pytest
import torch

import memfit
from memfit.api import _chain
from memfit.integrations.hf import build_hf, disable_hf_checkpointing
from memfit.plan.plan import Plan, Segment, Stage, recompute_one

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")

STACKS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "bert": "bert.encoder.layer",
}


def _grads(model, sample, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**sample).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _trees(n: int) -> dict[str, tuple]:
    last = n - 1
    return {
        "every block recomputed": (
            Stage(0),
            *[recompute_one(i) for i in range(1, last)],
            Stage(last),
        ),
        "one segment, nested": (
            Stage(0),
            Segment(1, last, (recompute_one(1), Stage(2), *[Stage(i) for i in range(3, last)])),
            Stage(last),
        ),
        "selective matmul": (
            Stage(0),
            *[Stage(i, "selective:matmul") for i in range(1, last)],
            Stage(last),
        ),
    }


@pytest.mark.parametrize("arch", sorted(STACKS))
def test_chain_found_and_gradients_bit_identical(arch: str) -> None:
    model, sample = build_hf(arch, layers=3)
    chain = _chain(model, sample, None)
    assert chain.container == STACKS[arch]
    reference_loss, reference = _grads(model, sample)
    for label, tree in _trees(len(chain)).items():
        plan = Plan(
            stage_names=chain.stage_names,
            tree=tree,
            strategy=label,
            predicted_peak_bytes=0,
            predicted_step_s=0.0,
        )
        memfit.apply(model, plan)
        try:
            loss, grads = _grads(model, sample)
        finally:
            memfit.remove(model)
        assert torch.equal(loss, reference_loss), label
        assert grads.keys() == reference.keys(), label
        assert all(torch.equal(grads[k], reference[k]) for k in reference), label


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_optimal_plans_on_hf_models(arch: str) -> None:
    model, sample = build_hf(arch, layers=4, hidden=64, seq=64, batch=2)
    profile = memfit.profile(model, sample, repeats=1)
    plan = memfit.plan(profile, budget="80%")
    memfit.apply(model, plan, sample)
    try:
        report = memfit.verify(model, sample, repeats=1)
    finally:
        memfit.remove(model)
    assert report.gradients_equal and report.loss_equal, report.mismatched
    assert report.measured_peak_bytes <= plan.budget_bytes
    assert abs(report.prediction_error) <= 0.02


def test_hf_gradient_checkpointing_is_turned_off_with_a_warning() -> None:
    model, sample = build_hf("gpt2", layers=2)
    reference_loss, reference = _grads(model, sample)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable()
        enabled = lambda: model.is_activation_checkpointing  # noqa: E731
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enabled = lambda: model.is_gradient_checkpointing  # noqa: E731
    assert enabled()
    profile = memfit.profile(model, sample, repeats=1, options=())
    plan = memfit.plan(profile, budget=None, strategy="all")
    with pytest.warns(UserWarning, match="memfit turned it off"):
        memfit.apply(model, plan)
    assert not enabled()
    loss, grads = _grads(model, sample)
    memfit.remove(model)
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[k], reference[k]) for k in reference)
    assert disable_hf_checkpointing(model) is False


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match=r"bert.*gpt2.*llama"):
        build_hf("t5")
