"""Every Hugging Face family memfit supports, built as users get it, under every way of planning.

Each model comes from :func:`memfit.integrations.hf.build_hf`: the library's defaults
(``use_cache``, attention implementation, dropout, tied embeddings), only the sizes small. Each
family is profiled once per attention implementation, then planned and verified against itself
unplanned: loss and every gradient ``torch.equal`` (dropout on where the library has it), the
same aten ops on the same shapes, strides and dtypes as the unplanned step (the op trace of
:mod:`memfit.measuring.trace`: what makes the equality hold on any CPU or GPU, not only on this
one), the measured peak within the budget, the predicted peak within 2% of the measured one.

Ways of planning: the optimal plan at budgets 30% and 60% of the activation memory, and every
block under one option: recompute (strategy ``all``), ``rebuild``, ``rebuild+linear``, ``rebuild+ops``,
``selective:matmul``.

| family | model class | attention | covered |
| --- | --- | --- | --- |
| GPT-2 | GPT2LMHeadModel | eager, sdpa | optimal 30%/60%, all, rebuild, rebuild+linear, selective:matmul |
| Llama | LlamaForCausalLM | eager, sdpa | same |
| Mistral | MistralForCausalLM | eager, sdpa | same |
| Qwen3 | Qwen3ForCausalLM | eager, sdpa | same |
| Phi-3 | Phi3ForCausalLM | eager, sdpa | same |
| Gemma 2 (alternating sliding-window layers) | Gemma2ForCausalLM | eager (no sdpa in transformers) | same |
| Falcon | FalconForCausalLM | eager, sdpa | same |
| Mixtral (mixture of experts) | MixtralForCausalLM | eager, sdpa | same |
| OPT | OPTForCausalLM | eager, sdpa | same |
| BERT (padding mask) | BertForMaskedLM | eager, sdpa | same |
| RoBERTa (padding mask) | RobertaForMaskedLM | eager, sdpa | same |
| ViT | ViTForImageClassification | eager, sdpa | same |
| ConvNeXt | ConvNextForImageClassification | none (no attention) | same |
| BART (encoder-decoder: encoder and decoder layers, one chain) | BartForConditionalGeneration | eager, sdpa | same |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import InfeasibleBudgetError
from memfit.integrations.hf import FAMILIES, build_hf
from memfit.measuring.profile import Profile
from memfit.measuring.run import measure_stages
from memfit.measuring.trace import Trace, compare_traces
from memfit.planning.plan import Plan, Stage, recompute_one
from memfit.planning.simulate import simulate
from memfit.verbs.verification import same_tensors, traced_gradients

transformers = pytest.importorskip("transformers")
Version = pytest.importorskip("packaging.version").Version  # a dependency of transformers
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")

STAGE_OPTIONS = ("rebuild", "rebuild+linear", "rebuild+ops", "selective:matmul")
BUDGETS = ("30%", "60%")
# 8 layers: the optimal plans at 30% need them (at 4 the floor lies above 30% and the case
# plans at the floor); 64 tokens keep what a family is here for (Gemma 2's sliding window is
# seq // 4, BERT's padding the last quarter) at three quarters of the CPU of 128
SIZES = {"layers": 8, "hidden": 32, "heads": 2, "seq": 64, "batch": 2, "vocab": 128}
SEED = 0


def _variants() -> list[Any]:
    """(family, attention implementation): both where the model class has both; a family the
    installed transformers lacks (Qwen3 before 4.51) is skipped, with the version it needs."""
    variants = []
    for arch in sorted(FAMILIES):
        family = FAMILIES[arch]
        if not family.available(transformers):
            reason = f"{family.model} needs transformers>={family.since}"
            skip = pytest.mark.skip(reason=f"{reason}, not {transformers.__version__}")
            variants.append(pytest.param((arch, "eager"), id=f"{arch}-eager", marks=skip))
            continue
        variants.extend(
            pytest.param((arch, attention), id=f"{arch}-{attention}")
            for attention in ("eager", "sdpa")
            if family.supports(transformers, attention)
        )
    return variants


@dataclass(frozen=True)
class Profiled:
    """A family's model, sample and profile, and its unplanned step (loss, gradients)."""

    variant: tuple[str, str]  # (family, attention implementation)
    model: nn.Module
    sample: dict[str, Any]
    profile: Profile
    reference: tuple[torch.Tensor, dict[str, torch.Tensor | None], Trace]


