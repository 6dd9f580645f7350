"""Predicted vs measured step time at shapes 2x and 4x the profiled tokens (``memfit.estimate``).

For each Hugging Face config (GPT-2, Llama, BERT; ``build_hf``, library defaults: dropout on,
SDPA where the library picks it), ``memfit.estimate`` profiles the model at its default shapes
for a sample of ``batch x seq`` (``memfit.verbs.shape_profiles.default_profile_shapes``: batches B/2, B by
seqs S/8..S, and the sample's tokens at longer seqs, B/2 x 2S ... down to batch 1) and predicts
the step time at shapes with 2x the sample's tokens (2B x S, B x 2S) and 4x (4B x S, 2B x 2S,
B x 4S), with no plan and with the plan for ``--budget``. No profiled shape has more tokens
than the sample. Each shape is then run: the plain model and the planned copy in turns (plain,
planned, planned, plain, ...), medians of ``--repeats`` steps each, wall seconds (what a user
waits) and the process's CPU seconds beside them. Errors are predicted / measured - 1.

The prediction is in wall seconds at the wall/CPU factor seen while profiling (other processes'
load); the "CPU" column holds the prediction against the measured CPU seconds times that
same factor, which takes out a change in the machine's load between profiling and measuring.
Steps are timed as a training loop runs them: no ``gc.collect()`` before each (measured: it
added 1.5 ms to a 4 ms BERT step at 1 x 16 and 3.5 ms to an 18 ms GPT-2 step at 2 x 128, the
collector's walk over 370k Python objects evicting the caches; the first version of this
benchmark did it, and charged it to the measured side).

    .venv/bin/python benchmarks/bench_estimate.py --runs 3   # about 1 minute a run on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

import memfit
from common import add_threads, header, write_results
from memfit.integrations.hf import build_hf
from memfit.measuring.sample_shapes import resize_sample
from memfit.planning.shape_fits import Shape
from memfit.runtime.apply import apply_plan, chain_of_plan

HERE = Path(__file__).parent


def timed(model: torch.nn.Module, batch: dict) -> tuple[float, float]:
    """Wall and CPU seconds of one training step (gradients reset, collector off during it;
    not run before it, see the module docstring)."""
    model.zero_grad(set_to_none=True)
    gc.disable()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        model(**batch).loss.backward()
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.enable()


def measure_run(args: argparse.Namespace, say: Any) -> tuple[list[dict], dict]:
    """One run: every architecture profiled, estimated and measured at the targets."""
    b, s = args.batch, args.seq
    rows: list[dict] = []
    fits: dict = {}
    load = os.getloadavg()[0]
    for arch in args.archs.split(","):
        model, big = build_hf(
            arch, layers=args.layers, hidden=args.width, heads=args.heads, seq=4 * s, batch=4 * b
        )
        sample = resize_sample(big, Shape(b, s))
        est = memfit.estimate(
            model,
            sample,
            shapes=[t for _, t in targets(b, s)],
            budget=args.budget,
            options=(),
            repeats=args.profile_repeats,
        )
        shaped = est.shaped
        fits[arch] = (shaped, shaped.fitted.summary(), load)
        assert max(x.tokens for x in shaped.fitted.shapes) == b * s  # 2x and 4x are honest
        say(f"{arch}: profiled in {shaped.profile_s:.1f} s, {fits[arch][1]['time_basis']}")
        factor = shaped.wall_per_cpu
        for (times, shape), row in zip(targets(b, s), est.rows, strict=True):
            batch = resize_sample(big, shape)
            assert row.plan is not None
            twin = copy.deepcopy(model)
            apply_plan(twin, chain_of_plan(twin, row.plan), row.plan)
            runs: dict[str, list[tuple[float, float]]] = {"plain": [], "planned": []}
            timed(model, batch), timed(twin, batch)  # warm-up: first-touch pages
            for turn in range(2 * args.repeats):  # plain, planned, planned, plain, ...
                way = "plain" if turn % 4 in (0, 3) else "planned"
                runs[way].append(timed(model if way == "plain" else twin, batch))
            del twin
            out = dict(arch=arch, shape=shape, times=times, untrusted=row.step_untrusted)
            for way, predicted in (("plain", row.step_s), ("planned", row.plan.predicted_step_s)):
                wall = statistics.median(w for w, _ in runs[way])
                cpu = statistics.median(c for _, c in runs[way])
                out[way] = (predicted, wall, predicted / wall - 1, predicted / (cpu * factor) - 1)
            rows.append(out)
            say(f"  {shape}: {out['plain']}, {out['planned']}")
    return rows, fits


def targets(b: int, s: int) -> list[tuple[int, Shape]]:
    return [
        (2, Shape(2 * b, s)),
        (2, Shape(b, 2 * s)),
        (4, Shape(4 * b, s)),
        (4, Shape(2 * b, 2 * s)),
        (4, Shape(b, 4 * s)),
    ]


def pct(values: list[float]) -> str:
    return f"median {statistics.median(values):+.1%}, {min(values):+.1%} to {max(values):+.1%}"


def reading(rows: list[dict]) -> list[str]:
    lines = []
    for times in (2, 4):
        for way in ("plain", "planned"):
            chosen = [r for r in rows if r["times"] == times]
            wall = [r[way][2] for r in chosen]
            cpu = [r[way][3] for r in chosen]
            lines.append(
                f"- {times}x the tokens, {way}: wall {pct(wall)} "
                f"({sum(abs(e) <= 0.15 for e in wall)}/{len(wall)} within 15%); CPU {pct(cpu)} "
                f"({sum(abs(e) <= 0.15 for e in cpu)}/{len(cpu)} within 15%)"
            )
    return lines


def run_section(number: int, rows: list[dict], fits: dict) -> list[str]:
    lines = [
        f"## Run {number}",
        "",
        "| model | time basis | time holdout | wall/CPU while profiling | load average | "
        "profile s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arch, (shaped, fit, load) in fits.items():
        holdout = fit["time_holdout_error"]
        lines.append(
            f"| {arch} | {fit['time_basis']} | "
            f"{'-' if holdout is None else f'{holdout:+.1%}'} | {shaped.wall_per_cpu:.2f} | "
            f"{load:.1f} | {shaped.profile_s:.1f} |"
        )
    lines += ["", *reading(rows), ""]
    lines += [
        "| model | shape | tokens | plain predicted ms | measured ms | error | CPU error | "
        "planned predicted ms | measured ms | error | CPU error | time trust |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = []
        for way in ("plain", "planned"):
            predicted, wall, error, cpu_error = r[way]
            cells += [
                f"{predicted * 1e3:.1f}",
                f"{wall * 1e3:.1f}",
                f"{error:+.1%}",
                f"{cpu_error:+.1%}",
            ]
        trust = "; ".join(r["untrusted"]) or "yes"
        lines.append(
            f"| {r['arch']} | {r['shape']} | {r['times']}x | {' | '.join(cells)} | {trust} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default="gpt2,llama,bert")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument(
        "--profile-repeats", type=int, default=3, help="memfit.profile's repeats per shape"
    )
    parser.add_argument("--runs", type=int, default=1, help="whole runs, one after another")
    add_threads(parser)
    parser.add_argument("--out", default=str(HERE / "results" / f"estimate-{date.today()}-2.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    torch.set_num_threads(args.threads)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    say("\n".join(header()))
    b, s = args.batch, args.seq
    runs = [measure_run(args, say) for _ in range(args.runs)]
    profiled = ", ".join(str(x) for x in sorted(next(iter(runs[0][1].values()))[0].fitted.shapes))
    every = [row for rows, _fits in runs for row in rows]
    lines = [
        f"# Step time predicted at 2x and 4x the profiled tokens ({date.today()})",
        "",
        *header(),
        f"- models: Hugging Face configs (build_hf, library defaults) {args.archs}, "
        f"{args.layers} layers, width {args.width}, {args.heads} heads, vocabulary 256",
        f"- profiled by memfit.estimate's defaults for a {b} x {s} sample ({profiled}; "
        f"{args.profile_repeats} timed steps per way, twice that at the larger half, keep and "
        f"recompute; then the plain step at every shape in {2 * args.profile_repeats + 1} "
        f"rounds); estimated at {', '.join(str(t) for _, t in targets(b, s))}; plans for "
        f"{args.budget}",
        f"- measured: plain and planned steps in turns, {args.repeats} each, medians; error "
        "= predicted / measured - 1 (wall); 'CPU' = against the measured CPU seconds times "
        "the profile's wall/CPU factor (takes out a change of load since profiling)",
        "",
        f"## All {len(runs)} run(s) together",
        "",
        *reading(every),
        "",
    ]
    for number, (rows, fits) in enumerate(runs, 1):
        lines += run_section(number, rows, fits)
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
