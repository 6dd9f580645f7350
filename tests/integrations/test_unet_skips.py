"""Offloaded skips on the Stable-Diffusion-like U-Net (:func:`tests.helpers.real_blocks.unet`):
a segment over blocks whose outputs the up blocks read again moves those outputs to host memory
until their readers (``Segment.offload_skips``), run by the offload stand-in on CPU (host to host,
the same code as on CUDA without streams), with the profile given a host as a CUDA one has."""

from __future__ import annotations

from dataclasses import replace

import pytest

import memfit
from memfit.planning.offload import skip_pairs
from memfit.planning.plan import Plan, Segment, Stage
from memfit.planning.simulate import simulate
from tests.helpers.real_blocks import unet

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_a_segment_offloading_its_skips_is_bit_identical_and_predicted() -> None:
    """The segment over the second down block's resnets and the mid block's first resnet
    leaves both resnets' outputs, skips, held by the model until the up blocks read them;
    offloaded, they leave the device after the next block and come back in their readers'
    forwards: the measured peak (device bytes: the stand-in's pool buffers exist before the
    measured step, the copies back are new allocations) is the prediction within 2% and within
    the budget, and the gradients are the unplanned model's bit for bit."""
    built = unet()
    model, sample, loss_fn = built.model, built.sample, built.loss_fn
    profile = memfit.profile(model, sample, loss_fn=loss_fn, options=(), repeats=1)
    costs = replace(profile.costs, host_bytes_per_s=1e9)  # a host to offload to, as on CUDA
    names = profile.stage_names
    start = names.index("down_blocks.1.resnets.0")
    stop = names.index("mid_block.resnets.0") + 1
    inner = tuple(Stage(i) for i in range(start, stop))
    pairs = skip_pairs(costs, Segment(start, stop, inner))
    assert [names[maker] for maker, _ in pairs] == [
        "down_blocks.1.resnets.0",
        "down_blocks.1.resnets.1",
    ]
    trees = {
        offload: (
            *(Stage(i) for i in range(start)),
            Segment(start, stop, inner, offload_skips=pairs if offload else ()),
            *(Stage(i) for i in range(stop, len(names))),
        )
        for offload in (False, True)
    }
    runs = {offload: simulate(costs, tree, timeline=True) for offload, tree in trees.items()}
    labels = [label for label, _ in runs[True].timeline]
    assert sum("to host" in label for label in labels) == 2
    assert sum("fetched from host" in label for label in labels) == 2
    hosted = costs.stages[start + 1].input_bytes + costs.stages[start + 2].input_bytes
    assert runs[True].host_peak_bytes == hosted > 0
    measured = {}
    for offload, tree in trees.items():
        run = runs[offload]
        plan = replace(
            Plan.from_tree(names, tree, "test"),
            budget_bytes=run.peak_bytes,
            predicted_peak_bytes=run.peak_bytes,
            predicted_step_s=run.step_s,
        )
        memfit.apply(model, plan)
        try:
            report = memfit.verify(model, sample, loss_fn=loss_fn, repeats=1)
        finally:
            memfit.remove(model)
        assert report.loss_equal and report.gradients_equal, report.mismatched
        assert report.measured_peak_bytes <= run.peak_bytes, offload
        assert abs(report.prediction_error) <= 0.02, (offload, report.prediction_error)
        measured[offload] = report.measured_peak_bytes
    print(measured, {k: v.peak_bytes for k, v in runs.items()})
