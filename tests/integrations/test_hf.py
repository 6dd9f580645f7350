"""Hugging Face models built from small configs (random weights, no downloads)."""

import sys
from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import PlanMismatchError
from memfit.integrations.hf import FAMILIES, build_hf, disable_hf_checkpointing, hf_block_names
from memfit.measuring.chain import Chain, find_chain
from memfit.planning.plan import Plan, Segment, Stage, recompute_one
from memfit.runtime import apply_plan, remove_plan
from tests.helpers.rng_draws import draws_between_blocks
from tests.helpers.trees import TREES as SHARED_TREES

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")

STACKS = {
    "bart": "model.encoder.layers,model.decoder.layers",  # both stacks: groups of one chain
    "bert": "bert.encoder.layer",
    "convnext": "convnext.encoder.stages",
    "falcon": "transformer.h",
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "opt": "model.decoder.layers",
    "roberta": "roberta.encoder.layer",
    "vit": ("vit.layers", "vit.encoder.layer"),  # transformers 5 moved the layers up
}


def checkpointing_on(model: nn.Module) -> bool:
    """Whether HF's checkpointing switch is on (``is_activation_checkpointing`` in transformers
    5, ``is_gradient_checkpointing`` before it, which 5 deprecates): the definition both use."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def listed_as_layers(model: nn.Module, blocks: tuple[str, ...]) -> bool:
    """Whether transformers names the blocks' class as its layers (``_no_split_modules`` or a
    ``GradientCheckpointingLayer``), which :func:`hf_block_names` reads."""
    module = sys.modules.get("transformers.modeling_layers")
    layers = getattr(module, "GradientCheckpointingLayer", ())
    listed = set(getattr(model, "_no_split_modules", None) or ())
    return all(
        type(block).__name__ in listed or isinstance(block, layers)
        for block in map(model.get_submodule, blocks)
    )


def joins_blocks(plan: Plan) -> bool:
    return any(isinstance(item, Segment) and item.stop - item.start > 1 for item in plan.tree)


# stages: 0 <pre>, 1..4 the layers, 5 <post>
TREES: dict[str, tuple] = {
    **SHARED_TREES,
    "nested": (
        Stage(0),
        Segment(1, 4, (recompute_one(1), Stage(2), recompute_one(3))),
        Stage(4),
        Stage(5),
    ),
}


def chain_of(model: nn.Module, sample: dict[str, Any]) -> Chain:
    return find_chain(model, lambda: model(**sample))


def plan_for(chain: Chain, tree: tuple) -> Plan:
    return Plan.from_tree(chain.stage_names, adapt(tree, chain), "test")


def adapt(tree: tuple, chain: Chain) -> tuple:
    """A tree over the 4-block chain of tests/trees.py, mapped onto ``chain``'s stages; for a
    chain of two block lists (an encoder-decoder, 2 + 2 blocks) segments are cut where the
    stage between the lists lies (it is always kept)."""
    if len(chain.groups) == 1:
        return tree
    last = len(chain) - 1
    where = {0: 0, 5: last} | {k: chain.block_stages[k - 1] for k in range(1, 5)}
    items: list = [Stage(i) for i in range(len(chain)) if i not in where.values()]
    for item in tree:
        if isinstance(item, Stage):
            items.append(Stage(where[item.index], item.option))
            continue
        stages = [where[k] for k in range(item.start, item.stop)]
        runs: list[list[int]] = [[stages[0]]]
        for index in stages[1:]:
            if index == runs[-1][-1] + 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        if len(runs) == 1 and item.stop - item.start == 1:
            items.append(recompute_one(stages[0]))
            continue
        for run in runs:  # cut at the stage between the lists; kept whole inside
            items.append(Segment(run[0], run[-1] + 1, tuple(Stage(i) for i in run)))
    return tuple(sorted(items, key=lambda item: getattr(item, "index", getattr(item, "start", 0))))


def step(model: nn.Module, sample: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(**sample).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_same_step(reference: tuple, planned: tuple, label: str) -> None:
    assert torch.equal(planned[0], reference[0]), label
    assert planned[1].keys() == reference[1].keys(), label
    for name, grad in reference[1].items():
        assert torch.equal(planned[1][name], grad), f"{label}: {name}"


@pytest.mark.parametrize("arch", sorted(STACKS))
def test_chain_found_and_gradients_bit_identical(arch: str) -> None:
    # an encoder-decoder's two stacks of 2 layers make the 4 blocks the shared trees are over;
    # ConvNeXt with one layer per stage is a chain of its 4 stages (deeper: of its layers)
    layers = {"bart": 2, "convnext": 1}.get(arch, 4)
    model, sample = build_hf(arch, layers=layers)
    assert model.training
    chain = chain_of(model, sample)
    assert chain.container in (STACKS[arch] if isinstance(STACKS[arch], tuple) else (STACKS[arch],))
    assert len(chain.block_names) == 4
    # older transformers list fewer layer classes (ConvNeXt's stages before 5.x, BERT's layers
    # in 4.45 only on the bare model): then the chain finder alone names the blocks
    names = hf_block_names(model)
    if listed_as_layers(model, chain.block_names):
        assert names == chain.block_names
    else:
        assert names is None
    draws = draws_between_blocks(model, sample, chain.block_names)
    reference = step(model, sample)
    for label, tree in TREES.items():
        plan = plan_for(chain, tree)
        apply_plan(model, chain, plan)
        try:
            if draws and joins_blocks(plan):  # a rerun would draw other numbers: refused
                with pytest.raises(PlanMismatchError, match="drew random numbers"):
                    step(model, sample)
                continue
            planned = step(model, sample)
        finally:
            remove_plan(model)
        assert_same_step(reference, planned, label)


def test_frozen_embeddings_under_bfloat16_autocast() -> None:
    model, sample = build_hf("llama", layers=4)
    model.get_input_embeddings().weight.requires_grad_(False)  # llama: the first layer's input
    chain = chain_of(model, sample)  # no longer requires grad, as with LoRA

    def autocast_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step(model, sample)

    reference = autocast_step()
    assert "model.layers.0.mlp.up_proj.weight" in reference[1]
    for label in ("nested", "rebuild mixed"):
        apply_plan(model, chain, plan_for(chain, TREES[label]))
        planned = autocast_step()
        remove_plan(model)
        assert_same_step(reference, planned, f"frozen embeddings, bf16 autocast, {label}")


def enable_hf_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Wrapper(nn.Module):
    """A plain module holding an HF model, as training frameworks do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **sample: Any) -> Any:
        return self.inner(**sample)


