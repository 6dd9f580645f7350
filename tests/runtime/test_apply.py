"""Executing plans: bit-identical gradients per option and nesting, round trips, guardrails."""

import pytest
import torch
from torch import nn

import memfit
from memfit.api import _chain
from memfit.errors import AlreadyPlannedError, MemfitError, PlanMismatchError
from memfit.models import build
from memfit.plan.plan import Plan, Segment, Stage, recompute_one
from memfit.runtime import applied_plan, apply_plan, remove_plan, saved_ops

SIZES = {
    "gpt": dict(layers=4, width=32, heads=4, seq=16, batch=2, vocab=64),
    "mlp": dict(layers=4, width=32, hidden=64, batch=8),
}


def _plan(chain, tree) -> Plan:
    return Plan(
        stage_names=chain.stage_names,
        tree=tree,
        strategy="test",
        predicted_peak_bytes=0,
        predicted_step_s=0.0,
    )


def _trees() -> dict[str, tuple]:
    # stages: 0 <pre>, 1..4 blocks, 5 <post>
    return {
        "keep": tuple(Stage(i) for i in range(6)),
        "every block": (Stage(0), *[recompute_one(i) for i in range(1, 5)], Stage(5)),
        "one segment": (Stage(0), Segment(1, 5, tuple(Stage(i) for i in range(1, 5))), Stage(5)),
        "nested": (
            Stage(0),
            Segment(
                1, 4, (recompute_one(1), Stage(2), Segment(3, 4, (Stage(3, "selective:matmul"),)))
            ),
            Stage(4, "selective:matmul"),
            Stage(5),
        ),
        "selective": (Stage(0), *[Stage(i, "selective:matmul") for i in range(1, 5)], Stage(5)),
        "selective by op": (
            Stage(0),
            *[Stage(i, "selective:save=addmm+gelu") for i in range(1, 5)],
            Stage(5),
        ),
    }


def _step(model, sample, seed=0, accumulate_into=None):
    if accumulate_into is None:
        model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(*sample)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("name", ["gpt", "mlp"])
@pytest.mark.parametrize("label", list(_trees()))
def test_gradients_bit_identical_with_dropout(name: str, label: str) -> None:
    model, sample = build(name, **SIZES[name])
    model.train()
    reference_loss, reference = _step(model, sample)
    chain = _chain(model, sample, None)
    apply_plan(model, chain, _plan(chain, _trees()[label]))
    loss, grads = _step(model, sample)
    remove_plan(model)
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference.keys()
    for key in reference:
        assert torch.equal(grads[key], reference[key]), key


def test_apply_remove_round_trip() -> None:
    model, sample = build("gpt", **SIZES["gpt"])
    tree_before = repr(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    out_before = model(*sample)
    chain = _chain(model, sample, None)
    plan = _plan(chain, _trees()["nested"])
    apply_plan(model, chain, plan)
    assert applied_plan(model) is plan
    assert repr(model) == tree_before
    assert list(model.state_dict()) == list(state)
    assert torch.equal(model(*sample), out_before)
    assert remove_plan(model) is True
    assert applied_plan(model) is None
    assert all("forward" not in block.__dict__ for block in model.blocks)
    assert "_memfit_applied" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(*sample), out_before)


def test_an_existing_instance_forward_is_restored() -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    block = model.blocks[0]
    mine = block.forward
    block.forward = mine
    chain = _chain(model, sample, None)
    apply_plan(model, chain, _plan(chain, _trees()["every block"]))
    assert block.__dict__["forward"] is not mine
    remove_plan(model)
    assert block.__dict__["forward"] is mine


def test_apply_twice_and_wrong_plans() -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    chain = _chain(model, sample, None)
    plan = _plan(chain, _trees()["every block"])
    apply_plan(model, chain, plan)
    with pytest.raises(AlreadyPlannedError):
        apply_plan(model, chain, plan)
    remove_plan(model)
    other = Plan(
        stage_names=("<pre>", "a", "b", "c", "d", "<post>"),
        tree=plan.tree,
        strategy="x",
        predicted_peak_bytes=0,
        predicted_step_s=0.0,
    )
    with pytest.raises(PlanMismatchError, match="not this model's chain"):
        apply_plan(model, chain, other)
    recompute_pre = _plan(chain, (Segment(0, 1, (Stage(0),)), *[Stage(i) for i in range(1, 6)]))
    with pytest.raises(PlanMismatchError, match="cannot be recomputed"):
        apply_plan(model, chain, recompute_pre)
    with pytest.raises(ValueError, match="unknown stage option"):
        apply_plan(
            model,
            chain,
            _plan(chain, (Stage(0), Stage(1, "offload:nvme"), *[Stage(i) for i in range(2, 6)])),
        )
    with pytest.raises(ValueError, match="random or in-place"):
        saved_ops("selective:save=native_dropout")
    assert applied_plan(model) is None, "a failed apply changes nothing"


