"""Blocks with different side inputs in one recompute segment (a U-Net's resnets take ``temb``,
its attentions ``encoder_hidden_states``; sliding and full attention layers get different
masks): each block keeps its own side inputs in the segment's rerun, and the profile lets
such blocks join."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memfit
from memfit.planning.plan import Segment, Stage
from memfit.runtime import apply_plan, remove_plan
from tests.helpers.plans import make_plan
from tests.helpers.steps import assert_same_step, chain_of, step

WIDTH = 16


class Timed(nn.Module):
    """Takes the time embedding (a resnet)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.drop(self.linear(x) * temb))


class Attending(nn.Module):
    """Takes the context by keyword (a cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor) -> torch.Tensor:
        return x + torch.sigmoid(self.linear(x)) * context.mean(0)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList([Timed(), Attending(), Timed(), Attending()])
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        temb = torch.sin(self.time(x.mean(0, keepdim=True)))
        for block in self.blocks:
            x = block(x, temb) if isinstance(block, Timed) else block(x, context=context)
        return self.head(x).square().mean()


def test_blocks_with_other_side_inputs_share_a_segment_bit_identical() -> None:
    """One segment over all four blocks (and a nested one over the middle two): the same
    loss and gradients as the unplanned model, dropout on, context requiring grad."""
    torch.manual_seed(0)
    model = Mixed()
    sample = (torch.randn(8, WIDTH), torch.randn(3, WIDTH, requires_grad=True))
    reference = step(model, sample)
    context_grad = sample[1].grad.clone()  # type: ignore[union-attr]
    sample[1].grad = None
    chain = chain_of(model, sample)
    nested = Segment(2, 4, (Stage(2), Stage(3)))
    tree = (Stage(0), Segment(1, 5, (Stage(1), nested, Stage(4))), Stage(5))
    apply_plan(model, chain, make_plan(chain, tree))
    try:
        planned = step(model, sample)
    finally:
        remove_plan(model)
    assert_same_step(reference, planned)
    assert torch.equal(sample[1].grad, context_grad)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_profile_lets_them_join() -> None:
    torch.manual_seed(0)
    model = Mixed()
    sample = (torch.randn(8, WIDTH), torch.randn(3, WIDTH))
    profile = memfit.profile(model, sample, repeats=1, options=())
    assert [stage.joins_previous for stage in profile.costs.stages[2:5]] == [True] * 3