@pytest.mark.parametrize("wrapped", [False, True], ids=["hf model", "wrapped"])
def test_hf_checkpointing_is_turned_off_with_a_warning(wrapped: bool) -> None:
    inner, sample = build_hf("llama", layers=2)
    model = Wrapper(inner) if wrapped else inner
    chain = chain_of(model, sample)
    reference = step(model, sample)
    enable_hf_checkpointing(inner)
    assert checkpointing_on(inner)
    plan = plan_for(chain, (Stage(0), Segment(1, 3, (Stage(1), recompute_one(2))), Stage(3)))
    with pytest.warns(UserWarning, match="memfit's plan replaces it"):
        apply_plan(model, chain, plan)
    assert not checkpointing_on(inner)
    planned = step(model, sample)
    remove_plan(model)
    assert_same_step(reference, planned, "after turning HF checkpointing off")
    assert disable_hf_checkpointing(model) is False


def test_alternating_sliding_and_full_attention_share_a_segment() -> None:
    """Sliding and full attention layers get different masks; in one segment each layer's
    rerun gets its own, bit for bit as the unplanned model."""
    config = transformers.Gemma2Config(
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=32,
        sliding_window=4,
        attention_dropout=0.1,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).train()
    ids = torch.randint(0, 128, (2, 16))
    sample = {"input_ids": ids, "labels": ids}
    if hasattr(config, "layer_types"):  # transformers >= 4.53; before, by layer index alike
        assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    chain = chain_of(model, sample)
    masks: list[Any] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, _a, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
        )
        for name in chain.block_names[:2]
    ]
    model(**sample)
    for handle in handles:
        handle.remove()
    # transformers < 4.53 hands every layer one mask and slides the window inside the layer
    assert not (isinstance(masks[0], torch.Tensor) and torch.equal(masks[0], masks[1]))
    reference = step(model, sample)
    for name in ("one segment", "every block recomputed"):
        apply_plan(model, chain, plan_for(chain, TREES[name]))
        planned = step(model, sample)
        remove_plan(model)
        assert_same_step(reference, planned, f"{name} on Gemma2")


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_optimal_plans_on_hf_models(arch: str) -> None:
    model, sample = build_hf(arch, layers=4, hidden=64, seq=64, batch=2)
    profile = memfit.profile(model, sample, repeats=1)
    plan = memfit.plan(profile, budget="80%")
    memfit.apply(model, plan, sample)
    try:
        report = memfit.verify(model, sample, repeats=1)
    finally:
        memfit.remove(model)
    assert report.gradients_equal and report.loss_equal, report.mismatched
    assert plan.budget_bytes is not None
    assert report.measured_peak_bytes <= plan.budget_bytes
    assert abs(report.prediction_error) <= 0.02


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match=r"'t5'.*\['bart', 'bert', 'convnext', 'falcon', "):
        build_hf("t5")


