"""Rich tables of profiles, plans and benchmarks (rich is optional: plain text without it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from memfit.measuring.profile import Profile
from memfit.planning.plan import Plan
from memfit.units import format_bytes
from memfit.verbs.bench import BenchResult
from memfit.verbs.estimation import Estimate


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def make_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Any:
    """A rich ``Table`` (or a plain-text stand-in with the same ``str``)."""
    try:
        from rich.table import Table
    except ImportError:  # rich is optional
        return _PlainTable(title, columns, rows)
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


class _PlainTable:
    def __init__(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.lines = [title, " | ".join(columns), *(" | ".join(row) for row in rows)]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def profile_table(profile: Profile) -> Any:
    """Per stage: time, memory, and what recompute would save."""
    rows = []
    for stage, params in zip(profile.costs.stages, profile.parameter_bytes, strict=True):
        keep = stage.options["keep"]
        rows.append(
            [
                stage.name,
                f"{keep.forward_s * 1e3:.2f}",
                f"{keep.backward_s * 1e3:.2f}",
                _mib(stage.output_bytes),
                _mib(keep.saved_bytes),
                _mib(keep.forward_peak_bytes),
                _mib(keep.backward_peak_bytes),
                _mib(params),
                "yes" if stage.checkpointable else "no",
            ]
        )
    m = profile.measurement
    title = (
        f"Profile: step {m.step_s * 1e3:.1f} ms, peak {format_bytes(m.peak_bytes)} "
        f"(held {format_bytes(m.held_bytes)} + gradients {format_bytes(m.gradient_bytes)} + "
        f"activations {format_bytes(m.activation_bytes)})"
    )
    columns = [
        "stage",
        "fwd ms",
        "bwd ms",
        "output MiB",
        "saved MiB",
        "fwd peak MiB",
        "bwd peak MiB",
        "params MiB",
        "recomputable",
    ]
    return make_table(title, columns, rows)


def describe_ops(option: str, detail: Mapping[str, Any] | None) -> str:
    """One line on what a stage's option keeps and reruns, for the plan table."""
    if option == "recompute":
        return "keeps its input; reruns the block in backward"
    if option == "recompute+offload":
        return "keeps its input in host memory; fetches it and reruns the block in backward"
    if option == "offload" and detail and detail.get("offload_bytes"):
        moved = format_bytes(detail["offload_bytes"])
        return f"saves what autograd saves, {moved} of it in host memory until backward"
    if not detail:
        return "saves what autograd saves" if option == "keep" else ""
    parts = []
    if detail.get("saves"):
        parts.append("saves " + ", ".join(detail["saves"]))
    if detail.get("recomputes"):
        parts.append("recomputes " + ", ".join(detail["recomputes"]))
    if detail.get("does"):
        parts.append(str(detail["does"]))
    if detail.get("stores"):
        stored = detail.get("compressed")
        size = (
            f": {format_bytes(stored[0])} -> {format_bytes(stored[1])}"
            if isinstance(stored, list) and len(stored) == 2
            else ""
        )
        parts.append(f"stores saved activations in {detail['stores']}{size}")
    if detail.get("error") is not None:
        parts.append(f"gradient error {detail['error']:.1e} (every block so)")
    if detail.get("rebuilds"):
        rebuilt = ", ".join(f"{k} {format_bytes(n)}" for k, n in sorted(detail["rebuilds"].items()))
        parts.append("rebuilds in backward: " + rebuilt)
    return "; ".join(parts)


def ops_table(profile: Profile) -> Any | None:
    """The first block's op profile (the others of a uniform model look alike): per op type
    that makes autograd save something, its time, its saved bytes, what recomputing it needs,
    and per measured option how the block runs it. ``None`` when the profile has no op data."""
    ops = profile.info.get("ops") or {}
    if not ops:
        return None
    name, rows = next(iter(ops.items()))
    title = (
        f"Ops of {name} that save tensors for backward (seconds from one forward under a "
        f"dispatch mode: they rank ops, whole steps price options)"
    )
    table_rows = [
        [
            row["op"],
            str(row["calls"]),
            f"{row['seconds'] * 1e3:.2f}",
            _mib(row["saved_bytes"]),
            ", ".join(row["needs"]),
        ]
        for row in rows
    ]
    return make_table(title, ["op", "calls", "fwd ms", "saved MiB", "needs"], table_rows)


