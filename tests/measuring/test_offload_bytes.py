"""What offload could move: saved activation bytes per block, and the CPU profile's note."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import memfit
from memfit.measuring import offload as offload_module
from memfit.measuring.chain import find_chain
from memfit.measuring.offload import saved_activation_bytes, saved_activations
from memfit.models import build
from memfit.planning.offload import OFFLOAD


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # linear saves x (the block's input); tanh saves its output (the block's output, which
        # the next block holds: not counted, and the next block's input, which this block holds:
        # not counted there either); the weight is a parameter (never moved)
        return torch.tanh(self.linear(x))


def tanh_chain(rows: int) -> tuple[Callable[[], torch.Tensor], dict[int, nn.Module]]:
    """Two tanh blocks between linears: the forward to run and the blocks by stage."""
    model = nn.Sequential(nn.Linear(64, 64), Block(), Block(), nn.Linear(64, 1))
    x = torch.randn(rows, 64)
    chain = find_chain(model, lambda: model(x), blocks=["1", "2"])
    blocks = {i: block for i in chain.block_stages if (block := chain.block_of_stage(i))}
    return lambda: model(x), blocks


def test_saved_activation_bytes_count_what_offload_frees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 1)
    forward, blocks = tanh_chain(32)
    moved = saved_activation_bytes(blocks, forward)
    # block 1's input comes from a linear (which saves its own input): only block 1 holds it;
    # block 2's input is block 1's tanh output, which block 1 keeps on the device
    assert moved == {1: 32 * 64 * 4, 2: 0}


def test_inputs_another_block_saves_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offloading a segment's input frees nothing when the block before saves it (its tanh
    output): the copy back would only add to the peak."""
    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 1)
    forward, blocks = tanh_chain(32)
    saved = saved_activations(blocks, forward)
    assert saved.inputs_stay == {2}


def test_tiny_tensors_are_not_counted() -> None:
    forward, blocks = tanh_chain(2)  # 512 bytes per activation, below MIN_OFFLOAD_BYTES
    assert saved_activation_bytes(blocks, forward) == {1: 0, 2: 0}


def test_cpu_plans_say_why_offload_is_absent() -> None:
    model, sample = build("gpt", layers=2, width=32, heads=4, seq=16, batch=2, vocab=64)
    prof = memfit.profile(model, sample, options=[OFFLOAD], repeats=1)
    assert prof.costs.host_bytes_per_s == 0
    assert all(OFFLOAD not in stage.options for stage in prof.costs.stages)
    plan = memfit.plan(prof, budget=None)
    assert any("offload left out" in note and "cpu" in note for note in plan.notes)
    assert "host_peak_bytes" not in plan.info
