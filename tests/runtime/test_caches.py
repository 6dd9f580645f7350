"""Causal LMs with their default config (use_cache=True) train under every plan, bit for bit.

Bit for bit by construction: the planned step runs the unplanned step's aten ops on the same
shapes, strides and dtypes (op traces compared), so the equality does not depend on which
kernels this machine's CPU happens to pick. GPT-2 and OPT at width 32 (head width 8) are the
configurations whose gradients differed on another CPU when planned blocks dropped their cache.
"""

import inspect
import io
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from memfit.errors import InfeasibleBudgetError, PlanMismatchError
from memfit.measuring.chain import find_chain
from memfit.measuring.trace import Trace, compare_traces, tracing
from memfit.planning.plan import Plan, Segment, Stage
from memfit.runtime import applied_plan, apply_plan, remove_plan
from memfit.runtime.caches import cache_arguments, private_caches
from memfit.runtime.head import is_head_option
from memfit.verbs.api import plan as make_strategy_plan
from memfit.verbs.profiling import profile
from tests.helpers.plans import make_plan
from tests.helpers.rng_draws import draws_between_blocks
from tests.helpers.trees import TREES

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


def step(model: nn.Module, sample: dict[str, Any]) -> Step:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(**sample).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def traced_step(model: nn.Module, sample: dict[str, Any]) -> tuple[Step, Trace]:
    with tracing() as trace:
        result = step(model, sample)
    return result, trace


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
    reference = traced_step(model, sample)
    chain = find_chain(model, lambda: model(**sample))
    plans = strategy_plans(model, sample)
    plans |= {label: make_plan(chain, TREES[label]) for label in OPTION_TREES}
    draws = draws_between_blocks(model, sample, chain.block_names)
    return dict(
        model=model, sample=sample, chain=chain, plans=plans, reference=reference, draws=draws
    )


def joins_blocks(plan: Plan) -> bool:
    return any(isinstance(item, Segment) and item.stop - item.start > 1 for item in plan.tree)


PLANS = ("all", "sqrt", "optimal tightest", "optimal midway", *OPTION_TREES)


def blocks_only(plan: Plan) -> Plan:
    """``plan`` with ``<post>`` run as the model writes it: ``head:lean-loss`` computes the same
    loss on row chunks of the logits by design, so the ops of the blocks are compared without
    it (its gradients are compared as they are)."""
    tree = tuple(
        Stage(item.index) if isinstance(item, Stage) and is_head_option(item.option) else item
        for item in plan.tree
    )
    return Plan.from_tree(plan.stage_names, tree, plan.strategy)


