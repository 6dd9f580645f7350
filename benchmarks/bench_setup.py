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

    .venv/bin/python benchmarks/bench_setup.py   # about 3 minutes on 2 quiet cores
"""

from __future__ import annotations

import argparse
import copy
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--steps", type=int, default=3, help="plain steps before/after each")
    parser.add_argument("--rounds", type=int, default=3, help="default-profile autos, in turns")
    parser.add_argument("--out", default=str(HERE / "results" / f"setup-{date.today()}.md"))
    add_threads(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"# memfit.auto setup time in training steps ({date.today()})",
        "",
        *header(),
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        "| model | plain step ms | profile | auto s (budget "
        f"{args.budget}) | auto in steps (per round) | plan.info setup_steps (last) | "
        "peak pred. error | "
        "predicted overhead | measured overhead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (model, sample) in models().items():
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
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
