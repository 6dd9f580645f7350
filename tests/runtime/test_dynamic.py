"""Plans that follow each batch's shape (``memfit.auto(..., shapes="dynamic")``).

A Hugging Face GPT-2 built with the library's defaults (dropout on, KV cache on) is profiled at
eight shapes up to 2 x 128 tokens and planned for a fixed budget in bytes that the long batches
only meet with recompute. Over a short stream of lengths every step's loss and gradients are
``torch.equal`` to the unplanned model's, every measured peak is within the budget, and the plan
switches between buckets. A batch longer than anything that fits raises before its forward.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle

import pytest
import torch

import memfit
from memfit.errors import AlreadyPlannedError, InfeasibleBudgetError
from memfit.integrations.hf import build_hf
from memfit.measuring.sample_shapes import resize_sample, sample_layout
from memfit.planning.baselines import keep_all
from memfit.planning.shape_fits import Shape
from memfit.planning.simulate import simulate
from memfit.planning.solve import min_peak_bytes
from memfit.runtime import applied_plan
from memfit.runtime.dynamic import batch_bucket, shape_plans
from memfit.verbs.verification import mismatched_gradients, seeded_gradients

STREAM = [16, 128, 40, 96, 16, 128]


@pytest.fixture(scope="module")
def shaped_gpt2():
    model, sample = build_hf("gpt2", layers=4, hidden=32, heads=2, seq=128, batch=2)
    shaped = memfit.profile_shapes(model, sample, repeats=1)
    costs = shaped.fitted.costs_at(Shape(2, 128))
    floor, plain = min_peak_bytes(costs), simulate(costs, keep_all(costs)).peak_bytes
    budget = floor + (plain - floor) // 3  # the longest batches need recompute
    return model, sample, shaped, budget


def planned(shaped_gpt2):
    model, sample, shaped, budget = shaped_gpt2
    twin = copy.deepcopy(model)
    memfit.auto(model, sample, budget=budget, shapes="dynamic", bucket=32, shape_profile=shaped)
    return model, twin, sample, budget


def assert_same_step(model, twin, batch, seed: int) -> None:
    loss, grads = seeded_gradients(model, batch, None, seed)
    reference_loss, reference = seeded_gradients(twin, batch, None, seed)
    assert torch.equal(loss, reference_loss)
    assert mismatched_gradients(reference, grads) == ()


def test_stream_within_budget_and_bit_identical(shaped_gpt2) -> None:
    model, twin, sample, budget = planned(shaped_gpt2)
    try:
        for step, seq in enumerate(STREAM):
            batch = resize_sample(sample, Shape(2, seq))
            assert_same_step(model, twin, batch, seed=step)
            peak = memfit.measure(model, batch, repeats=1, warmup=0).peak_bytes
            assert peak <= budget, (seq, peak, budget)
            plans = shape_plans(model)
            assert plans is not None
            assert abs(plans.steps[-1].predicted_peak_bytes / peak - 1) < 0.05
        assert plans.switches >= 3  # short batches keep more than long ones
        assert len(plans.plans) == 4  # buckets 32, 64, 96, 128
    finally:
        assert memfit.remove(model)
    assert applied_plan(model) is None and shape_plans(model) is None
    assert not model._forward_pre_hooks


def test_too_long_raises_before_the_forward(shaped_gpt2) -> None:
    model, _twin, sample, budget = planned(shaped_gpt2)
    try:
        # GPT-2's positions stop at 128: the error must come from memfit, before any layer
        with pytest.raises(InfeasibleBudgetError, match=r"batch of shape 2 x 4096 .* fit"):
            model(**resize_sample(sample, Shape(2, 4096)))
        with pytest.raises(AlreadyPlannedError):
            memfit.auto(model, sample, budget=budget, shapes="dynamic")
    finally:
        memfit.remove(model)
    _model, _sample, shaped, _budget = shaped_gpt2
    with pytest.raises(InfeasibleBudgetError, match=r"2 x 4096"):
        memfit.auto(
            model,
            sample,
            budget=budget,
            shapes="dynamic",
            seq_range=(16, 4096),
            shape_profile=shaped,
        )
    assert applied_plan(model) is None and shape_plans(model) is None


def test_copies_plan_their_own_shapes(shaped_gpt2) -> None:
    model, twin, sample, _budget = planned(shaped_gpt2)
    try:
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            plans = shape_plans(copied)
            assert plans is not None and plans is not shape_plans(model)
            before, switches = applied_plan(model), plans.switches
            for step, seq in enumerate([128, 16]):
                assert_same_step(copied, twin, resize_sample(sample, Shape(2, seq)), seed=step)
            # the copy switched to the short bucket's plan; the original kept its own
            assert plans.switches == switches + 1 and applied_plan(model) is before
            assert applied_plan(copied) is plans.plans[Shape(2, 32)]
    finally:
        memfit.remove(model)


def test_feedback_widens_the_margin_once(shaped_gpt2, caplog: pytest.LogCaptureFixture) -> None:
    model, _twin, sample, _budget = planned(shaped_gpt2)
    try:
        model(**resize_sample(sample, Shape(2, 100)))
        plans = shape_plans(model)
        assert plans is not None and plans.plans
        predicted = plans.steps[-1].predicted_peak_bytes
        assert not plans.observe(predicted)  # at the prediction: nothing to do
        margin = plans.margin
        with caplog.at_level(logging.WARNING, logger="memfit.runtime.dynamic"):
            assert plans.observe(predicted + 100_000)
            widened = plans.margin
            assert not plans.observe(predicted + 100_000)  # the margin absorbs it now
            assert plans.observe(predicted + 200_000)
        assert margin < widened < plans.margin and not plans.plans
        assert sum("above its prediction" in r.message for r in caplog.records) == 1
    finally:
        memfit.remove(model)


@pytest.mark.cuda
def test_cuda_reads_the_allocator_high() -> None:
    model, sample = build_hf("gpt2", layers=2, hidden=32, heads=2, seq=64, batch=2)
    model, sample = model.cuda(), {k: v.cuda() for k, v in sample.items()}
    memfit.auto(model, sample, budget="60%", shapes="dynamic", repeats=1)
    for seq in (16, 64, 32):
        model(**resize_sample(sample, Shape(2, seq))).loss.backward()
    plans = shape_plans(model)
    assert plans is not None and plans._high_bytes > 0
    memfit.remove(model)


def test_seq_range_probes_the_longest_seq() -> None:
    """Llama with eager attention, sample 2 x 32: the kept blocks' backward peaks switch to
    the scores' gradient (batch·seq²) past the profiled grid. ``seq_range`` up to 256 adds a
    batch-1 probe there, so every step of a stream up to 256 stays within the budget."""
    model, sample = build_hf(
        "llama", layers=4, hidden=32, heads=2, seq=256, batch=2, attn_implementation="eager"
    )
    short = resize_sample(sample, Shape(2, 32))
    budget = 6 * 2**20  # the 2 x 256 step needs recompute (floor 5.0 MiB, plain 11 MiB)
    memfit.auto(
        model, short, budget=budget, shapes="dynamic", seq_range=(16, 256), bucket=64, repeats=1
    )
    try:
        plans = shape_plans(model)
        assert plans is not None and Shape(1, 256) in plans.fitted.shapes
        for seq in (256, 64, 200):
            batch = resize_sample(sample, Shape(2, seq))
            peak = memfit.measure(model, batch, repeats=1, warmup=0).peak_bytes
            assert peak <= budget, (seq, peak, budget)
            assert plans.steps[-1].predicted_peak_bytes >= 0.95 * peak
    finally:
        memfit.remove(model)


def test_batch_sizes_round_to_the_sample_batch_times_a_power_of_two(shaped_gpt2) -> None:
    assert [batch_bucket(b, 24) for b in (1, 5, 12, 13, 24, 25, 49)] == [1, 6, 12, 24, 24, 48, 96]
    with pytest.raises(ValueError, match="batch sizes"):
        batch_bucket(0, 24)
    model, sample, shaped, budget = shaped_gpt2
    twin = copy.deepcopy(model)
    memfit.auto(
        model, sample, budget=budget, shapes="dynamic", bucket=32, shape_profile=shaped,
        round_batch=True,
    )  # fmt: skip
    try:
        for step, batch in enumerate([3, 4, 1, 3, 2, 4]):
            assert_same_step(model, twin, resize_sample(sample, Shape(batch, 64)), seed=step)
        plans = shape_plans(model)
        assert plans is not None
        # the sample's batch 2 is a bucket; 3 and 4 share one plan, made for 4
        assert set(plans.plans) == {Shape(2, 128), Shape(4, 64), Shape(1, 64), Shape(2, 64)}
        assert [s.bucket.batch for s in plans.steps[-6:]] == [4, 4, 1, 4, 2, 4]
        assert all(s.predicted_peak_bytes <= budget for s in plans.steps)
    finally:
        memfit.remove(model)


def test_the_shape_argument_may_come_by_keyword_or_by_position(shaped_gpt2) -> None:
    # planned from a sample with input_ids by keyword, called with them by position; and the
    # reverse: the hook finds the batch's shape either way (it raised on the other way before)
    model, twin, sample, _budget = planned(shaped_gpt2)
    ids = resize_sample(sample, Shape(2, 40))["input_ids"]
    try:
        loss, grads = seeded_gradients(model, (ids,), _logits_sum, 0)
        reference_loss, reference = seeded_gradients(twin, (ids,), _logits_sum, 0)
        assert torch.equal(loss, reference_loss) and mismatched_gradients(reference, grads) == ()
        assert shape_plans(model).steps[-1].shape == Shape(2, 40)
    finally:
        memfit.remove(model)
    _model, _sample, shaped, budget = shaped_gpt2
    by_position = dataclasses.replace(shaped, layout=sample_layout((sample["input_ids"],)))
    memfit.auto(
        model,
        (sample["input_ids"],),
        budget=budget,
        shapes="dynamic",
        bucket=32,
        shape_profile=by_position,
    )
    try:
        assert_same_step(model, twin, resize_sample(sample, Shape(2, 96)), 1)  # by keyword
        assert shape_plans(model).steps[-1].shape == Shape(2, 96)
    finally:
        memfit.remove(model)


def _logits_sum(output) -> torch.Tensor:
    return output.logits.sum()
