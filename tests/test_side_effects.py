"""memfit's entry points leave the model and the process as they found them.

Every entry point that runs steps (profile, plan on a model, measure, verify, bench, auto) is
called on a model with state of its own: gradients, a frozen parameter, a module in eval mode,
BatchNorm statistics that a step would move, dropout that draws from the RNG, Hugging Face
checkpointing switched on. Afterwards everything is compared with ``torch.equal``.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.measuring.run import time_step
from memfit.models import gpt
from memfit.verbs.bench import bench


class Residual(nn.Module):
    """conv-BN-ReLU-dropout-conv-BN plus the input: a ResNet basic block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResNet(nn.Module):
    def __init__(self, channels: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.blocks = nn.Sequential(*[Residual(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x)))
        return F.cross_entropy(self.head(h.mean((2, 3))), y)


def resnet() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = ResNet().train()
    sample = (torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,)))
    model(*sample).backward()  # the user's gradients, which memfit must give back untouched
    model.stem[0].bias.requires_grad_(False)
    model.blocks[2].body[3].eval()  # a dropout the user turned off
    return model, sample


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "config": getattr(getattr(model, "config", None), "to_dict", dict)(),
        "switches": {n: m.__dict__.get("gradient_checkpointing") for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for name, value in before["parameters"].items():
        assert torch.equal(after["parameters"][name], value), name
    for name, grad in before["grads"].items():
        assert after["grads"][name] is grad, name  # the same tensor object comes back
        if grad is not None:
            assert torch.equal(grad, before["grad_values"][name]), name
    assert after["requires_grad"] == before["requires_grad"]
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name
    assert after["training"] == before["training"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["config"] == before["config"]
    assert after["switches"] == before["switches"]


def test_a_step_does_change_what_is_checked() -> None:
    """The checks below can fail: one plain step moves statistics, RNG and gradients."""
    model, sample = resnet()
    before = snapshot(model)
    model(*sample).backward()
    with pytest.raises(AssertionError):
        assert_unchanged(model, before)


def test_cnn_with_batchnorm_and_dropout() -> None:
    model, sample = resnet()
    before = snapshot(model)
    assert before["buffers"] and before["grads"]["head.weight"] is not None
    prof = memfit.profile(model, sample, repeats=1, options=["rebuild"])
    assert_unchanged(model, before)
    memfit.plan(model, sample, budget=None, strategy="all", repeats=1, options=())
    assert_unchanged(model, before)
    memfit.measure(model, sample, repeats=1, accumulate=True)
    assert_unchanged(model, before)
    bench(model, sample, prof, budgets=["100%"], strategies=("none", "sqrt", "optimal"), repeats=1)
    assert_unchanged(model, before)
    # every block recomputed: BatchNorm runs twice per step under verify
    memfit.auto(model, sample, budget="1GiB", strategy="all", repeats=1, options=())
    assert_unchanged(model, before)
    assert memfit.verify(model, sample, repeats=1).gradients_equal
    assert_unchanged(model, before)
    assert memfit.remove(model)
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore::UserWarning:transformers")
def test_hugging_face_model_from_config_defaults() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 64, (2, 16))
    sample = {"input_ids": ids, "labels": ids}
    model(**sample).loss.backward()
    model.activation_checkpointing_enable()  # the user's own checkpointing, on
    before = snapshot(model)
    assert any(before["switches"].values())
    memfit.profile(model, sample, repeats=1, options=["rebuild"])
    assert_unchanged(model, before)
    memfit.plan(model, sample, budget=None, strategy="all", repeats=1, options=())
    assert_unchanged(model, before)


def test_gc_state_is_left_as_found() -> None:
    model, sample = gpt(layers=1, width=16, seq=8, batch=2)
    assert gc.isenabled()
    gc.disable()
    try:
        time_step(model, sample)
        assert not gc.isenabled()
    finally:
        gc.enable()
    time_step(model, sample)
    assert gc.isenabled()


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance: isinstance reads __class__, and some of torch's lazy objects warn
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_repeated_profiles_keep_nothing() -> None:
    """Each profile leaked its op-profile forward (a cycle through autograd's C++ graph) before
    the pack hook stopped returning the saved tensor itself."""
    model, sample = gpt(layers=2, width=16, seq=8, batch=2)
    memfit.profile(model, sample, repeats=1)
    tensors = _live_tensors()
    for _ in range(2):
        memfit.profile(model, sample, repeats=1)
    assert _live_tensors() == tensors


def test_profiled_model_is_not_kept_alive() -> None:
    def profile_one() -> weakref.ref[nn.Module]:
        model, sample = gpt(layers=2, width=16, seq=8, batch=2)
        memfit.auto(model, sample, budget="1GiB", strategy="sqrt", repeats=1)
        memfit.remove(model)
        return weakref.ref(model)

    ref = profile_one()
    gc.collect()
    assert ref() is None


def test_import_leaves_the_environment_alone() -> None:
    env = {key: value for key, value in os.environ.items() if key != "KINETO_LOG_LEVEL"}
    code = "import os, memfit, memfit.cli; print(os.environ.get('KINETO_LOG_LEVEL'))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "None"
