"""Plans that follow each batch's shape: a forward pre-hook on the model picks the plan.

:class:`ShapePlans` is a forward pre-hook on the root module. Before each forward with
gradients it reads the batch's shape (:func:`memfit.measuring.sample_shapes.batch_shape`),
rounds the sequence length up to its bucket (and, with ``round_batch``, the batch size to the
sample's batch times a power of two), plans that bucket from the fitted costs when it has no
plan yet (:func:`memfit.planning.shape_costs.plan_shape`: evaluate the fits, solve;
milliseconds, nothing runs), and, when the bucket's schedule differs from the one applied, swaps plans with
:func:`~memfit.runtime.apply.remove_plan` and :func:`~memfit.runtime.apply.apply_plan`. A shape
no plan fits raises :class:`~memfit.errors.InfeasibleBudgetError` there, before the forward.
Forwards without gradients (evaluation, generation) run with whatever plan is applied.

The hook holds no module: the model it runs on comes with each call, so ``copy.deepcopy`` and
``pickle`` copy it with the model's hook dicts and the copy plans itself.

Feedback: on CUDA, before each forward the hook reads ``torch.cuda.max_memory_allocated`` (a
counter read, never reset: resetting would destroy the user's own statistics). When it has
grown since the last read, the step in between set a new high; if that high exceeds the
step's predicted peak by more than the margin under the budget absorbs (allocator caching and
fragmentation are not in the fits, nor are peaks whose op changes beyond the profiled shapes),
the margin is widened to 1.25 times the overshoot, the cached plans are dropped, and one
warning is logged. Steps below the running high are not seen: the check catches the overshoots that
matter, the new highs. On CPU nothing is read: there is no allocator counter, and the meter
(a profiler replay) costs a step's worth of time; :meth:`ShapePlans.observe` takes a peak
measured by other means (the benchmark feeds it the meter's).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memfit.errors import InfeasibleBudgetError
from memfit.measuring.sample_shapes import SampleLayout, batch_shape
from memfit.planning.plan import Plan
from memfit.planning.shape_costs import ShapeCosts, largest_shape, plan_shape
from memfit.planning.shape_fits import Shape
from memfit.planning.simulate import budget_base, simulate
from memfit.runtime.apply import (
    SHAPE_PLANS,
    applied_plan,
    apply_plan,
    chain_of_plan,
    refuse_planned,
    remove_plan,
)
from memfit.units import Budget, format_bytes

logger = logging.getLogger(__name__)

_KEY = SHAPE_PLANS
# the margin never grows past this share of the budget's activation bytes
MAX_MARGIN = 0.5


@dataclass(frozen=True, slots=True)
class Step:
    """One forward the hook planned: its shape, the bucket planned, the predicted peak of the
    applied schedule at the exact shape, and whether the plan was switched for it."""

    shape: Shape
    bucket: Shape
    predicted_peak_bytes: int
    switched: bool


@dataclass(eq=False)
class ShapePlans:
    """A plan per shape bucket, chosen before each forward (see the module docstring).

    Attributes:
        fitted: the chain's costs as functions of the shape.
        layout: where each batch's shape is read (the sample's layout).
        budget: bytes of step peak, or a fraction of each shape's activation memory.
        strategy: the planner's strategy.
        bucket: sequence lengths are rounded up to a multiple of this (one plan per bucket,
            made for its longest length; every shorter one then fits too).
        round_batch: round batch sizes up to the sample's batch times a power of two
            (:func:`batch_bucket`: 17-24 plan as 24 at a sample of 24, 25-48 as 48, 7-12 as
            12), so that a stream of many batch sizes holds a plan per bucket. Off by default,
            as measured: a plan per batch size costs milliseconds once (then cached) and a
            switch less, while a plan made for a larger batch recomputes more than the batch
            needs (+14% step time at 5 x 256 planned as 8 x 256; figures in
            ``benchmarks/results/design-figures.md``, "Batch sizes not rounded by default").
        keep_output, accumulate: the loop the plans are for.
        plans: bucket -> its plan (planned on first use).
        steps: every forward the hook planned (the last ``history`` of them).
        switches: how often the applied plan was swapped.
    """

    fitted: ShapeCosts
    layout: SampleLayout
    budget: Budget
    strategy: str = "optimal"
    bucket: int = 64
    margin: float = 0.02
    round_batch: bool = False
    keep_output: bool = True
    accumulate: bool = False
    history: int = 10_000
    plans: dict[Shape, Plan] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    switches: int = 0
    _high_bytes: int = 0
    _warned: bool = False

    def __post_init__(self) -> None:
        check_bucket_and_margin(self.bucket, self.margin)

    def bucket_of(self, shape: Shape) -> Shape:
        """The bucket ``shape`` falls in: its seq rounded up to a multiple of ``bucket``, its
        batch (with ``round_batch``) to the sample's batch times a power of two."""
        batch = shape.batch
        if self.round_batch:
            batch = batch_bucket(batch, self.layout.shape.batch)
        if not shape.seq:
            return Shape(batch, 0)
        return Shape(batch, math.ceil(shape.seq / self.bucket) * self.bucket)

    def plan_for(self, shape: Shape) -> Plan:
        """The plan for ``shape``'s bucket (planned from the fits on first use).

        Raises:
            InfeasibleBudgetError: no plan fits the bucket, naming the largest that does.
        """
        bucket = self.bucket_of(shape)
        plan = self.plans.get(bucket)
        if plan is None:
            try:
                plan = plan_shape(
                    self.fitted, bucket, self.budget, strategy=self.strategy, margin=self.margin
                )
            except InfeasibleBudgetError as error:
                raise self._beyond(shape, bucket, error) from None
            plan = plan.for_loop(keep_output=self.keep_output, accumulate=self.accumulate)
            self.plans[bucket] = plan
        return plan

    def _beyond(self, shape: Shape, bucket: Shape, error: InfeasibleBudgetError) -> Exception:
        hint = ""
        if self.budget.bytes is not None and shape.seq:
            fits = largest_shape(self.fitted, self.budget.bytes, batch=shape.batch)
            if fits is None:
                hint = f"; no sequence length fits at batch {shape.batch}"
            else:
                longest = (fits.seq // self.bucket) * self.bucket
                hint = (
                    f"; at batch {shape.batch} sequences up to about {longest} tokens fit "
                    f"(bucket {self.bucket}): cut or split longer ones"
                )
        return InfeasibleBudgetError(
            error.budget_bytes,
            error.min_feasible_bytes,
            message=f"batch of shape {shape} (planned as bucket {bucket}): {error}{hint}",
        )

    def predict(self, shape: Shape, plan: Plan | None = None) -> int:
        """The predicted step peak at ``shape`` of ``plan`` (default: its bucket's)."""
        plan = plan or self.plan_for(shape)
        return simulate(self.fitted.costs_at(shape), plan.tree).peak_bytes

    def observe(self, peak_bytes: int, step: Step | None = None) -> bool:
        """Compare a measured step peak with the prediction (default: the last step's); if the
        margin would not have absorbed the overshoot, widen it to 1.25 times the overshoot (as a
        share of the budget's activation bytes) and drop the cached plans. Returns whether the
        margin changed."""
        step = step or (self.steps[-1] if self.steps else None)
        if step is None or peak_bytes <= step.predicted_peak_bytes:
            return False
        costs = self.fitted.costs_at(step.bucket)
        held, activation = budget_base(costs)
        share = max(1, self.budget.resolve(held, activation) - held)
        # the margin must absorb an error of this size: widened to it (with a quarter more),
        # never added up, so that an error the fits make at every long batch widens it once
        needed = min(MAX_MARGIN, 1.25 * (peak_bytes - step.predicted_peak_bytes) / share)
        if needed <= self.margin:
            return False
        self.margin = needed
        self.plans.clear()
        if not self._warned:
            self._warned = True
            logger.warning(
                "memfit: a step of shape %s peaked at %s, %s above its prediction; planning "
                "with a margin of %.1f%% under the budget from now on (reported once)",
                step.shape,
                format_bytes(peak_bytes),
                format_bytes(peak_bytes - step.predicted_peak_bytes),
                self.margin * 100,
            )
        return True

    def _read_cuda(self, device: torch.device) -> None:
        high = int(torch.cuda.max_memory_allocated(device))
        if high > self._high_bytes:
            if self._high_bytes and self.steps:
                self.observe(high)
            self._high_bytes = high

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return None
        shape = batch_shape(args, kwargs, self.layout, module.forward)
        device = _device_of(args, kwargs)
        if device is not None and device.type == "cuda":
            self._read_cuda(device)
        plan = self.plan_for(shape)
        applied = applied_plan(module)
        switched = applied is None or applied.tree != plan.tree
        if switched:
            remove_plan(module)
            apply_plan(module, chain_of_plan(module, plan), plan)
            self.switches += 1
        self.steps.append(Step(shape, self.bucket_of(shape), self.predict(shape, plan), switched))
        del self.steps[: -self.history]
        return None


def check_bucket_and_margin(bucket: Any, margin: Any) -> None:
    """Refuse a ``bucket`` or ``margin`` no :class:`ShapePlans` can use (``memfit.auto`` checks
    them before it profiles anything).

    Raises:
        TypeError: ``bucket`` not an integer, ``margin`` not a number.
        ValueError: ``bucket`` below 1, ``margin`` outside [0, 1).
    """
    if isinstance(bucket, bool) or not isinstance(bucket, int):
        raise TypeError(
            f"bucket must be an integer sequence length >= 1 (lengths are rounded up to a "
            f"multiple of it, e.g. 64); got {type(bucket).__name__} {bucket!r}"
        )
    if bucket < 1:
        raise ValueError(
            f"bucket must be a sequence length >= 1 (lengths are rounded up to a multiple of "
            f"it, e.g. 64); got {bucket!r}"
        )
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise TypeError(f"margin must be a number in [0, 1); got {type(margin).__name__}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(
            f"margin must be in [0, 1) (the share of the budget's activation memory kept "
            f"free for what the shape fits miss, e.g. 0.02); got {margin!r}"
        )


def batch_bucket(batch: int, reference: int) -> int:
    """``batch`` rounded up to ``reference`` times a power of two: the smallest of
    ``reference, 2·reference, 4·reference, ...`` and ``ceil(reference / 2), ceil(reference / 4),
    ...`` that is at least ``batch``.

    Example:
        >>> [batch_bucket(b, 24) for b in (1, 5, 12, 13, 24, 25)]
        [1, 6, 12, 24, 24, 48]
    """
    if batch < 1 or reference < 1:
        raise ValueError(f"batch sizes are >= 1; got batch={batch}, reference={reference}")
    size = reference
    while size < batch:
        size *= 2
    while size > 1 and -(-size // 2) >= batch:
        size = -(-size // 2)
    return size


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def shape_plans(model: nn.Module) -> ShapePlans | None:
    """The :class:`ShapePlans` choosing ``model``'s plans, or ``None``."""
    key = model.__dict__.get(_KEY)
    if key is None:
        return None
    hook = model._forward_pre_hooks.get(key)
    return hook if isinstance(hook, ShapePlans) else None


def apply_shape_plans(model: nn.Module, plans: ShapePlans, shape: Shape) -> Plan:
    """Let ``plans`` choose ``model``'s plan before every forward; applies ``shape``'s now.

    Raises:
        AlreadyPlannedError: the model carries a plan or shape plans already.
        InfeasibleBudgetError: no plan fits ``shape``.
    """
    refuse_planned(model, "installing shape plans")
    plan = plans.plan_for(shape)
    apply_plan(model, chain_of_plan(model, plan), plan)
    handle = model.register_forward_pre_hook(plans, with_kwargs=True)
    model.__dict__[_KEY] = handle.id
    return plan


def remove_shape_plans(model: nn.Module) -> bool:
    """Remove the shape plans' hook and the plan applied; returns whether there was a hook."""
    key = model.__dict__.pop(_KEY, None)
    if key is None:
        return False
    model._forward_pre_hooks.pop(key, None)
    model._forward_pre_hooks_with_kwargs.pop(key, None)
    remove_plan(model)
    return True
