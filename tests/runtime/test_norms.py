"""BatchNorm under recompute: running statistics after a planned step equal an unplanned step's."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import InfeasibleBudgetError
from memfit.measuring.chain import find_chain
from memfit.runtime import apply_plan, remove_plan
from memfit.verbs.api import plan as strategy_plan
from memfit.verbs.profiling import profile
from tests.helpers.plans import make_plan
from tests.helpers.trees import RUNTIME_TREES as TREES

CHANNELS, SIDE, BATCH = 8, 8, 4


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-dropout-conv-BN plus the input (ResNet's basic block)."""

    def __init__(self, channels: int, momentum: float | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=momentum)
        self.dropout = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.bn1(self.conv1(x))))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS), nn.ReLU()
        )
        # momentum=None: a cumulative average, which reads num_batches_tracked
        self.blocks = nn.Sequential(
            *(ResidualBlock(CHANNELS, 0.1 if i else None) for i in range(4))
        )
        self.head = nn.Linear(CHANNELS, 10)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(images)).mean(dim=(2, 3))
        return F.cross_entropy(self.head(features), labels)


Step = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]


def step(model: nn.Module, sample: tuple[torch.Tensor, ...]) -> Step:
    """Loss, gradients, buffers after one step, and how often the step bumped their versions."""
    model.zero_grad(set_to_none=True)
    versions = {n: b._version for n, b in model.named_buffers()}
    torch.manual_seed(1)
    loss = model(*sample)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = dict(model.named_buffers())
    bumps = {n: b._version - versions[n] for n, b in buffers.items()}
    return loss.detach(), grads, {n: b.clone() for n, b in buffers.items()}, bumps


OPTION_TREES = (
    "one segment",
    "every block recomputed",
    "nested",
    "three levels",
    "selective matmul",
    "rebuild",
    "rebuild+linear",
    "rebuild mixed",
)


@pytest.fixture(scope="module")
def resnet() -> dict[str, Any]:
    torch.manual_seed(0)
    model = ResNet()
    generator = torch.Generator().manual_seed(0)
    sample = (
        torch.randn(BATCH, 3, SIDE, SIDE, generator=generator),
        torch.randint(0, 10, (BATCH,), generator=generator),
    )
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    reference = step(model, sample)
    chain = find_chain(model, lambda: model(*sample))
    prof = profile(model, sample, repeats=1)  # runs steps: the state is reloaded before each test
    plans = {s: strategy_plan(prof, budget=None, strategy=s) for s in ("all", "sqrt")}
    with pytest.raises(InfeasibleBudgetError) as infeasible:
        strategy_plan(prof, budget=1)
    tightest = infeasible.value.min_feasible_bytes
    plans["optimal tightest"] = strategy_plan(prof, budget=tightest)
    plans["optimal midway"] = strategy_plan(
        prof, budget=(tightest + prof.measurement.peak_bytes) // 2
    )
    plans |= {label: make_plan(chain, TREES[label]) for label in OPTION_TREES}
    return dict(
        model=model, sample=sample, initial=initial, reference=reference, chain=chain, plans=plans
    )


def test_the_unplanned_step_updates_the_statistics(resnet: dict[str, Any]) -> None:
    buffers = resnet["reference"][2]
    for name, value in buffers.items():
        assert not torch.equal(value, resnet["initial"][name]), name


@pytest.mark.parametrize(
    "label", ["all", "sqrt", "optimal tightest", "optimal midway", *OPTION_TREES]
)
def test_running_statistics_bit_identical(resnet: dict[str, Any], label: str) -> None:
    model = resnet["model"]
    model.load_state_dict(resnet["initial"])
    apply_plan(model, resnet["chain"], resnet["plans"][label])
    try:
        loss, grads, buffers, bumps = step(model, resnet["sample"])
    finally:
        remove_plan(model)
    reference_loss, reference_grads, reference_buffers, reference_bumps = resnet["reference"]
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert torch.equal(grads[name], grad), name
    assert buffers.keys() == reference_buffers.keys()
    for name, value in reference_buffers.items():
        assert torch.equal(buffers[name], value), name
    assert bumps == reference_bumps  # the reruns left no trace, not even in version counters
