"""The model's real blocks: what its own checkpointing switch checkpoints, as a check on the
chain the finder picks (:mod:`memfit.measuring.library_blocks`).

The models here checkpoint as diffusers' and transformers' do: a module with a
``gradient_checkpointing`` flag passes each block it checkpoints through
``self._gradient_checkpointing_func``. No library is needed.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import UnsupportedModelError
from memfit.measuring.library_blocks import find_blocks, library_blocks

WIDTH = 16


def _feed_forward() -> nn.Sequential:
    return nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))


class _Checkpointing(nn.Module):
    """Runs a block as diffusers does: through the checkpoint function when the flag is on."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def run(self, block: nn.Module, *args: Any) -> Any:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)


class Joint(nn.Module):
    """Two streams in, both out, the other way round (SD3's joint block)."""

    def __init__(self) -> None:
        super().__init__()
        self.ff = _feed_forward()
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return context + self.mix(x), x + self.drop(self.ff(x + context))


class DualStream(_Checkpointing):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Joint() for _ in range(layers))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            context, x = self.run(block, x, context)
        return (x * x).mean()


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ff = _feed_forward()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.ff(x))


class Attributes(_Checkpointing):
    """Blocks held as attributes, not in a list: the finder sees only each block's ``ff``."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.third, self.fourth = (Residual() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.first, self.second, self.third, self.fourth):
            x = self.run(block, x)
        return (x * x).mean()


class Skips(_Checkpointing):
    """Down and up lists with a skip from the first down block to the last up block."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.ModuleList(Residual() for _ in range(2))
        self.up = nn.ModuleList(Residual() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.run(self.down[0], x)
        x = self.run(self.down[1], first)
        x = self.run(self.up[0], x)
        x = self.run(self.up[1], x + first)
        return (x * x).mean()


def _run(model: nn.Module, *sample: torch.Tensor) -> Any:
    return lambda: model(*sample)


def test_library_blocks_are_what_the_switch_checkpoints_and_flags_come_back() -> None:
    model = Attributes().train()
    x = torch.randn(4, WIDTH)
    found = library_blocks(model, _run(model, x))
    assert found is not None
    assert found.names == ("first", "second", "third", "fourth")
    assert found.reasons() == []
    assert model.gradient_checkpointing is False
    assert "_gradient_checkpointing_func" not in vars(model)


def test_blocks_of_the_library_replace_a_chain_inside_one_block() -> None:
    model = Attributes().train()
    x = torch.randn(4, WIDTH)
    chain, notes = find_blocks(model, _run(model, x))
    assert chain.block_names == ("first", "second", "third", "fourth")
    assert len(notes) == 1 and "first.ff" in notes[0], notes


def test_library_blocks_plan_bit_identical_within_budget() -> None:
    model = Attributes().train()
    sample = (torch.randn(64, WIDTH),)
    plan = memfit.auto(model, sample, budget="50%", repeats=1, options=())
    assert plan.stage_names[1:-1] == ("first", "second", "third", "fourth")
    report = memfit.verify(model, sample, repeats=1)
    assert report.loss_equal and report.gradients_equal, report.mismatched
    assert report.measured_peak_bytes <= plan.budget_bytes
    assert abs(report.prediction_error) <= 0.02


def test_blocks_carrying_two_tensors_are_the_librarys_or_refused_naming_the_carries() -> None:
    """Never the chain inside one block: the library's blocks once the chain finder follows
    carries (branch carries), else a refusal that names them."""
    model = DualStream().train()
    sample = (torch.randn(4, WIDTH), torch.randn(4, WIDTH))
    found = library_blocks(model, _run(model, *sample))
    assert found is not None and found.carried[0] == ("blocks.0", "blocks.1", 2)
    try:
        chain, _notes = find_blocks(model, _run(model, *sample))
    except UnsupportedModelError as error:
        message = str(error)
        assert "blocks.0.ff.0" in message  # what the finder found
        assert "inside one of the blocks" in message
        assert "carry several tensors" in message and "blocks.1 takes 2 tensors" in message
        assert "blocks=" in message
        return
    assert chain.block_names == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")


def test_skip_connections_are_refused_and_named() -> None:
    model = Skips().train()
    x = torch.randn(4, WIDTH)
    found = library_blocks(model, _run(model, x))
    assert found is not None
    assert found.skipped == (("down.0", "the model's code before up.1", 2),)
    with pytest.raises(UnsupportedModelError, match=r"skip connections: the output of down\.0"):
        find_blocks(model, _run(model, x))


def test_a_model_without_flags_keeps_the_finders_chain() -> None:
    model = nn.Sequential(*(Residual() for _ in range(3)))
    x = torch.randn(4, WIDTH)
    chain, notes = find_blocks(model, _run(model, x))
    assert chain.block_names == ("0", "1", "2") and notes == []


class WideHead(nn.Module):
    """Three small blocks before a head that saves far more than they do."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Residual() for _ in range(3)))
        self.head = nn.Linear(WIDTH, 64 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)).square().mean()


def test_blocks_saving_under_half_the_activations_get_a_note() -> None:
    model = WideHead().train()
    profile = memfit.profile(model, (torch.randn(8, WIDTH),), options=(), repeats=1)
    notes = [note for note in profile.notes if "activation memory" in note]
    assert len(notes) == 1 and "blocks.0" in notes[0] and "blocks=" in notes[0], notes
    plan = memfit.plan(profile, budget="90%")
    assert notes[0] in plan.notes


class NewTokens(_Checkpointing):
    """A list whose second block gets extra tokens joined to the first's output (EoMT's
    queries, concatenated before its last layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Residual() for _ in range(3))
        self.queries = nn.Parameter(torch.randn(2, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run(self.layers[0], x)
        x = torch.cat([self.queries, x])
        for layer in self.layers[1:]:
            x = self.run(layer, x)
        return (x * x).mean()


def test_blocks_whose_input_the_model_joins_are_refused_and_named() -> None:
    model = NewTokens().train()
    with pytest.raises(UnsupportedModelError, match=r"makes layers\.1's input from layers\.0's"):
        find_blocks(model, _run(model, torch.randn(4, WIDTH)))


class Parallel(nn.Module):
    """Each layer spread over two lists, the residual adds in the model's code (XLM)."""

    def __init__(self) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.ffns = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, ffn in zip(self.attentions, self.ffns, strict=True):
            x = x + attention(x)
            x = x + ffn(x).relu()
        return (x * x).mean()


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.up(x).relu())


class DirectForward(nn.Module):
    """Runs its blocks by calling ``.forward`` (SqueezeBERT's encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Plain() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return (x * x).mean()


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (Parallel(), r"spread over parallel lists \(attentions, ffns"),
        (DirectForward(), r"runs the blocks of layers by calling their \.forward itself"),
    ],
)
def test_no_chain_without_a_switch_says_why(model: nn.Module, reason: str) -> None:
    model.train()
    with pytest.raises(UnsupportedModelError, match=reason):
        find_blocks(model, _run(model, torch.randn(4, WIDTH)))
    assert "forward" not in vars(model.get_submodule("ffns.0" if "ffns" in reason else "layers.0"))


class Longer(_Checkpointing):
    """A list of six blocks of which the switch checkpoints only the last three (Mimi: its
    transformer layers, not the convolutions in the same chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Residual() for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = self.run(layer, x) if index >= 3 else layer(x)
        return (x * x).mean()


def test_a_chain_holding_every_library_block_stays() -> None:
    model = Longer().train()
    chain, notes = find_blocks(model, _run(model, torch.randn(4, WIDTH)))
    assert chain.block_names == tuple(f"layers.{i}" for i in range(6)) and notes == []


class Stage(_Checkpointing):
    """A container of blocks of two classes, each checkpointed by the container (a diffusers
    down block's resnets and attentions; an EfficientNet stage's blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Residual(), Plain(), Residual()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.run(block, x)
        return x


class Stages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(Stage() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return (x * x).mean()


def _floor(profile: memfit.Profile) -> int:
    with pytest.raises(memfit.InfeasibleBudgetError) as raised:
        memfit.plan(profile, budget="1%")
    return raised.value.min_feasible_bytes


def test_containers_give_way_to_the_blocks_the_library_checkpoints_in_them() -> None:
    model = Stages().train()
    sample = (torch.randn(64, WIDTH),)
    chain, notes = find_blocks(model, _run(model, *sample))
    assert chain.block_names == tuple(f"stages.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1, 2))
    assert chain.groups == (0, 3) and "stages.0" in notes[0]
    finer = memfit.profile(model, sample, options=(), repeats=1)
    whole = memfit.profile(model, sample, options=(), repeats=1, blocks="stages")
    assert _floor(finer) < _floor(whole)


class Cross(nn.Module):
    """A decoder block reading the encoder's output besides its input."""

    def __init__(self) -> None:
        super().__init__()
        self.ff = Plain()
        self.cross = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.ff(x) + self.cross(memory)


class EncoderDecoder(_Checkpointing):
    """Two lists, the encoder's last output read by every decoder block (BART without an
    encoder norm, Florence-2's language model); logs as transformers does when its switch is
    on."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(Plain() for _ in range(2))
        self.decoder = nn.ModuleList(Cross() for _ in range(2))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            logging.getLogger("transformers.toy").warning("use_cache=True is incompatible")
        for block in self.encoder:
            x = self.run(block, x)
        for block in self.decoder:
            y = self.run(block, y, x)
        return (y * y).mean()


def test_an_encoder_output_read_by_every_decoder_block_is_no_skip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = EncoderDecoder().train()
    sample = (torch.randn(4, WIDTH), torch.randn(4, WIDTH))
    with caplog.at_level(logging.WARNING):
        found = library_blocks(model, _run(model, *sample))
        chain, notes = find_blocks(model, _run(model, *sample))
    assert found is not None and found.skipped == ()
    assert chain.block_names == ("encoder.0", "encoder.1", "decoder.0", "decoder.1")
    assert notes == [] and chain.groups == (0, 2)
    assert caplog.records == []  # the watch turned the switch on, not the user
