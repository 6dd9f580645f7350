"""Executing plans: bit-identical gradients per option and nesting, round trips, misuse."""

import pytest
import torch
from torch import nn

from memfit.errors import AlreadyPlannedError, PlanMismatchError
from memfit.models import build
from memfit.planning.plan import Plan, Segment, Stage
from memfit.runtime import applied_plan, apply_plan, remove_plan
from tests.helpers.plans import make_plan
from tests.helpers.steps import SIZES, assert_same_step, chain_of, step
from tests.helpers.trees import RUNTIME_TREES as TREES


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("label", list(TREES))
def test_gradients_bit_identical_with_dropout(name: str, label: str) -> None:
    model, sample = build(name, **SIZES[name])
    model.train()
    reference = step(model, sample)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES[label]))
    try:
        planned = step(model, sample)
    finally:
        remove_plan(model)
    assert_same_step(reference, planned)


def module_state(model: nn.Module) -> dict[str, set[str]]:
    return {name: set(vars(module)) for name, module in model.named_modules()}


def test_apply_remove_round_trip() -> None:
    model, sample = build("gpt", **SIZES["gpt"])
    tree_before, attributes_before = repr(model), module_state(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    out_before = model(*sample)
    chain = chain_of(model, sample)
    plan = make_plan(chain, TREES["nested"])
    apply_plan(model, chain, plan)
    assert applied_plan(model) is plan
    assert repr(model) == tree_before
    assert list(model.state_dict()) == list(state)
    assert torch.equal(model(*sample), out_before)
    with torch.no_grad():  # no backward: the plan runs the blocks as they are
        assert torch.equal(model(*sample), out_before)
    assert remove_plan(model) is True
    assert remove_plan(model) is False
    assert applied_plan(model) is None
    assert module_state(model) == attributes_before, "leftover instance attributes"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(*sample), out_before)


def test_an_existing_instance_forward_is_restored() -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    block = model.blocks[0]
    mine = block.forward
    block.forward = mine
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES["one segment"]))
    assert block.__dict__["forward"] is not mine
    remove_plan(model)
    assert block.__dict__["forward"] is mine


def test_apply_twice_raises() -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    chain = chain_of(model, sample)
    plan = make_plan(chain, TREES["every block recomputed"])
    apply_plan(model, chain, plan)
    with pytest.raises(AlreadyPlannedError):
        apply_plan(model, chain, plan)
    assert applied_plan(model) is plan
    remove_plan(model)
    assert all("forward" not in vars(block) for block in model.blocks), "wrapped twice"


def test_wrong_plans_raise_and_change_nothing() -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    chain = chain_of(model, sample)
    before = module_state(model)
    other = Plan.from_tree(("<pre>", "a", "b", "c", "d", "<post>"), TREES["one segment"], "x")
    with pytest.raises(PlanMismatchError, match=r"not this model's chain \['<pre>', 'blocks.0'"):
        apply_plan(model, chain, other)
    recompute_pre = make_plan(chain, (Segment(0, 1, (Stage(0),)), *TREES["all keep"][1:]))
    with pytest.raises(
        PlanMismatchError,
        match="<pre>, <post> and the stages between block lists cannot be recomputed",
    ):
        apply_plan(model, chain, recompute_pre)
    selective_post = make_plan(chain, (*TREES["all keep"][:5], Stage(5, "selective:matmul")))
    with pytest.raises(PlanMismatchError, match="'<post>' can only be kept"):
        apply_plan(model, chain, selective_post)
    unknown_inside = make_plan(chain, (Stage(0), Segment(1, 5, tuple(
        Stage(i, "offload:nvme" if i == 3 else "keep") for i in range(1, 5)
    )), Stage(5)))  # fmt: skip
    with pytest.raises(PlanMismatchError, match="'offload:nvme' inside a recompute segment"):
        apply_plan(model, chain, unknown_inside)
    selective_inside = make_plan(chain, (Stage(0), Segment(1, 5, tuple(
        Stage(i, "selective:matmul" if i == 3 else "keep") for i in range(1, 5)
    )), Stage(5)))  # fmt: skip
    with pytest.raises(PlanMismatchError, match="only keep or nested segments"):
        apply_plan(model, chain, selective_inside)
    rebuild_inside = make_plan(chain, (Stage(0), Segment(1, 5, tuple(
        Stage(i, "rebuild" if i == 2 else "keep") for i in range(1, 5)
    )), Stage(5)))  # fmt: skip
    with pytest.raises(PlanMismatchError, match="'rebuild' inside a recompute segment"):
        apply_plan(model, chain, rebuild_inside)
    unknown = make_plan(chain, (Stage(0), Stage(1, "offload:nvme"), *TREES["all keep"][2:]))
    with pytest.raises(ValueError, match="unknown stage option 'offload:nvme'"):
        apply_plan(model, chain, unknown)
    assert applied_plan(model) is None
    assert module_state(model) == before


