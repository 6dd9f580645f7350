"""The runtime of offloaded skips (:mod:`memfit.runtime.skip_offload`) on a toy with one skip
connection, on CPU (the host-to-host stand-in): the skip's storage is empty between the block
after its maker and its reader, full again when the model reads it, the gradients bit for bit
the unplanned model's (dropout on), and nothing is left after the step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from memfit.errors import PlanMismatchError
from memfit.planning.plan import Segment, Stage
from memfit.runtime import apply_plan, remove_plan
from tests.helpers.plans import make_plan
from tests.helpers.steps import assert_same_step, chain_of, step


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.drop = nn.Dropout(0.1)
        self.seen: list[int] = []  # the skip's storage bytes when this block runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = getattr(self, "owner", None)
        if owner is not None and owner.skip is not None:
            self.seen.append(owner.skip.untyped_storage().nbytes())
        return torch.tanh(self.drop(self.linear(x)))


class Skipped(nn.Module):
    """Four blocks; the first block's output is read again after the last (a U-Net's skip)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(4))
        self.head = nn.Linear(width, 1)
        self.skip: torch.Tensor | None = None
        for block in self.blocks:
            object.__setattr__(block, "owner", self)  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        self.skip = None
        for k, block in enumerate(self.blocks):
            h = block(h)
            if k == 0:
                self.skip = h
        skip, self.skip = self.skip, None
        assert skip is not None
        return self.head(h + skip).square().mean()


# stages: 0 <pre>, 1..4 the blocks, 5 <post>; stage 1's output read after stage 4's forward
TREE = (
    Stage(0),
    Segment(1, 3, (Stage(1), Stage(2)), offload_skips=((1, 4),)),
    Stage(3),
    Stage(4),
    Stage(5),
)


def test_the_skip_waits_in_host_memory_and_gradients_are_bit_identical() -> None:
    torch.manual_seed(0)
    model, sample = Skipped(), (torch.randn(8, 16),)
    reference = step(model, sample)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREE))
    try:
        for block in model.blocks:
            block.seen.clear()
        planned = step(model, sample)
        again = step(model, sample)  # the pool's buffer again, nothing left over
        executor: Any = model.blocks[0].__dict__["forward"].executor
        pool = executor.offloader.pools["cpu"]
        trips = executor.offloader.skips
    finally:
        remove_plan(model)
    assert_same_step(reference, planned)
    assert_same_step(reference, again)
    size = 8 * 16 * 4
    # per step: block 2 (stage 2) while the copy runs, block 3 with the storage gone, block 4
    # (the reader) with it back
    assert [block.seen for block in model.blocks] == [[], [size] * 2, [0] * 2, [size] * 2]
    assert pool.allocated == 1 and pool.held_bytes == size
    assert not (trips.leaving or trips.hosted or trips.arriving)


class Aliasing(Skipped):
    """The block after the skip's maker returns a view of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks[1].forward = lambda x: x[:]  # type: ignore[method-assign]


def test_a_skip_whose_storage_the_next_block_hands_on_is_refused() -> None:
    torch.manual_seed(0)
    model, sample = Aliasing(), (torch.randn(8, 16),)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREE))
    try:
        with pytest.raises(PlanMismatchError, match="shares its storage"):
            step(model, sample)
    finally:
        remove_plan(model)
