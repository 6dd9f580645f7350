"""What a checkpoint keeps beyond its RNG state (issue 22, finding 8: LLaVA 8 B over budget).
Autograd keeps the tensor of a Python number multiplied in (``1.702 * x`` in CLIP's quick_gelu:
8 bytes) without the saved-tensor hooks, so a checkpoint of such a block keeps it from its
no-save forward to its backward. The chain's ``checkpoint_bytes`` is the smallest over the
blocks (what every checkpoint keeps); the rest is the block's own
(``StageCosts.nosave_held_bytes``), which the simulator and the solvers charge."""

import pytest
import torch
from torch import nn

import memfit
from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts
from memfit.planning.optimal import solve_optimal
from memfit.planning.plan import Segment, Stage
from memfit.planning.simulate import simulate

WIDTH, BATCH, BLOCKS = 16, 32, 4
SCALAR = 8  # a 0-dim float64 tensor: a Python number autograd keeps


class Block(nn.Module):
    def __init__(self, quick: bool) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.quick = quick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        # CLIP's quick_gelu: the Python number 1.702 becomes a tensor autograd keeps
        return x + self.down(h * torch.sigmoid(1.702 * h) if self.quick else torch.tanh(h))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(quick=i % 2 == 0) for i in range(BLOCKS))
        # a wide head: its backward is the step's peak, while every segment waits for its own
        self.head = nn.Linear(WIDTH, 32 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).square().mean()


def test_quick_gelu_blocks_hold_their_scalar() -> None:
    torch.manual_seed(0)
    model = Mixed().train()
    sample = (torch.randn(BATCH, WIDTH),)
    # recompute segments only (no selective or rebuild options): checkpoints are what is tested
    profile = memfit.profile(model, sample, repeats=1, options=[])
    held = {s.name: s.nosave_held_bytes for s in profile.costs.stages}
    assert held == {
        "<pre>": 0,
        **{f"blocks.{i}": SCALAR if i % 2 == 0 else 0 for i in range(BLOCKS)},
        "<post>": 0,
    }
    with pytest.raises(memfit.InfeasibleBudgetError) as error:
        memfit.plan(profile, budget="1%")
    floor = error.value.min_feasible_bytes
    for budget, strategy in ((floor, "optimal"), (None, "all")):
        plan = memfit.plan(profile, budget=budget, strategy=strategy)
        assert any(isinstance(item, Segment) for item in plan.tree)
        memfit.apply(model, plan)
        try:
            result = memfit.verify(model, sample, repeats=1)
        finally:
            memfit.remove(model)
        assert result.gradients_equal and result.loss_equal
        if budget is not None:
            assert result.measured_peak_bytes <= budget, plan.tree
        assert result.measured_peak_bytes == result.predicted_peak_bytes, plan.tree


def _chain(held: int) -> ChainCosts:
    keep = OptionCosts(
        forward_s=1.0,
        backward_s=2.0,
        saved_bytes=40,
        forward_peak_bytes=50,
        backward_peak_bytes=50,
        backward_delta_bytes=-50,
    )
    stages = [
        StageCosts(
            name=f"s{i}",
            input_bytes=10,
            output_bytes=10,
            options={KEEP: keep},
            nosave_forward_s=1.0,
            nosave_forward_peak_bytes=20,
            nosave_held_bytes=held,
        )
        for i in range(4)
    ]
    return ChainCosts(stages=stages, checkpoint_bytes=4)


def test_simulator_holds_them_to_the_stage_backward() -> None:
    tree = (Segment(0, 2, (Stage(0), Stage(1))), Segment(2, 4, (Stage(2), Stage(3))))
    plain, held = simulate(_chain(0), tree, timeline=True), simulate(_chain(3), tree, timeline=True)
    # both segments' no-save forwards hold 2 * 3 bytes at the end of the forward
    forward_end = [level for label, level in held.timeline if label.startswith("forward")][-1]
    plain_end = [level for label, level in plain.timeline if label.startswith("forward")][-1]
    assert forward_end - plain_end == 12
    assert held.timeline[-1][1] == plain.timeline[-1][1]  # all freed by the step's end
    assert held.peak_bytes > plain.peak_bytes


@pytest.mark.parametrize("held", [0, 3, 40])
def test_optimal_plans_agree_with_the_simulator(held: int) -> None:
    costs = _chain(held)
    floor = None
    for budget in range(60, 400):
        try:
            solution = solve_optimal(costs, budget)
        except memfit.InfeasibleBudgetError as error:
            floor = error.min_feasible_bytes
            continue
        assert solution.simulation.peak_bytes <= budget
        assert simulate(costs, solution.tree).peak_bytes == solution.simulation.peak_bytes
        break
    assert floor is not None
    assert simulate(costs, solve_optimal(costs, floor).tree).peak_bytes <= floor
