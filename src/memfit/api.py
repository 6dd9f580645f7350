"""memfit's public functions: plan, apply, remove, auto (and, re-exported, profile, verify).

They speak the user's words (a model, a sample, a budget such as ``"40%"`` or ``"12GiB"``) and
compose the layers below: ``measuring/`` (meter, steps, chain), ``planning/`` (solvers) and
``runtime/`` (executing a plan on the model). Profiling lives in :mod:`memfit.profiling`,
verification in :mod:`memfit.verification`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from memfit.distributed import agree_on_plan, ranks
from memfit.errors import AlreadyPlannedError, InfeasibleBudgetError, PlanMismatchError
from memfit.measuring.profile import Profile, fingerprint
from memfit.planning.plan import Plan
from memfit.planning.solve import solve
from memfit.profiling import profile
from memfit.runtime.apply import apply_plan, chain_of_plan, planned_module, remove_plan
from memfit.units import Budget, infeasible_message, parse_budget
from memfit.verification import Verification, verify

__all__ = ["Verification", "apply", "auto", "plan", "profile", "remove", "verify"]

logger = logging.getLogger(__name__)


def plan(
    profile_or_model: Profile | nn.Module,
    sample: Any = None,
    *,
    budget: int | float | str | Budget | None,
    strategy: str = "optimal",
    **profile_options: Any,
) -> Plan:
    """Choose how every stage runs so that the step fits ``budget`` at the least time.

    Args:
        profile_or_model: a :class:`Profile`, or a model (then ``sample`` is required and the
            model is profiled first, with ``profile_options`` passed to :func:`profile`:
            ``keep_output``, ``accumulate``, ``optimizer``, ``options``...). The plan records
            the loop the profile measured (``plan.keep_output``, ``plan.accumulate``).
        budget: a fraction of the step's activation memory without memfit (``"40%"``, or a
            float in (0, 1] such as ``0.4``), or bytes of step peak (``"12GiB"``, ``"800MB"``,
            ``12 * 2**30``, an integral float above 1); anything else is a ``ValueError`` (see
            :func:`~memfit.units.parse_budget`). ``None``: no cap (for the baselines).
        strategy: ``optimal`` (default), ``none``, ``all``, ``sqrt`` or ``every:k``.

    Returns:
        The :class:`~memfit.planning.Plan`, with its predicted peak and step time.

    Raises:
        InfeasibleBudgetError: no plan fits; the message states the smallest feasible budget in
            the units of ``budget`` (a percentage for a percentage, bytes and percentage for
            bytes), ``.min_feasible_bytes`` carries it in bytes of step peak.
        ValueError: malformed budget or strategy.

    Example:
        >>> p = memfit.plan(prof, budget="40%")
        >>> p.predicted_peak_bytes, p.options
    """
    parsed = None if budget is None else parse_budget(budget)
    if isinstance(profile_or_model, nn.Module):
        if sample is None:
            raise TypeError("memfit.plan(model, sample, budget=...) needs the sample to profile")
        prof = profile(profile_or_model, sample, **profile_options)
    elif isinstance(profile_or_model, Profile):
        prof = profile_or_model
    else:
        raise TypeError(
            f"memfit.plan takes a Profile or an nn.Module; got {type(profile_or_model).__name__}"
        )
    held, activation = prof.measurement.held_bytes, prof.measurement.activation_bytes
    budget_bytes = None if parsed is None else parsed.resolve(held, activation)
    try:
        result = solve(prof.costs, budget_bytes, strategy)
    except InfeasibleBudgetError as error:
        if parsed is None or budget_bytes is None:
            raise
        message = infeasible_message(
            parsed, budget_bytes, error.min_feasible_bytes, held, activation
        )
        raise InfeasibleBudgetError(
            budget_bytes, error.min_feasible_bytes, error.detail, message=message
        ) from None
    if int(prof.info.get("ranks", 1)) > 1 and ranks() > 1:  # merged over the ranks: all solved it
        result = agree_on_plan(result)
    # the plan holds for the loop the profile measured: verify measures that one again
    step = prof.measurement
    result = dataclasses.replace(result, keep_output=step.keep_output, accumulate=step.accumulate)
    logger.info("plan %s: predicted peak %d bytes", result.strategy, result.predicted_peak_bytes)
    return result


def apply(model: nn.Module, plan: Plan, sample: Any = None) -> None:
    """Run ``model`` with ``plan`` from now on (in place; ``memfit.remove`` undoes it).

    The module tree, ``state_dict()`` keys and values stay as they are.

    Args:
        sample: if given, also check that the plan was made for samples of this shape.

    Raises:
        AlreadyPlannedError: the model already carries a plan.
        PlanMismatchError: the plan was made for another model or sample shape.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"memfit.apply(model, plan) takes a Plan; got {type(plan).__name__}")
    if planned_module(model) is not None:
        raise AlreadyPlannedError("the model already carries a plan; call memfit.remove(model)")
    chain = chain_of_plan(model, plan)
    if plan.fingerprint:
        expected_model, _, expected_sample = plan.fingerprint.partition("-")
        if sample is None:
            actual = fingerprint(model, (), chain)
        else:
            actual = fingerprint(model, sample, chain)
        actual_model, _, actual_sample = actual.partition("-")
        if actual_model != expected_model:
            raise PlanMismatchError(
                "the plan was made for a model with other parameters (names, shapes or dtypes); "
                "profile and plan this model again"
            )
        if sample is not None and actual_sample != expected_sample:
            raise PlanMismatchError(
                "the plan was made for samples of another shape, dtype or device; its memory "
                "predictions do not hold for this sample: plan again with this sample"
            )
    apply_plan(model, chain, plan)


def remove(model: nn.Module) -> bool:
    """Undo :func:`apply`; returns whether a plan was removed (from ``model``, or from the model
    inside a wrapper made after planning, such as ``DistributedDataParallel``)."""
    target = planned_module(model)
    return target is not None and remove_plan(target)


def auto(
    model: nn.Module,
    sample: Any,
    *,
    budget: int | float | str | Budget,
    strategy: str = "optimal",
    **profile_options: Any,
) -> Plan:
    """Profile, plan and apply in one call; returns the plan applied.

    Profiling leaves the model as it found it; only the plan's own changes remain (undone by
    :func:`remove`; Hugging Face's own checkpointing stays off, with a warning).

    Args:
        model: the model, in training mode.
        sample: a tuple of positional or a dict of keyword arguments for ``model(...)``.
        budget: as for :func:`plan`: ``"40%"`` or a float in (0, 1] (of activation memory),
            or bytes of step peak (``"12GiB"``, an int, an integral float above 1).
        strategy: as for :func:`plan`.
        **profile_options: passed to :func:`profile`, e.g. ``keep_output=False`` for a loop
            that keeps only the loss, ``accumulate=True``, ``optimizer=opt``.

    Returns:
        The :class:`~memfit.planning.Plan` applied.

    Raises:
        InfeasibleBudgetError: no plan fits (see :func:`plan`); the model is left unplanned.
        ValueError: malformed budget or strategy.

    Example:
        >>> p = memfit.auto(model, (tokens, targets), budget="40%")
        >>> loss = model(tokens, targets); loss.backward()  # train as before
    """
    result = plan(model, sample, budget=budget, strategy=strategy, **profile_options)
    apply(model, result, sample)
    return result
