"""Diffusion models against diffusers' own checkpointing switch.

On diffusers' ``SD3Transformer2DModel`` (4 joint blocks) and ``FluxTransformer2DModel`` (2
dual-stream + 4 single-stream blocks) at the tiny sizes of ``tests/helpers/diffusion.py``, and
a Stable-Diffusion-like ``UNet2DConditionModel`` (``tests/helpers/real_blocks.py``, planned over
its resnets, attentions, down- and upsamplers with its skip connections, keep and recompute
only), library defaults, MSE loss against a fixed target, one profile per model, then per row:

* diffusers' ``enable_gradient_checkpointing()`` (every block recomputed), measured;
* memfit's floor plan (the smallest feasible budget), at the switch's memory, at 50% and 30%,
  each applied and checked by ``memfit.verify`` (gradients and loss bit for bit, measured peak).
  "vs switch" times memfit's plan at the switch's memory against the switch itself: two copies
  of the model, one planned and one switched, stepped in turns (A, B, A, B), the median of the
  paired ratios.

Activation memory is the step peak above what the plain step holds before it and the gradients
it makes (``Measurement.base_bytes``), as a share of the plain step's. Overheads are medians of
paired ratios, each way timed beside the plain step in turns (``verify``'s pairs for memfit, the
same pairing here for the switch). Results go to ``benchmarks/results/diffusion-<date>.md``.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_diffusion.py --repeats 7
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
from memfit.verbs.verification import seeded_gradients

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # the tests' model builders

from tests.helpers import diffusion, real_blocks  # noqa: E402


def _step_s(model: torch.nn.Module, built: diffusion.Built) -> float:
    start = time.perf_counter()
    built.loss_fn(model(**built.sample)).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _paired(first: Callable[[], float], second: Callable[[], float], repeats: int) -> float:
    """Median of ``first() / second()`` over ``repeats`` pairs run in turns, after one of each."""
    first(), second()  # warm-up
    return statistics.median(first() / second() for _ in range(repeats))


def switch_overhead(built: diffusion.Built, repeats: int) -> float:
    """Median of paired (switch on / plain) step-time ratios, minus one."""
    model = built.model
    _step_s(model, built)  # warm-up
    ratios = []
    for _ in range(repeats):
        model.enable_gradient_checkpointing()
        on = _step_s(model, built)
        model.disable_gradient_checkpointing()
        ratios.append(on / _step_s(model, built))
    return statistics.median(ratios) - 1


def same_gradients(built: diffusion.Built) -> bool:
    """Whether the switch gives the plain step's loss and gradients bit for bit (seed 0)."""
    model = built.model
    loss, grads = seeded_gradients(model, built.sample, built.loss_fn, 0)
    model.enable_gradient_checkpointing()
    try:
        loss_on, grads_on = seeded_gradients(model, built.sample, built.loss_fn, 0)
    finally:
        model.disable_gradient_checkpointing()
    return torch.equal(loss, loss_on) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in ((grads[k], grads_on[k]) for k in grads)
    )


def rows(name: str, built: diffusion.Built, repeats: int, **profile_args: Any) -> list[str]:
    model, sample, loss_fn = built.model, built.sample, built.loss_fn
    switched = copy.deepcopy(model)  # for the head-to-head timing, before any plan
    plain = memfit.measure(model, sample, loss_fn=loss_fn, repeats=repeats)
    activation = plain.activation_bytes

    def share(peak: int) -> str:
        return f"{(peak - plain.base_bytes) / activation:.1%}"

    model.enable_gradient_checkpointing()
    try:
        switch = memfit.measure(model, sample, loss_fn=loss_fn, repeats=1)
    finally:
        model.disable_gradient_checkpointing()
    lines = [
        f"| {name} | plain step | {plain.peak_bytes:,} | 100% | | | | |",
        f"| {name} | diffusers `enable_gradient_checkpointing()` | {switch.peak_bytes:,} | "
        f"{share(switch.peak_bytes)} | | {switch_overhead(built, repeats):+.0%} | | "
        f"{'yes' if same_gradients(built) else 'no'} |",
    ]
    profile = memfit.profile(model, sample, loss_fn=loss_fn, **profile_args)
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
    switched.enable_gradient_checkpointing()
    for label, budget in budgets:
        plan = memfit.plan(profile, budget=budget)
        memfit.apply(model, plan)
        try:
            report = memfit.verify(model, sample, loss_fn=loss_fn, repeats=repeats)
            versus = ""
            if label == "memfit at the switch's peak":
                ratio = _paired(
                    lambda: _step_s(model, built), lambda: _step_s(switched, built), repeats
                )
                versus = f"{ratio - 1:+.0%}"
        finally:
            memfit.remove(model)
        lines.append(
            f"| {name} | {label} (budget {plan.budget_bytes:,}; {plan.summary}) "
            f"| {report.measured_peak_bytes:,} "
            f"| {share(report.measured_peak_bytes)} | {report.prediction_error:+.2%} | "
            f"{report.overhead:+.0%} | {versus} | {'yes' if report.gradients_equal else 'no'} |"
        )
    return lines


MODELS: dict[str, Callable[[], Any]] = {
    "SD3": diffusion.sd3,
    "Flux": diffusion.flux,
    "SD U-Net": real_blocks.unet,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "results" / f"diffusion-{date.today()}.md"))
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="which models"
    )
    add_threads(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# Diffusion models vs diffusers' checkpointing switch",
        "",
        *header(libraries=("torch", "diffusers")),
        "",
        "| model | way | step peak (B) | activation | prediction error | overhead | "
        "vs switch | grads bit-identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.models:
        if name == "SD U-Net":
            # over its blocks' children, with joins and skips; keep and recompute only (the
            # full menu took 864 s to profile at a load of 9 on this machine)
            built = real_blocks.unet()
            blocks = real_blocks.unet_children(built.model)
            lines += rows(name, built, args.repeats, blocks=blocks, options=())  # type: ignore[arg-type]
        else:
            lines += rows(name, MODELS[name](), args.repeats)
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
