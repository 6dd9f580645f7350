"""Blocks no gradient reaches (issue 22, finding 8: encodec, mimi). A quantizer's argmin in the
middle of the chain cuts the graph: the blocks before it have trainable parameters and autograd
records their graph, but no gradient reaches them, so their saved tensors go when the model drops
that graph, in the forward, and a checkpoint's recompute never runs. Checkpointing them saves
nothing: plans must not count it as a saving (it took plans over budget with predictions 13%
low), so the profile offers them ``keep`` only. Plans at the floor must hold their budget, with
bit-identical gradients and predictions within 2%."""

import pytest
import torch
from torch import nn

import memfit
from memfit.planning.costs import KEEP
from memfit.planning.plan import Segment

WIDTH, BATCH, BLOCKS, CODES = 16, 64, 3, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(torch.tanh(self.up(x))))


class Quantized(nn.Module):
    """Encoder blocks, a nearest-codebook lookup (its argmin passes no gradient back), decoder
    blocks and a head: a vector-quantized autoencoder, as encodec and mimi are."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.codebook = nn.Parameter(torch.randn(CODES, WIDTH))
        self.decoder = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder:
            x = block(x)
        x = self.codebook[torch.cdist(x, self.codebook).argmin(-1)]
        for block in self.decoder:
            x = block(x)
        return self.head(x).square().mean()


@pytest.fixture(scope="module", params=[None, 1], ids=["fast", "repeats=1"])
def quantized(request: pytest.FixtureRequest) -> tuple[Quantized, tuple, memfit.Profile]:
    torch.manual_seed(0)
    model = Quantized().train()
    sample = (torch.randn(BATCH, WIDTH),)
    return model, sample, memfit.profile(model, sample, repeats=request.param)


def test_blocks_cut_off_are_kept(quantized: tuple) -> None:
    _model, _sample, profile = quantized
    stages = profile.costs.stages
    names = [stage.name for stage in stages]
    assert {f"encoder.{i}" for i in range(BLOCKS)} | {f"decoder.{i}" for i in range(BLOCKS)} <= set(
        names
    )
    for stage in stages:
        if stage.name.startswith("encoder."):
            assert not stage.checkpointable and set(stage.options) == {KEEP}, stage.name
        elif stage.name.startswith("decoder."):
            assert stage.checkpointable and len(stage.options) > 1, stage.name
    assert any("no gradient reaches encoder.0" in note for note in profile.notes)


def test_plan_at_the_floor_holds(quantized: tuple) -> None:
    model, sample, profile = quantized
    torch.manual_seed(1)
    reference = _step(model, sample)
    with pytest.raises(memfit.InfeasibleBudgetError) as error:
        memfit.plan(profile, budget="1%")
    floor = error.value.min_feasible_bytes
    plan = memfit.plan(profile, budget=floor)
    assert any(isinstance(item, Segment) or item.option != KEEP for item in plan.tree)
    memfit.apply(model, plan)
    try:
        torch.manual_seed(1)
        planned = _step(model, sample)
        result = memfit.verify(model, sample, repeats=1)
    finally:
        memfit.remove(model)
    assert torch.equal(planned[0], reference[0])
    assert all(map(torch.equal, planned[1], reference[1]))
    assert result.gradients_equal and result.loss_equal
    assert result.measured_peak_bytes <= floor, (result.measured_peak_bytes, floor)
    assert abs(result.prediction_error) <= 0.02, result.prediction_error


def _step(model: nn.Module, sample: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(*sample)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads
