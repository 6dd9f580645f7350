"""``memfit.estimate``: peak memory and step time at shapes never run, from profiles at a few;
and ``memfit.auto(..., shapes="dynamic")``.

The model is profiled at a few shapes made from the sample and its costs fitted to the shape
(:func:`memfit.verbs.shape_profiles.profile_shapes`); an estimate at a new shape is the simulator and
the planner run on the fitted costs there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from memfit.errors import InfeasibleBudgetError
from memfit.measuring.profile import sample_digest
from memfit.measuring.sample_shapes import resize_sample, sample_layout
from memfit.planning.baselines import keep_all
from memfit.planning.plan import Plan
from memfit.planning.shape_costs import largest_shape, plan_shape
from memfit.planning.shape_fits import Shape
from memfit.planning.simulate import budget_base, simulate
from memfit.planning.solve import min_peak_bytes, parse_strategy
from memfit.runtime.apply import refuse_planned
from memfit.runtime.dynamic import (
    ShapePlans,
    apply_shape_plans,
    check_bucket_and_margin,
)
from memfit.units import Budget, parse_budget
from memfit.verbs.profile_options import ProfileOptions
from memfit.verbs.shape_profiles import (
    ShapeProfile,
    ShapesArg,
    default_profile_shapes,
    parse_shapes,
    position_limit,
    profile_shapes,
    shape_profile_options,
    shape_profile_with,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Estimate",
    "ShapeEstimate",
    "ShapeProfile",
    "auto_dynamic",
    "default_profile_shapes",
    "estimate",
    "profile_shapes",
]


@dataclass(frozen=True, kw_only=True)
class ShapeEstimate:
    """The estimate at one shape.

    Attributes:
        shape: the shape.
        peak_bytes: step peak without a plan (every block kept, as memfit runs it: a Hugging
            Face decoder's KV cache off in training, as in a profile's plain step).
        step_s: its step time.
        held_bytes: held before the step (parameters, gradients, the batch...).
        min_feasible_bytes: the smallest step peak any plan reaches.
        budget_bytes: the budget resolved at this shape (``None``: none asked).
        plan: the plan for the budget (``None``: no budget, or infeasible).
        untrusted: why the estimate should not be trusted (empty: no reason known).
        step_untrusted: why its step times should not be trusted (the time fits' own check,
            :meth:`~memfit.planning.shape_costs.ShapeCosts.time_trust`).
    """

    shape: Shape
    peak_bytes: int
    step_s: float
    held_bytes: int
    min_feasible_bytes: int
    budget_bytes: int | None = None
    plan: Plan | None = None
    untrusted: tuple[str, ...] = ()
    step_untrusted: tuple[str, ...] = ()

    @property
    def activation_bytes(self) -> int:
        return self.peak_bytes - self.held_bytes

    @property
    def feasible(self) -> bool:
        return self.budget_bytes is None or self.min_feasible_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.shape.batch,
            "seq": self.shape.seq,
            "peak_bytes": self.peak_bytes,
            "step_s": self.step_s,
            "held_bytes": self.held_bytes,
            "min_feasible_bytes": self.min_feasible_bytes,
            "budget_bytes": self.budget_bytes,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "untrusted": list(self.untrusted),
            "step_untrusted": list(self.step_untrusted),
        }


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """What :func:`estimate` predicts.

    Attributes:
        rows: one :class:`ShapeEstimate` per shape asked.
        shaped: the fitted profile (reuse it: ``memfit.estimate(shaped, shapes=...)``).
        budget: the budget asked (``None``: none).
        strategy: the planner's strategy.
        largest: the largest shape that fits ``budget`` at the asked batch (or seq), when
            asked for and the budget is in bytes.
    """

    rows: tuple[ShapeEstimate, ...]
    shaped: ShapeProfile
    budget: Budget | None = None
    strategy: str = "optimal"
    largest: Shape | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [row.to_dict() for row in self.rows],
            "budget": None if self.budget is None else str(self.budget),
            "strategy": self.strategy,
            "fit": self.shaped.fitted.summary(),
            "largest": None if self.largest is None else [self.largest.batch, self.largest.seq],
            "info": dict(self.info),
        }


def estimate(
    model: nn.Module | ShapeProfile,
    sample: Any = None,
    *,
    shapes: ShapesArg,
    budget: int | float | str | Budget | None = None,
    strategy: str = "optimal",
    largest: str | None = None,
    profile_at: Iterable[Shape | tuple[int, int]] | None = None,
    **profile_options: Any,
) -> Estimate:
    """Predict step peak and time at shapes never run, without a plan and with one.

    Args:
        model: the model (then ``sample`` is required; it is profiled at a few shapes made
            from the sample, see :func:`profile_shapes`), or a :class:`ShapeProfile` made
            before (nothing runs then).
        shapes: ``[(batch, seq), ...]``, or ``{"batch": 8, "seq": [512, 1024, 2048]}`` (a
            missing key takes the sample's size).
        budget: as for :func:`memfit.plan`; a percentage is of each shape's own activation
            memory. ``None``: no plan, only the plain step and the smallest feasible peak.
        strategy: the planner's strategy (``optimal``, ``all``, ...).
        largest: ``"seq"`` or ``"batch"``: also find the largest seq (at the first shape's
            batch) or batch (at its seq) whose smallest feasible peak fits ``budget`` (bytes).
        profile_at: the shapes to profile (default :func:`default_profile_shapes`, its
            ladder of longer seqs going on towards the longest seq in ``shapes``).
        **profile_options: passed to :func:`memfit.profile`.

    Returns:
        An :class:`Estimate`; each row says why it should not be trusted where a reason is
        known (far beyond the profiled shapes, fits that missed the profiles).

    Raises:
        ValueError: malformed shapes, budget or strategy; ``largest`` with a percentage.

    Example:
        >>> est = memfit.estimate(model, sample, shapes={"batch": 8, "seq": [512, 1024]},
        ...                       budget="50%")
        >>> [(row.shape.seq, row.peak_bytes, row.plan.predicted_peak_bytes) for row in est.rows]
    """
    parsed = None if budget is None else parse_budget(budget)
    parse_strategy(strategy)
    if largest not in (None, "seq", "batch"):
        raise ValueError(f"largest must be None, 'seq' or 'batch'; got {largest!r}")
    if largest is not None and (parsed is None or parsed.bytes is None):
        raise ValueError(
            f"largest={largest!r} needs a budget in bytes (a percentage is of each shape's own "
            f"activation memory, so every shape fits some percentage); got budget={budget!r}"
        )
    if isinstance(model, ShapeProfile):
        shaped = model
    elif isinstance(model, nn.Module):
        if sample is None:
            raise TypeError("memfit.estimate(model, sample, shapes=...) needs the sample")
        # checked before anything is profiled
        longest = max(s.seq for s in parse_shapes(shapes, sample_layout(sample)))
        options = shape_profile_options(**profile_options)
        options.loop.check(model, sample)
        shaped = shape_profile_with(
            model, sample, shapes=profile_at, longest_seq=longest, options=options
        )
    else:
        raise TypeError(
            f"memfit.estimate takes a model or a ShapeProfile; got {type(model).__name__}"
        )
    fitted = shaped.fitted
    rows = []
    for shape in parse_shapes(shapes, shaped.layout):
        costs = fitted.costs_at(shape)
        plain = simulate(costs, keep_all(costs))
        chosen = None
        budget_bytes = None
        if parsed is not None:
            budget_bytes = parsed.resolve(*budget_base(costs))
            try:
                chosen = plan_shape(fitted, shape, parsed, strategy=strategy)
            except InfeasibleBudgetError:
                chosen = None
            else:
                chosen = replace(
                    chosen.for_loop(keep_output=shaped.keep_output, accumulate=shaped.accumulate),
                    fingerprint=_fingerprint(chosen, shaped, model, sample, shape),
                )
        rows.append(
            ShapeEstimate(
                shape=shape,
                peak_bytes=plain.peak_bytes,
                step_s=plain.step_s,
                held_bytes=costs.held_bytes,
                min_feasible_bytes=min_peak_bytes(costs),
                budget_bytes=budget_bytes,
                plan=chosen,
                untrusted=tuple(fitted.trust(shape)),
                step_untrusted=tuple(fitted.time_trust(shape)),
            )
        )
    found = None
    if largest is not None and parsed is not None and parsed.bytes is not None:
        first = rows[0].shape
        where = {"batch": first.batch} if largest == "seq" else {"seq": first.seq}
        found = largest_shape(fitted, parsed.bytes, **where)
    return Estimate(
        rows=tuple(rows), shaped=shaped, budget=parsed, strategy=strategy, largest=found
    )


def _fingerprint(plan: Plan, shaped: ShapeProfile, model: Any, sample: Any, shape: Shape) -> str:
    """The fingerprint that ``memfit.apply(model, plan, sample_of_that_shape)`` checks, given
    the sample; the plan's own without one."""
    if not isinstance(model, nn.Module) or sample is None:
        return plan.fingerprint
    model_part = plan.fingerprint.partition("-")[0]
    resized = resize_sample(sample, shape, shaped.layout)
    return f"{model_part}-{sample_digest(resized)}"


def auto_dynamic(
    model: nn.Module,
    sample: Any,
    *,
    budget: int | float | str | Budget,
    strategy: str = "optimal",
    seq_range: tuple[int, int] | None = None,
    bucket: int = 64,
    margin: float = 0.02,
    round_batch: bool = False,
    shapes_profiled: Iterable[Shape | tuple[int, int]] | None = None,
    shape_profile: ShapeProfile | None = None,
    options: ProfileOptions,
) -> Plan:
    """``memfit.auto(model, sample, budget=..., shapes="dynamic")``: see :func:`memfit.auto`
    (``options``: its profile options, :func:`~memfit.verbs.shape_profiles.shape_profile_options`).
    Every argument is checked before the first shape is profiled."""
    parsed = parse_budget(budget)
    parse_strategy(strategy)
    check_bucket_and_margin(bucket, margin)
    options.loop.check(model, sample)
    refuse_planned(model, "planning it again")
    layout = sample_layout(sample)
    if seq_range is not None:
        if not layout.has_seq:
            raise ValueError(
                "seq_range needs a sample with a sequence axis (token ids of shape (batch, "
                "seq)); this sample has none"
            )
        if not (
            isinstance(seq_range, tuple | list)
            and len(seq_range) == 2
            and all(isinstance(n, int) for n in seq_range)
            and 1 <= seq_range[0] <= seq_range[1]
        ):
            raise ValueError(
                f"seq_range is (shortest, longest) sequence lengths, e.g. (64, 1024); got "
                f"{seq_range!r}"
            )
    if shape_profile is None:
        if shapes_profiled is None and seq_range is not None and seq_range[1] > layout.shape.seq:
            # a batch-1 probe at the longest seq: a peak that a seq² op sets only at long
            # lengths (eager attention's scores) loses at every grid shape, and the fits would
            # miss it; at batch 1 the probe costs a fraction of the longest batch
            # (the default rungs stop there too: no plan is asked for beyond it)
            limit = min(n for n in (position_limit(model), seq_range[1]) if n is not None)
            shapes_profiled = [
                *default_profile_shapes(layout.shape, max_seq=limit),
                Shape(1, seq_range[1]),
            ]
        shaped = shape_profile_with(
            model, sample, shapes=shapes_profiled, longest_seq=None, options=options
        )
    else:
        shaped = shape_profile
    plans = ShapePlans(
        fitted=shaped.fitted,
        layout=shaped.layout,
        budget=parsed,
        strategy=strategy,
        bucket=bucket,
        margin=margin,
        round_batch=round_batch,
        keep_output=shaped.keep_output,
        accumulate=shaped.accumulate,
    )
    if seq_range is not None:  # the longest first: it is the one that may not fit
        for seq in (seq_range[1], seq_range[0]):
            plans.plan_for(Shape(layout.shape.batch, seq))
            for reason in shaped.fitted.trust(Shape(layout.shape.batch, seq)):
                logger.warning("memfit: plans at seq %d may be off: %s", seq, reason)
    return apply_shape_plans(model, plans, layout.shape)