# Known gaps in the predicted peak, checked strictly: gradients and budget are checked as for
# every family, the prediction must still miss by more than 2% (a fix fails the test until the
# gap is removed here), and the gap is in docs/known-gaps.md.
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}
# Gaps that show only in some runs (the plan depends on measured times): the prediction may be
# high by up to two tails beyond the 2% check; the test is xfailed only when it is.
LOOSE_GAPS: dict[tuple[str, str, str], str] = {}
TAIL_BYTES = 2 * SIZES["batch"] * SIZES["seq"] * SIZES["hidden"] * 4  # keys and values, float32

# Before transformers 4.54 (4.53.3 fails these cases, 4.54.1 passes all of them) OPT and Falcon
# (sdpa) layers return their keys and values as extra outputs (tails). The first and last
# layers' kept stages are measured with nothing recomputed and include one such tail (32,768
# bytes at the sweep's sizes) that a rerun does not keep, so the prediction is high by one or
# two of them. Figures: predicted / measured peak bytes on 4.53.3, torch 2.13.0 CPU, measured
# when the sweep ran 128 tokens (a tail of 65,536 bytes then).
TAILS_BEFORE_4_54 = "transformers<4.54: key/value tails counted in the kept first and last layers"
if Version(transformers.__version__) < Version("4.54"):
    KNOWN_GAPS.update(
        (variant, f"{TAILS_BEFORE_4_54}: predicted / measured {figures}")
        for variant, figures in {
            ("falcon", "sdpa", "recompute"): "2,007,544 / 1,942,008 B (+3.4%)",
            # measured at 64 tokens (a tail of 32,768 bytes): within 2% at 128
            ("falcon", "eager", "recompute"): "1,254,408 / 1,221,632 B (+2.7%)",
            ("opt", "eager", "30%"): "2,308,200 / 2,227,400 B (+3.6%)",
            ("opt", "eager", "recompute"): "2,308,200 / 2,177,112 B (+6.0%)",
            ("opt", "sdpa", "30%"): "1,934,472 / 1,868,936 B (+3.5%)",
            ("opt", "sdpa", "recompute"): "1,930,456 / 1,799,376 B (+7.3%)",
        }.items()
    )
    # At 60% the optimal plan follows the profiled step times: some runs keep the first or
    # last layer (then high by one or two tails: 4,419,976 / 4,288,904 B, +3.1%, OPT eager;
    # 3,313,992 / 3,248,456 B, +2.0%, OPT sdpa), others not (OPT eager +1.5%). Not strict: the
    # prediction may be high by up to two tails beyond the 2%, never low.
    LOOSE_GAPS.update(
        ((family, attention, "60%"), f"{TAILS_BEFORE_4_54}: up to {2 * TAIL_BYTES:,} B high")
        for family, attention in (("opt", "eager"), ("opt", "sdpa"))
    )


@pytest.fixture(scope="module", params=_variants())
def profiled(request: pytest.FixtureRequest) -> Profiled:
    arch, attention = request.param
    model, sample = build_hf(arch, attn_implementation=attention, **SIZES)
    reference = traced_gradients(model, sample, None, SEED)
    # the default (fast) setup, as users profile: one metered step per way; the thorough one
    # (``repeats``) times each way three more times and measures the same bytes
    profile = memfit.profile(model, sample, options=STAGE_OPTIONS)
    return Profiled((arch, attention), model, sample, profile, reference)


def known_gap(profiled: Profiled, way: str) -> str | None:
    return KNOWN_GAPS.get((*profiled.variant, way))


def loose_gap(profiled: Profiled, way: str, predicted: int, measured: int) -> str | None:
    """The loose gap of ``way`` if the prediction shows it (high by over 2%, up to two tails
    beyond); a prediction lower, or higher still, fails."""
    gap = LOOSE_GAPS.get((*profiled.variant, way))
    if gap is None or predicted <= measured * 1.02:
        return None
    assert predicted <= measured * 1.02 + 2 * TAIL_BYTES, (gap, predicted, measured)
    return gap


