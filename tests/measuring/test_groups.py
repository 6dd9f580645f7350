"""Chains of several block lists: an encoder's blocks, a stage between, a decoder's blocks."""

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import PlanMismatchError
from memfit.measuring.chain import POST, PRE, find_chain
from memfit.planning.plan import Plan, Segment, Stage, keep_tree
from memfit.runtime.apply import apply_plan, chain_of_plan, remove_plan

WIDTH, TOKENS = 64, 96


class Block(nn.Module):
    """A residual MLP block; decoder blocks also read the encoder's output (cross-attention's
    role: a side input every decoder block gets)."""

    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.cross = nn.Linear(WIDTH, WIDTH) if cross else None
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        if self.cross is not None and memory is not None:
            h = h + torch.tanh(self.cross(memory))
        return x + self.drop(h)


class EncoderDecoder(nn.Module):
    """Two block lists run one after the other, with a norm and an embedding between them."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.encoder = nn.ModuleList(Block(cross=False) for _ in range(layers))
        self.encoder_norm = nn.LayerNorm(WIDTH)
        self.decoder_embed = nn.Linear(WIDTH, WIDTH)
        self.decoder = nn.ModuleList(Block(cross=True) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 8), nn.Tanh())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.encoder:
            h = block(h)
        memory = self.encoder_norm(h)
        d = self.decoder_embed(y)
        for block in self.decoder:
            d = block(d, memory)
        return self.head(d).square().mean()


def _model() -> tuple[EncoderDecoder, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = EncoderDecoder().train()
    return model, (torch.randn(4, TOKENS, WIDTH), torch.randn(4, TOKENS, WIDTH))


def test_both_lists_are_found_with_a_stage_between() -> None:
    model, sample = _model()
    chain = find_chain(model, lambda: model(*sample))
    names = chain.stage_names
    assert names == (
        PRE,
        *(f"encoder.{i}" for i in range(3)),
        "<after encoder>",
        *(f"decoder.{i}" for i in range(3)),
        POST,
    )
    assert chain.block_of_stage(4) is None and chain.block_of_stage(5) is model.decoder[0]
    assert chain.block_stages == (1, 2, 3, 5, 6, 7)
    # the head's small Sequential runs as a chain too, but is no block list of the model
    assert "head.0" not in names
    # naming both containers gives the same chain, in execution order whatever the order given
    named = find_chain(model, lambda: model(*sample), ["decoder", "encoder"])
    assert named.stage_names == names
    # the plan names it back
    costs_plan = Plan.from_tree(names, keep_tree(0, len(names)), "none")
    assert chain_of_plan(model, costs_plan).stage_names == names


def test_between_stage_is_kept_and_never_joins_a_segment() -> None:
    model, sample = _model()
    prof = memfit.profile(model, sample, repeats=1, options=())
    between = prof.costs.stages[4]
    assert between.name == "<after encoder>"
    assert not between.checkpointable and list(between.options) == ["keep"]
    # the encoder output (the decoder blocks' side input) stays live until the between stage's
    # backward: it is counted in that stage's saved bytes
    memory_bytes = 4 * TOKENS * WIDTH * 4
    assert between.options["keep"].saved_bytes >= memory_bytes
    assert not prof.costs.stages[5].joins_previous  # the first decoder block follows a non-block
    chain = find_chain(model, lambda: model(*sample))
    across = Segment(3, 6, keep_tree(3, 6))
    tree = (*keep_tree(0, 3), across, *keep_tree(6, len(chain)))
    with pytest.raises(PlanMismatchError, match="not a block"):
        apply_plan(model, chain, Plan.from_tree(chain.stage_names, tree, "bad"))
    assert memfit.runtime.applied_plan(model) is None
    option_between = tuple(Stage(i, "rebuild" if i == 4 else "keep") for i in range(len(chain)))
    with pytest.raises(PlanMismatchError, match="can only be kept"):
        apply_plan(model, chain, Plan.from_tree(chain.stage_names, option_between, "bad"))


@pytest.mark.parametrize("budget", ["floor", "40%", "60%"])
def test_plans_over_both_lists_are_exact(budget: str) -> None:
    model, sample = _model()
    prof = memfit.profile(model, sample, repeats=1)
    if budget == "floor":
        with pytest.raises(memfit.InfeasibleBudgetError) as error:
            memfit.plan(prof, budget="1%")
        plan = memfit.plan(prof, budget=error.value.min_feasible_bytes)
        planned = {
            index
            for item in plan.tree
            if not (isinstance(item, Stage) and item.option == "keep")
            for index in (
                range(item.start, item.stop) if isinstance(item, Segment) else (item.index,)
            )
        }
        # the smallest peak needs both lists: the decoder is no longer kept whole in <post>
        assert planned & {1, 2, 3} and planned & {5, 6, 7}
    else:  # which blocks a budget picks depends on measured times; the checks below do not
        plan = memfit.plan(prof, budget=budget)
    memfit.apply(model, plan, sample)
    try:
        report = memfit.verify(model, sample, repeats=1)
    finally:
        remove_plan(model)
    assert report.gradients_equal and report.loss_equal
    assert report.budget_bytes is not None
    assert report.measured_peak_bytes <= report.budget_bytes
    assert abs(report.prediction_error) <= 0.02
