"""How low the step peak can go on a large-vocabulary model: the floor of the memory frontier.

On a Hugging Face Llama config with a realistic vocabulary-to-width ratio (32,000 tokens, width
512), built with the library's defaults, the smallest feasible step peak of:

* Hugging Face full recompute (``gradient_checkpointing_enable()``), measured;
* memfit before its ``<post>`` options (the exact block options only: keep, recompute, rebuild,
  selective), the planner's minimal peak;
* memfit with the exact ``head:lean-loss`` (bit-identical);
* memfit with the opt-in ``head:chunked`` (``exact=False``: exact to rounding).

All memfit rows come from one profile (``exact=False``) whose ``<post>`` menu is cut down per
row, which is what profiling with fewer options measures (every way is a step of its own). Each
row's min-peak plan is applied and verified: measured peak, gradients bit for bit (to rounding
for the chunked row). The loop is the usual HF one (``out = model(**batch); out.loss.backward()``,
the output alive through backward). Results go to ``benchmarks/results/floor-<date>.md``.

    .venv/bin/python benchmarks/bench_floor.py --batch 4 --seq 512
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import date
from pathlib import Path

import torch

import memfit
from common import header, write_results
from memfit.measuring.profile import Profile
from memfit.planning.costs import ChainCosts
from memfit.runtime.head import HEAD_OPTIONS, is_head_option

HERE = Path(__file__).parent


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    return model, {"input_ids": ids, "labels": ids.clone()}


def with_post_menu(profile: Profile, keep: set[str]) -> Profile:
    """The profile with only ``keep`` (and the block options) in the last stage's menu."""
    stages = list(profile.costs.stages)
    last = stages[-1]
    menu = {k: v for k, v in last.options.items() if not is_head_option(k) or k in keep}
    stages[-1] = dataclasses.replace(last, options=menu)
    costs: ChainCosts = dataclasses.replace(profile.costs, stages=stages)
    return dataclasses.replace(profile, costs=costs)


def floor_plan(profile: Profile) -> memfit.Plan:
    """The plan at the smallest feasible budget (the planner's own figure)."""
    try:
        memfit.plan(profile, budget=1)
    except memfit.InfeasibleBudgetError as error:
        return memfit.plan(profile, budget=error.min_feasible_bytes)
    raise AssertionError("a 1-byte budget fitted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / f"floor-{date.today()}.md"))
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say("\n".join(header()))
    model, sample = build(args)
    plain = memfit.measure(model, sample, repeats=args.repeats)
    say(f"plain step: peak {plain.peak_bytes / 2**20:.1f} MiB")
    model.gradient_checkpointing_enable()
    hf = memfit.measure(model, sample, repeats=args.repeats)
    model.gradient_checkpointing_disable()
    say(f"HF full recompute: peak {hf.peak_bytes / 2**20:.1f} MiB")
    profile = memfit.profile(model, sample, exact=False, repeats=args.repeats)
    say(f"profiled; notes: {list(profile.notes)}")
    exact_heads = {name for name, head in HEAD_OPTIONS.items() if head.exact}
    rows = [
        ("memfit before (exact block options, <post> kept)", with_post_menu(profile, set())),
        ("memfit + head:lean-loss (exact)", with_post_menu(profile, exact_heads)),
        ("memfit + head:chunked (opt-in, exact to rounding)", profile),
    ]
    held, activation = plain.base_bytes, plain.activation_bytes
    lines = [
        f"# Floor of the frontier on a 32k-vocabulary Llama ({date.today()})",
        "",
        *header(),
        f"- model: transformers {__import__('transformers').__version__} LlamaForCausalLM, "
        f"random weights, library defaults but sizes: vocab {args.vocab}, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads; batch "
        f"{args.batch} x {args.seq} tokens with labels (the model's own shifted loss)",
        "- loop: `out = model(**batch); out.loss.backward()` (the output, logits included, "
        "alive through backward), gradients set to None before each step",
        f"- plain step: peak {plain.peak_bytes / 2**20:.1f} MiB = held "
        f"{held / 2**20:.1f} MiB (parameters, sample) + activations "
        f"{activation / 2**20:.1f} MiB; one logits tensor is "
        f"{args.batch * args.seq * args.vocab * 4 / 2**20:.1f} MiB",
        "- memfit rows: one profile (`exact=False`, options auto, "
        f"{args.repeats} timed round), the last stage's menu cut per row; the floor is the "
        "planner's smallest feasible budget, planned, applied and verified (`memfit.verify`)",
        "",
        "| row | smallest feasible peak MiB | vs HF full recompute | activations (of plain) "
        "| measured MiB | pred. error | gradients | <post> runs as |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| none (plain step) | {plain.peak_bytes / 2**20:.1f} | "
        f"{plain.peak_bytes / hf.peak_bytes - 1:+.1%} | 100.0% | {plain.peak_bytes / 2**20:.1f} "
        "| | | keep |",
        f"| HF full recompute (`gradient_checkpointing_enable()`) | {hf.peak_bytes / 2**20:.1f} "
        f"| +0.0% | {(hf.peak_bytes - held) / activation:.1%} | {hf.peak_bytes / 2**20:.1f} | | "
        "| keep |",
    ]
    for label, row_profile in rows:
        plan = floor_plan(row_profile)
        memfit.apply(model, plan)
        try:
            check = memfit.verify(model, sample, repeats=1)
        finally:
            memfit.remove(model)
        if check.exact:
            grads = "bit-identical" if check.gradients_equal and check.loss_equal else "DIFFER"
        else:
            grads = (
                f"to rounding: max rel. error {check.gradient_error:.1e} (loss "
                f"{check.loss_error:.1e})"
            )
        floor = plan.predicted_peak_bytes
        line = (
            f"| {label} | {floor / 2**20:.1f} | {floor / hf.peak_bytes - 1:+.1%} | "
            f"{(floor - held) / activation:.1%} | {check.measured_peak_bytes / 2**20:.1f} | "
            f"{check.prediction_error:+.2%} | {grads} | {plan.options['<post>']} |"
        )
        say(line)
        lines.append(line)
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
