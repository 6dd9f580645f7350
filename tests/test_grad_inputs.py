"""Inputs that require grad (issue 22, finding 5): a sample the user differentiates, latents
handed in as an ``nn.Parameter`` (Perceiver), a model without parameters. Profiling must run,
leave no hook and no ``.grad`` on the user's tensors, and the plan must hold: the same
gradients bit for bit (the input's too), within the budget, predicted within 2%."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

import memfit

WIDTH, BATCH, BLOCKS = 64, 64, 6


class Block(nn.Module):
    def __init__(self, parameters: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH) if parameters else None
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.linear(x) if self.linear is not None else 1.5 * x
        return x + self.dropout(torch.tanh(inner))


class Chain(nn.Module):
    def __init__(self, parameters: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(parameters) for _ in range(BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def sample_requiring_grad() -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, requires_grad=True)


def latents() -> torch.Tensor:
    return nn.Parameter(torch.randn(BATCH, WIDTH))


CASES: dict[str, tuple[bool, Callable[[], torch.Tensor], str]] = {
    "sample": (True, sample_requiring_grad, "70%"),
    "parameter": (True, latents, "70%"),
    "no-parameters": (False, sample_requiring_grad, "80%"),
}


def hooks_on(tensor: torch.Tensor) -> int:
    return len(tensor._backward_hooks or {})


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One seeded step (dropout on): loss, the input's gradient, the parameters' gradients."""
    torch.manual_seed(7)
    x.grad = None
    model.zero_grad(set_to_none=True)
    loss = model(x)
    loss.backward()
    assert x.grad is not None
    grads = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    x.grad = None
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("case", CASES)
def test_input_requiring_grad_is_planned_and_left_alone(case: str) -> None:
    parameters, make_input, budget = CASES[case]
    torch.manual_seed(0)
    model = Chain(parameters).train()
    x = make_input()
    reference = step(model, x)
    plan = memfit.auto(model, (x,), budget=budget)
    assert hooks_on(x) == 0  # none of memfit's measuring hooks stay on the user's tensor
    assert x.grad is None  # nor a gradient of memfit's steps
    assert any(option != "keep" for option in plan.options.values())  # the check has teeth
    loss, grads = step(model, x)
    assert torch.equal(loss, reference[0])
    assert all(map(torch.equal, grads, reference[1]))
    result = memfit.verify(model, (x,), repeats=1)
    assert hooks_on(x) == 0 and x.grad is None
    assert result.gradients_equal and result.loss_equal
    assert result.budget_bytes is not None
    assert result.measured_peak_bytes <= result.budget_bytes
    assert abs(result.prediction_error) <= 0.02, result.prediction_error
    memfit.remove(model)


def test_the_users_gradient_on_the_input_comes_back() -> None:
    torch.manual_seed(0)
    model = Chain().train()
    x = sample_requiring_grad()
    mine = torch.ones_like(x)
    x.grad = mine
    memfit.profile(model, (x,), repeats=1, options=())
    assert x.grad is mine and torch.equal(mine, torch.ones_like(x))
    assert hooks_on(x) == 0
