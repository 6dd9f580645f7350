"""One training step: samples, losses, steady states, and clear errors on bad input."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memfit.measuring.run import measure
from memfit.measuring.step import compute_loss, held_bytes, reset_grads, split_sample
from memfit.models import build


def test_split_sample() -> None:
    x = torch.zeros(2)
    assert split_sample((x,)) == ((x,), {})
    assert split_sample({"input_ids": x}) == ((), {"input_ids": x})


@pytest.mark.parametrize("bad", [torch.zeros(2), [torch.zeros(2)], 3, None])
def test_sample_neither_tuple_nor_dict(bad: object) -> None:
    with pytest.raises(TypeError, match="tuple of positional arguments or a dict"):
        split_sample(bad)


def test_single_tensor_sample_gets_a_hint() -> None:
    with pytest.raises(TypeError, match=r"write \(x,\)"):
        split_sample(torch.zeros(2))


def test_loss_sources() -> None:
    scalar = torch.tensor(1.0)
    assert compute_loss(scalar) is scalar
    assert compute_loss(SimpleNamespace(loss=scalar)) is scalar
    assert compute_loss({"loss": scalar, "logits": torch.zeros(3)}) is scalar
    assert compute_loss(torch.ones(3), lambda out: out.sum()).item() == 3.0


def test_no_loss_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"shape \(2, 3\).*pass loss_fn"):
        compute_loss(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):
        compute_loss(torch.zeros(2, 3), lambda out: out)


def test_measure_step_figures_are_consistent() -> None:
    model, sample = build("mlp", layers=3, width=64, hidden=128, batch=32)
    m = measure(model, sample, repeats=2)
    assert m.peak_bytes == m.held_bytes + m.gradient_bytes + m.activation_bytes
    assert m.base_bytes == m.held_bytes + m.gradient_bytes
    assert m.gradient_bytes + m.activation_bytes == max(m.forward_peak_bytes, m.backward_peak_bytes)
    assert m.step_s > 0 and m.forward_s > 0 and m.backward_s > 0
    assert m.step_s == pytest.approx(m.forward_s + m.backward_s, rel=0.25)
    parameters = sum(p.numel() * 4 for p in model.parameters())
    sample_bytes = sum(t.numel() * 4 for t in sample)
    assert m.held_bytes == parameters + sample_bytes
    # the step leaves its gradients (and the loss it returns, whose storage is mse_loss's
    # buffer of the output's size on this CPU): the budget's base
    assert parameters <= m.gradient_bytes <= parameters + sample_bytes // 2
    assert all(p.grad is None for p in model.parameters()), "measure leaves gradients as they were"


def test_gradient_accumulation_steady_state_holds_gradients_before_the_step() -> None:
    model, sample = build("mlp", layers=3, width=64, hidden=128, batch=32)
    plain = measure(model, sample, repeats=1)
    accumulating = measure(model, sample, repeats=1, accumulate=True)
    grads = sum(p.numel() * 4 for p in model.parameters())
    assert accumulating.held_bytes == plain.held_bytes + grads
    assert accumulating.base_bytes == plain.base_bytes  # held either before or during the step
    # With buffers already there, the step leaves no gradients of its own.
    assert accumulating.gradient_bytes < grads <= plain.gradient_bytes


def test_held_bytes_counts_optimizer_state_and_ties_once() -> None:
    model = nn.Linear(8, 8, bias=False)
    model2 = nn.Sequential(model, model)  # the same weight twice
    sample = (torch.zeros(1, 8),)
    assert held_bytes(model2, sample) == 8 * 8 * 4 + 8 * 4
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 8)).sum().backward()
    optimizer.step()
    # weight, grad, exp_avg, exp_avg_sq, the step counter, the sample
    assert held_bytes(model2, sample, optimizer) == 4 * 8 * 8 * 4 + 4 + 8 * 4


def test_reset_grads() -> None:
    model = nn.Linear(2, 2)
    reset_grads(model, accumulate=True)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    reset_grads(model, accumulate=False)
    assert all(p.grad is None for p in model.parameters())