def test_frozen_embeddings_still_give_block_gradients() -> None:
    model, sample = build("gpt", **SIZES["gpt"])
    model.token_embedding.weight.requires_grad_(False)  # also the tied head
    model.position_embedding.weight.requires_grad_(False)
    model.dropout.p = 0.0  # so that the first block's input does not require grad
    reference = step(model, sample)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES["one segment"]))
    planned = step(model, sample)
    remove_plan(model)
    assert "blocks.0.fc.weight" in planned[1]
    assert_same_step(reference, planned)


def test_autocast_bfloat16_on_cpu() -> None:
    model, sample = build("gpt", **SIZES["gpt"])

    def autocast_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step(model, sample)

    reference = autocast_step()
    assert reference[0].dtype == torch.float32  # cross-entropy runs in fp32 under autocast
    chain = chain_of(model, sample)
    for label in ("three levels", "rebuild mixed"):
        apply_plan(model, chain, make_plan(chain, TREES[label]))
        planned = autocast_step()
        remove_plan(model)
        assert_same_step(reference, planned)


def test_gradient_accumulation_over_two_micro_batches() -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    second = (sample[0].flip(0), sample[1])
    model.zero_grad(set_to_none=True)
    step(model, sample, seed=1, zero=False)
    reference = step(model, second, seed=2, zero=False)
    chain = chain_of(model, sample)
    for label in ("nested", "rebuild mixed"):
        apply_plan(model, chain, make_plan(chain, TREES[label]))
        model.zero_grad(set_to_none=True)
        step(model, sample, seed=1, zero=False)
        planned = step(model, second, seed=2, zero=False)
        remove_plan(model)
        assert_same_step(reference, planned)


# How often each block's forward runs in backward: once per enclosing checkpoint whose recompute
# passes through it. torch stops a recompute as soon as it has rebuilt every tensor the region
# saved ("early stop"), so a region's trailing checkpointed item is not rerun by the parent:
# in "three levels", block 4 (recomputed inside the outer segment) reruns once, not twice.
RECOMPUTES = {
    "all keep": [0, 0, 0, 0],
    "every block recomputed": [1, 1, 1, 1],
    "one segment": [1, 1, 1, 1],
    "nested": [2, 1, 1, 1],
    "three levels": [3, 2, 1, 1],
    "selective matmul": [1, 1, 1, 1],
    "rebuild": [0, 0, 0, 0],  # rebuild reruns single ops, never a block
    "rebuild+linear": [0, 0, 0, 0],
}


@pytest.mark.parametrize("label", list(RECOMPUTES))
def test_the_schedule_runs_as_planned(label: str) -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    chain = chain_of(model, sample)
    runs = [0] * 4
    for i, block in enumerate(model.blocks):
        block.norm.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    apply_plan(model, chain, make_plan(chain, TREES[label]))
    loss = model(*sample)
    assert runs == [1, 1, 1, 1]
    loss.backward()
    remove_plan(model)
    assert [count - 1 for count in runs] == RECOMPUTES[label]
