"""Blocks that carry several tensors (dual-stream diffusion transformers: SD3's and Flux's
joint blocks take ``hidden_states`` and ``encoder_hidden_states`` and return both, the order
swapped). The chain finder refused them as "not a chain" (the next block's main input is not
the first item of the previous block's output) and settled for a list inside one block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import UnsupportedModelError
from memfit.measuring.carry import MAIN_ONLY
from memfit.measuring.chain import find_chain
from memfit.planning import Plan, Segment, Stage, simulate

WIDTH, BATCH, IMAGE, TEXT = 16, 2, 12, 5


class Joint(nn.Module):
    """A joint block as diffusers writes them: both streams in, ``(context, image)`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(WIDTH, WIDTH)
        self.context = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.1)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        mixed = torch.tanh(self.image(joint) + temb[:, None])
        context, image = mixed[:, :TEXT], mixed[:, TEXT:]
        hidden_states = hidden_states + self.drop(image)
        encoder_hidden_states = encoder_hidden_states + torch.tanh(self.context(context))
        return encoder_hidden_states, hidden_states


class Single(nn.Module):
    """A single-stream block as Flux's: concatenate, transform, hand back two views of one
    tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(WIDTH, WIDTH)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        joint = joint + nn.functional.gelu(self.mlp(joint * temb[:, None]))
        return joint[:, :TEXT], joint[:, TEXT:]


class DualStream(nn.Module):
    def __init__(self, joint: int = 3, single: int = 0) -> None:
        super().__init__()
        self.embed = nn.Linear(4, WIDTH)
        self.context_embed = nn.Linear(8, WIDTH)
        self.time = nn.Linear(1, WIDTH)
        self.transformer_blocks = nn.ModuleList(Joint() for _ in range(joint))
        self.single_transformer_blocks = nn.ModuleList(Single() for _ in range(single))
        self.out = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        hidden_states, encoder_hidden_states = self.embed(x), self.context_embed(context)
        temb = self.time(t[:, None])
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb
            )
        return (self.out(hidden_states) - x).pow(2).mean()


class OneStream(nn.Module):
    """A single-stream block as older diffusers' Flux had it: one tensor in, one out."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return hidden_states + nn.functional.gelu(self.mlp(hidden_states * temb[:, None]))


class Concatenated(nn.Module):
    """Flux as older diffusers wrote it: the joint blocks' two streams concatenated between
    the lists, the single-stream blocks handing on one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, WIDTH)
        self.context_embed = nn.Linear(8, WIDTH)
        self.time = nn.Linear(1, WIDTH)
        self.transformer_blocks = nn.ModuleList(Joint() for _ in range(2))
        self.single_transformer_blocks = nn.ModuleList(OneStream() for _ in range(3))
        self.out = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        hidden_states, encoder_hidden_states = self.embed(x), self.context_embed(context)
        temb = self.time(t[:, None])
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb
            )
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for single in self.single_transformer_blocks:
            hidden_states = single(hidden_states, temb)
        return (self.out(hidden_states)[:, TEXT:] - x).pow(2).mean()


class Pair(nn.Module):
    """A block that takes two tensors positionally and hands them on in the same order."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(a) + b, b * 2


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Pair() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x, x.flip(1)
        for block in self.blocks:
            a, b = block(a, b)
        return (a * b).sum()


def _sample() -> tuple[torch.Tensor, ...]:
    return torch.randn(BATCH, IMAGE, 4), torch.randn(BATCH, TEXT, 8), torch.rand(BATCH)


def test_joint_blocks_are_a_chain_that_carries_both_streams() -> None:
    model = DualStream()
    sample = _sample()
    chain = find_chain(model, lambda: model(*sample))
    assert chain.block_names == (
        "transformer_blocks.0",
        "transformer_blocks.1",
        "transformer_blocks.2",
    )
    # the main input is item 1 of the output, encoder_hidden_states= item 0 (order swapped)
    assert chain.carries == (((0, 1), ("encoder_hidden_states", 0)),)
    named = find_chain(model, lambda: model(*sample), blocks="transformer_blocks")
    assert named.carries == chain.carries


def test_dual_then_single_stream_lists_are_groups_of_one_chain() -> None:
    model = DualStream(joint=2, single=3)
    sample = _sample()
    chain = find_chain(model, lambda: model(*sample))
    assert chain.groups == (0, 2)
    assert chain.stage_names[3] == "<after transformer_blocks>"
    assert len(chain.carries) == 2 and all(chain.carries)


@pytest.mark.slow  # a profile and a traced verify: about 3 s, 10 s under load
def test_a_concatenation_between_two_streams_and_one_joins_the_groups() -> None:
    torch.manual_seed(0)
    model = Concatenated().train()
    sample = _sample()
    chain = find_chain(model, lambda: model(*sample))
    assert chain.groups == (0, 2)
    assert chain.carries == (((0, 1), ("encoder_hidden_states", 0)), MAIN_ONLY)
    profile = memfit.profile(model, sample, options=())
    names = [stage.name for stage in profile.costs.stages]
    assert names[3] == "<after transformer_blocks>"
    # the joint blocks joined in one segment, the single-stream ones in another
    tree = (Stage(0), Segment(1, 3, (Stage(1), Stage(2))), Stage(3))
    tree += (Segment(4, 7, (Stage(4), Stage(5), Stage(6))), Stage(7))
    plan = Plan.from_tree(names, tree, "hand-made")
    predicted = simulate(profile.costs, plan.tree).peak_bytes
    memfit.apply(model, plan)
    report = memfit.verify(model, sample, repeats=1, trace=True)
    assert report.gradients_equal and report.loss_equal and report.trace_difference == ""
    # high, never low: the recompute of this toy's last single-stream block is predicted one
    # stream tensor high, with or without carries (docs/known-gaps.md); the joint segment
    # alone is predicted within 128 B
    assert 0 <= predicted - report.measured_peak_bytes <= 0.06 * report.measured_peak_bytes


def test_blocks_handing_on_a_pair_positionally_carry_both() -> None:
    model = Positional()
    x = torch.randn(BATCH, WIDTH)
    chain = find_chain(model, lambda: model(x))
    assert chain.carries == (((0, 0), (1, 1)),)


@pytest.mark.parametrize("layers", [2, 3])
def test_a_tensor_passed_on_unchanged_is_no_carry(layers: int) -> None:
    """T5's position bias: made by the first block, returned by every block, passed to the
    next as it is. Only the hidden state is carried, also with two layers, where the one pair
    of blocks hands on both tensors (transformers' T5 tester config)."""

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(WIDTH, WIDTH)

        def forward(
            self, hidden_states: torch.Tensor, bias: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if bias is None:
                bias = torch.ones(WIDTH)
            return self.linear(hidden_states) + bias, bias

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Biased() for _ in range(layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = None
            for layer in self.layers:
                x, bias = layer(x, bias=bias)
            return x.sum()

    model = Stack()
    x = torch.randn(BATCH, WIDTH)
    chain = find_chain(model, lambda: model(x))
    assert chain.block_names == tuple(f"layers.{i}" for i in range(layers))
    assert chain.carries == () and chain.carry(1) == MAIN_ONLY


def test_named_blocks_that_hand_on_nothing_are_still_refused() -> None:
    class Apart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Joint() for _ in range(2))

        def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            temb = t[:, None].expand(-1, WIDTH)
            c1, h1 = self.blocks[0](x, c, temb)
            c2, h2 = self.blocks[1](x, c, temb)  # the first block's output is not handed on
            return (h1 + h2).sum() + (c1 + c2).sum()

    model = Apart()
    x, c = torch.randn(BATCH, IMAGE, WIDTH), torch.randn(BATCH, TEXT, WIDTH)
    with pytest.raises(UnsupportedModelError, match="is not a chain"):
        find_chain(model, lambda: model(x, c, torch.rand(BATCH)), blocks="blocks")


def test_the_profile_counts_every_carried_tensor() -> None:
    model = DualStream(joint=2, single=2)
    sample = _sample()
    stages = {stage.name: stage for stage in memfit.profile(model, sample, options=()).costs.stages}
    both = BATCH * (IMAGE + TEXT) * WIDTH * 4
    assert stages["transformer_blocks.0"].output_bytes == both  # two tensors
    assert stages["transformer_blocks.1"].input_bytes == both
    assert stages["<pre>"].output_bytes == both
    # the single-stream block hands on two views of one tensor: its storage, once
    assert stages["single_transformer_blocks.0"].output_bytes == both


@pytest.mark.slow  # a profile and a traced verify each: about 3 s, 10 s under load
@pytest.mark.parametrize(
    "tree",
    [
        # blocks 1-3 joined in one segment (the carried pair checked and handed on between)
        lambda: (Stage(0), Segment(1, 4, (Stage(1), Stage(2), Stage(3))), Stage(4)),
        # nested: an outer segment over 1-3 recomputing 1-2 in a segment of their own
        lambda: (
            Stage(0),
            Segment(1, 4, (Segment(1, 3, (Stage(1), Stage(2))), Stage(3))),
            Stage(4),
        ),
        # one block at a time, and a kept block between recomputed ones
        lambda: (
            Stage(0),
            Segment(1, 2, (Stage(1),)),
            Stage(2),
            Segment(3, 4, (Stage(3),)),
            Stage(4),
        ),
    ],
    ids=["joined", "nested", "per-block"],
)
def test_segments_across_carries_are_bit_identical_and_predicted(tree) -> None:
    torch.manual_seed(0)
    model = DualStream(joint=3).train()
    sample = _sample()
    profile = memfit.profile(model, sample, options=())
    names = [stage.name for stage in profile.costs.stages]
    plan = Plan.from_tree(names, tree(), "hand-made")
    predicted = simulate(profile.costs, plan.tree).peak_bytes
    memfit.apply(model, plan)
    report = memfit.verify(model, sample, repeats=1, trace=True)
    assert report.gradients_equal and report.loss_equal
    assert report.trace_difference == ""
    if any(isinstance(item, Segment) for item in plan.tree[1].inner):
        # nested segments: the simulator holds the nested checkpoints' RNG states to the outer
        # backward's end (docs/memory-model.md), a few KB over on a toy this small (13.7% on
        # the same blocks handing on one tensor)
        excess = predicted - report.measured_peak_bytes
        assert 0 <= excess <= 2 * profile.costs.checkpoint_bytes
    else:
        assert abs(report.measured_peak_bytes / predicted - 1) <= 0.02
