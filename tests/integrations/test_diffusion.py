"""Dual-stream diffusion transformers: diffusers' SD3 and Flux at tiny sizes with the library's
defaults (tests/helpers/diffusion.py), planned across the two streams their joint blocks carry
(docs/carries.md), against diffusers' own ``enable_gradient_checkpointing()``."""

from __future__ import annotations

import pytest

import memfit
from memfit.measuring.profile import Profile
from tests.helpers import diffusion
from tests.helpers.hf_testers import verified_within_budget

pytest.importorskip("diffusers")

BUILDERS = {"sd3": diffusion.sd3, "flux": diffusion.flux}
BLOCKS = {
    "sd3": [f"transformer_blocks.{i}" for i in range(4)],
    "flux": [f"transformer_blocks.{i}" for i in range(2)]
    + [f"single_transformer_blocks.{i}" for i in range(4)],
}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def profiled(request: pytest.FixtureRequest) -> tuple[str, diffusion.Built, Profile]:
    """A model, built and profiled once for the module."""
    built = BUILDERS[request.param]()
    return request.param, built, memfit.profile(built.model, built.sample, loss_fn=built.loss_fn)


@pytest.mark.parametrize("budget", ["50%", "30%"])
def test_dual_stream_transformer_plans_bit_identically_within_budget(
    profiled: tuple[str, diffusion.Built, Profile], budget: str
) -> None:
    name, built, profile = profiled
    blocks = [stage.name for stage in profile.costs.stages if not stage.name.startswith("<")]
    assert blocks == BLOCKS[name]  # the model's own blocks, both streams carried
    plan = memfit.plan(profile, budget=budget)
    assert plan.budget_bytes is not None
    verified_within_budget(built.model, built.sample, built.loss_fn, plan)
    assert any(option != "keep" for option in plan.options.values())


def test_floor_reaches_the_memory_of_diffusers_own_checkpointing(
    profiled: tuple[str, diffusion.Built, Profile],
) -> None:
    """memfit's floor plan peaks no higher than diffusers' ``enable_gradient_checkpointing()``
    (every block recomputed), measured. The smallest budget memfit accepts is a few hundred
    bytes above it (measured: 384 B on SD3, 256 B on Flux, of about 4 and 1.7 MB): the gradient
    reserve of the side input that requires grad (``temb``, 256 B) and a prediction 128 B high
    on SD3."""
    _name, built, profile = profiled
    model = built.model
    model.enable_gradient_checkpointing()
    try:
        switch = memfit.measure(model, built.sample, loss_fn=built.loss_fn, repeats=1)
    finally:
        model.disable_gradient_checkpointing()
    with pytest.raises(memfit.InfeasibleBudgetError) as refused:
        memfit.plan(profile, budget=1)
    floor = refused.value.min_feasible_bytes
    assert floor <= switch.peak_bytes + profile.costs.side_grad_bytes + 1024
    memfit.apply(model, memfit.plan(profile, budget=floor))
    try:
        report = memfit.verify(model, built.sample, loss_fn=built.loss_fn, repeats=1)
    finally:
        memfit.remove(model)
    assert report.gradients_equal and report.loss_equal
    assert report.measured_peak_bytes <= switch.peak_bytes
    assert report.measured_peak_bytes <= floor


def test_auto_plans_the_joint_blocks_not_a_list_inside_one() -> None:
    """``auto`` took ``transformer_blocks.0.ff.net`` for the chain (floor 92%): it plans the
    joint blocks, called with keywords only (``hidden_states=``), without ``blocks=``."""
    built = diffusion.sd3(layers=3)
    plan = memfit.auto(built.model, built.sample, budget="40%", loss_fn=built.loss_fn)
    memfit.remove(built.model)
    assert plan.stage_names[1:-1] == tuple(f"transformer_blocks.{i}" for i in range(3))
