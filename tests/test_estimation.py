"""``memfit.estimate`` on three architectures built as users get them (library defaults).

Each model is profiled at eight shapes up to 2 x 64 tokens (made from a longer sample) plus a
batch-1 probe at the longest seq asked (1 x 256: without it, peaks that a seq² op sets beyond
the profiled seq are flagged as untrusted, see the last test) and its estimates at shapes 2-4x
larger than the grid (2 x 256: four times the tokens and the sequence; 4 x 128: four times the
tokens, twice the sequence) are held against measured steps there: the plain step
(every block kept, as memfit runs it) and the plan for 60% of that shape's activation memory,
each within 5% of the measured peak. The planned step also stays within its budget. Then the
default profile shapes (a grid and the sample's tokens at longer seqs) and the stage times'
scaling to unmarked steps.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

import memfit
from memfit.integrations.hf import build_hf
from memfit.measuring.sample_shapes import resize_sample
from memfit.models import gpt
from memfit.planning.plan import Plan, keep_tree
from memfit.planning.shape_fits import Shape
from memfit.runtime.apply import chain_of_plan, planned
from memfit.verbs.shape_profiles import default_profile_shapes

PROFILED = [(b, s) for b in (1, 2) for s in (8, 16, 32, 64)]
PROBE = (1, 256)
LARGER = [(2, 256), (4, 128)]


def measured_peak(model, sample, plan: Plan) -> int:
    with planned(model, chain_of_plan(model, plan), plan):
        return memfit.measure(model, sample, repeats=1, warmup=1).peak_bytes


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_estimate_within_5_percent_at_larger_shapes(arch: str) -> None:
    model, sample = build_hf(arch, layers=4, hidden=32, heads=2, seq=256, batch=4)
    result = memfit.estimate(
        model,
        sample,
        shapes=LARGER,
        budget="60%",
        profile_at=[*PROFILED, PROBE],
        options=(),
        repeats=1,
    )
    fit = result.shaped.fitted.summary()
    assert fit["holdout_error"] is not None and abs(fit["holdout_error"]) < 0.03
    for row in result.rows:
        assert row.shape in {Shape(*s) for s in LARGER}
        assert not row.untrusted, row.untrusted
        big = resize_sample(sample, row.shape)
        names = result.shaped.fitted.template.stages
        plain = Plan.from_tree([s.name for s in names], keep_tree(0, len(names)), "none")
        peak = measured_peak(model, big, plain)
        assert abs(row.peak_bytes / peak - 1) < 0.05, (row.shape, row.peak_bytes, peak)
        assert row.plan is not None and row.budget_bytes is not None
        planned_peak = measured_peak(model, big, row.plan)
        error = row.plan.predicted_peak_bytes / planned_peak - 1
        assert abs(error) < 0.05, (row.shape, row.plan.predicted_peak_bytes, planned_peak)
        assert planned_peak <= row.budget_bytes


def test_long_peak_flagged_or_found_with_a_probe() -> None:
    """Llama with eager attention: a kept block's backward peak is linear in tokens up to
    2 x 64 and set by the scores' gradient (batch·seq²) from about 100 tokens on. Estimated at
    2 x 256 from the grid alone the rows say so; with a batch-1 probe at seq 256 the fits see
    the long branch and the 60% plan's peak is within 5% of the measured one, within budget."""
    model, sample = build_hf(
        "llama", layers=4, hidden=32, heads=2, seq=256, batch=4, attn_implementation="eager"
    )
    shape = Shape(2, 256)
    big = resize_sample(sample, shape)
    for profile_at in (PROFILED, [*PROFILED, PROBE]):
        result = memfit.estimate(
            model,
            sample,
            shapes=[shape],
            budget="60%",
            profile_at=profile_at,
            options=(),
            repeats=1,
        )
        (row,) = result.rows
        if len(profile_at) == len(PROFILED):
            assert any("seq² term" in reason for reason in row.untrusted), row.untrusted
            continue
        assert not row.untrusted, row.untrusted
        assert row.plan is not None and row.budget_bytes is not None
        planned_peak = measured_peak(model, big, row.plan)
        error = row.plan.predicted_peak_bytes / planned_peak - 1
        assert abs(error) < 0.05, (row.plan.predicted_peak_bytes, planned_peak)
        assert planned_peak <= row.budget_bytes


def test_default_shapes_add_the_sample_tokens_at_longer_seqs() -> None:
    shapes = default_profile_shapes(Shape(4, 64))
    assert shapes[:8] == [Shape(b, s) for b in (2, 4) for s in (8, 16, 32, 64)]
    assert shapes[8:] == [Shape(2, 128), Shape(1, 256)]  # tokens of the sample, longer seqs
    assert max(s.tokens for s in shapes) == 4 * 64
    # towards the longest seq asked, as far as the batch halves; never past a position limit
    assert default_profile_shapes(Shape(8, 64), longest_seq=1024)[-1] == Shape(1, 512)
    assert default_profile_shapes(Shape(8, 64), longest_seq=64)[-1] == Shape(2, 256)
    assert default_profile_shapes(Shape(4, 64), max_seq=128)[-1] == Shape(2, 128)
    assert default_profile_shapes(Shape(1, 64))[-1] == Shape(1, 128)  # from the grid's batch 2


def test_stage_times_scaled_to_unmarked_steps_and_rungs_past_positions_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The built-in GPT's position table ends at the sample's seq and it has no config: the
    default rungs at longer seqs fail and are left out with a warning. Every profiled shape's
    times are scaled to the plain step timed there in rounds; the model is left as it was."""
    model, sample = gpt(layers=2, width=32, heads=2, vocab=64, seq=32, batch=4)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="memfit.verbs.shape_profiles"):
        shaped = memfit.profile_shapes(model, sample, repeats=1)
    assert sorted(shaped.fitted.shapes) == [Shape(b, s) for b in (2, 4) for s in (4, 8, 16, 32)]
    assert "shape 2 x 64 left out" in caplog.text and "shape 1 x 128 left out" in caplog.text
    assert set(shaped.calibration) == set(shaped.fitted.shapes)
    # a scale per shape, each a ratio of two measured times (near one on a quiet machine:
    # 0.70-1.05 here; a loaded CI run pushed one past 3, so the size is the estimate
    # benchmark's to show, not a test's)
    assert all(math.isfinite(factor) and factor > 0 for factor in shaped.calibration.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(IndexError):  # asked for by name, a shape that fails still raises
        memfit.profile_shapes(model, sample, shapes=[(4, 32), (2, 32), (1, 64)], repeats=1)
