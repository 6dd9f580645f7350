"""Several towers planned as one schedule (issue 24): LLaVA (a CLIP vision tower, a projector, a
Llama) and T5 (an encoder and a decoder), at tiny sizes with the library's defaults
(``tests/helpers/towers.py``), against transformers' own ``gradient_checkpointing_enable()``.

Every tower's layers are groups of one chain, so one budget covers them all; the stage between
two towers (LLaVA's projector and merge, T5's final encoder norm and decoder embeddings) is
kept, and what it holds (the image features, the encoder output every decoder layer reads) is
counted in its saved bytes. At the testers' 2 layers a tower, 30% is below what must be held
(the floor is the switch's memory: 38% on LLaVA, 37% on T5, one layer's recompute alone a third
of it): the 50% / 30% tests take 4 layers a tower, where the layers hold most of the memory as
in real models.
"""

from __future__ import annotations

import pytest

import memfit
from memfit.measuring.profile import Profile
from memfit.planning.costs import CHECKPOINT
from tests.helpers import towers
from tests.helpers.hf_testers import Built, verified_within_budget

LAYERS = 4  # a tower
TOWERS = {
    "llava": ("model.vision_tower.encoder.layers", "model.language_model.layers"),
    "t5": ("encoder.block", "decoder.block"),
}


def _build(name: str, layers: int) -> Built:
    return towers.llava(layers, layers) if name == "llava" else towers.t5(layers, layers)


@pytest.fixture(scope="module", params=sorted(TOWERS))
def profiled(request: pytest.FixtureRequest) -> tuple[str, Built, Profile]:
    """A model with 4 layers a tower, built and profiled once for the module."""
    built = _build(request.param, LAYERS)
    return request.param, built, memfit.profile(built.model, built.sample, loss_fn=built.loss_fn)


def test_every_towers_layers_are_stages_of_one_chain(
    profiled: tuple[str, Built, Profile],
) -> None:
    name, _built, profile = profiled
    first, second = TOWERS[name]
    names = [stage.name for stage in profile.costs.stages]
    assert names == [
        "<pre>",
        *(f"{first}.{i}" for i in range(LAYERS)),
        f"<after {first}>",
        *(f"{second}.{i}" for i in range(LAYERS)),
        "<post>",
    ]


@pytest.mark.parametrize("budget", ["50%", "30%"])
def test_towers_plan_bit_identically_within_budget(
    profiled: tuple[str, Built, Profile], budget: str
) -> None:
    name, built, profile = profiled
    plan = memfit.plan(profile, budget=budget)
    first, second = TOWERS[name]
    planned = [stage for stage, option in plan.options.items() if option != "keep"]
    assert any(stage.startswith(first) for stage in planned)  # one schedule over both towers
    assert any(stage.startswith(second) for stage in planned)
    assert plan.budget_bytes is not None
    verified_within_budget(built.model, built.sample, built.loss_fn, plan)


def _switch_peak(built: Built) -> int:
    model = built.model
    model.gradient_checkpointing_enable()
    try:
        return memfit.measure(model, built.sample, loss_fn=built.loss_fn, repeats=1).peak_bytes
    finally:
        model.gradient_checkpointing_disable()


def _floor_plan_peak(built: Built, profile: Profile) -> tuple[int, int]:
    """The smallest budget memfit accepts, and its plan's measured peak (bit-identical)."""
    with pytest.raises(memfit.InfeasibleBudgetError) as refused:
        memfit.plan(profile, budget=1)
    floor = refused.value.min_feasible_bytes
    memfit.apply(built.model, memfit.plan(profile, budget=floor))
    try:
        report = memfit.verify(built.model, built.sample, loss_fn=built.loss_fn, repeats=1)
    finally:
        memfit.remove(built.model)
    assert report.gradients_equal and report.loss_equal
    assert report.measured_peak_bytes <= floor
    return floor, report.measured_peak_bytes


def test_llava_floor_is_the_memory_of_transformers_own_checkpointing() -> None:
    """The tester's LLaVA (2 + 2 layers): its last vision layer runs although no gradient
    reaches it (the features are ``hidden_states[-2]``), and the output returns the vision
    tower's, so its graph lives to the end of the step. transformers' switch checkpoints it;
    memfit did not (floor 526,573 B against the switch's 461,657 B), now it runs it under a
    checkpoint (``checkpoint``) and its floor is the switch's memory."""
    built = towers.llava()
    switch = _switch_peak(built)
    profile = memfit.profile(built.model, built.sample, loss_fn=built.loss_fn)
    vision_last = "model.vision_tower.encoder.layers.1"
    assert CHECKPOINT in profile.costs.stages[2].options
    assert profile.costs.stages[2].name == vision_last
    floor, measured = _floor_plan_peak(built, profile)
    assert measured <= switch
    assert floor <= switch + profile.costs.side_grad_bytes + 1024


def test_t5_floor_is_the_memory_of_transformers_own_checkpointing_without_the_cache() -> None:
    """transformers' switch passes T5's layers no cache (``cache=None``: the cross-attention's
    keys and values stay strided views instead of the cache's concatenated copies), which is
    another computation than the plain step's; memfit keeps the plain step's, whose copies cost
    2 x 11,648 B in a decoder layer's recompute at these sizes (floor 771,519 B against the
    switch's 735,791 B, tester config). With the cache off in the sample, as the switch runs
    the model, memfit's floor plan measures at most the switch's peak, and its smallest
    budget is above it by the reserve for the encoder output's gradient
    (``side_grad_bytes``) and a prediction a few KB high."""
    built = towers.t5()
    built.sample["use_cache"] = False  # what the switch runs
    switch = _switch_peak(built)
    profile = memfit.profile(built.model, built.sample, loss_fn=built.loss_fn)
    floor, measured = _floor_plan_peak(built, profile)
    assert measured <= switch
    assert floor <= switch + profile.costs.side_grad_bytes + 4096
