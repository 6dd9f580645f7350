"""memfit + torch.compile against torch.compile's own ``activation_memory_budget``, side by side.

Rows, each a copy of one model, all measured in this one run:

* eager: no compile, no plan (the reference for memory and time);
* compile: ``torch.compile(model)`` (whole model, inductor) with ``activation_memory_budget``
  at 1.0 (the default) and each of ``--knob`` (compile's own knob: a fraction of the saved
  bytes its partitioner may keep);
* compile per block: each block's ``block.compile()`` (what memfit's compiled plans run);
* memfit + compile: ``memfit.auto(model, sample, budget=b, compile={"backend": "inductor"})``
  for each ``--budgets`` (blocks compiled, profiled compiled, checkpoints around them).

Memory: step peak from memfit's meter (CPU: every allocation, to the byte) and the activation
part (peak minus what is held before the step), as a share of eager's. Time: ``--repeats``
rounds; in each, every row's timed step is paired with an eager step right after it, and a
row's figure is the median of its paired ratios (the machine's speed drifts; a pair sees the
same drift). Gradients: ``torch.equal`` against the compile per block row (the same compiled
block code) and the largest difference from the whole-model compile.

    .venv/bin/python benchmarks/bench_compile.py --model gpt --budgets 70%,50%,30%,20%
    .venv/bin/python benchmarks/bench_compile.py --model hf-gpt2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config

import memfit
from common import header
from memfit.errors import InfeasibleBudgetError
from memfit.measuring.run import time_step
from memfit.models import build, describe
from memfit.verbs.verification import seeded_gradients

HERE = Path(__file__).parent
COMPILE = {"backend": "inductor"}


@dataclass
class Row:
    label: str
    model: Any  # what is called: the model, or torch.compile's wrapper of it
    predicted_peak_bytes: int | None = None
    peak_bytes: int = 0
    activation_bytes: int = 0
    ratios: list[float] | None = None
    grads_equal: bool | None = None
    max_diff: float | None = None
    plan: str = ""
    setup_s: float = 0.0


def build_model(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str]:
    if name == "gpt":
        model, sample = build(
            "gpt",
            layers=args.layers,
            width=args.width,
            seq=args.seq,
            batch=args.batch,
            dropout=args.dropout,
        )
        text = f"{describe(model)}, {args.batch} x {args.seq} tokens, dropout {args.dropout:g}"
        return model, sample, text
    from memfit.integrations.hf import build_hf

    model, sample = build_hf(
        "gpt2",
        layers=args.layers,
        hidden=args.width,
        heads=4,
        seq=args.seq,
        batch=args.batch,
        vocab=args.vocab,
    )
    text = (
        f"Hugging Face GPT2LMHeadModel (library defaults: dropout 0.1, sdpa), {args.layers} "
        f"layers, width {args.width}, vocabulary {args.vocab}, {args.batch} x {args.seq} tokens"
    )
    return model, sample, text


class InductorWithKnob:
    """Inductor with ``activation_memory_budget`` set while it compiles (the partitioner reads
    it then). One object per knob: Dynamo's cache entries match their backend, so a copy of the
    model compiled under another knob never reuses these graphs (with the plain "inductor"
    string every copy shared the first copy's graph, whatever the knob)."""

    def __init__(self, knob: float) -> None:
        self.knob = knob

    def __call__(self, graph: Any, example_inputs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx

        with (
            torch._functorch.config.patch(
                activation_memory_budget=self.knob, enable_autograd_cache=False
            ),
            torch._inductor.config.patch(fx_graph_cache=False),
        ):
            return compile_fx(graph, example_inputs)


def warm(row: Row, sample: Any) -> None:
    started = time.perf_counter()
    for _ in range(2):
        time_step(row.model, sample)
    row.setup_s += time.perf_counter() - started


def gradients(model: torch.nn.Module, sample: Any) -> dict[str, torch.Tensor]:
    """Seeded gradients by parameter name (torch.compile's wrapper's prefix removed)."""
    _, grads = seeded_gradients(model, sample, None, 0)
    return {
        name.removeprefix("_orig_mod."): grad for name, grad in grads.items() if grad is not None
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["gpt", "hf-gpt2"], default="gpt")
    parser.add_argument("--budgets", default="70%,50%,30%,20%")
    parser.add_argument("--knob", default="0.5,0.3,0.1")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dropout", type=float, default=0.1, help="built-in GPT only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or str(HERE / "results" / f"compile-{args.model}-{date.today()}.md")
    # every row compiles the same forward code again (another model, another knob)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    base, sample, text = build_model(args.model, args)
    say("\n".join(header("CPU; compile backend inductor (C++/OpenMP kernels)")))

    rows = [Row("eager", copy.deepcopy(base))]
    knobs = [1.0, *(float(k) for k in args.knob.split(","))]
    for knob in knobs:
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend=InductorWithKnob(knob))
        row = Row(f"compile, activation_memory_budget {knob:g}", compiled)
        warm(row, sample)
        rows.append(row)
        say(f"{row.label}: compiled in {row.setup_s:.0f} s")
    per_block = Row("compile per block (block.compile())", copy.deepcopy(base))
    blocks = per_block.model.blocks if args.model == "gpt" else per_block.model.transformer.h
    for block in blocks:
        block.compile(**COMPILE)
    warm(per_block, sample)
    rows.append(per_block)
    say(f"{per_block.label}: compiled in {per_block.setup_s:.0f} s")
    for budget in args.budgets.split(","):
        model = copy.deepcopy(base)
        started = time.perf_counter()
        try:
            plan = memfit.auto(model, sample, budget=budget, repeats=3, compile=COMPILE)
        except InfeasibleBudgetError as error:
            say(f"memfit {budget}: {error}")
            rows.append(Row(f"memfit {budget} + compile: infeasible", None, plan=str(error)))
            continue
        row = Row(f"memfit {budget} + compile", model)
        row.setup_s = time.perf_counter() - started
        row.predicted_peak_bytes = plan.predicted_peak_bytes
        counts: dict[str, int] = {}
        for option in plan.options.values():
            counts[option] = counts.get(option, 0) + 1
        row.plan = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        warm(row, sample)
        rows.append(row)
        say(f"{row.label}: profiled, planned, compiled in {row.setup_s:.0f} s ({row.plan})")
    live = [row for row in rows if row.model is not None]

    for row in live:  # memory, each after its warm-up
        measurement = memfit.measure(row.model, sample, repeats=1)
        row.peak_bytes, row.activation_bytes = measurement.peak_bytes, measurement.activation_bytes
    per_block_grads = gradients(per_block.model, sample)
    whole_grads = gradients(rows[1].model, sample)
    for row in live:
        grads = gradients(row.model, sample)
        row.grads_equal = grads.keys() == per_block_grads.keys() and all(
            torch.equal(grads[name], g) for name, g in per_block_grads.items()
        )
        row.max_diff = max((grads[name] - g).abs().max().item() for name, g in whole_grads.items())
    reference = rows[0]
    for row in live:
        row.ratios = []
    for round_index in range(args.repeats):
        for row in live:
            planned = time_step(row.model, sample)
            row.ratios.append(planned / time_step(reference.model, sample))  # type: ignore[union-attr]
        say(f"round {round_index + 1}/{args.repeats}")

    eager = reference
    lines = [
        f"# memfit + torch.compile vs compile's activation_memory_budget: {args.model} "
        f"({date.today()})",
        "",
        *header("CPU; compile backend inductor (C++/OpenMP kernels)"),
        f"- model: {text}",
        f"- eager step: peak {eager.peak_bytes / 2**20:.1f} MiB, activations "
        f"{eager.activation_bytes / 2**20:.1f} MiB",
        f"- timing: {args.repeats} rounds over all rows; each timed step paired with an eager "
        "step right after it; time = median of the paired ratios - 1 (all in this one run)",
        "- memory: memfit's CPU meter, one step after two warm-up steps; activation = step peak "
        "minus what is held before the step (parameters, sample)",
        "- grads: `torch.equal` to the compile-per-block row on every parameter (the same compiled "
        "block code memfit runs); max |diff| against the whole-model compile (knob 1.0): with "
        "dropout on, compiled graphs draw their own random numbers, so a different graph "
        "(eager, per block, whole model) means different dropout masks",
        "",
        "| run | activation MiB | % of eager activation | step peak MiB | predicted peak | "
        "time vs eager | grads = per-block compile | max diff vs compile | plan | setup s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row.model is None:
            lines.append(f"| {row.label} | | | | | | | | {row.plan[:160]} | |")
            continue
        assert row.ratios is not None
        predicted = ""
        if row.predicted_peak_bytes is not None:
            error = row.predicted_peak_bytes / row.peak_bytes - 1
            predicted = f"{row.predicted_peak_bytes / 2**20:.2f} MiB ({error * 100:+.2f}%)"
        lines.append(
            f"| {row.label} | {row.activation_bytes / 2**20:.2f} | "
            f"{row.activation_bytes / eager.activation_bytes:.1%} | "
            f"{row.peak_bytes / 2**20:.2f} | {predicted} | "
            f"{(statistics.median(row.ratios) - 1) * 100:+.1f}% | "
            f"{'yes' if row.grads_equal else 'no'} | {row.max_diff:.2e} | {row.plan} | "
            f"{row.setup_s:.0f} |"
        )
    result = "\n".join(lines) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