def plan_table(plan: Plan) -> Any:
    """How every stage runs under ``plan``, and what each option saves and reruns."""
    details = plan.info.get("ops", {})
    rows = [
        [name, option, describe_ops(option, details.get(name))]
        for name, option in plan.options.items()
    ]
    budget = "none" if plan.budget_bytes is None else format_bytes(plan.budget_bytes)
    host = plan.info.get("host_peak_bytes")
    title = (
        f"Plan ({plan.strategy}, budget {budget}): predicted peak "
        f"{format_bytes(plan.predicted_peak_bytes)}, step {plan.predicted_step_s * 1e3:.1f} ms"
        + (f", {format_bytes(host)} in host memory" if host else "")
        + f"; loop: {plan.loop}"
    )
    if not plan.exact:
        stages = ", ".join(f"{name} ({why})" for name, why in plan.inexact.items())
        title += f"; NOT bit-identical: {stages}"
    for note in plan.notes:
        rows.append(["note", "", str(note)])
    for entry in plan.info.get("timed", []):
        mark = "chosen" if entry["chosen"] else "timed"
        rows.append(
            [
                mark,
                f"{entry['ratio_to_optimal']:.3f}x",
                f"{entry['options']}: measured {entry['measured_step_s'] * 1e3:.1f} ms, "
                f"predicted {entry['predicted_step_s'] * 1e3:.1f} ms",
            ]
        )
    return make_table(title, ["stage", "runs as", "ops"], rows)


def bench_table(result: BenchResult, title: str) -> Any:
    """One row per strategy and budget, with the seed metrics."""
    rows = []
    for row in result.rows:
        if not row.feasible:
            need = format_bytes(row.min_feasible_bytes or 0)
            rows.append([row.label, row.budget, f"infeasible (needs {need})", *[""] * 6])
            continue
        rows.append(
            [
                row.label,
                row.budget,
                _mib(row.predicted_peak_bytes),
                _mib(row.measured_peak_bytes),
                f"{row.prediction_error * 100:+.2f}%",
                f"{row.step_s * 1e3:.1f}",
                f"{row.overhead * 100:+.1f}%",
                f"{row.memory_saved * 100:.1f}%",
                "yes" if row.gradients_equal else "NO",
            ]
        )
    columns = [
        "strategy",
        "budget",
        "predicted MiB",
        "measured MiB",
        "pred. err",
        "step ms",
        "overhead",
        "act. saved",
        "grads equal",
    ]
    return make_table(title, columns, rows)


def seed_metrics(result: BenchResult) -> dict[str, float]:
    """The headline figures of the best plan that saves memory (least overhead per saving).

    ``compute_to_memory`` is the overhead in % paid per % of activation memory saved.
    """
    candidates = [r for r in result.rows if r.feasible and r.memory_saved > 0.01]
    if not candidates:
        return {}
    best = min(candidates, key=lambda r: r.overhead / r.memory_saved)
    return {
        "recompute_overhead_pct": best.overhead * 100,
        "memory_saved_pct": best.memory_saved * 100,
        "parameters_per_gib_of_peak": result.parameters / (best.measured_peak_bytes / 2**30),
        "compute_to_memory": best.overhead / best.memory_saved,
    }


def estimate_table(result: Estimate, title: str = "") -> Any:
    """One row per shape: the plain step and the plan for the budget, as the fits predict."""
    fit = result.shaped.fitted.summary()
    holdout = fit["holdout_error"]
    check = "no extrapolation check" if holdout is None else f"extrapolation check {holdout:+.2%}"
    timing = fit["time_holdout_error"]
    time_check = "no time check" if timing is None else f"time check {timing:+.1%}"
    quality = (
        f"fitted on {len(fit['profiled_shapes'])} profiled shapes up to "
        f"{result.shaped.fitted.largest}: {fit['exact_byte_figures']}/{fit['byte_figures']} "
        f"byte figures exact, {check}, {time_check}"
    )
    budget = "no budget" if result.budget is None else f"budget {result.budget}"
    rows = []
    for row in result.rows:
        plan = row.plan
        if row.budget_bytes is None:
            planned = ["-", "-", "-"]
        elif plan is None:
            planned = [f"infeasible (needs {_mib(row.min_feasible_bytes)})", "-", "-"]
        else:
            overhead = plan.predicted_step_s / row.step_s - 1 if row.step_s else 0.0
            planned = [
                _mib(plan.predicted_peak_bytes),
                f"{plan.predicted_step_s * 1e3:.1f}",
                f"{overhead * 100:+.1f}%",
            ]
        rows.append(
            [
                str(row.shape.batch),
                str(row.shape.seq),
                _mib(row.peak_bytes),
                f"{row.step_s * 1e3:.1f}",
                _mib(row.min_feasible_bytes),
                "-" if row.budget_bytes is None else _mib(row.budget_bytes),
                *planned,
                "yes" if not row.untrusted else "NO: " + "; ".join(row.untrusted),
                "yes" if not row.step_untrusted else "NO: " + "; ".join(row.step_untrusted),
            ]
        )
    columns = [
        "batch",
        "seq",
        "no plan MiB",
        "step ms",
        "min MiB",
        "budget MiB",
        "planned MiB",
        "planned ms",
        "overhead",
        "memory trusted",
        "time trusted",
    ]
    heading = f"{title}\n" if title else ""
    return make_table(f"{heading}Estimate ({budget}, {result.strategy}); {quality}", columns, rows)
