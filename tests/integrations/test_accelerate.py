"""Accelerate's loop trains a planned model as it trains the model itself, whichever comes first:
``accelerator.prepare`` then ``memfit.auto``, or ``memfit.auto`` then ``prepare``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import memfit
from memfit.integrations.hf import build_hf

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")

STEPS = 2


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state (mixed precision included); each test its own."""
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def _loop(model: torch.nn.Module, sample: dict[str, torch.Tensor], order: str, precision: str):
    """Prepare with Accelerate (and plan, in ``order``), then train ``STEPS`` steps; returns the
    plan and each step's loss and gradients."""
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = [{key: value[i] for key, value in sample.items()} for i in range(len(sample["labels"]))]
    loader = torch.utils.data.DataLoader(rows, batch_size=len(rows))
    plan = None
    if order == "memfit-first":
        plan = memfit.auto(model, sample, budget="50%", repeats=1, options=())
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # one process on CPU: the same model back; with bf16 its forward wrapped in autocast (an
    # instance forward on the top module: memfit's chain lies beneath it)
    assert prepared is model
    assert ("forward" in model.__dict__) == (precision == "bf16")
    batch: dict[str, Any] = next(iter(loader))
    if order == "prepare-first":
        plan = memfit.auto(prepared, batch, budget="50%", repeats=1, options=())
    steps = []
    torch.manual_seed(1)
    for _ in range(STEPS):
        out = prepared(**batch)
        accelerator.backward(out.loss)
        grads = {name: p.grad.clone() for name, p in prepared.named_parameters()}
        steps.append((out.loss.detach(), grads))
        optimizer.step()
        optimizer.zero_grad()
    return plan, steps


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("order", ["prepare-first", "memfit-first"])
def test_accelerate_loop_is_bit_identical(order: str, precision: str) -> None:
    # GPT-2 with its defaults: dropout 0.1, use_cache=True
    model, sample = build_hf("gpt2", layers=4, hidden=32, seq=64)
    unplanned = copy.deepcopy(model)
    plan, planned_steps = _loop(model, sample, order, precision)
    _, reference_steps = _loop(unplanned, sample, "none", precision)
    assert plan is not None and any(option != "keep" for option in plan.options.values())
    assert memfit.runtime.applied_plan(model) is plan
    for (loss, grads), (reference_loss, reference_grads) in zip(
        planned_steps, reference_steps, strict=True
    ):
        assert torch.equal(loss, reference_loss)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            assert torch.equal(grad, reference_grads[name]), name