def every_block(profile: Profile, option: str) -> Plan:
    """Every block under ``option`` (``recompute``: each its own segment), with predictions."""
    tree = tuple(
        (recompute_one(i) if option == "recompute" else Stage(i, option))
        if stage.checkpointable  # a block (not <pre>, <post> or a stage between block lists)
        else Stage(i)
        for i, stage in enumerate(profile.costs.stages)
    )
    simulation = simulate(profile.costs, tree)
    return Plan(
        stage_names=profile.stage_names,
        tree=tree,
        strategy=f"every block {option}",
        predicted_peak_bytes=simulation.peak_bytes,
        predicted_step_s=simulation.step_s,
        fingerprint=profile.fingerprint,
    )


def check_planned(profiled: Profiled, plan: Plan, way: str) -> tuple[int, str | None]:
    """Run ``plan`` on the model: loss and gradients bit for bit as unplanned, the same ops on
    the same layouts, the predicted peak within 2% of the measured one unless ``way`` has a
    known gap. Returns the measured peak and the gap it showed.

    ``memfit.verify`` without its timed steps (a garbage collection before each on a heap that
    holds transformers costs a quarter second, and no check here reads times). The peak is
    ``memfit.measure``'s metered step alone: the traced step warmed the planned model up, and
    no check reads the op at the peak, whose recording costs twice the step.
    """
    model, sample = profiled.model, profiled.sample
    memfit.apply(model, plan, sample)
    try:
        loss, grads, trace = traced_gradients(model, sample, None, SEED)
        metered = measure_stages(model, sample, None, warmup=0, clock_metered=True)
        peak_bytes = metered.measurement.peak_bytes
    finally:
        memfit.remove(model)
    reference_loss, reference_grads, reference_trace = profiled.reference
    difference = compare_traces(reference_trace, trace)
    assert difference is None, f"{plan.tree}: {difference}"
    assert torch.equal(loss, reference_loss), plan.tree
    assert grads.keys() == reference_grads.keys()
    mismatched = [name for name, g in reference_grads.items() if not same_tensors(g, grads[name])]
    assert not mismatched, (plan.tree, mismatched)
    error = plan.predicted_peak_bytes / peak_bytes - 1.0
    gap = known_gap(profiled, way) or loose_gap(
        profiled, way, plan.predicted_peak_bytes, peak_bytes
    )
    if gap is None:
        assert abs(error) <= 0.02, (plan.predicted_peak_bytes, peak_bytes)
    else:  # a known gap must still be there: a fix shows up as a failure to remove it
        assert abs(error) > 0.02, f"known gap closed, remove it from KNOWN_GAPS: {gap}"
    return peak_bytes, gap


@pytest.mark.parametrize("budget", BUDGETS)
def test_optimal_plan(profiled: Profiled, budget: str) -> None:
    try:
        plan = memfit.plan(profiled.profile, budget=budget)
    except InfeasibleBudgetError as error:
        # Tiny models: parameter gradients, embeddings, head and one block's backward are a
        # large share of the step, so 30% can lie below the floor. Then the smallest feasible
        # budget the error names must hold, to the byte: plan and check at exactly that.
        assert error.min_feasible_bytes > error.budget_bytes
        plan = memfit.plan(profiled.profile, budget=error.min_feasible_bytes)
    peak_bytes, gap = check_planned(profiled, plan, budget)
    assert plan.budget_bytes is not None
    assert peak_bytes <= plan.budget_bytes
    if gap is not None:
        pytest.xfail(gap)  # everything else held


@pytest.mark.parametrize("option", ["recompute", *STAGE_OPTIONS])
def test_every_block_under_one_option(profiled: Profiled, option: str) -> None:
    plan = (
        memfit.plan(profiled.profile, budget=None, strategy="all")
        if option == "recompute"
        else every_block(profiled.profile, option)
    )
    peak_bytes, gap = check_planned(profiled, plan, option)
    assert peak_bytes <= profiled.profile.measurement.peak_bytes
    if gap is not None:
        pytest.xfail(gap)  # everything else held
