"""Blocks no gradient reaches (issue 22, finding 8: encodec, mimi). A quantizer's argmin in the
middle of the chain cuts the graph: the blocks before it have trainable parameters and autograd
records their graph, but no gradient reaches them, so their saved tensors go when the model drops
that graph, in the forward, and a checkpoint's recompute never runs. Checkpointing them saves
nothing: plans must not count it as a saving (it took plans over budget with predictions 13%
low), so the profile offers them ``keep`` only. Plans at the floor must hold their budget, with
bit-identical gradients and predictions within 2%.

A model may hold that graph past the forward instead (LLaVA returns its vision tower's output,
whose graph holds the last vision layer, which no gradient reaches): then a checkpoint around
the block holds its inputs and RNG state in place of its saved tensors, to the end of the step,
and the profile offers it (``checkpoint``)."""

import pytest
import torch
from torch import nn

import memfit
from memfit.planning.costs import CHECKPOINT, KEEP
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


class Features(nn.Module):
    """A LLaVA-like tower: the loss reads the last block but one (``hidden_states[-2]``); the
    last block runs all the same and its output is returned with the loss, so the caller's
    output holds its graph, which no gradient reaches, through the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = [x]
        for block in self.blocks:
            states.append(block(states[-1]))
        return self.head(states[-2]).square().mean(), states[-1]


def _first(output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return output[0]


def test_a_cut_off_block_whose_graph_outlives_the_forward_runs_under_a_checkpoint() -> None:
    torch.manual_seed(0)
    model = Features().train()
    sample = (torch.randn(BATCH, WIDTH),)
    profile = memfit.profile(model, sample, loss_fn=_first)
    last = profile.costs.stages[BLOCKS]
    assert last.name == f"blocks.{BLOCKS - 1}" and not last.checkpointable
    assert set(last.options) == {KEEP, CHECKPOINT}
    kept, checkpointed = last.options[KEEP], last.options[CHECKPOINT]
    assert checkpointed.saved_bytes < kept.saved_bytes // 2  # its input and RNG state only
    with pytest.raises(memfit.InfeasibleBudgetError) as error:
        memfit.plan(profile, budget="1%")
    floor = error.value.min_feasible_bytes
    plan = memfit.plan(profile, budget=floor)
    assert plan.options[last.name] == CHECKPOINT
    every = memfit.plan(profile, budget=None, strategy="all")
    assert every.options[last.name] == CHECKPOINT  # as Hugging Face's switch runs it
    memfit.apply(model, plan)
    try:
        result = memfit.verify(model, sample, loss_fn=_first, repeats=1, trace=True)
    finally:
        memfit.remove(model)
    assert result.gradients_equal and result.loss_equal and result.trace_difference == ""
    assert result.measured_peak_bytes <= floor, (result.measured_peak_bytes, floor)
    assert abs(result.prediction_error) <= 0.02, result.prediction_error


def test_a_cut_off_block_whose_graph_goes_in_the_forward_is_kept() -> None:
    """The same model, its loop dropping the output before backward: the graph goes when the
    forward ends, where a checkpoint would free less than the kept step shows (no cost of the
    block can say so), so ``keep`` stays its only option."""
    torch.manual_seed(0)
    model = Features().train()
    sample = (torch.randn(BATCH, WIDTH),)
    profile = memfit.profile(model, sample, loss_fn=_first, keep_output=False)
    assert set(profile.costs.stages[BLOCKS].options) == {KEEP}
