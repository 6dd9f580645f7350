"""memfit's public functions: plan, apply, remove, auto (and, re-exported, profile, verify).

They speak the user's words (a model, a sample, a budget such as ``"40%"`` or ``"12GiB"``) and
compose the layers below: ``measuring/`` (meter, steps, chain), ``planning/`` (solvers) and
``runtime/`` (executing a plan on the model). Profiling lives in :mod:`memfit.verbs.profiling`,
verification in :mod:`memfit.verbs.verification`.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
from typing import Any

from torch import nn

from memfit.errors import InfeasibleBudgetError, PlanMismatchError
from memfit.measuring.offload import available_host_bytes
from memfit.measuring.profile import Profile, fingerprint
from memfit.planning.candidates import alternatives, without
from memfit.planning.lossy import check_max_error, within_error
from memfit.planning.offload import offloads
from memfit.planning.plan import Plan
from memfit.planning.solve import Strategy, parse_strategy, solve
from memfit.runtime.apply import (
    applied_plan,
    apply_plan,
    chain_of_plan,
    planned_module,
    refuse_planned,
    remove_plan,
    undo_before_apply,
)
from memfit.runtime.compiled import (
    arm_traced_plan_warning,
    blocks_compiled,
    is_compile_budget,
    plan_compile_options,
    refuse_compiled_model,
    uncompile_blocks,
)
from memfit.runtime.dynamic import remove_shape_plans
from memfit.runtime.options import hooks_inside
from memfit.units import Budget, infeasible_message, parse_budget, parse_bytes
from memfit.verbs.distributed import agree_on_plan, rank0_plan, rank0_plans, ranks
from memfit.verbs.profile_options import ProfileOptions
from memfit.verbs.profiling import profile, profile_with
from memfit.verbs.shape_profiles import shape_profile_options
from memfit.verbs.timing import fastest
from memfit.verbs.verification import Verification, verify

__all__ = ["Verification", "apply", "auto", "plan", "profile", "remove", "verify"]

logger = logging.getLogger(__name__)


def plan(
    profile_or_model: Profile | nn.Module,
    sample: Any = None,
    *,
    budget: int | float | str | Budget | None,
    strategy: str = "optimal",
    host_budget: int | str | None = None,
    candidates: int = 1,
    max_error: float | None = None,
    **profile_options: Any,
) -> Plan:
    """Choose how every stage runs so that the step fits ``budget`` at the least time.

    Args:
        profile_or_model: a :class:`Profile`, or a model (then ``sample`` is required and the
            model is profiled first, with ``profile_options`` passed to :func:`profile`:
            ``keep_output``, ``accumulate``, ``optimizer``, ``options``, ``exact=False`` to
            also offer options exact only to rounding, such as ``head:chunked``...). The plan
            records the loop the profile measured (``plan.keep_output``, ``plan.accumulate``);
            a plan using an option exact to rounding says so (``plan.exact`` is false,
            ``plan.inexact`` names the stage), and what planning took:
            ``plan.info["setup_s"]`` seconds, ``plan.info["setup_steps"]`` unplanned steps.
        budget: a fraction of the step's activation memory without memfit (``"40%"``, or a
            float in (0, 1] such as ``0.4``): the step peak above what is held before it
            (weights, optimizer state, the batch) and the gradients it makes, which no plan
            removes (``"40%"`` keeps them and 40% of the rest); or bytes of step peak (``"12GiB"``, ``"800MB"``,
            ``12 * 2**30``, an integral float above 1); anything else is a ``ValueError`` (see
            :func:`~memfit.units.parse_budget`). ``None``: no cap (for the baselines).
        strategy: ``optimal`` (default), ``none``, ``all``, ``sqrt`` or ``every:k``.
        host_budget: host memory that offloaded activations may take (bytes, or ``"64GiB"``);
            ``None``: half of the host memory available now. Only CUDA profiles offload
            (``plan.info["host_peak_bytes"]`` says how much a plan holds there). Checked
            everywhere (a malformed size is a ``ValueError`` before anything is measured);
            on a model whose profile has no offload in its menu (CPU) a valid size has no
            effect, so that one script serves CPU and CUDA (``plan.notes`` says why
            offload is absent).
        candidates: how many plans within the budget to time on the model before choosing
            (``optimal`` only; needs the model and sample, not a profile). 1 (default): the
            optimal plan of the predicted costs. More: that plan and the optimal plans over
            menus without the options it relies on (:func:`~memfit.planning.candidates.
            alternatives`) run in turns, whole steps, and the fastest by more than 1% wins
            (:func:`memfit.verbs.timing.fastest`: ``plan.info["timed"]`` lists what was measured).
            Costs 10 steps per plan (5 rounds of an untimed and a timed step; ``repeats`` does
            not change it); worth it where predictions of mixed plans miss. Across ranks
            every rank times the same plans in lockstep and all run rank 0's choice.
        max_error: the error budget of lossy options (``compress:*``, measured with
            ``exact=False``): the largest relative gradient error of a parameter group
            (``||g - g_exact|| / ||g_exact||`` over a block's parameters) that an option may
            bring, as the profile measured it with every block under the option on the sample;
            options above it are not offered (``plan.notes`` says which), and
            :func:`memfit.verify` holds the plan to it (``plan.max_error``). ``None``
            (default): no bound. Needs ``exact=False`` when a model is profiled here.

    Returns:
        The :class:`~memfit.planning.Plan`, with its predicted peak and step time.

    Raises:
        InfeasibleBudgetError: no plan fits; the message states the smallest feasible budget in
            the units of ``budget`` (a percentage for a percentage, bytes and percentage for
            bytes), ``.min_feasible_bytes`` carries it in bytes of step peak.
        ValueError: malformed budget (zero, negative, infinite), strategy or host budget;
            ``candidates`` below 1, or above 1 with another strategy than ``optimal`` or
            with a profile instead of the model; a model with nothing to train. All raised
            before anything is measured.
        TypeError: ``candidates`` is not an integer; ``loss_fn`` not callable; ``optimizer``
            not an optimizer; a ``torch.compile`` wrapper as the model (the message shows the
            fix: plan ``model._orig_mod`` with ``compile=True``); ``max_error`` not a number.

    Example:
        >>> p = memfit.plan(prof, budget="40%")
        >>> p.predicted_peak_bytes, p.options
    """
    started = time.perf_counter()
    # every argument is checked here, before anything is measured
    if isinstance(profile_or_model, nn.Module):
        refuse_compiled_model(profile_or_model, "plan")
    parsed = None if budget is None else parse_budget(budget)
    parse_strategy(strategy)
    host_budget_bytes = None if host_budget is None else _host_budget(host_budget)
    candidates = _check_candidates(candidates, profile_or_model, strategy)
    if max_error is not None:
        max_error = check_max_error(max_error)
    options = None
    if isinstance(profile_or_model, nn.Module):
        if sample is None:
            raise TypeError("memfit.plan(model, sample, budget=...) needs the sample to profile")
        options = ProfileOptions.of(**profile_options)
        if max_error is not None and options.exact:
            raise ValueError(
                f"max_error={max_error!r} bounds the error of lossy options, which only "
                f"exact=False offers; pass exact=False too, or leave max_error out"
            )
        prof = profile_with(profile_or_model, sample, options)
    elif isinstance(profile_or_model, Profile):
        prof = profile_or_model
    else:
        raise TypeError(
            f"memfit.plan takes a Profile or an nn.Module; got {type(profile_or_model).__name__}"
        )
    if max_error is not None:  # options above the error budget leave the menu, with a note
        bounded, dropped = within_error(prof.costs, max_error)
        prof = dataclasses.replace(prof, costs=bounded, notes=(*prof.notes, *dropped))
    held, activation = prof.measurement.base_bytes, prof.measurement.activation_bytes
    budget_bytes = None if parsed is None else parsed.resolve(held, activation)
    extra: dict[str, Any] = {}
    if offloads(prof.costs) and parse_strategy(strategy)[0] is Strategy.OPTIMAL:
        limit = available_host_bytes() // 2 if host_budget_bytes is None else host_budget_bytes
        extra["host_budget_bytes"] = limit
    try:
        if candidates > 1:
            plans = alternatives(prof.costs, budget_bytes, candidates, **extra)
            if len(plans) < candidates:
                logger.info(
                    "plan: %d of %d candidates: the optimal plan relies on no option a plan "
                    "within the budget can do without",
                    len(plans),
                    candidates,
                )
        else:
            plans = [solve(prof.costs, budget_bytes, strategy, **extra)]
    except InfeasibleBudgetError as error:
        if parsed is None or budget_bytes is None:
            raise
        floor = _stable_floor(prof, budget_bytes, strategy, extra, error.min_feasible_bytes)
        message = infeasible_message(parsed, budget_bytes, floor, held, activation)
        raise InfeasibleBudgetError(budget_bytes, floor, error.detail, message=message) from None
    together = int(prof.info.get("ranks", 1)) > 1 and ranks() > 1  # merged: all ranks solved it
    if together:
        plans = rank0_plans(plans) if candidates > 1 else [agree_on_plan(plans[0])]
    # the plan holds for the loop the profile measured: verify measures that one again
    step = prof.measurement
    for index, candidate in enumerate(plans):
        stamped = candidate.for_loop(keep_output=step.keep_output, accumulate=step.accumulate)
        # compiled blocks: apply compiles them; the menu's notes: what was left out and why
        plans[index] = dataclasses.replace(
            stamped, compile=prof.compile, notes=prof.notes, max_error=max_error
        )
    result = plans[0]
    if candidates > 1:
        assert isinstance(profile_or_model, nn.Module) and options is not None  # checked above
        result = fastest(
            profile_or_model,
            sample,
            plans,
            loop=options.loop,  # the loop the profile measured
            drop_failures=not together,  # a rank that skips a plan would desert the others
            compile=prof.compile,  # profiled here: the caller's own arguments
        )
        if together:  # every rank timed the same plans in lockstep; all run rank 0's choice
            result = rank0_plan(result)
    if isinstance(profile_or_model, nn.Module):  # what planning cost, in the user's steps
        setup_s = time.perf_counter() - started
        setup = {"setup_s": setup_s, "setup_steps": setup_s / max(step.step_s, 1e-9)}
        result = dataclasses.replace(result, info={**result.info, **setup})
    # debug: a caller that applies the plan says so once (the Trainer callback logs one line)
    logger.debug("plan %s: predicted peak %d bytes", result.strategy, result.predicted_peak_bytes)
    return result


def _stable_floor(
    prof: Profile, budget_bytes: int, strategy: str, extra: dict[str, Any], floor: int
) -> int:
    """The smallest budget a later profile of the same model accepts too: the floor without the
    options the profile chose by measured op times (``profile.info["timed_options"]``), which
    another profile may not propose. A few bytes above ``floor`` (the floor with them) at most
    what those options save; a named floor that the next call refuses would be worse."""
    timed = set(prof.info.get("timed_options", ()))
    if not timed:
        return floor
    try:
        solve(without(prof.costs, timed), budget_bytes, strategy, **extra)
    except InfeasibleBudgetError as stable:
        return max(floor, stable.min_feasible_bytes)
    return floor  # not reached: fewer options reach no lower floor


def _host_budget(host_budget: Any) -> int:
    """``host_budget`` in bytes; a ``ValueError``/``TypeError`` naming it when malformed."""
    try:
        return parse_bytes(host_budget)
    except (ValueError, TypeError) as error:
        raise type(error)(
            f'host_budget (host memory offloaded activations may take, e.g. "64GiB"): {error}'
        ) from None


def _check_candidates(candidates: Any, profile_or_model: Any, strategy: str) -> int:
    """``candidates`` as an int, checked against the other arguments of :func:`plan`."""
    if isinstance(candidates, bool):
        raise TypeError(f"candidates must be an integer >= 1; got {candidates!r}")
    try:
        count = operator.index(candidates)
    except TypeError:
        raise TypeError(
            f"candidates must be an integer >= 1 (plans to time on the model); got "
            f"{type(candidates).__name__} {candidates!r}"
        ) from None
    if count < 1:
        raise ValueError(
            f"candidates must be an integer >= 1 (plans to time on the model; 1: the optimal "
            f"plan, untimed); got {count}"
        )
    if count == 1:
        return count
    if parse_strategy(strategy)[0] is not Strategy.OPTIMAL:
        raise ValueError(
            f"candidates={count} chooses among optimal plans; strategy {strategy!r} makes one "
            f"plan. Use strategy='optimal' or candidates=1"
        )
    if not isinstance(profile_or_model, nn.Module):
        raise ValueError(
            f"candidates={count} times plans on the model: call memfit.plan(model, sample, "
            f"budget=..., candidates={count}) (or memfit.auto), not with a profile"
        )
    return count


def apply(
    model: nn.Module,
    plan: Plan,
    sample: Any = None,
    *,
    compile: bool | dict[str, Any] | None = None,
) -> None:
    """Run ``model`` with ``plan`` from now on (in place; ``memfit.remove`` undoes it).

    The module tree, ``state_dict()`` keys and values stay as they are.

    A plan made from a compiled profile (``plan.compile``, see :func:`profile`)
    compiles each block's own forward first; memfit's checkpoints run around the compiled
    blocks. A plan is data, and may come from a file: the ``torch.compile`` arguments are the
    caller's ``compile=``, or else the plan's own settings when they only choose among torch's
    compilers (backend, mode, fullgraph, dynamic: see
    :func:`~memfit.runtime.compiled.plan_compile_options`).

    Args:
        sample: if given, also check that the plan was made for samples of this shape.
        compile: your own ``torch.compile`` arguments for a plan from a compiled profile
            (``True``, or a dict such as ``{"mode": "max-autotune", "options": {...}}``);
            ``None``: the plan's settings, checked.

    Raises:
        AlreadyPlannedError: the model already carries a plan.
        PlanMismatchError: the plan was made for another model or sample shape, asks for
            ``rebuild``/``selective:*`` on compiled blocks, or names compile settings a plan
            may not set (pass ``compile=`` yourself); ``compile=`` for a plan made without
            compiled blocks.
        TypeError: ``model`` is a ``torch.compile`` wrapper (apply to ``model._orig_mod`` a
            plan made with ``compile=True``).

    A ``torch.compile`` around a model planned without ``compile=`` warns once, at its first
    compiled step: compile's partitioner then decides what the checkpoints save, and the
    plan's budget does not hold (the warning shows the fix).

    Example:
        >>> memfit.apply(model, memfit.Plan.from_json(path.read_text()), sample)
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"memfit.apply(model, plan) takes a Plan; got {type(plan).__name__}")
    refuse_compiled_model(model, "apply")
    compiling = plan_compile_options(plan, compile)
    refuse_planned(model, "applying another")
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
    if compiling is None:
        budgets = sorted({o for o in plan.options.values() if is_compile_budget(o)})
        if budgets:
            raise PlanMismatchError(
                f"the plan asks for {budgets}, which run on compiled blocks, but records no "
                f"compile arguments (plan.compile); plan with compile=True"
            )
        apply_plan(model, chain, plan)
        arm_traced_plan_warning()
        return
    hooked = sorted({o for o in plan.options.values() if hooks_inside(o)})
    if hooked:
        raise PlanMismatchError(
            f"the plan compiles its blocks (compile={compiling}) but asks for {hooked}, which "
            f"cannot see inside compiled blocks; plan again from a compiled profile"
        )
    with blocks_compiled(chain.blocks, compiling, keep=True):  # until memfit.remove
        apply_plan(model, chain, plan)


