"""memfit against the usual checkpointing strategies on the built-in GPT, measured side by side.

Rows: no checkpointing, HF-style full per-block recompute (``all``), every 2nd block (Megatron /
DeepSpeed's knob), Chen's sqrt(n) segments, memfit's optimal plan without selective options, and
memfit's optimal plan with them, at several budgets. Every row is run for real: measured peak
(CPU meter), gradients compared bit for bit, step times interleaved with every other row
(medians over ``--repeats``). Results go to ``benchmarks/results/gpt-<date>.md``.

    .venv/bin/python benchmarks/bench_gpt.py --budgets 30%,50%,70%

On a GPU (``benchmarks/gpu_check.sh``), sizes and rows are chosen on the command line, and
``--hf llama`` runs a Hugging Face config (library defaults) instead of the built-in GPT:

    python3 benchmarks/bench_gpt.py --device cuda --layers 12 --width 1024 --seq 1024 \
        --strategies none,all,all+offload,optimal-no-offload,optimal
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import memfit
from common import header, write_results
from memfit.models import build, describe
from memfit.verbs.bench import bench

HERE = Path(__file__).parent


# how the memory column was measured, on each device
MEMORY = "(memory from memfit's meter: the CPU allocator's events, or CUDA's caching allocator's)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="30%,50%,70%")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--hf", default=None, help="a Hugging Face family (llama, gpt2...)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--strategies", default="none,all,every:2,sqrt,optimal-recompute,optimal")
    parser.add_argument("--out", default=str(HERE / "results" / f"gpt-{date.today()}.md"))
    args = parser.parse_args(argv)
    sizes = {
        key: value
        for key, value in (
            ("layers", args.layers),
            ("seq", args.seq),
            ("vocab", args.vocab),
            ("hidden" if args.hf else "width", args.width),
        )
        if value is not None
    }
    if args.hf:
        from memfit.integrations.hf import build_hf

        heads = max(1, (args.width or 64) // 64)
        model, sample = build_hf(args.hf, batch=args.batch, heads=heads, **sizes)
        sample = {key: value.to(args.device) for key, value in sample.items()}
    else:
        model, sample = build("gpt", batch=args.batch, **sizes)
        sample = tuple(t.to(args.device) for t in sample)
    model = model.to(args.device)
    print(
        "\n".join(header(note=MEMORY)),
        file=sys.stderr,
    )
    profile = memfit.profile(model, sample, repeats=args.repeats)
    budgets = [b.strip() for b in args.budgets.split(",")]
    result = bench(
        model,
        sample,
        profile,
        budgets=budgets,
        strategies=[s.strip() for s in args.strategies.split(",")],
        repeats=args.repeats,
        progress=lambda m: print(m, file=sys.stderr),
    )
    m = profile.measurement
    lines = [
        f"# memfit vs checkpointing baselines: {args.hf or 'built-in GPT'}, batch {args.batch} "
        f"({date.today()})",
        "",
        *header(note=MEMORY),
        f"- model: {describe(model)}, batch {args.batch}; sample shapes "
        f"{[tuple(t.shape) for t in (sample.values() if isinstance(sample, dict) else sample)]}",
        f"- host copies: {profile.costs.host_bytes_per_s / 1e9:.1f} GB/s"
        if profile.costs.host_bytes_per_s
        else "- offload: none (no CUDA device)",
        f"- unplanned step: peak {m.peak_bytes / 2**20:.1f} MiB = held "
        f"{m.held_bytes / 2**20:.1f} MiB + gradients {m.gradient_bytes / 2**20:.1f} MiB + activations {m.activation_bytes / 2**20:.1f} MiB",
        f"- timing: {args.repeats} rounds over all rows, each timed step of a row paired with an "
        "unplanned step right after it; overhead = median over rounds of (row step / paired "
        "unplanned step) - 1, all measured in this one run; step ms = the row's median",
        "",
        "| strategy | budget | predicted MiB | measured MiB | pred. error | step ms | overhead "
        "| activation saved | grads bit-identical | plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result.rows:
        if not row.feasible:
            need = row.min_feasible_bytes or 0
            share = (need - m.base_bytes) / m.activation_bytes
            lines.append(
                f"| {row.label} | {row.budget} | infeasible: needs {need / 2**20:.1f} MiB "
                f"(= {share:.1%} of activation memory) | | | | | | | |"
            )
            continue
        plan = memfit.Plan.from_dict(row.plan or {})
        counts: dict[str, int] = {}
        for option in plan.options.values():
            key = option.split("=")[0]
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        lines.append(
            f"| {row.label} | {row.budget} | {row.predicted_peak_bytes / 2**20:.1f} | "
            f"{row.measured_peak_bytes / 2**20:.1f} | {row.prediction_error * 100:+.2f}% | "
            f"{row.step_s * 1e3:.0f} | {row.overhead * 100:+.1f}% | "
            f"{row.memory_saved * 100:.1f}% | {'yes' if row.gradients_equal else 'NO'} | "
            f"{summary} |"
        )
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
