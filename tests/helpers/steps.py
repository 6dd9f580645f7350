"""One training step from a fixed random state, compared bit for bit; the small models' sizes."""

from typing import Any

import torch
from torch import nn

from memfit.measuring.chain import Chain, find_chain

SIZES: dict[str, dict[str, int]] = {
    "gpt": dict(layers=4, width=32, heads=4, seq=16, batch=2, vocab=64),
    "mlp": dict(layers=4, width=32, hidden=64, batch=8),
}


def chain_of(model: nn.Module, sample: tuple[Any, ...]) -> Chain:
    return find_chain(model, lambda: model(*sample))


def step(
    model: nn.Module, sample: tuple[Any, ...], seed: int = 0, zero: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step from a fixed RNG state; the loss and a copy of every gradient."""
    if zero:
        model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(*sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_step(
    reference: tuple[torch.Tensor, dict[str, torch.Tensor]],
    planned: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> None:
    assert torch.equal(planned[0], reference[0]), "loss differs"
    assert planned[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        assert torch.equal(planned[1][name], grad), name
