"""Random numbers drawn between blocks (LayerDrop's ``torch.rand([])``, drawn by BART and OPT
between their layers up to transformers 5.0 even at LayerDrop 0): a rerun of blocks joined in
one recompute segment would not draw them, so every plan memfit offers keeps the blocks on
either side of such a draw apart, and trains bit for bit as the unplanned model does."""

import pytest
import torch
from torch import nn

import memfit
from memfit.planning.plan import Segment

WIDTH, LAYERS = 16, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, 4 * WIDTH)
        self.out = nn.Linear(4 * WIDTH, WIDTH)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.out(torch.tanh(self.linear(x))))


class Stack(nn.Module):
    """Residual blocks; with ``draws``, the loop draws a number before every block, as
    LayerDrop does (``layerdrop`` 0: the number never drops a block, it only moves the
    random stream)."""

    def __init__(self, draws: bool, layerdrop: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.draws, self.layerdrop = draws, layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            if self.draws and self.training:
                skip = torch.rand([]) < self.layerdrop
                if skip:
                    continue
            x = block(x)
        return x.pow(2).mean()


def _model(draws: bool) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Stack(draws).train(), (torch.randn(64, 8, WIDTH),)


def _joined(plan: memfit.Plan) -> list[tuple[int, int]]:
    """The recompute segments of several stages, at any depth."""
    found = []

    def walk(items: tuple) -> None:
        for item in items:
            if isinstance(item, Segment):
                if item.stop - item.start > 1:
                    found.append((item.start, item.stop))
                walk(item.inner)

    walk(plan.tree)
    return found


@pytest.fixture(scope="module")
def profiles() -> dict[bool, memfit.Profile]:
    return {draws: memfit.profile(*_model(draws), repeats=1, options=()) for draws in (False, True)}


def test_the_profile_sees_draws_between_blocks(profiles: dict[bool, memfit.Profile]) -> None:
    for draws, prof in profiles.items():
        blocks = [s for s in prof.costs.stages if s.name.startswith("blocks.")]
        assert len(blocks) == LAYERS
        # the first block follows <pre> (never joined); each later one follows a draw
        assert [s.joins_previous for s in blocks[1:]] == [not draws] * (LAYERS - 1)


@pytest.mark.parametrize(
    ("budget", "strategy"), [("40%", "optimal"), ("50%", "optimal"), (None, "sqrt")]
)
def test_plans_keep_draws_outside_segments_and_train_bit_identical(
    profiles: dict[bool, memfit.Profile], budget: str | None, strategy: str
) -> None:
    # without the draws, the same budgets join blocks: the case the draws must change
    plain = memfit.plan(profiles[False], budget=budget, strategy=strategy)
    assert _joined(plain), plain.tree
    model, sample = _model(True)
    plan = memfit.auto(model, sample, budget=budget, strategy=strategy, repeats=1, options=())
    try:
        assert not _joined(plan), plan.tree
        report = memfit.verify(model, sample, repeats=1, trace=True)
    finally:
        memfit.remove(model)
    assert report.gradients_equal and report.loss_equal, report.mismatched
    assert report.trace_difference == "", report.trace_difference
    if plan.budget_bytes is not None:
        assert report.measured_peak_bytes <= plan.budget_bytes
    assert abs(report.prediction_error) <= 0.02