def remove(model: nn.Module) -> bool:
    """Undo :func:`apply` (or :func:`auto`, shape-following plans included; blocks it
    compiled run their own forward again; Hugging Face's gradient checkpointing, when apply
    turned it off, is on again as the user had it, PEFT's input-require-grads hooks
    included); returns whether a plan was removed (from ``model``, or from the model inside a
    wrapper made after planning, such as ``DistributedDataParallel``).
    """
    if remove_shape_plans(model):
        undo_before_apply(model)
        return True
    target = planned_module(model)
    current = None if target is None else applied_plan(target)
    if target is None or current is None:
        return False
    chain = chain_of_plan(target, current)
    remove_plan(target)
    if current.compile is not None:
        uncompile_blocks(chain.blocks)
    undo_before_apply(target)  # Hugging Face's checkpointing back on, if apply turned it off
    return True


def auto(
    model: nn.Module,
    sample: Any,
    *,
    budget: int | float | str | Budget | None,
    strategy: str = "optimal",
    shapes: str | None = None,
    seq_range: tuple[int, int] | None = None,
    bucket: int = 64,
    margin: float = 0.02,
    round_batch: bool = False,
    candidates: int = 1,
    max_error: float | None = None,
    **profile_options: Any,
) -> Plan:
    """Profile, plan and apply in one call; returns the plan applied.

    With ``shapes="dynamic"`` the plan follows each batch's shape: the model is profiled at a
    few shapes made from the sample (:func:`memfit.profile_shapes`), and before every forward
    with gradients a hook plans the batch's shape bucket from the fitted costs (milliseconds,
    nothing runs) and swaps plans when the bucket needs another (see
    :mod:`memfit.runtime.dynamic`; ``memfit.runtime.dynamic.shape_plans(model)`` shows the
    plans, steps and switches).

    Profiling leaves the model as it found it; only the plan's own changes remain (undone by
    :func:`remove`; Hugging Face's own checkpointing stays off, with a warning).

    Args:
        model: the model, in training mode.
        sample: a tuple of positional or a dict of keyword arguments for ``model(...)``.
        budget: as for :func:`plan`: ``"40%"`` or a float in (0, 1] (of activation memory),
            or bytes of step peak (``"12GiB"``, an int, an integral float above 1). ``None``
            only with a baseline strategy (``all``, ``sqrt``, ``every:k``, ``none``): an
            optimal plan without a budget saves nothing, so that is a ``TypeError``.
        strategy: as for :func:`plan`.
        shapes: ``None`` (one plan for the sample's shape) or ``"dynamic"`` (a plan per shape
            bucket, chosen at each forward; a percentage budget is then of each shape's own
            activation memory).
        seq_range: with ``shapes="dynamic"``, the ``(shortest, longest)`` sequence lengths to
            be trained at, checked now: a longest length no plan fits raises here, not in a
            forward. Longer batches are planned too, and raise before their forward starts
            when nothing fits.
        bucket: with ``shapes="dynamic"``, lengths are rounded up to a multiple of this (one
            plan per bucket, made for its longest length).
        margin: with ``shapes="dynamic"``, plans are made for ``1 - margin`` of the budget's
            activation share, for what the shape fits miss (widened on CUDA when a step peaks
            above its prediction).
        round_batch: with ``shapes="dynamic"``, round batch sizes up to the sample's batch
            times a power of two (one plan for sizes 17-24 at a sample of 24; default: a plan
            per batch size, see :class:`~memfit.runtime.dynamic.ShapePlans`).
        candidates: as for :func:`plan`: time this many plans within the budget on the model
            and apply the fastest (one shape only: not with ``shapes="dynamic"``).
        max_error: as for :func:`plan`: the error budget of lossy options (with
            ``exact=False``; one shape only: not with ``shapes="dynamic"``).
        **profile_options: passed to :func:`profile` (and to :func:`memfit.profile_shapes`
            with ``shapes="dynamic"``: ``shapes_profiled=[(1, 64), ...]``, or
            ``shape_profile=`` a :class:`~memfit.ShapeProfile` made before, to reuse), e.g.
            ``keep_output=False`` for a loop that keeps only the loss, ``accumulate=True``,
            ``optimizer=opt``, ``compile=True`` (or a dict of ``torch.compile`` arguments) to
            plan with the blocks compiled and run them compiled, ``exact=False`` to also offer
            options exact only to rounding (``head:chunked``: head and loss fused in chunks of
            tokens; the plan then says so, ``plan.exact``).

    Returns:
        The :class:`~memfit.planning.Plan` applied (with ``shapes="dynamic"``: the sample's).

    Raises:
        InfeasibleBudgetError: no plan fits (see :func:`plan`; with ``shapes="dynamic"``: at
            the sample's shape or the longest of ``seq_range``); the model is left unplanned.
        ValueError: malformed budget, strategy, shapes, range, ``bucket`` or ``margin``, or
            anything else :func:`plan` refuses; all before anything is measured.
        TypeError: ``budget=None`` with the optimal strategy or ``shapes="dynamic"``; a
            ``torch.compile`` wrapper as the model (the message shows the two-line fix).

    Example:
        >>> p = memfit.auto(model, (tokens, targets), budget="40%")
        >>> loss = model(tokens, targets); loss.backward()  # train as before
    """
    # every argument is checked here, before anything is measured
    refuse_compiled_model(model, "auto")
    count = _check_candidates(candidates, model, strategy)
    if budget is None and (shapes is not None or parse_strategy(strategy)[0] is Strategy.OPTIMAL):
        raise TypeError(
            f"memfit.auto(model, sample, budget=None, strategy={strategy!r}"
            f"{', shapes=' + repr(shapes) if shapes is not None else ''}): the optimal plan "
            f'without a budget keeps every activation and saves nothing. Give a budget ("40%" '
            f'of activation memory, or bytes of step peak such as "12GiB"), or a baseline '
            f'strategy that needs none (strategy="all", "sqrt" or "every:k")'
        )
    if shapes is not None:
        if shapes != "dynamic":
            raise ValueError(f'shapes must be None or "dynamic"; got {shapes!r}')
        if max_error is not None:
            raise ValueError(
                "max_error bounds options measured on the sample's shape: not with "
                'shapes="dynamic"; leave it out or plan one shape'
            )
        if count != 1:
            raise ValueError(
                'candidates times plans at the sample\'s shape: not with shapes="dynamic" '
                "(each shape's plan is made in milliseconds, at its first batch); use "
                "candidates=1"
            )
        from memfit.verbs.estimation import auto_dynamic

        assert budget is not None  # refused above
        shapes_profiled = profile_options.pop("shapes_profiled", None)
        shape_profile = profile_options.pop("shape_profile", None)
        applied = auto_dynamic(
            model,
            sample,
            budget=budget,
            strategy=strategy,
            seq_range=seq_range,
            bucket=bucket,
            margin=margin,
            round_batch=round_batch,
            shapes_profiled=shapes_profiled,
            shape_profile=shape_profile,
            options=shape_profile_options(**profile_options),
        )
        arm_traced_plan_warning()
        return applied
    if seq_range is not None:
        raise ValueError('seq_range applies to shapes="dynamic" only')
    result = plan(
        model,
        sample,
        budget=budget,
        strategy=strategy,
        candidates=count,
        max_error=max_error,
        **profile_options,
    )
    # made here from the caller's compile= (or the blocks the caller compiled): theirs to pass
    apply(model, result, sample, compile=result.compile)
    return result
