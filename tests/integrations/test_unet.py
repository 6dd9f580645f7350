"""A Stable-Diffusion-like U-Net (diffusers' ``UNet2DConditionModel``, tiny, library defaults)
planned over its blocks' children, as diffusers' switch checkpoints them: resnets, attentions,
down- and upsamplers, one sequence through several lists, with the up blocks' inputs made by
the model (``cat(output, skip)``: joins) and the down blocks' outputs read again by the up
blocks (skip connections, held from maker to reader by the planner)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import memfit
from memfit.measuring.chain import find_chain
from memfit.planning.plan import Plan, Segment, Stage
from memfit.planning.simulate import simulate
from tests.helpers.hf_testers import verified_within_budget
from tests.helpers.real_blocks import unet, unet_children

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_the_children_are_one_sequence_with_joins_and_skips() -> None:
    built = unet()
    model = built.model
    names = unet_children(model)
    chain = find_chain(model, lambda: model(**built.sample), names)
    assert chain.block_names == tuple(names)
    # every up-block resnet reads cat(output, skip)
    assert {names[k] for k in chain.joins} == {
        name for name in names if name.startswith("up_blocks") and ".resnets." in name
    }
    # conv_in's output (<pre>), both down attentions, the downsampler and both resnets of the
    # second down block, each read by the up block that concatenates it
    makers = {("<pre>" if maker < 0 else names[maker]) for maker, _ in chain.skips}
    assert makers == {
        "<pre>",
        "down_blocks.0.attentions.0",
        "down_blocks.0.attentions.1",
        "down_blocks.0.downsamplers.0",
        "down_blocks.1.resnets.0",
        "down_blocks.1.resnets.1",
    }
    for _maker, reader in chain.skips:
        assert names[reader + 1].startswith("up_blocks") and reader + 1 in chain.joins


def test_unet_plans_at_50_and_30_percent_bit_identical() -> None:
    built = unet()
    model, sample, loss_fn = built.model, built.sample, built.loss_fn
    # no blocks=: memfit finds the children itself (measuring.library_blocks)
    profile = memfit.profile(model, sample, loss_fn=loss_fn, options=(), repeats=1)
    assert profile.stage_names[1:-1] == tuple(unet_children(model))
    assert len(profile.costs.skips) == 6
    for budget in ("50%", "30%"):
        plan = memfit.plan(profile, budget=budget)
        assert plan.budget_bytes is not None
        verified_within_budget(model, sample, loss_fn, plan)
    # a segment over the second down block's resnets and the mid block's first resnet (the same
    # temb): both resnets' outputs are skips, held by the model until the up blocks read them
    names = profile.stage_names
    start = names.index("down_blocks.1.resnets.0")
    stop = names.index("mid_block.resnets.0") + 1
    assert {start, start + 1} <= {skip.maker for skip in profile.costs.skips}
    inner = tuple(Stage(i) for i in range(start, stop))
    tree = (
        *(Stage(i) for i in range(start)),
        Segment(start, stop, inner),
        *(Stage(i) for i in range(stop, len(names))),
    )
    simulation = simulate(profile.costs, tree, timeline=True)
    assert sum("skips read by" in label for label, _ in simulation.timeline) == 2
    plan = replace(
        Plan.from_tree(names, tree, "test"),
        predicted_peak_bytes=simulation.peak_bytes,
        predicted_step_s=simulation.step_s,
    )
    assert plan.budget_bytes is None
    verified_within_budget(model, sample, loss_fn, plan)
    # the floor at or below diffusers' own switch (every resnet and transformer block
    # checkpointed), measured
    floor = memfit.planning.min_peak_bytes(profile.costs)
    model.enable_gradient_checkpointing()
    try:
        switch = memfit.measure(model, sample, loss_fn=loss_fn, repeats=1)
    finally:
        model.disable_gradient_checkpointing()
    assert floor <= switch.peak_bytes
