"""The stage-option registry: built-in options, extension points, selective policy details."""

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy

import memfit
from memfit.errors import MemfitError, UnsupportedModelError
from memfit.measuring.chain import find_chain
from memfit.measuring.ops import MATMUL_OPS
from memfit.models import build
from memfit.planning.plan import Stage
from memfit.runtime import (
    OptionKind,
    apply_plan,
    option_kind,
    register_option,
    register_selective_policy,
    remove_plan,
    saved_ops,
    stage_wrapper,
)
from memfit.runtime import options as registry
from memfit.runtime.options import SelectivePolicy
from tests.helpers.plans import make_plan

aten = torch.ops.aten


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))
    monkeypatch.setattr(registry, "_SELECTIVE_POLICIES", dict(registry._SELECTIVE_POLICIES))
    yield


def test_built_in_options() -> None:
    assert option_kind("keep").recomputes is False
    assert option_kind("selective:matmul").recomputes is True
    assert saved_ops("selective:matmul") == MATMUL_OPS
    assert saved_ops("selective:save=addmm+gelu") == {"aten.addmm.default", "aten.gelu.default"}
    assert option_kind("offload").recomputes is False
    with pytest.raises(ValueError, match=r"unknown stage option 'swap'.*'keep'.*selective"):
        stage_wrapper("swap")
    with pytest.raises(ValueError, match=r"unknown selective option.*'selective:matmul'"):
        stage_wrapper("selective:everything")
    with pytest.raises(ValueError, match="random or in-place"):
        stage_wrapper("selective:save=native_dropout")


@pytest.mark.usefixtures("scratch_registry")
def test_a_new_option_family_is_one_registration() -> None:
    calls: list[str] = []

    def traced(option: str) -> registry.StageWrapper:
        label = option.removeprefix("traced:")

        def wrap(forward: registry.Forward) -> registry.Forward:
            def run(*args: object, **kwargs: object) -> object:
                calls.append(label)
                return forward(*args, **kwargs)

            return run

        return wrap

    register_option(
        OptionKind(prefix="traced:", form="traced:<label>", recomputes=False, wrapper=traced)
    )
    with pytest.raises(ValueError, match="registered already"):
        register_option(OptionKind(prefix="traced:", form="x", recomputes=False, wrapper=traced))
    register_selective_policy("gelu", frozenset({"aten.gelu.default"}))
    with pytest.raises(ValueError, match="random or in-place"):
        register_selective_policy("drop", frozenset({"aten.native_dropout.default"}))

    model, sample = build("mlp", layers=2, width=16, hidden=32, batch=4)
    chain = find_chain(model, lambda: model(*sample))
    tree = (Stage(0), Stage(1, "traced:a"), Stage(2, "selective:gelu"), Stage(3))
    torch.manual_seed(0)
    model(*sample).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    apply_plan(model, chain, make_plan(chain, tree))
    torch.manual_seed(0)
    model(*sample).backward()
    remove_plan(model)
    assert calls == ["a"]
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), reference, strict=True))


def test_selective_policy_saves_default_overloads_and_never_out_variants(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = SelectivePolicy(MATMUL_OPS, "selective:matmul")
    assert policy(None, aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.addmm.default) == CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.gelu.default) == CheckpointPolicy.PREFER_RECOMPUTE
    with caplog.at_level(logging.WARNING, logger="memfit.runtime.options"):
        assert policy(None, aten.mm.out) == CheckpointPolicy.PREFER_RECOMPUTE
        assert policy(None, aten.mm.out) == CheckpointPolicy.PREFER_RECOMPUTE
    assert [r.getMessage().count("aten.mm.out") for r in caplog.records] == [1], "warn once"


class OutVariant(nn.Module):
    """Calls ``mm`` the way compiled code does: into a buffer it then reads. Saving that op
    would hand the recompute a cached tensor while the buffer stays empty."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty(x.shape[0], 8)
        aten.mm.out(torch.tanh(x).detach(), self.weight.detach(), out=buffer)
        return torch.sin(buffer @ self.weight) + torch.mm(x, self.weight)


def test_out_variants_are_recomputed_correctly() -> None:
    block, x = OutVariant(), torch.randn(4, 8, requires_grad=True)
    block(x).sum().backward()
    reference = block.weight.grad.clone(), x.grad.clone()
    block.weight.grad, x.grad = None, None
    stage_wrapper("selective:matmul")(block)(x).sum().backward()
    assert torch.equal(block.weight.grad, reference[0])
    assert torch.equal(x.grad, reference[1])


@pytest.mark.parametrize("second", ["retain_graph", "gradient penalty"])
def test_a_second_backward_through_selective_names_torchs_limit(second: str) -> None:
    # torch's selective checkpoint allows one backward per forward; the error says so instead
    # of blaming the model (a block "that does not compute the same thing twice")
    model, sample = build("mlp", layers=3, width=16, hidden=32, batch=4)
    chain = find_chain(model, lambda: model(*sample))
    options = {1: "selective:matmul", 2: "selective:matmul"}
    plan = make_plan(chain, tuple(Stage(i, options.get(i, "keep")) for i in range(len(chain))))
    apply_plan(model, chain, plan)
    try:
        loss = model(*sample)
        with pytest.raises(MemfitError) as caught:
            if second == "retain_graph":
                loss.backward(retain_graph=True)
                loss.backward()
            else:
                grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
                sum((grad**2).sum() for grad in grads).backward()
    finally:
        remove_plan(model)
    message = str(caught.value)
    assert not isinstance(caught.value, UnsupportedModelError)
    assert "Trying to backward an extra time" in message and "retain_graph" in message
    assert "selective" in message and "options=()" in message
    assert "does not compute the same thing twice" not in message


def test_whether_an_option_hooks_inside_the_block_is_a_field_of_its_kind(scratch_registry) -> None:
    # profile and apply refuse such options on compiled blocks: a registered option says so
    # itself, rather than by a list of names written in each place
    assert all(
        registry.hooks_inside(o)
        for o in ("rebuild", "rebuild+linear", "rebuild+ops", "selective:matmul")
    )
    assert not any(
        registry.hooks_inside(o) for o in ("keep", "offload", "compile-budget:0.5", "no-such")
    )
    register_option(
        OptionKind(
            prefix="hooked:",
            form="hooked:<label>",
            recomputes=False,
            wrapper=lambda option: lambda forward: forward,
            hooks_inside=True,
        )
    )
    model, sample = build("mlp", layers=2, width=16, hidden=32, batch=4)
    with pytest.raises(ValueError, match=r"\['hooked:x'\] cannot run on compiled blocks"):
        memfit.profile(model, sample, options=("hooked:x",), compile=True)
