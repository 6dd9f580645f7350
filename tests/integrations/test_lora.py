"""LoRA adapters (peft) on a Llama built with the library's defaults: the base is frozen, so no
block input requires grad and only the adapters train; plans must keep that exact."""

from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.measuring.chain import find_chain
from memfit.planning.plan import Plan, Stage, recompute_one

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")

VOCAB = 256
STEPS = 2  # the second step sees lora_B moved off zeros, so lora_A's gradients are not zero


def lora_llama(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small Llama with peft's LoRA on q_proj and v_proj; every other setting the library's."""
    config = transformers.LlamaConfig(
        num_hidden_layers=8,  # 4 layers: no plan reaches 30% (floor 34%)
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(config)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    model = peft.get_peft_model(base, lora).train()
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": ids, "labels": ids.clone()}


def frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def train(model: nn.Module, sample: dict[str, Any]) -> list[tuple[torch.Tensor, dict]]:
    """``STEPS`` seeded steps of the usual loop over all parameters (as users write it):
    loss and adapter gradients per step; asserts that no frozen weight got a gradient."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # lora_dropout draws from here
        out = model(**sample)
        out.loss.backward()
        ungraded = [
            n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
        ]
        assert ungraded == [], f"frozen weights got gradients: {ungraded[:3]}"
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        steps.append((out.loss.detach(), grads))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps


@pytest.fixture(scope="module")
def reference() -> list[tuple[torch.Tensor, dict]]:
    model, sample = lora_llama()
    steps = train(model, sample)
    lora_a = [g for n, g in steps[-1][1].items() if "lora_A" in n]
    assert lora_a and all(g.abs().sum() > 0 for g in lora_a)  # the check below has teeth
    assert all("lora_" in name for name in steps[0][1])  # peft froze the whole base
    return steps


def assert_trains_like(model: nn.Module, sample: dict, reference: list, label: str) -> None:
    base = frozen(model)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = train(model, sample)
    for index, ((loss, grads), (ref_loss, ref_grads)) in enumerate(
        zip(steps, reference, strict=True)
    ):
        assert torch.equal(loss, ref_loss), f"{label}: loss of step {index}"
        assert grads.keys() == ref_grads.keys(), label
        for name, grad in ref_grads.items():
            assert torch.equal(grads[name], grad), f"{label}: step {index}, {name}"
    after = frozen(model)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[n], w) for n, w in base.items()), f"{label}: base changed"
    moved = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p, adapters[n])
    ]
    assert moved == sorted(adapters), f"{label}: adapters that did not train"


@pytest.mark.parametrize("budget", ["30%", "60%"])
def test_auto_on_lora_fits_and_trains_the_adapters_bit_for_bit(
    budget: str, reference: list
) -> None:
    model, sample = lora_llama()
    plan = memfit.auto(model, sample, budget=budget, repeats=1)
    assert plan.budget_bytes is not None
    measured = memfit.measure(model, sample, repeats=1)
    assert measured.peak_bytes <= plan.budget_bytes, (measured.peak_bytes, plan.budget_bytes)
    assert_trains_like(model, sample, reference, f"auto {budget} {plan.options}")


@pytest.mark.parametrize("option", ["rebuild", "rebuild+linear", "selective:matmul", None])
def test_every_block_under_each_option(option: str | None, reference: list) -> None:
    model, sample = lora_llama()
    chain = find_chain(model, lambda: model(**sample))
    last = len(chain) - 1
    blocks = [recompute_one(i) if option is None else Stage(i, option) for i in range(1, last)]
    plan = Plan.from_tree(chain.stage_names, (Stage(0), *blocks, Stage(last)), "test")
    memfit.apply(model, plan, sample)
    assert_trains_like(model, sample, reference, f"every block {option or 'recompute'}")
