"""The eager frontier on Hugging Face configs: memfit before and after ``rebuild+ops`` and the
``<post>`` options (``head:lean-loss``; the opt-in ``head:chunked`` is not in the menu here).

Rows per model: no checkpointing, per-block full recompute (``all``: what Hugging Face's
``gradient_checkpointing_enable()`` does), memfit's optimal plan from a menu without ``rebuild+ops``
(memfit before op chains and head options), and with them, at 30%, 50%, 70% of activation
memory and at the per-block recompute's own peak; ``--frontier N`` also times N points of
memfit's frontier side by side, to check that time falls as memory grows; ``--candidates N``
(default 4) adds rows whose plan was chosen by timing up to N plans within the budget
(``memfit.plan(..., candidates=N)``), measured again side by side with the others. Models are
built with the library's defaults (``memfit.integrations.hf.build_hf``: dropout on, default
attention; ``--vocab default``: each config's own vocabulary too). Every row is measured
for real: peak (CPU meter), gradients bit for bit, step time paired with an unplanned step
(medians of ratios). Results go to ``benchmarks/results/eager-<date>.md``.

    .venv/bin/python benchmarks/bench_eager.py --models gpt2,llama,bert --frontier 6
    .venv/bin/python benchmarks/bench_eager.py --vocab default --frontier 6
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from datetime import date
from pathlib import Path
from typing import Any

import memfit
from common import header, write_results
from memfit.integrations.hf import build_hf
from memfit.planning.frontier import frontier
from memfit.planning.solve import solve
from memfit.runtime import REBUILD_OPS
from memfit.verbs.bench import BenchRow, bench

HERE = Path(__file__).parent


def summary(row: BenchRow) -> str:
    return memfit.Plan.from_dict(row.plan or {}).summary


def table(rows: list[tuple[str, BenchRow]], held: int, activation: int) -> list[str]:
    lines = [
        "| row | budget | predicted MiB | measured MiB | activation saved | overhead "
        "| grads bit-identical | plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in rows:
        if not row.feasible:
            need = row.min_feasible_bytes or 0
            lines.append(
                f"| {label} | {row.budget} | infeasible: floor {need / 2**20:.1f} MiB "
                f"({(need - held) / activation:.1%}) | | | | | |"
            )
            continue
        lines.append(
            f"| {label} | {row.budget} | {row.predicted_peak_bytes / 2**20:.1f} | "
            f"{row.measured_peak_bytes / 2**20:.1f} | {row.memory_saved:.1%} | "
            f"{row.overhead:+.1%} | {'yes' if row.gradients_equal else 'NO'} | {summary(row)} |"
        )
    return lines


def run(arch: str, args: argparse.Namespace) -> list[str]:
    model, sample = build_hf(
        arch,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        seq=args.seq,
        batch=args.batch,
        vocab=vocabulary(arch, args.vocab),
    )
    budgets = [b.strip() for b in args.budgets.split(",")]
    after = memfit.profile(model, sample, repeats=args.repeats)
    # memfit before issue 15: the same profile, its menus without rebuild+ops and head:*
    stages = [
        dataclasses.replace(
            stage,
            options={
                k: v
                for k, v in stage.options.items()
                if k != REBUILD_OPS and not k.startswith("head:")
            },
        )
        for stage in after.costs.stages
    ]
    before = dataclasses.replace(after, costs=dataclasses.replace(after.costs, stages=stages))
    hf_peak = solve(before.costs, None, "all").predicted_peak_bytes
    old = bench(
        model,
        sample,
        before,
        budgets=[*budgets, str(hf_peak)],
        strategies=("none", "all", "optimal"),
        repeats=args.repeats,
        progress=lambda m: print(arch, "before:", m, file=sys.stderr),
    )
    new = bench(
        model,
        sample,
        after,
        budgets=[*budgets, str(hf_peak)],
        strategies=("optimal", "optimal-timed") if args.candidates > 1 else ("optimal",),
        repeats=args.repeats,
        progress=lambda m: print(arch, "after:", m, file=sys.stderr),
        candidates=args.candidates,
    )
    m = before.measurement
    rows: list[tuple[str, BenchRow]] = []
    for row in old.rows:
        name = {"none": "none", "all": "per-block recompute (HF)", "optimal": "memfit before"}
        label = name[row.strategy]
        rows.append((label, row if row.budget != str(hf_peak) else _at_hf(row)))
    after_names = {"optimal": "memfit after", "optimal-timed": "memfit after, timed"}
    rows += [
        (after_names[row.strategy], row if row.budget != str(hf_peak) else _at_hf(row))
        for row in new.rows
    ]
    lines = [
        f"## {arch}",
        "",
        f"- vocabulary {vocabulary(arch, args.vocab)}",
        f"- unplanned step: peak {m.peak_bytes / 2**20:.1f} MiB = held {m.held_bytes / 2**20:.1f}"
        f" MiB + gradients {m.gradient_bytes / 2**20:.1f} MiB + activations {m.activation_bytes / 2**20:.1f} MiB; step {old.baseline_step_s * 1e3:.0f} ms",
        "",
        *table(rows, m.base_bytes, m.activation_bytes),
        "",
    ]
    if args.frontier:
        lines += frontier_rows(model, sample, after, args)
    return lines


def frontier_rows(model: Any, sample: Any, prof: Any, args: argparse.Namespace) -> list[str]:
    """memfit's frontier measured: each point's plan run at its own peak, timed side by side;
    the measured time should fall as the budget grows."""
    points = frontier(prof.costs, points=args.frontier)
    result = bench(
        model,
        sample,
        prof,
        budgets=[str(point.peak_bytes) for point in points],
        strategies=("optimal",),
        repeats=args.repeats,
        progress=lambda m: print("frontier:", m, file=sys.stderr),
    )
    m = prof.measurement
    lines = [
        f"Frontier ({len(points)} points, each plan timed side by side with the others):",
        "",
        "| activation share | predicted MiB | measured MiB | predicted overhead | measured "
        "overhead | plan |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    measured = []
    for row in sorted(result.rows, key=lambda r: r.predicted_peak_bytes or 0):
        if not row.feasible:
            continue
        predicted = (row.predicted_step_s or 0) / m.step_s - 1 if m.step_s else 0.0
        measured.append(row.overhead)
        share = (row.measured_peak_bytes - m.base_bytes) / m.activation_bytes
        lines.append(
            f"| {share:.1%} | {row.predicted_peak_bytes / 2**20:.1f} | "
            f"{row.measured_peak_bytes / 2**20:.1f} | {predicted:+.1%} | {row.overhead:+.1%} | "
            f"{summary(row)} |"
        )
    rises = [f"{a:+.1%} -> {b:+.1%}" for a, b in itertools.pairwise(measured) if b > a]
    lines += [
        "",
        "Measured time along the frontier (more memory, less time): "
        + ("monotone." if not rises else f"{len(rises)} rise(s): {', '.join(rises)}."),
        "",
    ]
    return lines


def vocabulary(arch: str, vocab: str) -> int:
    """``vocab`` as a size; ``default``: the transformers config's own for ``arch``."""
    if vocab != "default":
        return int(vocab)
    import transformers

    from memfit.integrations.hf_models import FAMILIES

    return int(getattr(transformers, FAMILIES[arch].config)().vocab_size)


