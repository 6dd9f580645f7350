"""``memfit.verify``: op traces (identity on any machine) and models that do not repeat themselves."""

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import memfit
from memfit.runtime import replay

transformers = pytest.importorskip("transformers")


def gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The configuration whose gradients differed on another CPU when the cache was dropped."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=32, vocab_size=64)
    ids = torch.randint(0, 64, (2, 32))
    return transformers.GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}


def test_a_planned_gpt2_runs_the_plain_steps_ops() -> None:
    model, sample = gpt2()
    memfit.auto(model, sample, budget=None, strategy="sqrt", repeats=1)
    try:
        report = memfit.verify(model, sample, repeats=1, trace=True)
    finally:
        memfit.remove(model)
    assert report.trace_difference == ""
    assert report.ok and report.reference_repeatable


def _dropping(where: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What planned blocks did before: the cache dropped (strided keys instead of fresh ones)."""
    cache_utils = transformers.cache_utils
    args = tuple(None if isinstance(a, cache_utils.Cache) else a for a in args)
    kwargs = {k: None if isinstance(v, cache_utils.Cache) else v for k, v in kwargs.items()}
    return args, kwargs


def test_the_trace_sees_what_equal_gradients_on_this_machine_hide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = torch.randn(2, 8, 4, 4).transpose(1, 2)  # strided, as attention makes them
    if transformers.DynamicCache().update(keys, keys, 0)[0].stride() == keys.stride():
        # older transformers (4.52) hand a layer's first keys back as they came: no other layout
        pytest.skip("this transformers' cache returns the keys as given: dropping it is alike")
    model, sample = gpt2()
    memfit.auto(model, sample, budget=None, strategy="sqrt", repeats=1)
    monkeypatch.setattr(replay, "private_caches", _dropping)
    try:
        report = memfit.verify(model, sample, repeats=1, trace=True)
    finally:
        memfit.remove(model)
    # the gradients may well be equal here; the layouts are not, and other CPUs round them
    # differently
    assert report.trace_difference.startswith("forward"), report.trace_difference
    assert "stride" in report.trace_difference
    assert not report.ok


class NumpyNoise(nn.Module):
    """Draws its noise from NumPy, which no seed of torch's reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        noise = torch.from_numpy(np.random.default_rng().standard_normal(8).astype("float32"))
        return (x * noise).sum()


def test_a_model_that_does_not_repeat_itself_is_named_not_the_plan() -> None:
    model, x = NumpyNoise(), torch.randn(4, 8)
    memfit.auto(model, (x,), budget=None, strategy="all", repeats=1)
    try:
        report = memfit.verify(model, (x,), repeats=1)
    finally:
        memfit.remove(model)
    assert not report.gradients_equal
    assert report.reference_repeatable is False