def test_a_family_newer_than_transformers_is_named_with_the_version_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memfit.integrations.hf_models import Family

    future = Family(config="FutureConfig", model="FutureForCausalLM", sizes=dict, since="99.0")
    monkeypatch.setitem(FAMILIES, "future", future)
    assert not future.available(transformers)
    assert not future.supports(transformers, "sdpa")  # no AttributeError: a sweep skips it
    with pytest.raises(ImportError, match=r"'future' needs transformers>=99\.0 \(FutureFor"):
        build_hf("future")


def test_bad_attention_implementation() -> None:
    with pytest.raises(ValueError, match=r"one of \['eager', 'sdpa'\]; got 'flash'"):
        build_hf("llama", attn_implementation="flash")
    with pytest.raises(
        ValueError,
        match="ConvNextForImageClassification does not support attn_implementation='sdpa'",
    ):
        build_hf("convnext", attn_implementation="sdpa")


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_builders_keep_the_library_defaults(arch: str) -> None:
    if not FAMILIES[arch].available(transformers):
        pytest.skip(f"{FAMILIES[arch].model} needs transformers>={FAMILIES[arch].since}")
    model, sample = build_hf(arch)
    library = type(model.config)().to_dict()
    built = model.config.to_dict()
    kept = [key for key in library if "drop" in key or key in ("use_cache", "tie_word_embeddings")]
    assert kept, library.keys()
    assert {key: built[key] for key in kept} == {key: library[key] for key in kept}
    default = "sdpa" if FAMILIES[arch].supports(transformers, "sdpa") else "eager"
    assert model.config._attn_implementation == default
    assert model.training
    if "input_ids" in sample:
        assert int(sample["input_ids"].max()) < model.config.vocab_size
    eager, _ = build_hf(arch, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_hf_block_names_of_a_plain_model() -> None:
    assert hf_block_names(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) is None


def test_profile_turns_hf_checkpointing_off_before_measuring() -> None:
    import memfit

    model, sample = build_hf("gpt2", layers=2)
    plain = memfit.profile(model, sample, repeats=1, options=())
    enable_hf_checkpointing(model)
    again = memfit.profile(model, sample, repeats=1, options=())  # silently: no warning
    # the baseline is the model without any checkpointing, to the byte
    assert again.measurement.peak_bytes == plain.measurement.peak_bytes
    assert checkpointing_on(model)  # and the user's switch is back on


def test_a_bad_option_name_fails_before_the_model_changes() -> None:
    model, sample = build_hf("llama", layers=2)
    enable_hf_checkpointing(model)
    with pytest.raises(ValueError, match="unknown stage option 'offlaod'"):
        memfit.profile(model, sample, options=["rebuild", "offlaod"])
    assert checkpointing_on(model)  # untouched: nothing was measured or turned off


@pytest.mark.parametrize(
    ("arch", "rebuilt"),
    [("gpt2", {"LayerNorm", "NewGELUActivation", "Conv1D"}), ("llama", {"LlamaRMSNorm", "silu"})],
)
def test_rebuild_finds_the_norms_activations_and_linears_of_hf_blocks(arch, rebuilt) -> None:
    from memfit.runtime import recording

    model, sample = build_hf(arch, layers=2)
    chain = chain_of(model, sample)
    tree = (Stage(0), Stage(1, "rebuild+linear"), Stage(2, "rebuild+linear"), Stage(3))
    reference = step(model, sample)
    apply_plan(model, chain, plan_for(chain, tree))
    try:
        with recording() as log:
            planned = step(model, sample)
    finally:
        remove_plan(model)
    assert rebuilt <= set(log[0]), log[0]
    assert_same_step(reference, planned, f"{arch} rebuild+linear")


def _switches(model: nn.Module) -> list[tuple[str, object]]:
    names = ("gradient_checkpointing", "_gradient_checkpointing_func")
    return [
        (f"{fqn}:{name}", module.__dict__[name])
        for fqn, module in model.named_modules()
        for name in names
        if name in module.__dict__
    ]


def _hooked(model: nn.Module) -> bool:
    # transformers 4's disable removes its one hook but keeps the handle: count live hooks
    hooks = [
        *(model.__dict__.get("_require_grads_hooks") or ()),
        model.__dict__.get("_require_grads_hook"),
    ]
    return any(hook is not None and hook.id in (hook.hooks_dict_ref() or {}) for hook in hooks)


@pytest.mark.parametrize("adapter", [False, True], ids=["plain", "peft adapter"])
def test_remove_turns_hf_checkpointing_back_on(adapter: bool) -> None:
    # apply turns HF's checkpointing off (a plan replaces it); remove gives it back as the user
    # had set it: every module's switch and checkpoint function, and PEFT's input hooks
    model, sample = build_hf("llama", layers=2)
    if adapter:
        peft = pytest.importorskip("peft")
        try:
            model.add_adapter(peft.LoraConfig(target_modules=["q_proj"]))
        except ValueError:  # transformers 5.25 wants peft >= 0.22: its flag, as add_adapter sets
            model._hf_peft_config_loaded = True
    enable_hf_checkpointing(model)
    before = _switches(model)
    # HF's switch hooks the embeddings' output to require grad (where and when it unhooks
    # them differs between transformers 4 and 5): memfit leaves them as HF's switch has them
    hooked = _hooked(model)
    assert checkpointing_on(model)
    memfit.profile(model, sample, repeats=1, options=())  # leaves it all as it found it
    assert _switches(model) == before and _hooked(model) == hooked
    chain = chain_of(model, sample)
    plan = plan_for(chain, (Stage(0), Segment(1, 3, (Stage(1), recompute_one(2))), Stage(3)))
    with pytest.warns(UserWarning, match="memfit.remove\\(model\\) turns it back on"):
        memfit.apply(model, plan)
    assert not checkpointing_on(model)
    assert memfit.remove(model)
    assert checkpointing_on(model) and _switches(model) == before
    assert _hooked(model) == hooked
    if not hooked:
        return
    for parameter in model.get_input_embeddings().parameters():
        parameter.requires_grad_(False)  # frozen, as under an adapter: the hook makes the
    embedded = model.get_input_embeddings()(sample["input_ids"])  # output require grad
    assert embedded.requires_grad
