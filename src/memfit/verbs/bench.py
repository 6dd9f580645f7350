"""Plans side by side on one model: predicted against measured peak, overhead, gradients.

Every row is run for real: one metered step for its peak, one seeded step whose gradients are
compared bit for bit with the unplanned model's, and timed steps interleaved with every other
row. Each timed step of a row is paired with an unplanned step right after it, and the row's
overhead is the median of those paired ratios: on a shared machine whose speed drifts, a pair
sees the same drift, so the ratio cancels it (a ratio of medians taken minutes apart would not).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from memfit.errors import InfeasibleBudgetError
from memfit.measuring.loop import TrainingLoop
from memfit.measuring.profile import Profile
from memfit.measuring.run import measure_loop
from memfit.measuring.state import preserving_state
from memfit.measuring.step import LossFn
from memfit.planning.candidates import alternatives
from memfit.planning.offload import offloads, without_offload
from memfit.planning.plan import Plan
from memfit.planning.solve import solve
from memfit.runtime.apply import apply_plan, chain_of_plan, remove_plan
from memfit.units import parse_budget
from memfit.verbs.timing import fastest
from memfit.verbs.verification import mismatched_gradients, seeded_gradients, timed_step_under

STRATEGY_LABELS = {
    "none": "none",
    "all": "all (HF-style)",
    "sqrt": "sqrt (Chen)",
    "optimal": "optimal (memfit)",
    "optimal-recompute": "optimal, no selective",
    "optimal-no-offload": "optimal, no offload",
    "all+offload": "all + inputs offloaded",
    "optimal-timed": "optimal, candidates timed",
}
OPTIMAL_STRATEGIES = ("optimal", "optimal-recompute", "optimal-no-offload", "optimal-timed")


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchRow:
    """One strategy at one budget, measured."""

    strategy: str
    budget: str
    budget_bytes: int | None
    feasible: bool
    predicted_peak_bytes: int = 0
    predicted_step_s: float = 0.0
    measured_peak_bytes: int = 0
    step_s: float = 0.0
    overhead: float = 0.0
    memory_saved: float = 0.0
    gradients_equal: bool = False
    min_feasible_bytes: int | None = None
    plan: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return STRATEGY_LABELS.get(self.strategy, self.strategy)

    @property
    def prediction_error(self) -> float:
        if not self.measured_peak_bytes:
            return 0.0
        return self.predicted_peak_bytes / self.measured_peak_bytes - 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchResult:
    """All rows of a benchmark, with the unplanned step they are compared to."""

    rows: tuple[BenchRow, ...]
    baseline_peak_bytes: int
    held_bytes: int
    baseline_step_s: float
    parameters: int
    repeats: int
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, raw in zip(self.rows, data["rows"], strict=True):
            raw["label"] = row.label
            raw["prediction_error"] = row.prediction_error
        return data


@preserving_state
def bench(
    model: nn.Module,
    sample: Any,
    profile: Profile,
    *,
    budgets: Sequence[str],
    strategies: Sequence[str] = (
        "none",
        "all",
        "every:2",
        "sqrt",
        "optimal-recompute",
        "optimal",
    ),
    loss_fn: LossFn | None = None,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
    keep_output: bool | None = None,
    candidates: int = 4,
) -> BenchResult:
    """Run every strategy at every budget on ``model`` and measure it.

    Baselines (``none``, ``all``, ``every:k``, ``sqrt``) have no budget of their own: they are
    run once, with ``-`` in the budget column. ``optimal`` and ``optimal-recompute`` are run at
    every budget; ``optimal-timed`` times up to ``candidates`` plans within each budget on the
    model first and runs the fastest (:func:`memfit.verbs.timing.fastest`). ``keep_output``:
    whether the model's output stays alive through backward in the measured steps (``None``:
    as the profile measured it, ``profile.measurement``).

    Raises:
        ValueError: a malformed budget or strategy, or ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (timed steps per row); got {repeats}")
    if "optimal-timed" in strategies and candidates < 2:
        raise ValueError(
            f"strategy 'optimal-timed' times at least 2 plans per budget; got candidates="
            f"{candidates} (use 'optimal' for the untimed plan)"
        )
    say = progress or (lambda _message: None)
    measurement = profile.measurement
    keep = measurement.keep_output if keep_output is None else keep_output
    loop = TrainingLoop(loss_fn=loss_fn, keep_output=keep, accumulate=measurement.accumulate)
    resolved = [
        (text, parse_budget(text).resolve(measurement.base_bytes, measurement.activation_bytes))
        for text in budgets
    ]
    jobs: list[tuple[str, str, int | None]] = []
    for strategy in strategies:
        if strategy == "all+offload" and not offloads(profile.costs):
            say("all+offload skipped: no CUDA device to offload from")
            continue
        if strategy in OPTIMAL_STRATEGIES:
            jobs += [(strategy, text, value) for text, value in resolved]
        else:
            jobs.append((strategy, "-", None))
    plans: list[Plan | None] = []
    rows: list[dict[str, Any]] = []
    for strategy, text, budget_bytes in jobs:
        row: dict[str, Any] = dict(strategy=strategy, budget=text, budget_bytes=budget_bytes)
        costs = profile.costs
        if strategy == "optimal-recompute":
            costs, strategy = costs.keep_only(), "optimal"
        elif strategy == "optimal-no-offload":
            costs, strategy = without_offload(costs), "optimal"
        try:
            if strategy == "optimal-timed":
                say(f"timing up to {candidates} plans within {text}")
                plans_within = alternatives(costs, budget_bytes, candidates)
                chosen = fastest(
                    model,
                    sample,
                    plans_within,
                    loop=loop,
                )
            else:
                chosen = solve(costs, budget_bytes, strategy)
        except InfeasibleBudgetError as error:
            plans.append(None)
            rows.append(row | dict(feasible=False, min_feasible_bytes=error.min_feasible_bytes))
            continue
        plans.append(chosen)
        rows.append(
            row
            | dict(
                feasible=True,
                predicted_peak_bytes=chosen.predicted_peak_bytes,
                predicted_step_s=chosen.predicted_step_s,
                plan=chosen.to_dict(),
            )
        )
    seed = 1234
    reference_loss, reference = seeded_gradients(model, sample, loss_fn, seed)
    for index, maybe in enumerate(plans):
        if maybe is None:
            continue
        chosen = maybe
        say(f"measuring {rows[index]['strategy']} {rows[index]['budget']}")
        chain = chain_of_plan(model, chosen)
        apply_plan(model, chain, chosen)
        try:
            loss, grads = seeded_gradients(model, sample, loss_fn, seed)
            peak = measure_loop(model, sample, loop, repeats=1, warmup=1).peak_bytes
        finally:
            remove_plan(model)
        equal = torch.equal(loss, reference_loss) and not mismatched_gradients(reference, grads)
        rows[index] |= dict(measured_peak_bytes=peak, gradients_equal=equal)
    say("timing all rows side by side")
    timed_rows = [i for i, p in enumerate(plans) if p is not None]
    row_s: dict[int, list[float]] = {i: [] for i in timed_rows}
    ratios: dict[int, list[float]] = {i: [] for i in timed_rows}
    baseline_samples: list[float] = []
    for round_ in range(repeats):
        # each round starts at another row, so no row always follows the same one
        shift = round_ % len(timed_rows) if timed_rows else 0
        for index in timed_rows[shift:] + timed_rows[:shift]:
            planned = timed_step_under(model, sample, plans[index], loop)
            unplanned = timed_step_under(model, sample, None, loop)
            row_s[index].append(planned)
            baseline_samples.append(unplanned)
            ratios[index].append(planned / unplanned)
    baseline_s = statistics.median(baseline_samples) if baseline_samples else 0.0
    baseline_activation = measurement.activation_bytes
    for index in timed_rows:
        row = rows[index]
        activation = row["measured_peak_bytes"] - measurement.base_bytes
        row |= dict(
            step_s=statistics.median(row_s[index]),
            overhead=statistics.median(ratios[index]) - 1.0,
            memory_saved=1.0 - activation / baseline_activation if baseline_activation else 0.0,
        )
    return BenchResult(
        rows=tuple(BenchRow(**row) for row in rows),
        baseline_peak_bytes=measurement.peak_bytes,
        held_bytes=measurement.held_bytes,
        baseline_step_s=baseline_s,
        parameters=sum(p.numel() for p in model.parameters()),
        repeats=repeats,
    )