def _at_hf(row: BenchRow) -> BenchRow:
    from dataclasses import replace

    return replace(row, budget="HF's peak")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="gpt2,llama,bert")
    parser.add_argument("--budgets", default="30%,50%,70%")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--vocab",
        default="1024",
        help="vocabulary size, or 'default' for each config's own (GPT-2 50257, Llama 32000, "
        "BERT 30522)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--candidates",
        type=int,
        default=4,
        help="also rows whose plan was chosen by timing this many plans within the budget",
    )
    parser.add_argument(
        "--frontier", type=int, default=0, help="also time N points of memfit's frontier"
    )
    parser.add_argument("--out", default=str(HERE / "results" / f"eager-{date.today()}.md"))
    args = parser.parse_args(argv)
    lines = [
        f"# The eager frontier: memfit before and after op-chain rebuild and head options "
        f"({date.today()})",
        "",
        *header(),
        f"- models: Hugging Face configs with library defaults, {args.layers} layers, width "
        f"{args.hidden}, vocab {args.vocab if args.vocab != 'default' else 'the config default'}"
        f", batch {args.batch} x {args.seq} tokens",
        f"- overhead: median over {args.repeats} rounds of (row step / paired unplanned step) - 1",
        "",
    ]
    for arch in args.models.split(","):
        lines += run(arch.strip(), args)
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