@pytest.mark.parametrize("label", PLANS)
def test_default_decoders_train_bit_identical(decoder: dict[str, Any], label: str) -> None:
    model, sample, plan = decoder["model"], decoder["sample"], decoder["plans"][label]
    if decoder["draws"] and joins_blocks(plan):
        # a plan of memfit's own never joins blocks across draws (OPT before transformers 5.x)
        assert label in OPTION_TREES, plan.tree
        apply_plan(model, decoder["chain"], plan)  # a rerun would draw other numbers: refused
        try:
            with pytest.raises(PlanMismatchError, match="drew random numbers"):
                step(model, sample)
        finally:
            remove_plan(model)
        return
    apply_plan(model, decoder["chain"], plan)
    try:
        loss, grads = step(model, sample)
    finally:
        remove_plan(model)
    apply_plan(model, decoder["chain"], blocks_only(plan))
    try:
        _, trace = traced_step(model, sample)
    finally:
        remove_plan(model)
    (reference_loss, reference_grads), reference_trace = decoder["reference"]
    difference = compare_traces(reference_trace, trace)
    assert difference is None, str(difference)
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert torch.equal(grads[name], grad), name


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of each layer of a ``DynamicCache``: its ``layers`` (transformers 4.54
    and later), or its lists ``key_cache`` and ``value_cache`` (before)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def containers(cache: Any) -> list[Any]:
    """The objects a ``DynamicCache`` holds its tensors in (which a private copy renews)."""
    if hasattr(cache, "layers"):
        return [cache.layers, *cache.layers]
    return [cache.key_cache, cache.value_cache]


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
    assert [keys.shape[-2] for keys, _ in cache_layers(cache)] == [SEQ // 2] * 4
    assert torch.equal(planned_tokens, tokens)


def test_training_is_quiet_and_leaves_the_models_cache_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = gpt2("eager")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    chain = find_chain(model, lambda: model(input_ids=ids))
    with caplog.at_level(logging.DEBUG, "memfit"):
        apply_plan(model, chain, make_plan(chain, TREES["one segment"]))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        remove_plan(model)
    assert not [r for r in caplog.records if r.name.startswith("memfit")]
    # the planned blocks wrote their keys into private copies, never into the model's cache
    cache = out.past_key_values
    if isinstance(cache, tuple):  # transformers 4 returns a legacy cache: a tuple per layer
        cache = transformers.DynamicCache.from_legacy_cache(cache)
    assert cache.get_seq_length() == 0


def test_a_prefix_in_the_cache_is_seen_by_every_rerun() -> None:
    """A cache that holds keys before a training forward (prefix tuning): each run of a planned
    block (forward and recompute) starts from the same prefix, as the unplanned block does."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = llama("eager")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ // 2))
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :4]).past_key_values  # 4 tokens of keys per layer

    # transformers 5.x names the argument ``cache`` (``past_key_values`` is deprecated)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def sample() -> dict[str, Any]:
        cache = DynamicCache()  # the unplanned model appends to it: a fresh one per step
        for index, (keys, values) in enumerate(cache_layers(prefix)):
            cache.update(keys, values, index)
        mask = torch.ones(BATCH, 4 + SEQ // 2, dtype=torch.long)
        return {
            "input_ids": ids,
            "labels": ids,
            name: cache,
            "attention_mask": mask,
        }

    reference = traced_step(model, sample())
    chain = find_chain(model, lambda: model(**sample()))
    for label in ("every block recomputed", "one segment", "selective matmul"):
        apply_plan(model, chain, make_plan(chain, TREES[label]))
        try:
            given = sample()
            (loss, grads), trace = traced_step(model, given)
        finally:
            remove_plan(model)
        assert compare_traces(reference[1], trace) is None, label
        assert torch.equal(loss, reference[0][0]), label
        assert all(torch.equal(grads[n], g) for n, g in reference[0][1].items()), label
        assert given[name].get_seq_length() == 4  # the prefix, unchanged


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


def test_private_caches_copy_cache_objects_and_share_their_tensors() -> None:
    from transformers import DynamicCache

    where = cache_arguments(Layer())
    x, keys = torch.zeros(1), torch.randn(1, 2, 3, 4)
    cache = DynamicCache()
    cache.update(keys, keys, 0)
    args, kwargs = private_caches(where, (x, cache), {"memory": cache, "use_cache": True})
    for copy in (args[1], kwargs["memory"]):
        assert type(copy) is DynamicCache and copy is not cache
        assert all(
            new is not old for new, old in zip(containers(copy), containers(cache), strict=True)
        )
        assert cache_layers(copy)[0][0] is cache_layers(cache)[0][0]  # shared, not copied
        copy.update(keys, keys, 0)
        assert copy.get_seq_length() == 6
    assert cache.get_seq_length() == 3  # the original is never written
    assert kwargs["use_cache"] is True  # as passed: the layer computes as it would unplanned


def test_private_caches_turn_off_legacy_presents_only() -> None:
    where = cache_arguments(Layer())
    x, mask = torch.zeros(1), torch.ones(1)
    past = (torch.zeros(1), torch.zeros(1))  # a legacy cache: a tuple, never written
    args, kwargs = private_caches(where, (x, past, mask), {})
    assert args == (x, past, mask) and kwargs == {"use_cache": False}
    args, kwargs = private_caches(where, (x,), {"use_cache": True})
    assert args == (x,) and kwargs == {"use_cache": False}
    call = ((x, None, mask, False), {})
    assert private_caches(where, *call) == call  # nothing to change: the very same call


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
