"""Random ops found by torch's tag, never saved by a selective policy: recomputed blocks that draw
random numbers (noise, sampling, attention dropout) keep their gradients bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from memfit.measuring.chain import find_chain
from memfit.measuring.ops import (
    candidate_policies,
    draws_random,
    is_random_op,
    profile_ops,
    saveable,
    selective_detail,
)
from memfit.planning.plan import Plan, Stage
from memfit.runtime import apply_plan, remove_plan, saved_ops, stage_wrapper
from memfit.runtime.options import SelectivePolicy

aten = torch.ops.aten
W = 16


class Noisy(nn.Module):
    """Draws with ``randn``, ``rand_like``, ``bernoulli`` and ``multinomial``; every draw reaches
    the gradients (the noise is saved by the ``mul`` that reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x)) * torch.randn(x.shape)
        h = h * torch.rand_like(h) * torch.bernoulli(torch.full_like(h, 0.8))
        probabilities = torch.softmax(h.detach(), -1).reshape(-1, W)
        picks = torch.multinomial(probabilities, W, replacement=True).view(h.shape)
        return x + self.fc2(h.gather(-1, picks))


class Attention(nn.Module):
    """Self-attention with dropout inside ``scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(W, 3 * W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(2, 8, 3, 2, W // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(2, 8, W))


class Chain(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


def gradients(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    model(x).backward()
    return [p.grad.clone() for p in model.parameters()]


def gradients_under(model: nn.Module, x: torch.Tensor, option: str) -> list[torch.Tensor]:
    chain = find_chain(model, lambda: model(x))
    tree = (Stage(0), Stage(1, option), Stage(2, option), Stage(3))
    apply_plan(model, chain, Plan.from_tree(chain.stage_names, tree, "test"))
    try:
        return gradients(model, x)
    finally:
        remove_plan(model)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_random_ops_are_found_by_tag() -> None:
    for op in (
        aten.rand.default,
        aten.randn.default,
        aten.normal.Tensor_Tensor,
        aten.randint.low,
        aten.multinomial.default,
        aten.bernoulli_.float,
        aten.bernoulli.default,
        aten.rand_like.default,
        aten.native_dropout.default,
    ):
        assert is_random_op(op) and is_random_op(str(op)), op
        assert draws_random(op) and not saveable(str(op)), op
    assert not is_random_op(aten.mm.default) and saveable("aten.mm.default")
    assert not is_random_op("aten.no_such_op.default")


def test_attention_kernels_draw_only_with_dropout_on() -> None:
    flash_cpu = aten._scaled_dot_product_flash_attention_for_cpu.default
    efficient = aten._scaled_dot_product_efficient_attention.default
    q = torch.randn(1, 1, 4, 4)
    assert is_random_op(flash_cpu) and saveable(str(flash_cpu)) and saveable(str(efficient))
    assert draws_random(flash_cpu, (q, q, q, 0.1)) and not draws_random(flash_cpu, (q, q, q))
    assert draws_random(efficient, (q, q, q, None, True), {"dropout_p": 0.2})
    assert not draws_random(efficient, (q, q, q, None, True, 0.0))
    policy = SelectivePolicy(saved_ops("selective:matmul"), "selective:matmul")
    assert policy(None, flash_cpu, q, q, q, 0.0) == CheckpointPolicy.MUST_SAVE
    assert policy(None, flash_cpu, q, q, q, 0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, efficient, q, q, q, None, True, dropout_p=0.1) == (
        CheckpointPolicy.PREFER_RECOMPUTE
    )
    # with dropout off the kernel draws nothing: saving it cannot shift the RNG stream
    state = torch.get_rng_state()
    flash_cpu(q, q, q, 0.0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("random_op", ["randn", "rand_like", "bernoulli", "multinomial"])
def test_naming_a_random_op_is_refused(random_op: str) -> None:
    with pytest.raises(ValueError, match=rf"aten\.{random_op}\.default.*random or in-place"):
        stage_wrapper(f"selective:save=addmm+{random_op}")


def test_saving_a_random_op_would_change_the_gradients() -> None:
    """Why the refusal matters: a policy that saves ``randn`` skips it in the recompute, and every
    later draw of the block comes out of another place in the RNG stream."""
    block, x = Noisy(), torch.randn(2, 8, W, requires_grad=True)
    torch.manual_seed(7)
    block(x).sum().backward()
    reference = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)

    def unsafe(_ctx: object, op: object, *_args: object, **_kwargs: object) -> CheckpointPolicy:
        saved = op in (aten.randn.default, aten.addmm.default)
        return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE

    def contexts() -> object:
        return create_selective_checkpoint_contexts(unsafe)

    torch.manual_seed(7)
    checkpoint(block, x, use_reentrant=False, context_fn=contexts).sum().backward()
    assert not same([p.grad for p in block.parameters()], reference)


def test_blocks_that_draw_keep_their_gradients_under_every_selective_option() -> None:
    model, x = Chain(Noisy), torch.randn(2, 8, W, requires_grad=True)
    blocks = profile_ops(model, (x,), find_chain(model, lambda: model(x)))
    randn = blocks[0].ops["aten.randn.default"]
    assert randn.random and randn.saved_bytes > 0 and "random numbers" in randn.needs
    options = candidate_policies(blocks)
    assert options  # from the profile: saves tanh, gather and the products, never a draw
    for option in options:
        assert not any(is_random_op(op) for op in saved_ops(option)), option
        detail = selective_detail(blocks[0], saved_ops(option))
        assert {"randn", "rand_like", "bernoulli", "multinomial"} <= set(detail["recomputes"])
    reference = gradients(model, x)
    for option in (*options, "selective:matmul", "selective:save=addmm+tanh+mul.Tensor+gather"):
        assert same(gradients_under(model, x, option), reference), option


def test_attention_dropout_keeps_its_gradients_under_selective_matmul() -> None:
    model, x = Chain(Attention), torch.randn(2, 8, W, requires_grad=True)
    reference = gradients(model, x)
    for option in ("selective:matmul", "selective:save=addmm+bmm+_safe_softmax"):
        assert same(gradients_under(model, x, option), reference), option
    with pytest.raises(ValueError, match=r"bernoulli_"):
        stage_wrapper("selective:save=bmm+bernoulli_.float")
