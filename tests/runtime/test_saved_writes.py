"""Selective stages whose forward writes in place into an output the option saves."""

import logging

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import UnsupportedModelError
from memfit.measuring.chain import find_chain
from memfit.measuring.ops import candidate_policies, profile_ops
from memfit.measuring.step import split_sample
from memfit.planning.plan import Stage
from memfit.runtime import saved_ops, stage_wrapper
from tests.helpers.plans import make_plan


def scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Falcon's eager attention in short: the saved bmm's output is divided in place."""
    s = q @ k.transpose(-1, -2)
    s /= 4.0
    return s.softmax(-1).sum()


def written_by_out(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = q @ k.transpose(-1, -2)
    torch.mul(s.detach(), 2.0, out=s.detach())  # an out= argument writes too
    return s.softmax(-1).sum()


def gradients(function, option: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 4, generator=generator, requires_grad=True)
    k = torch.randn(2, 8, 4, generator=generator, requires_grad=True)
    run = function if option is None else stage_wrapper(option)(function)
    run(q, k).backward()
    return q.grad, k.grad


@pytest.mark.parametrize("function", [scaled_scores, written_by_out])
@pytest.mark.parametrize("option", ["selective:matmul", "selective:save=bmm"])
def test_saved_output_written_in_place_gives_identical_gradients(function, option: str) -> None:
    assert "aten.bmm.default" in saved_ops(option)
    reference = gradients(function, None)
    planned = gradients(function, option)
    assert torch.equal(planned[0], reference[0])
    assert torch.equal(planned[1], reference[1])


def transposed_then_scaled(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = q @ k.transpose(-1, -2)
    t = s.transpose(-1, -2)  # saved below: a view, which no copy can stand in for
    s /= 4.0
    return (s.softmax(-1) * t.exp()).sum()


def test_saved_view_written_in_place_raises() -> None:
    with pytest.raises(UnsupportedModelError, match=r"aten\.transpose\.int.*aten\.div_\.Tensor"):
        gradients(transposed_then_scaled, "selective:save=transpose.int")


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + transposed_then_scaled(self.linear(x), x)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scaled() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.sum()


def test_profile_leaves_out_an_option_that_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    model, sample = Tiny().train(), (torch.randn(2, 8, 8),)
    options = ["selective:matmul", "selective:save=transpose.int"]
    with caplog.at_level(logging.WARNING, logger="memfit.verbs.profiling"):
        profile = memfit.profile(model, sample, repeats=1, options=options)
    menu = profile.costs.stages[1].options
    assert "selective:matmul" in menu and "selective:save=transpose.int" not in menu
    assert "selective:save=transpose.int" in caplog.text and "aten.div_.Tensor" in caplog.text


def test_falcon_eager_attention() -> None:
    pytest.importorskip("transformers")
    from memfit.integrations.hf import build_hf

    model, sample = build_hf(
        "falcon", attn_implementation="eager", layers=2, hidden=32, heads=2, seq=32, batch=2,
        vocab=128,
    )  # fmt: skip
    args, kwargs = split_sample(sample)
    chain = find_chain(model, lambda: model(*args, **kwargs))
    blocks = profile_ops(model, sample, chain)
    written = {op for op, stats in blocks[0].ops.items() if stats.written_later}
    # mlp_output += attention_output after an mm (which ops the attention's matmuls become
    # depends on the layouts of its keys: not asserted)
    assert "aten.mm.default" in written
    assert all(not saved_ops(name) & written for name in candidate_policies(blocks))
    profile = memfit.profile(model, sample, repeats=1)
    selective = [name for name in profile.costs.stages[1].options if name.startswith("selective:")]
    assert selective and all(not saved_ops(name) & written for name in selective)
    # 2 layers: logits dominate, the smallest feasible budget is about 81%
    memfit.auto(model, sample, budget="90%")
    assert memfit.verify(model, sample, repeats=1).gradients_equal
    memfit.remove(model)
    # an explicit plan that saves the written bmm is correct too (a copy stands in)
    tree = tuple(
        Stage(i, "selective:matmul" if chain.block_of_stage(i) is not None else "keep")
        for i in range(len(chain))
    )
    memfit.apply(model, make_plan(chain, tree))
    assert memfit.verify(model, sample, repeats=1).gradients_equal


def empty_scores_then_an_unrelated_empty_write(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = q @ k.transpose(-1, -2)  # no rows: an empty storage
    t = s.transpose(-1, -2)  # saved below: a view
    other = q.new_zeros(0)  # another empty storage, written in place
    other.add_(1.0)
    return (q * k).sum() + t.sum() + other.sum()


def test_an_in_place_write_into_another_empty_storage_is_not_a_write_into_the_saved_one() -> None:
    # every empty storage has data pointer 0: told apart by address, the write into ``other``
    # looked like a write into the saved view, and the stage raised UnsupportedModelError
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 0, 4, generator=generator, requires_grad=True)
    k = torch.randn(2, 0, 4, generator=generator, requires_grad=True)
    run = stage_wrapper("selective:save=transpose.int")(empty_scores_then_an_unrelated_empty_write)
    run(q, k).backward()
    assert q.grad is not None and q.grad.shape == q.shape
