"""Shape-following plans on a stream of random lengths, against the static plan for the longest.

A Hugging Face GPT-2 config (library defaults: SDPA, dropout, KV cache) is profiled at nine
small shapes (batch 1-2, seq 32-256, and 1 x 512: the same tokens at a longer seq, as
``memfit.profile_shapes``'s default shapes add), its costs fitted to the shape, and planned dynamically
(``memfit.auto(..., shapes="dynamic")``) for a fixed budget in bytes. A stream of batches of
random lengths 64-1024 then runs; per step it records the predicted and measured (CPU meter)
peaks, the predicted and measured step times, whether the plan switched, and whether the loss
and every gradient are bit-identical to the unplanned model's. Every step is timed paired with
the static plan (made from the same fits for the longest length, the plan a user without
shape-following plans must run) on the same batch, in alternating order; the total-time ratio
is the sum of dynamic step times over the sum of static ones, measured side by side. Each
measured peak is fed back to the plans (``ShapePlans.observe``), as the allocator's counter is
on CUDA: a step above its prediction widens the margin for the next ones.

    .venv/bin/python benchmarks/bench_shapes.py --steps 20
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

import memfit
from common import add_threads, header, write_results
from memfit.integrations.hf import build_hf
from memfit.measuring.sample_shapes import resize_sample
from memfit.planning.baselines import keep_all
from memfit.planning.shape_fits import Shape
from memfit.planning.simulate import simulate
from memfit.planning.solve import min_peak_bytes
from memfit.runtime.apply import apply_plan, chain_of_plan
from memfit.runtime.dynamic import shape_plans
from memfit.verbs.verification import mismatched_gradients, seeded_gradients

HERE = Path(__file__).parent


def cpu_step(model: torch.nn.Module, batch: dict) -> float:
    """CPU seconds of one training step (gradients reset, the collector off during it): the
    process's own work, which another process's load on the shared machine enters far less
    than wall time (the first run timed wall seconds: steps of the same shape 1.5-2x apart)."""
    model.zero_grad(set_to_none=True)
    gc.disable()
    try:
        start = time.process_time()
        model(**batch).loss.backward()
        return time.process_time() - start
    finally:
        gc.enable()


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--shortest", type=int, default=64)
    parser.add_argument("--longest", type=int, default=1024)
    parser.add_argument("--budget-share", type=float, default=0.35)
    parser.add_argument("--bucket", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    add_threads(parser)
    parser.add_argument("--out", default=str(HERE / "results" / f"shapes-{date.today()}.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    torch.set_num_threads(args.threads)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    say("\n".join(header("CPU (memory from memfit's CPU meter, to the byte)")))

    model, sample = build_hf(
        "gpt2", layers=args.layers, hidden=args.width, heads=4, seq=args.longest, batch=2
    )
    twin = copy.deepcopy(model)  # unplanned, same weights: the gradients' reference
    # a grid and, as memfit's default shapes do, its largest tokens at twice the seq
    profiled = [*((b, s) for b in (1, 2) for s in (32, 64, 128, 256)), (1, 512)]
    say(f"profiling at {profiled}")
    shaped = memfit.profile_shapes(model, sample, shapes=profiled, repeats=3)
    longest = Shape(args.batch, args.longest)
    costs = shaped.fitted.costs_at(longest)
    floor = min_peak_bytes(costs)
    plain = simulate(costs, keep_all(costs)).peak_bytes
    budget = int(floor + args.budget_share * (plain - floor))
    memfit.auto(
        model, sample, budget=budget, shapes="dynamic", bucket=args.bucket,
        seq_range=(args.shortest, args.longest), shape_profile=shaped,
    )  # fmt: skip
    plans = shape_plans(model)
    assert plans is not None
    static_plan = plans.plan_for(longest)
    static = copy.deepcopy(twin)
    apply_plan(static, chain_of_plan(static, static_plan), static_plan)

    for warm in (model, static, twin):  # one untimed step each: first-touch page faults
        cpu_step(warm, resize_sample(sample, longest))
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.shortest, args.longest) for _ in range(args.steps)]
    rows = []
    for step, seq in enumerate(lengths):
        shape = Shape(args.batch, seq)
        batch = resize_sample(sample, shape)
        switches = plans.switches
        loss, grads = seeded_gradients(model, batch, None, step)
        reference_loss, reference = seeded_gradients(twin, batch, None, step)
        equal = torch.equal(loss, reference_loss) and not mismatched_gradients(reference, grads)
        measured = memfit.measure(model, batch, repeats=1, warmup=0).peak_bytes
        static_peak = memfit.measure(static, batch, repeats=1, warmup=0).peak_bytes
        record = plans.steps[-1]
        margin = plans.margin
        # the feedback CUDA gets from the allocator's counter, fed here from the CPU meter
        plans.observe(measured, record)
        dynamic_s, static_s = [], []
        for turn in range(4):  # dynamic, static, static, dynamic
            first = turn in (0, 3)
            (dynamic_s if first else static_s).append(cpu_step(model if first else static, batch))
        # the fits' seconds are wall seconds at the profile's wall/CPU factor: back to CPU
        predicted_s = (
            simulate(shaped.fitted.costs_at(shape), plans.plan_for(shape).tree).step_s
            / shaped.wall_per_cpu
        )
        rows.append(
            dict(
                step=step,
                seq=seq,
                bucket=record.bucket.seq,
                switched=plans.switches > switches,
                margin=margin,
                predicted=record.predicted_peak_bytes,
                measured=measured,
                static_peak=static_peak,
                predicted_s=predicted_s,
                dynamic_s=statistics.median(dynamic_s),
                static_s=statistics.median(static_s),
                equal=equal,
            )
        )
        say(f"step {step}: seq {seq}, peak {mib(measured)} MiB, budget {mib(budget)}")

    total_dynamic = sum(r["dynamic_s"] for r in rows)
    total_static = sum(r["static_s"] for r in rows)
    errors = [r["predicted"] / r["measured"] - 1 for r in rows]
    time_errors = [r["predicted_s"] / r["dynamic_s"] - 1 for r in rows]
    fit = shaped.fitted.summary()
    lines = [
        f"# Shape-following plans on a stream of random lengths ({date.today()})",
        "",
        *header("CPU (memory from memfit's CPU meter, to the byte)"),
        f"- model: Hugging Face GPT-2 config (build_hf, library defaults), {args.layers} layers, "
        f"width {args.width}, 4 heads, vocabulary 256; batches of {args.batch} x "
        f"{args.shortest}-{args.longest} tokens (uniform, seed {args.seed}), {args.steps} steps",
        f"- profiled at {len(fit['profiled_shapes'])} shapes {fit['profiled_shapes']} in "
        f"{shaped.profile_s:.1f} s; {fit['exact_byte_figures']}/{fit['byte_figures']} byte "
        f"figures fit exactly; extrapolation check {fit['holdout_error']:+.3%}",
        f"- budget {mib(budget)} MiB of step peak (fixed): the smallest feasible peak at "
        f"{longest} plus {args.budget_share:.0%} of the way to its plain step "
        f"({mib(floor)} -> {mib(plain)} MiB); buckets of {args.bucket} tokens, margin "
        f"{plans.margin:.0%}",
        f"- static plan: made from the same fits for {longest}, applied to every step",
        "- timing: CPU seconds of each step, timed twice per plan in the order dynamic, static, "
        "static, dynamic (medians); totals are sums over the stream, measured side by side; "
        "predicted times are the fits' (wall seconds at the profile's wall/CPU factor "
        f"{shaped.wall_per_cpu:.2f}) over that factor",
        "",
        "## Reading",
        "",
        f"- every step within budget: {all(r['measured'] <= budget for r in rows)} (the "
        f"static plan: {sum(r['static_peak'] <= budget for r in rows)} of {len(rows)} steps, "
        f"its largest peak {mib(max(r['static_peak'] for r in rows))} MiB); loss and "
        f"gradients bit-identical to the unplanned model on every step: "
        f"{all(r['equal'] for r in rows)}",
        f"- predicted peak vs measured: error {min(errors):+.2%} to {max(errors):+.2%} "
        f"(median {statistics.median(errors):+.2%})",
        f"- predicted step time vs measured: error {min(time_errors):+.1%} to "
        f"{max(time_errors):+.1%} (median {statistics.median(time_errors):+.1%})",
        f"- plan switches: {sum(r['switched'] for r in rows)} in {args.steps} steps; "
        f"{len(plans.plans)} bucket plans held at the end, each made in milliseconds from the "
        f"fits; margin {rows[0]['margin']:.1%} at the start, {plans.margin:.1%} at the end "
        f"(each measured peak fed back with ShapePlans.observe, as CUDA's counter does)",
        f"- total time: dynamic {total_dynamic:.2f} s, static {total_static:.2f} s: "
        f"ratio {total_dynamic / total_static:.3f} ({(total_dynamic / total_static - 1):+.1%})",
        "",
        "| step | seq | bucket | switched | margin | predicted MiB | measured MiB | error | "
        "within budget | predicted ms | dynamic ms | static ms | grads equal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['seq']} | {r['bucket']} | {'yes' if r['switched'] else ''} | "
            f"{r['margin']:.1%} | "
            f"{mib(r['predicted'])} | {mib(r['measured'])} | "
            f"{r['predicted'] / r['measured'] - 1:+.2%} | "
            f"{'yes' if r['measured'] <= budget else 'NO'} | {r['predicted_s'] * 1e3:.0f} | "
            f"{r['dynamic_s'] * 1e3:.0f} | {r['static_s'] * 1e3:.0f} | "
            f"{'yes' if r['equal'] else 'NO'} |"
        )
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
