"""Models of several towers against transformers' own checkpointing switch.

On ``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama) and
``T5ForConditionalGeneration`` (encoder, decoder) built by ``tests/helpers/towers.py`` (the
testers' sizes, library defaults) at 2 and 4 layers a tower, one profile per model, then per row:

* transformers' ``gradient_checkpointing_enable()`` (every layer checkpointed; it also turns
  the cache off: ``use_cache=False``, and passes the layers ``cache=None``), measured;
* memfit's floor plan (the smallest feasible budget), at the switch's memory, at 50% and 30%,
  each applied and checked by ``memfit.verify`` (gradients and loss bit for bit, op trace
  against the plain step, measured peak).

Activation memory is the step peak above what the plain step holds before it and the gradients
it makes (``Measurement.base_bytes``), as a share of the plain step's. Overheads against the
plain step are medians of paired ratios (``verify``'s pairs for memfit, the same pairing here
for the switch). "vs switch" times memfit's plan at the switch's memory against the switch
itself: two copies of the model, one planned and one switched, stepped in turns (A, B, A, B),
the median of the paired ratios. T5 runs twice: with the library's defaults, and with
``use_cache=False`` in the sample, the computation the switch runs. Results go to
``benchmarks/results/towers-<date>.md``.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_towers.py --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

import memfit
from common import add_threads, header, write_results
from memfit.measuring.trace import compare_traces
from memfit.verbs.verification import traced_gradients

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # the tests' model builders

from tests.helpers import towers  # noqa: E402
from tests.helpers.hf_testers import Built  # noqa: E402


def _step_s(model: torch.nn.Module, built: Built) -> float:
    start = time.perf_counter()
    out = model(**built.sample)
    out.loss.backward()
    del out
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _paired(first: Callable[[], float], second: Callable[[], float], repeats: int) -> float:
    """Median of ``first() / second()`` over ``repeats`` pairs run in turns, after one of each."""
    first(), second()  # warm-up
    return statistics.median(first() / second() for _ in range(repeats))


def switch_overhead(built: Built, repeats: int) -> float:
    """Median of paired (switch on / plain) step-time ratios, minus one."""
    model = built.model

    def on() -> float:
        model.gradient_checkpointing_enable()
        try:
            return _step_s(model, built)
        finally:
            model.gradient_checkpointing_disable()

    return _paired(on, lambda: _step_s(model, built), repeats) - 1


def same_gradients(built: Built) -> str:
    """Whether the switch gives the plain step's loss and gradients bit for bit (seed 0), and
    whether it runs the plain step's ops on the same layouts (the op trace)."""
    model = built.model
    loss, grads, trace = traced_gradients(model, built.sample, None, 0)
    model.gradient_checkpointing_enable()
    try:
        loss_on, grads_on, trace_on = traced_gradients(model, built.sample, None, 0)
    finally:
        model.gradient_checkpointing_disable()
    equal = torch.equal(loss, loss_on) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in ((grads[k], grads_on[k]) for k in grads)
    )
    difference = compare_traces(trace, trace_on)
    ops = "same ops" if difference is None else "other ops (trace differs)"
    return f"{'yes' if equal else 'no'} on this CPU, {ops}"


def rows(name: str, built: Built, repeats: int) -> list[str]:
    model, sample = built.model, built.sample
    switched = copy.deepcopy(model)  # for the head-to-head timing, before any plan
    plain = memfit.measure(model, sample, repeats=repeats)
    activation = plain.activation_bytes

    def share(peak: int) -> str:
        return f"{(peak - plain.base_bytes) / activation:.1%}"

    model.gradient_checkpointing_enable()
    try:
        switch = memfit.measure(model, sample, repeats=1)
    finally:
        model.gradient_checkpointing_disable()
    lines = [
        f"| {name} | plain step | {plain.peak_bytes:,} | 100% | | | | |",
        f"| {name} | transformers `gradient_checkpointing_enable()` | {switch.peak_bytes:,} | "
        f"{share(switch.peak_bytes)} | | {switch_overhead(built, repeats):+.0%} | | "
        f"{same_gradients(built)} |",
    ]
    profile = memfit.profile(model, sample)
    try:
        memfit.plan(profile, budget=1)
    except memfit.InfeasibleBudgetError as error:
        floor = error.min_feasible_bytes
    budgets: list[tuple[str, Any]] = [
        ("memfit floor", floor),
        ("memfit at the switch's peak", max(floor, switch.peak_bytes)),
        ("memfit 50%", "50%"),
        ("memfit 30%", "30%"),
    ]
    switched.gradient_checkpointing_enable()
    for label, budget in budgets:
        try:
            plan = memfit.plan(profile, budget=budget)
        except memfit.InfeasibleBudgetError as error:
            lines.append(f"| {name} | {label} | infeasible: {error} | | | | | |")
            continue
        memfit.apply(model, plan)
        try:
            report = memfit.verify(model, sample, repeats=repeats, trace=True)
            versus = ""
            if label == "memfit at the switch's peak":
                ratio = _paired(
                    lambda: _step_s(model, built), lambda: _step_s(switched, built), repeats
                )
                versus = f"{ratio - 1:+.0%}"
        finally:
            memfit.remove(model)
        identical = report.gradients_equal and report.trace_difference == ""
        lines.append(
            f"| {name} | {label} (budget {plan.budget_bytes:,}; {plan.summary}) "
            f"| {report.measured_peak_bytes:,} "
            f"| {share(report.measured_peak_bytes)} | {report.prediction_error:+.2%} | "
            f"{report.overhead:+.0%} | {versus} | {'yes' if identical else 'no'} |"
        )
    return lines


def _t5_without_cache(layers: int, width: int) -> Built:
    built = towers.t5(layers, layers, width=width)
    built.sample["use_cache"] = False
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="layers a tower")
    parser.add_argument(
        "--wide",
        type=int,
        nargs="*",
        default=[4],
        help="layers a tower of the width-256 rows (compute, not Python, dominates their steps)",
    )
    parser.add_argument("--out", default=str(HERE / "results" / f"towers-{date.today()}.md"))
    add_threads(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# Models of several towers vs transformers' checkpointing switch",
        "",
        *header(libraries=("torch", "transformers")),
        "",
        "| model | way | step peak (B) | activation | prediction error | overhead | "
        "vs switch | bit-identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    sizes = [(layers, 32) for layers in args.layers] + [(layers, 256) for layers in args.wide]
    for layers, width in sizes:
        size = f"{layers}+{layers}" + ("" if width == 32 else f" w{width}")
        models: list[tuple[str, Callable[[], Built]]] = [
            (f"LLaVA {size}", lambda n=layers, w=width: towers.llava(n, n, width=w)),
            (f"T5 {size}", lambda n=layers, w=width: towers.t5(n, n, width=w)),
            (f"T5 {size}, use_cache=False", lambda n=layers, w=width: _t5_without_cache(n, w)),
        ]
        for name, build in models:
            torch.manual_seed(0)
            lines += rows(name, build(), args.repeats)
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
