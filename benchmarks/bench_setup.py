"""What ``memfit.auto`` costs before training starts, in training steps of the model itself.

For the built-in GPT at nanoGPT's small size (4 layers, width 128, 8 x 64 tokens) and two
Hugging Face configs (``build_hf``: GPT-2 and Llama, library defaults), each round times the
plain training step (median of ``--steps`` steps after two warm-up steps) right before and
after ``memfit.auto(model, sample, budget=--budget)`` on a fresh copy of the model (wall
seconds; ``--rounds`` rounds for the default profile, the median ratio), with the default profile
(one step per way of running the model, metered and timed at once) and with ``thorough=True``
(three timed steps per way in turns), and writes the ratio: the setup's cost in steps. Each
plan is then verified: its predicted peak against the measured one, its predicted step time
against the measured overhead. ``plan.info["setup_steps"]`` (profile and plan, measured inside
``memfit.plan`` against the profile's own step time) is printed beside it.

``--phases`` adds one more default ``memfit.auto`` per model with memfit's own functions wrapped
in timers (process CPU seconds, which other processes' load does not enter as it enters wall
time): where the setup goes, each phase in plain steps (CPU seconds of a plain step, median of
five). Run it against another checkout (``PYTHONPATH=...``) for a before/after.

    .venv/bin/python benchmarks/bench_setup.py   # about 3 minutes on 2 quiet cores
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import torch

import memfit
from common import add_threads, header, write_results
from memfit.integrations.hf import build_hf
from memfit.measuring.step import compute_loss, split_sample
from memfit.models import build

HERE = Path(__file__).parent


def models() -> dict[str, tuple[torch.nn.Module, Any]]:
    return {
        "gpt (built-in, nanoGPT size)": build("gpt", layers=4, width=128, heads=4, seq=64, batch=8),
        "hf gpt2": build_hf("gpt2", layers=4, hidden=128, heads=4, seq=64, batch=8),
        "hf llama": build_hf("llama", layers=4, hidden=128, heads=4, seq=64, batch=8),
    }


def step_s(model: torch.nn.Module, sample: Any, steps: int) -> float:
    args, kwargs = split_sample(sample)
    times = []
    for index in range(steps + 2):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        compute_loss(model(*args, **kwargs)).backward()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_s(run: Callable[[], Any]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def phases(model: torch.nn.Module, sample: Any, budget: str) -> list[tuple[str, float]]:
    """(phase, CPU seconds) of one default ``memfit.auto`` on a fresh copy of ``model``, then
    ``("plain step", CPU seconds)``: the median of five plain steps after two."""
    import memfit.measuring.meter
    import memfit.verbs.api
    import memfit.verbs.profiling

    spent: dict[str, float] = {}
    originals: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: Callable[..., str]) -> None:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                key = label(*args, **kwargs)
                spent[key] = spent.get(key, 0.0) + time.process_time() - start

        setattr(owner, name, timed)

    planned = memfit.verbs.profiling.planned

    @contextlib.contextmanager
    def way(model: Any, chain: Any, plan: Any) -> Iterator[Any]:
        start = time.process_time()
        with planned(model, chain, plan) as value:
            yield value
        key = f"way: {plan.strategy}"
        spent[key] = spent.get(key, 0.0) + time.process_time() - start

    wrap(memfit.verbs.profiling, "_chain", lambda *a, **k: "chain finding")
    wrap(memfit.verbs.profiling, "profile_ops", lambda *a, **k: "op profile (selective candidates)")
    wrap(
        memfit.verbs.profiling,
        "stage_clock",
        lambda *a, **k: "keep's plain timed step (in its way)",
    )
    wrap(
        memfit.measuring.meter.MemoryMeter,
        "__exit__",
        lambda *a, **k: "profiler stop + replay (in the ways)",
    )
    wrap(memfit.verbs.api, "solve", lambda *a, **k: "solve")
    wrap(memfit.verbs.api, "apply", lambda *a, **k: "apply")
    memfit.verbs.profiling.planned = way
    fresh = copy.deepcopy(model)
    try:
        total = _cpu_s(lambda: memfit.auto(fresh, sample, budget=budget))
    finally:
        memfit.verbs.profiling.planned = planned
        for owner, name, original in originals:
            setattr(owner, name, original)
    args, kwargs = split_sample(sample)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        compute_loss(model(*args, **kwargs)).backward()

    for _ in range(2):
        plain()
    step = statistics.median(_cpu_s(plain) for _ in range(5))
    ways = sum(s for key, s in spent.items() if key.startswith("way: "))
    inside = ("keep's plain timed step (in its way)", "profiler stop + replay (in the ways)")
    outside = sum(
        s for key, s in spent.items() if not key.startswith("way: ") and key not in inside
    )
    order = [
        "chain finding",
        "op profile (selective candidates)",
        *inside,
        "solve",
        "apply",
    ]
    ways_first = sorted((key, s) for key, s in spent.items() if key.startswith("way: "))
    rows = ways_first + [(key, spent[key]) for key in order if key in spent]
    return [
        *rows,
        ("rest (state, checks, costs)", total - ways - outside),
        ("auto", total),
        ("plain step", step),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--steps", type=int, default=3, help="plain steps before/after each")
    parser.add_argument(
        "--rounds", type=int, default=3, help="default-profile autos, in turns (0: only --phases)"
    )
    parser.add_argument("--out", default=str(HERE / "results" / f"setup-{date.today()}.md"))
    parser.add_argument(
        "--phases", action="store_true", help="add where each model's setup goes, per phase"
    )
    add_threads(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"# memfit.auto setup time in training steps ({date.today()})",
        "",
        *header(),
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
    ]
    if args.rounds:
        lines += [
            "",
            "| model | plain step ms | profile | auto s (budget "
            f"{args.budget}) | auto in steps (per round) | plan.info setup_steps (last) | "
            "peak pred. error | "
            "predicted overhead | measured overhead |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    for name, (model, sample) in models().items() if args.rounds else ():
        for label, options, rounds in (
            ("default", {}, args.rounds),
            ("thorough", {"thorough": True}, 1),
        ):
            # in turns: plain steps right before and after each auto, the ratio per round,
            # the median over rounds (a loaded machine's drift reaches both sides alike)
            ratios, plains, autos = [], [], []
            for _ in range(rounds):
                before = step_s(model, sample, args.steps)
                fresh = copy.deepcopy(model)
                start = time.perf_counter()
                plan = memfit.auto(fresh, sample, budget=args.budget, **options)
                auto_s = time.perf_counter() - start
                plain = (before + step_s(model, sample, args.steps)) / 2
                ratios.append(auto_s / plain)
                plains.append(plain)
                autos.append(auto_s)
            check = memfit.verify(fresh, sample)
            predicted = plan.predicted_step_s / check.baseline.step_s - 1
            lines.append(
                f"| {name} | {statistics.median(plains) * 1e3:.1f} | {label} | "
                f"{statistics.median(autos):.1f} | {statistics.median(ratios):.0f} "
                f"({', '.join(f'{r:.0f}' for r in ratios)}) | "
                f"{plan.info['setup_steps']:.0f} | {check.prediction_error:+.2%} | "
                f"{predicted:+.1%} | {check.overhead:+.1%} |"
            )
    if args.phases:
        lines += [
            "",
            "Where the default setup goes (one more `memfit.auto` per model, memfit's functions "
            "wrapped in timers; CPU seconds in plain steps' CPU seconds):",
            "",
            "| model | phase | CPU s | in plain steps |",
            "| --- | --- | --- | --- |",
        ]
        for name, (model, sample) in models().items():
            rows = phases(model, sample, args.budget)
            step = rows[-1][1]
            lines += [
                f"| {name} | {phase} | {seconds:.3f} | {seconds / step:.1f} |"
                for phase, seconds in rows
            ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
