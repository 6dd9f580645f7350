"""``memfit.verify``: op traces (identity on any machine) and models that do not repeat themselves."""

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import memfit
from memfit.measuring.chain import find_chain
from memfit.models import build
from memfit.runtime import apply_plan, remove_plan, replay
from memfit.runtime.head import LEAN_LOSS
from tests.helpers.plans import head_plan

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


def lean_loss_model(arch: str) -> tuple[nn.Module, Any]:
    """``arch`` with every block recomputed and its loss under ``head:lean-loss`` (forced: the
    planner picks it only where it pays)."""
    if arch == "gpt2":
        model, sample = gpt2()
        chain = find_chain(model, lambda: model(**sample))
    else:  # the built-in GPT: its forward calls F.cross_entropy
        model, sample = build("gpt", layers=2, width=32, seq=16, batch=2)
        chain = find_chain(model, lambda: model(*sample))
    apply_plan(model, chain, head_plan(chain, LEAN_LOSS))
    return model, sample


@pytest.mark.parametrize("arch", ["gpt2", "gpt"])
def test_the_lean_loss_is_a_difference_by_design(arch: str) -> None:
    model, sample = lean_loss_model(arch)
    try:
        report = memfit.verify(model, sample, repeats=1, trace=True)
    finally:
        remove_plan(model)
    assert report.trace_difference == "", report.trace_difference
    assert report.ok and report.gradients_equal and report.loss_equal
    forward, backward = report.by_design
    rows = "64 x 64" if arch == "gpt2" else "32 x 1024"
    label = f"{LEAN_LOSS}: cross_entropy over {rows} logits"
    assert forward.startswith(f"{label} (forward): the plain step's aten._log_softmax.default, ")
    assert "aten.nll_loss_forward.default replaced by" in forward and "gather" in forward
    assert backward.startswith(f"{label} (backward): the plain step's aten.nll_loss_backward")
    assert "aten._log_softmax_backward_data.default replaced by" in backward


def _column_major(where: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A planned block's input as a column-major copy: the same values on another layout."""
    first, *rest = args
    return (first.mT.contiguous().mT, *rest), kwargs


def _column_major_reruns(where: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The same in a block's rerun only: the forward matches, and the first difference is a
    block's backward on the rerun's saved tensors, after the head's backward region (found only
    where that region is cut out of both steps)."""
    return _column_major(where, args, kwargs) if replay.replaying() else (args, kwargs)


@pytest.mark.parametrize(
    ("patch", "where"), [(_column_major, "forward"), (_column_major_reruns, "backward")]
)
def test_a_block_difference_is_caught_with_the_head_exempt(
    monkeypatch: pytest.MonkeyPatch, patch: Any, where: str
) -> None:
    model, sample = lean_loss_model("gpt")
    monkeypatch.setattr(replay, "private_caches", patch)
    try:
        report = memfit.verify(model, sample, repeats=1, trace=True)
    finally:
        remove_plan(model)
    assert report.trace_difference.startswith(where), report.trace_difference
    assert "stride" in report.trace_difference
    assert "by design" not in report.trace_difference
    assert not report.ok
    assert report.by_design[0].startswith(f"{LEAN_LOSS}: cross_entropy over 32 x 1024 logits")


def test_group_errors_and_cosine_measure_a_gradient_against_the_reference() -> None:
    from memfit.verbs.verification import (
        OUTSIDE_BLOCKS,
        cosine_similarity,
        group_errors,
        parameter_groups,
    )

    model, _sample = build("gpt", layers=2, width=16, heads=2, vocab=32, seq=8, batch=2)
    groups = parameter_groups(model, ["blocks.0", "blocks.1"])
    assert groups["blocks.1.attn.qkv.weight"] == "blocks.1"
    assert OUTSIDE_BLOCKS in set(groups.values())
    reference = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    planned = dict(reference)
    assert set(group_errors(reference, planned, groups).values()) == {0.0}
    assert cosine_similarity(reference, planned) == pytest.approx(1.0)
    # one block's gradients 1% off, in norm: that group only
    planned = {
        name: grad * 1.01 if groups[name] == "blocks.0" else grad
        for name, grad in reference.items()
    }
    errors = group_errors(reference, planned, groups)
    assert errors["blocks.0"] == pytest.approx(0.01) and errors["blocks.1"] == 0.0
    assert cosine_similarity(reference, {k: -v for k, v in reference.items()}) == pytest.approx(-1)
    missing = {**reference, "blocks.1.attn.qkv.weight": None}
    assert group_errors(reference, missing, groups)["blocks.1"] == float("inf")


def test_a_lossy_plan_is_held_to_its_error_budget() -> None:
    from memfit.runtime import BF16

    model, sample = build("gpt", layers=2, width=64, heads=4, vocab=64, seq=32, batch=2)
    chain = find_chain(model, lambda: model(*sample))
    from memfit.planning.plan import Plan, Stage

    stages = tuple(
        Stage(i, BF16 if chain.block_of_stage(i) is not None else "keep") for i in range(len(chain))
    )
    for bound, ok in ((None, True), (1e-9, False), (0.5, True)):
        plan = Plan(
            stage_names=chain.stage_names,
            tree=stages,
            strategy="by hand",
            predicted_peak_bytes=1,
            predicted_step_s=0.0,
            max_error=bound,
        )
        apply_plan(model, chain, plan)
        try:
            report = memfit.verify(model, sample, repeats=1)
        finally:
            remove_plan(model)
        assert report.lossy and not report.exact and not report.gradients_equal
        assert report.loss_equal  # the forward is the plain one: only backward reads bf16
        assert 0 < report.relative_error < 0.05 and 0.99 < report.cosine < 1
        assert report.max_error == bound and report.ok is ok
        assert report.to_dict()["relative_error"] == report.relative_error
