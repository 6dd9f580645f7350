"""Lossy options (``compress:bf16``, ``compress:fp8``) against the exact step: the training
curve, then the overhead at 50% and 30% of activation memory.

Part 1, the training curve. One character-level GPT (the built-in one: dropout on) trains on
text generated from a small grammar (no downloads), from the same seed, the same batches and the
same dropout draws, once unplanned (exact) and once with every block under each lossy option (the
most any plan compresses). The held-out loss is measured every ``--eval-every`` steps in eval
mode; the final losses are compared. An option whose final held-out loss ends more than 1% above
the exact run's is not in the default lossy menu (``memfit.verbs.menu.LOSSY_OPTIONS``).

Part 2, the overhead. On the Hugging Face configs of ``eager-2026-12-02-5.md`` (GPT-2, Llama,
BERT with library defaults; 8 layers, width 256, vocabulary 1,024, 4 x 256 tokens), one profile
with ``exact=False`` gives both menus: the exact one (its lossy options taken out) and the lossy
one. The optimal plans of each at 50% and 30% run interleaved (each round: every plan once, each
paired with an unplanned step), and the medians of the paired ratios are the overheads. Each plan
is verified once: measured peak, and for lossy plans the gradient error and cosine.

    .venv/bin/python benchmarks/bench_lossy.py
    .venv/bin/python benchmarks/bench_lossy.py --skip-overhead --steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
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
from memfit.measuring.chain import find_chain
from memfit.measuring.run import step_clock
from memfit.models import GPT
from memfit.planning.candidates import used_options, without
from memfit.planning.plan import Plan, Stage
from memfit.runtime.apply import chain_of_plan, planned
from memfit.runtime.compress import FORMATS, FP8, compress_log, fp8_halved
from memfit.verbs.menu import LOSSY_OPTIONS

HERE = Path(__file__).parent
LOSSY = tuple(FORMATS)  # every lossy option, default menu or not

# A small grammar: sentences of subjects, verbs, objects and places, with agreement in number.
NOUNS = {
    "s": ["cat", "dog", "bird", "child", "robot", "farmer", "queen"],
    "p": ["cats", "dogs", "birds", "children", "robots", "farmers", "queens"],
}
VERBS = {
    "s": ["sees", "likes", "follows", "paints", "finds"],
    "p": ["see", "like", "follow", "paint", "find"],
}
ADJECTIVES = ["small", "red", "old", "happy", "quiet", "clever"]
PLACES = ["in the garden", "near the river", "on the hill", "under the bridge"]


def noun_phrase(rng: random.Random) -> tuple[str, str]:
    number = rng.choice("sp")
    words = ["the" if number == "s" or rng.random() < 0.5 else "some"]
    words += rng.sample(ADJECTIVES, rng.choice([0, 0, 1, 2]))
    words.append(rng.choice(NOUNS[number]))
    return " ".join(words), number


def sentence(rng: random.Random) -> str:
    subject, number = noun_phrase(rng)
    obj, _ = noun_phrase(rng)
    words = [subject, rng.choice(VERBS[number]), obj]
    if rng.random() < 0.4:
        words.append(rng.choice(PLACES))
    return " ".join(words) + ". "


def corpus(characters: int, seed: int) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < characters:
        parts.append(sentence(rng))
        length += len(parts[-1])
    return "".join(parts)[:characters]


def batch(data: torch.Tensor, seq: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (size,), generator=generator)
    windows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def every_block(model: torch.nn.Module, sample: Any, option: str | None) -> Plan | None:
    """The plan that runs every block with ``option`` (``None``: no plan)."""
    if option is None:
        return None
    chain = find_chain(model, lambda: model(*sample))
    tree = tuple(
        Stage(i, option if chain.block_of_stage(i) is not None else "keep")
        for i in range(len(chain))
    )
    return Plan.from_tree(chain.stage_names, tree, f"every block {option}")


def train(option: str | None, args: argparse.Namespace, text: str, held_out: str) -> dict[str, Any]:
    chars = sorted(set(text + held_out))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text])
    evaluation = torch.tensor([index[c] for c in held_out])
    torch.manual_seed(args.seed)
    model = GPT(
        layers=args.layers, width=args.width, heads=args.heads, vocab=len(chars), seq=args.seq
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    evals = [batch(evaluation, args.seq, args.batch, 10**6 + k) for k in range(args.eval_batches)]
    plan = every_block(model, evals[0], option)
    if plan is not None:
        memfit.apply(model, plan)
    curve: list[tuple[int, float]] = []
    losses: list[float] = []
    started = time.perf_counter()

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            value = statistics.fmean(float(model(*b)) for b in evals)
        model.train()
        curve.append((step, value))

    evaluate(0)
    for step in range(1, args.steps + 1):
        tokens, targets = batch(data, args.seq, args.batch, step)
        torch.manual_seed(args.seed * 7919 + step)  # the same dropout draws in every run
        for group in optimizer.param_groups:  # linear warm-up, then constant
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        loss = model(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    if plan is not None:
        memfit.remove(model)
    return {
        "curve": curve,
        "train": losses,
        "seconds": time.perf_counter() - started,
        "vocab": len(chars),
    }


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        steps, values = zip(*run["curve"], strict=True)
        left.plot(steps, values, label=name, marker=".")
        losses = run["train"]
        smooth = [statistics.fmean(losses[max(0, i - 19) : i + 1]) for i in range(len(losses))]
        right.plot(range(1, len(losses) + 1), smooth, label=name)
    left.set(title="held-out loss", xlabel="step", ylabel="cross-entropy (nats)")
    right.set(title="training loss (mean of the last 20 steps)", xlabel="step")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def training_part(args: argparse.Namespace) -> list[str]:
    text = corpus(args.characters, seed=1)
    held_out = corpus(args.characters // 10, seed=2)
    runs: dict[str, dict[str, Any]] = {}
    for option in (None, *LOSSY):
        name = "exact" if option is None else f"every block {option}"
        print("training:", name, file=sys.stderr)
        runs[name] = train(option, args, text, held_out)
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.with_suffix(".json").write_text(json.dumps(runs))  # the curves, for other plots
    plot(runs, png)
    exact = runs["exact"]["curve"][-1][1]
    start = runs["exact"]["curve"][0][1]
    lines = [
        "## Training curves",
        "",
        f"- data: {args.characters:,} characters generated from a small grammar (subject, verb, "
        f"object, place; number agreement), held-out text from another seed; "
        f"{runs['exact']['vocab']} characters in the vocabulary",
        f"- model: the built-in GPT (dropout 0.1), {args.layers} layers, width {args.width}, "
        f"{args.heads} heads; batch {args.batch} x {args.seq} characters, AdamW lr {args.lr} "
        f"({args.warmup} warm-up steps), gradient clipping 1.0, {args.steps} steps; the same "
        f"initial weights, batches and dropout draws in every run",
        f"- held-out loss: mean over {args.eval_batches} batches in eval mode, every "
        f"{args.eval_every} steps",
        f"- plot: [{png.name}]({png.name})",
        "",
        f"![held-out and training loss]({png.name})",
        "",
        "| run | held-out loss at step 0 | final held-out loss | vs exact | final train loss "
        "(mean of last 20) | seconds | in the default lossy menu |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        final = run["curve"][-1][1]
        difference = final / exact - 1
        last = statistics.fmean(run["train"][-20:])
        option = name.removeprefix("every block ")
        menu = "-"
        if name != "exact":
            belongs = "yes" if difference <= 0.01 else "NO (> 1%)"
            listed = "listed" if option in LOSSY_OPTIONS else "not listed"
            menu = f"{belongs} (menu.LOSSY_OPTIONS: {listed})"
        lines.append(
            f"| {name} | {run['curve'][0][1]:.4f} | {final:.4f} | {difference:+.2%} | "
            f"{last:.4f} | {run['seconds']:.0f} | {menu} |"
        )
    lines += [
        "",
        f"The exact run's held-out loss fell from {start:.3f} to {exact:.3f} "
        f"({exact / start:.1%} of its start).",
        "",
    ]
    return lines


def clocked(model: torch.nn.Module, sample: Any, plan: Plan | None) -> tuple[float, float]:
    """Wall and CPU seconds of one step under ``plan`` (``None``: unplanned), after an untimed
    one. CPU time is what other processes' load enters least (the process's own seconds)."""
    chain = None if plan is None else chain_of_plan(model, plan)
    with planned(model, chain, plan):
        return step_clock(model, sample, warmup=1)


def cast_floor(model: torch.nn.Module, sample: Any, plan: Plan) -> tuple[int, int, float]:
    """What ``plan``'s compressed blocks store in one step (bytes before and after) and the CPU
    seconds of the casts alone for that many bytes: for each format, one float32 tensor of its
    blocks' bytes cast to it and back, one call each (no hooks, no Python per tensor, no scale;
    fp8 decoded as the runtime decodes it). The part of a lossy plan's overhead that no faster
    bookkeeping can take off on this machine."""
    chain = chain_of_plan(model, plan)
    with planned(model, chain, plan), compress_log() as log:
        step_clock(model, sample, warmup=0)
    # top-level stages run in order, one log entry each
    options = [i.option for i in plan.tree if isinstance(i, Stage) and i.option in FORMATS]
    if len(options) != len(log) or not log:
        return sum(o for o, _s in log), sum(s for _o, s in log), 0.0
    by_format: dict[str, int] = {}
    for option, (original, _stored) in zip(options, log, strict=True):
        by_format[option] = by_format.get(option, 0) + original
    seconds = []
    for _ in range(3):
        spent = 0.0
        for option, original in by_format.items():
            source = torch.randn(original // 4)
            started = time.process_time()
            narrow = source.to(FORMATS[option])
            del source
            back = fp8_halved(narrow) if option == FP8 else narrow.to(torch.float32)
            spent += time.process_time() - started
            del narrow, back
        seconds.append(spent)
    return sum(o for o, _s in log), sum(s for _o, s in log), min(seconds)


def overhead_part(arch: str, args: argparse.Namespace) -> list[str]:
    model, sample = build_hf(
        arch, layers=8, hidden=256, heads=4, seq=256, batch=4, vocab=1024, seed=0
    )
    print(arch, "profiling", file=sys.stderr)
    both = memfit.profile(model, sample, exact=False)
    exact_prof = dataclasses.replace(both, costs=without(both.costs, set(LOSSY)))
    lossy_prof = dataclasses.replace(
        both, costs=without(both.costs, set(LOSSY) - set(LOSSY_OPTIONS))
    )
    plans: dict[str, Plan] = {}
    for budget in args.budgets.split(","):
        plans[f"exact {budget}"] = memfit.plan(exact_prof, budget=budget)
        plans[f"lossy {budget}"] = memfit.plan(lossy_prof, budget=budget)
    reports = {}
    for name, plan in plans.items():
        print(arch, "verifying", name, file=sys.stderr)
        memfit.apply(model, plan)
        try:
            reports[name] = memfit.verify(model, sample, repeats=1)
        finally:
            memfit.remove(model)
    # each round: every plan once, each paired with an unplanned step; wall and CPU seconds
    ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in plans}
    loads: list[float] = []
    plain_cpu: list[float] = []
    for round_ in range(args.repeats):
        print(arch, "timing round", round_ + 1, file=sys.stderr)
        loads.append(os.getloadavg()[0])
        for name, plan in plans.items():
            wall, cpu = clocked(model, sample, plan)
            plain_wall, plain = clocked(model, sample, None)
            ratios[name].append((wall / plain_wall, cpu / plain))
            plain_cpu.append(plain)
    m = both.measurement
    step_cpu = statistics.median(plain_cpu)
    lines = [
        f"## {arch}",
        "",
        f"- unplanned step: peak {m.peak_bytes / 2**20:.1f} MiB, activations "
        f"{m.activation_bytes / 2**20:.1f} MiB, {step_cpu:.2f} CPU s (median); load average "
        f"{min(loads):.1f} to {max(loads):.1f} over the rounds",
        "",
        "| plan | budget | measured MiB | activation share | overhead, CPU time (median) | "
        "rounds (CPU) | overhead, wall (median) | compressed per step | floor: casts alone | "
        "gradients | largest group error | cosine | plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, plan in plans.items():
        report = reports[name]
        share = (report.measured_peak_bytes - m.base_bytes) / m.activation_bytes
        cpu_ratios = [c for _w, c in ratios[name]]
        overhead = statistics.median(cpu_ratios) - 1
        wall = statistics.median(w for w, _c in ratios[name]) - 1
        grads = "bit-identical" if report.gradients_equal else "lossy"
        kind, _, budget = name.partition(" ")
        lossy = used_options(plan.tree) & set(LOSSY)
        original, stored, floor = cast_floor(model, sample, plan)
        compressed = f"{original / 2**20:.0f} -> {stored / 2**20:.0f} MiB" if original else "-"
        floor_text = f"{floor / step_cpu:.1%}" if original else "-"
        lines.append(
            f"| {kind} | {budget} | {report.measured_peak_bytes / 2**20:.1f} | {share:.1%} | "
            f"{overhead:+.1%} | {', '.join(f'{r - 1:+.0%}' for r in cpu_ratios)} | {wall:+.1%} | "
            f"{compressed} | {floor_text} | {grads} | {report.relative_error:.1e} | "
            f"{report.cosine:.6f} | {plan.summary}"
            f"{' (lossy: ' + ', '.join(sorted(lossy)) + ')' if lossy else ''} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--characters", type=int, default=200_000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--models", default="gpt2,llama,bert")
    parser.add_argument("--budgets", default="50%,30%")
    parser.add_argument("--repeats", type=int, default=5)
    add_threads(parser)
    parser.add_argument(
        "--out",
        default=None,
        help="results file; default benchmarks/results/lossy-<date>.md, or "
        "lossy-overhead-<date>.md with --skip-training",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        name = "lossy-overhead" if args.skip_training else "lossy"
        args.out = str(HERE / "results" / f"{name}-{date.today()}.md")
    torch.set_num_threads(args.threads)
    lines = [
        f"# Lossy options against the exact step ({date.today()})",
        "",
        *header(),
        "",
    ]
    if not args.skip_training:
        lines += training_part(args)
    if not args.skip_overhead:
        lines += [
            "## Overhead at 50% and 30% of activation memory",
            "",
            "- models: Hugging Face configs with library defaults, 8 layers, width 256, "
            "vocabulary 1,024, batch 4 x 256 tokens (as `eager-2026-12-02-5.md`)",
            "- one profile with exact=False; exact plans from its menu without the lossy "
            f"options, lossy plans from the menu with the default ones ({list(LOSSY_OPTIONS)})",
            f"- overhead: median over {args.repeats} interleaved rounds of (plan step / paired "
            "unplanned step) - 1; every plan of a model in every round. CPU time (the process's "
            "seconds, torch on one thread) is the figure the targets are read on: on a shared "
            "machine wall time adds other processes' load; wall medians beside it",
            "- compressed per step: the bytes the plan's compressed blocks held before and after "
            "(one step under `compress_log`); floor: the CPU time of the casts alone for those "
            "bytes (one float32 tensor per format cast to it and back, one call each) as a share "
            "of the unplanned step's CPU time",
            "",
        ]
        for arch in args.models.split(","):
            lines += overhead_part(arch.strip(), args)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")  # each model as it is done
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