def test_frozen_embeddings_still_give_block_gradients() -> None:
    model, sample = build("gpt", **SIZES["gpt"])
    model.token_embedding.weight.requires_grad_(False)
    model.position_embedding.weight.requires_grad_(False)
    reference_loss, reference = _step(model, sample)
    chain = _chain(model, sample, None)
    apply_plan(model, chain, _plan(chain, _trees()["nested"]))
    loss, grads = _step(model, sample)
    remove_plan(model)
    assert torch.equal(loss, reference_loss)
    assert "blocks.0.fc.weight" in grads
    assert grads.keys() == reference.keys()
    assert all(torch.equal(grads[k], reference[k]) for k in reference)


def test_autocast_bfloat16_on_cpu() -> None:
    model, sample = build("gpt", **SIZES["gpt"])

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(*sample)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    reference_loss, reference = step()
    chain = _chain(model, sample, None)
    apply_plan(model, chain, _plan(chain, _trees()["nested"]))
    loss, grads = step()
    remove_plan(model)
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[k], reference[k]) for k in reference)


def test_gradient_accumulation() -> None:
    model, sample = build("mlp", **SIZES["mlp"])
    model.zero_grad(set_to_none=True)
    _step(model, sample, seed=1, accumulate_into=True)
    _, reference = _step(model, sample, seed=2, accumulate_into=True)
    chain = _chain(model, sample, None)
    apply_plan(model, chain, _plan(chain, _trees()["one segment"]))
    model.zero_grad(set_to_none=True)
    _step(model, sample, seed=1, accumulate_into=True)
    _, grads = _step(model, sample, seed=2, accumulate_into=True)
    remove_plan(model)
    assert all(torch.equal(grads[k], reference[k]) for k in reference)


class InPlace(nn.Module):
    """Mutates each block's input after the block ran. Legal without a plan (no op saves a
    block's input: Tanh saves its output), but a recompute would read the changed input."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Tanh(), nn.Linear(8, 8)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1.0
        for block in self.blocks:
            out = block(h)
            h.mul_(2.0)  # the block's input, changed after its forward
            h = out
        return h.sum()


def test_in_place_mutation_of_a_recomputed_input_is_reported() -> None:
    model = InPlace()
    sample = (torch.randn(4, 8),)
    model(*sample).backward()  # fine without a plan
    chain = _chain(model, sample, None)
    apply_plan(
        model, chain, _plan(chain, (Stage(0), recompute_one(1), Stage(2), Stage(3), Stage(4)))
    )
    with pytest.raises(MemfitError, match=r"'blocks\.0'.*modified in place"):
        model(*sample).backward()
    remove_plan(model)


class PerLayerMasks(nn.Module):
    """Alternating side inputs per layer, like sliding/full attention models."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scaled() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = [torch.tensor(1.0), torch.tensor(0.5)]
        for i, block in enumerate(self.blocks):
            x = block(x, scale=scales[i % 2])
        return x.sum()


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * scale


def test_side_inputs_that_change_between_blocks() -> None:
    model = PerLayerMasks()
    sample = (torch.randn(4, 8, requires_grad=False),)
    profile = memfit.profile(model, sample, repeats=1, options=())
    assert [s.joins_previous for s in profile.costs.stages] == [
        False,
        False,
        False,
        False,
        False,
        False,
    ]
    chain = _chain(model, sample, None)
    plan = _plan(
        chain, (Stage(0), Segment(1, 3, (Stage(1), Stage(2))), Stage(3), Stage(4), Stage(5))
    )
    apply_plan(model, chain, plan)
    with pytest.raises(PlanMismatchError, match=r"'blocks\.1' got other side inputs"):
        model(*sample)
    remove_plan(model)
