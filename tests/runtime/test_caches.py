"""Causal LMs with their default config (use_cache=True) train under every plan, bit for bit."""

import io
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from runtime_cases import make_plan
from torch import nn

from memfit.api import plan as make_strategy_plan
from memfit.errors import InfeasibleBudgetError
from memfit.measuring.chain import find_chain
from memfit.planning.plan import Plan
from memfit.profiling import profile
from memfit.runtime import applied_plan, apply_plan, remove_plan
from memfit.runtime.caches import cache_arguments, drop_caches
from trees import TREES

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 64, 16, 2


def gpt2(attn: str) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, n_positions=SEQ, vocab_size=VOCAB, attn_implementation=attn
    )
    return transformers.GPT2LMHeadModel(config)


def llama(attn: str) -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        vocab_size=VOCAB,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config)


def opt(attn: str) -> nn.Module:
    config = transformers.OPTConfig(
        num_hidden_layers=4,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=SEQ,
        vocab_size=VOCAB,
        attn_implementation=attn,
    )
    return transformers.OPTForCausalLM(config)


DECODERS: dict[str, Callable[[str], nn.Module]] = {"gpt2": gpt2, "llama": llama, "opt": opt}
OPTION_TREES = ("selective matmul", "rebuild", "rebuild+linear", "rebuild mixed", "one segment")
Step = tuple[torch.Tensor, dict[str, torch.Tensor]]


def step(model: nn.Module, sample: dict[str, torch.Tensor]) -> Step:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(**sample).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def strategy_plans(model: nn.Module, sample: dict[str, torch.Tensor]) -> dict[str, Plan]:
    prof = profile(model, sample, repeats=1)
    plans = {s: make_strategy_plan(prof, budget=None, strategy=s) for s in ("all", "sqrt")}
    with pytest.raises(InfeasibleBudgetError) as infeasible:
        make_strategy_plan(prof, budget=1)
    # the tightest budget: optimal at its most aggressive (options, maybe segments)
    tightest = infeasible.value.min_feasible_bytes
    plans["optimal tightest"] = make_strategy_plan(prof, budget=tightest)
    midway = (tightest + prof.measurement.peak_bytes) // 2
    plans["optimal midway"] = make_strategy_plan(prof, budget=midway)
    return plans


@pytest.fixture(scope="module", params=[(a, i) for a in DECODERS for i in ("eager", "sdpa")])
def decoder(request: pytest.FixtureRequest) -> dict[str, Any]:
    arch, attn = request.param
    torch.manual_seed(0)
    model = DECODERS[arch](attn)
    model.train()
    assert model.config.use_cache is True  # the default the test is about
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    sample = {"input_ids": ids, "labels": ids}
    reference = step(model, sample)
    chain = find_chain(model, lambda: model(**sample))
    plans = strategy_plans(model, sample)
    plans |= {label: make_plan(chain, TREES[label]) for label in OPTION_TREES}
    return dict(model=model, sample=sample, chain=chain, plans=plans, reference=reference)


PLANS = ("all", "sqrt", "optimal tightest", "optimal midway", *OPTION_TREES)


@pytest.mark.parametrize("label", PLANS)
def test_default_decoders_train_bit_identical(decoder: dict[str, Any], label: str) -> None:
    model, sample, plan = decoder["model"], decoder["sample"], decoder["plans"][label]
    apply_plan(model, decoder["chain"], plan)
    try:
        loss, grads = step(model, sample)
    finally:
        remove_plan(model)
    reference_loss, reference_grads = decoder["reference"]
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert torch.equal(grads[name], grad), name


def test_generation_keeps_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = llama("sdpa")
    model.eval()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ // 2))
    with torch.no_grad():
        expected = model(input_ids=ids)
        tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
    chain = find_chain(model, lambda: model(input_ids=ids))
    apply_plan(model, chain, make_plan(chain, TREES["rebuild mixed"]))
    with torch.no_grad(), caplog.at_level(logging.WARNING, "memfit"):
        out = model(input_ids=ids)
        planned_tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
    remove_plan(model)
    assert not [r for r in caplog.records if r.name.startswith("memfit")], "no cache dropped"
    assert torch.equal(out.logits, expected.logits)
    cache = out.past_key_values
    assert [layer.keys.shape[-2] for layer in cache.layers] == [SEQ // 2] * 4
    assert torch.equal(planned_tokens, tokens)


def test_one_log_line_per_model(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = gpt2("eager")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    chain = find_chain(model, lambda: model(input_ids=ids))
    with caplog.at_level(logging.WARNING, "memfit"):
        apply_plan(model, chain, make_plan(chain, TREES["every block recomputed"]))
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        remove_plan(model)
        apply_plan(model, chain, make_plan(chain, TREES["one segment"]))
        model(input_ids=ids, labels=ids).loss.backward()
        remove_plan(model)
    lines = [r for r in caplog.records if r.name.startswith("memfit")]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert "'transformer.h.0'" in lines[0].getMessage()
    assert "cache, use_cache" in lines[0].getMessage()
    assert applied_plan(model) is None


class Layer(nn.Module):
    """Signatures as decoder layers write them."""

    def forward(  # GPT-2 style: the cache second, passed positionally
        self,
        hidden_states: torch.Tensor,
        layer_past: Any = None,
        mask: Any = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        return hidden_states


class ReadsCache(Layer):
    _can_checkpoint_with_cache = True


def test_drop_caches_by_position_keyword_and_default() -> None:
    where = cache_arguments(Layer())
    x, cache, mask = torch.zeros(1), object(), torch.ones(1)
    args, kwargs, changed = drop_caches(where, (x, cache, mask), {})
    assert args == (x, None, mask) and kwargs == {"use_cache": False}
    assert changed == ["layer_past", "use_cache"]
    args, kwargs, changed = drop_caches(where, (x,), {"past_key_values": cache, "use_cache": True})
    assert args == (x,) and kwargs == {"past_key_values": None, "use_cache": False}
    assert changed == ["past_key_values", "use_cache"]
    call = ((x, None, mask, False), {})
    assert drop_caches(where, *call) == (*call, [])  # nothing to drop: the very same call
    args, kwargs, changed = drop_caches(cache_arguments(ReadsCache()), (x, cache), {})
    assert args == (x, cache) and changed == ["use_cache"]


def test_drop_caches_by_type() -> None:
    from transformers import DynamicCache

    where = cache_arguments(Layer())
    x, cache = torch.zeros(1), DynamicCache()
    args, kwargs, changed = drop_caches(where, (x, None, cache), {"memory": cache})
    assert args == (x, None, None) and kwargs == {"memory": None, "use_cache": False}
    assert changed == ["argument 2", "memory", "use_cache"]


def test_a_planned_decoder_survives_torch_save() -> None:
    torch.manual_seed(0)
    model = llama("eager")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    sample = {"input_ids": ids, "labels": ids}
    chain = find_chain(model, lambda: model(**sample))
    apply_plan(model, chain, make_plan(chain, TREES["rebuild mixed"]))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.mul_(0.5)  # weights of its own
    planned = step(loaded, sample)
    assert remove_plan(loaded) is True
    assert applied_plan(model) is not None
    reference = step(loaded, sample)
    assert torch.equal(planned[0], reference[0])
    assert all(torch.equal(planned[1][name], grad) for name, grad in reference[1].items())
    assert planned[1].keys() == reference[1].keys()
