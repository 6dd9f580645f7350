"""Blocks that rebind their modules' state in forward are rerun from the state their first run
saw (memfit.runtime.state_replay): the same gradients bit for bit and the same state after the
step as unplanned training, where a plain rerun (torch's checkpoint, Hugging Face's switch)
reads what the first run wrote."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.errors import UnsupportedModelError
from memfit.measuring.chain import Chain, find_chain
from memfit.planning.plan import Plan, Segment, Stage
from memfit.runtime import apply_plan, remove_plan
from tests.helpers.plans import make_plan, one_segment, per_block
from tests.runtime.test_guards import WIDTH, Dense, Toy, plain, recompute_first, selective_first


class Counts(Dense):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
        self.calls += 1
        return super().forward(x, scale)


class KeepsLast(Dense):
    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
        self.last = x.detach()  # a tensor attribute, rebound every forward
        return super().forward(x, scale)


class Averages(Dense):
    """I-BERT's pattern: a running statistic in a buffer, rebound (not written in place) and
    then read by the same forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("average", torch.zeros(()))

    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
        self.average = self.average * 0.9 + x.detach().abs().mean() * 0.1
        return super().forward(x, scale) * self.average


_CLOCK = itertools.count()


class Stamps(Dense):
    """Writes a value from outside its modules: a rerun writes another one."""

    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
        self.stamp = torch.tensor(float(next(_CLOCK)))
        return super().forward(x, scale)


def nested(chain: Chain) -> Plan:
    """Blocks 0-1 in a segment inside a segment over all four: they rerun twice per backward."""
    inner = (Segment(1, 3, (Stage(1), Stage(2))), Stage(3), Stage(4))
    return make_plan(chain, (Stage(0), Segment(1, 5, inner), Stage(5)))


PLANS = [one_segment, per_block, recompute_first, selective_first, nested]
REPLAYED = [Counts, KeepsLast, Averages]


def state_of(model: nn.Module) -> dict[str, Any]:
    """Every buffer, tensor attribute and number a module holds, by name."""
    state: dict[str, Any] = {}
    for name, module in model.named_modules():
        for key, value in [*vars(module).items(), *module._buffers.items()]:
            if isinstance(value, torch.Tensor | int | float) and not isinstance(value, bool):
                state[f"{name}.{key}"] = value
    return state


def same_state(first: dict[str, Any], second: dict[str, Any]) -> bool:
    if first.keys() != second.keys():
        return False
    for key, value in first.items():
        other = second[key]
        if isinstance(value, torch.Tensor):
            if not (isinstance(other, torch.Tensor) and torch.equal(value, other)):
                return False
        elif value != other:
            return False
    return True


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def two_steps(model: nn.Module, x: torch.Tensor) -> list[Any]:
    """Two steps (the second starts from the state the first left), then the state."""
    return [*step(model, x), *step(model, x * 2), state_of(model)]


def assert_same_steps(reference: list[Any], planned: list[Any]) -> None:
    for ours, theirs in zip(planned[:4], reference[:4], strict=True):
        if isinstance(ours, list):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        else:
            assert torch.equal(ours, theirs)
    assert same_state(reference[4], planned[4])


@pytest.mark.parametrize("plan", PLANS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("block_type", REPLAYED, ids=lambda t: t.__name__)
def test_rebound_state_is_replayed(block_type: type[nn.Module], plan: Callable) -> None:
    torch.manual_seed(1)
    model, x = Toy(block_type, plain), torch.randn(4, WIDTH)
    planned = copy.deepcopy(model)
    for each in (model, planned):  # the same forwards on both (a counter counts them)
        torch.manual_seed(2)
        chain = find_chain(each, partial(each, x))
    reference = two_steps(model, x)
    apply_plan(planned, chain, plan(chain))
    try:
        assert_same_steps(reference, two_steps(planned, x))
    finally:
        remove_plan(planned)


def checkpointed(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def test_a_plain_rerun_reads_what_the_first_run_wrote() -> None:
    """What memfit's replay avoids: torch's checkpoint (as Hugging Face's switch) reruns the
    block from the statistic its first run already moved."""
    torch.manual_seed(1)
    model, x = Toy(Averages, plain), torch.randn(4, WIDTH)
    rerun = copy.deepcopy(model)
    rerun.loop = checkpointed
    reference, ours = step(model, x), step(rerun, x)
    assert torch.equal(reference[0], ours[0])  # the forward is the same...
    assert not all(torch.equal(a, b) for a, b in zip(reference[1], ours[1], strict=True))
    assert not torch.equal(model.blocks[0].average, rerun.blocks[0].average)  # ...written twice


def test_a_rerun_that_writes_another_value_is_refused() -> None:
    model, x = Toy(Stamps, plain), torch.randn(4, WIDTH)
    chain = find_chain(model, lambda: model(x))
    apply_plan(model, chain, per_block(chain))
    try:
        loss = model(x)  # the forward runs as unplanned
        with pytest.raises(UnsupportedModelError, match=r"writes blocks\.3\.stamp in forward"):
            loss.backward()
    finally:
        remove_plan(model)


def test_a_second_backward_through_a_replayed_block_is_refused() -> None:
    model, x = Toy(Averages, plain), torch.randn(4, WIDTH)
    chain = find_chain(model, lambda: model(x))
    apply_plan(model, chain, per_block(chain))
    try:
        loss = model(x)
        loss.backward(retain_graph=True)
        with pytest.raises(UnsupportedModelError, match=r"second backward through the same"):
            loss.backward()
    finally:
        remove_plan(model)
