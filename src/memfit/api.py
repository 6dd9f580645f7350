"""memfit's public functions: measure, profile, plan, apply, remove, auto, verify.

They speak the user's words (a model, a sample, a budget such as ``"40%"`` or ``"12GiB"``) and
compose the layers below: ``measure/`` (meter, steps, chain), ``plan/`` (solvers) and
``runtime/`` (executing a plan on the model).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from memfit.errors import AlreadyPlannedError, MemfitError, PlanMismatchError
from memfit.integrations.hf import disable_hf_checkpointing
from memfit.measure.chain import Chain, find_chain
from memfit.measure.ops import candidate_policies, profile_ops, selective_detail
from memfit.measure.profile import Profile, build_profile, fingerprint
from memfit.measure.run import (
    Measurement,
    StageReading,
    measure,
    measure_stages,
    stage_clock,
    time_step,
)
from memfit.measure.step import LossFn, compute_loss, reset_grads, sample_device, split_sample
from memfit.plan.costs import KEEP
from memfit.plan.plan import Plan, Stage, recompute_one
from memfit.plan.solve import solve
from memfit.runtime import REBUILD, REBUILD_LINEAR, recording, saved_ops, stage_wrapper
from memfit.runtime.apply import applied_plan, apply_plan, remove_plan
from memfit.runtime.options import is_selective
from memfit.units import Budget, parse_budget

logger = logging.getLogger(__name__)

Blocks = Sequence[str] | str | None


def _chain(model: nn.Module, sample: Any, blocks: Blocks) -> Chain:
    args, kwargs = split_sample(sample)
    return find_chain(model, lambda: model(*args, **kwargs), blocks)


def chain_of_plan(model: nn.Module, plan: Plan) -> Chain:
    """The chain a plan names, looked up in ``model`` (PlanMismatchError if it lacks a block)."""
    modules = dict(model.named_modules())
    names = plan.stage_names[1:-1]
    missing = [name for name in names if name not in modules]
    if missing:
        raise PlanMismatchError(
            f"the plan names blocks {missing[:3]} that {type(model).__name__} does not have; "
            f"it was made for another model (plan stages: {list(plan.stage_names[:4])}...)"
        )
    container = names[0].rpartition(".")[0] if names else ""
    return Chain(container, tuple(names), tuple(modules[name] for name in names))


def _every_block(chain: Chain, option: str | None) -> Plan:
    last = len(chain) - 1
    blocks = [recompute_one(i) if option is None else Stage(i, option) for i in range(1, last)]
    strategy = "all" if option is None else f"every block {option}"
    return Plan.from_tree(chain.stage_names, (Stage(0), *blocks, Stage(last)), strategy)


RECOMPUTE = "recompute"


@contextmanager
def _planned(model: nn.Module, chain: Chain | None, plan: Plan | None) -> Iterator[None]:
    """``model`` runs ``plan`` inside the ``with`` statement (as it is when ``None``)."""
    if plan is None:
        yield
        return
    assert chain is not None
    apply_plan(model, chain, plan)
    try:
        yield
    finally:
        remove_plan(model)


def profile(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    blocks: Blocks = None,
    accumulate: bool = False,
    repeats: int = 3,
    options: Sequence[str] | str = "auto",
    optimizer: Any = None,
) -> Profile:
    """Find the model's chain and measure every stage under every option.

    Args:
        model: the model, in training mode.
        sample: a tuple of positional or a dict of keyword arguments for ``model(...)``.
        loss_fn: maps the output to the scalar loss when needed (see :func:`measure`).
        blocks: the blocks' fqns (or their container's); ``None`` finds them.
        accumulate: profile the gradient-accumulation steady state.
        repeats: timed steps per way of running the model.
        options: per-block options to measure beside keep and recompute: ``"auto"`` (default)
            measures ``rebuild``, ``rebuild+linear`` and a few selective-recompute policies
            picked from the blocks' op profile; or a list such as
            ``["rebuild", "selective:matmul"]``; ``()`` for none.
        optimizer: its state counts as held before the step.

    Returns:
        A :class:`~memfit.measure.Profile`; ``profile.costs`` is what the planner reads.

    Raises:
        AlreadyPlannedError: the model carries a plan (``memfit.remove(model)`` first).
        UnsupportedModelError: no chain of blocks found; pass ``blocks=``.
        ValueError: an unknown option name (checked before anything is measured).

    Example:
        >>> prof = memfit.profile(model, (tokens, targets))
        >>> prof.measurement.peak_bytes
    """
    if applied_plan(model) is not None:
        raise AlreadyPlannedError(
            "the model already carries a memfit plan; call memfit.remove(model) before profiling"
        )
    if repeats < 1:
        raise ValueError(
            f"repeats must be at least 1 (timed steps per way of running); got {repeats}"
        )
    if isinstance(options, str):
        if options != "auto":
            raise ValueError(f'options must be "auto" or a list of option names; got {options!r}')
    else:
        options = list(options)
        for name in options:  # a bad name fails here, before anything is measured or changed
            stage_wrapper(name)
    # Measure the model as memfit will run it: HF's own checkpointing off (with a warning).
    disable_hf_checkpointing(model)
    chain = _chain(model, sample, blocks)
    if isinstance(options, str):
        block_ops = profile_ops(model, sample, chain)
        options = [REBUILD, REBUILD_LINEAR, *candidate_policies(block_ops)]
    else:
        block_ops = profile_ops(model, sample, chain) if any(map(is_selective, options)) else []
    # Every way of running the blocks: keep, recompute (each block its own segment), options.
    ways: dict[str, Plan | None] = {KEEP: None, RECOMPUTE: _every_block(chain, None)}
    ways |= {option: _every_block(chain, option) for option in options if option != KEEP}
    # Times first, in turns (keep, recompute, options, keep, ...), so that the machine's drift
    # reaches every way alike and the planner compares options measured side by side.
    clocks: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, way_plan in ways.items():
            with _planned(model, chain, way_plan):
                clocks[way].append(
                    stage_clock(model, sample, chain, loss_fn=loss_fn, accumulate=accumulate)
                )
    readings: dict[str, StageReading] = {}
    details: dict[str, list[dict[str, Any]]] = {}
    for way, way_plan in ways.items():
        with _planned(model, chain, way_plan), recording() as rebuilt:
            readings[way] = measure_stages(
                model,
                sample,
                chain,
                loss_fn=loss_fn,
                accumulate=accumulate,
                optimizer=optimizer,
                clocks=clocks[way],
            )
        if is_selective(way):
            saved = saved_ops(way)
            details[way] = [selective_detail(block, saved) for block in block_ops]
        elif rebuilt:  # the warm-up forward's blocks, in chain order
            details[way] = [{"rebuilds": entry} for entry in rebuilt[: len(chain.block_names)]]
    keep, recompute = readings.pop(KEEP), readings.pop(RECOMPUTE)
    ops = {block.name: block.to_rows() for block in block_ops}
    return build_profile(
        model,
        sample,
        chain,
        keep,
        recompute=recompute,
        options=readings,
        details=details,
        info={"ops": ops} if ops else None,
    )


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
            model is profiled first, with ``profile_options`` passed to :func:`profile`).
        budget: bytes of step peak (``"12GiB"``, ``"800MB"``, ``12 * 2**30``), or a percentage of
            the step's activation memory without memfit (``"40%"``); ``None``: no cap (for the
            baselines).
        strategy: ``optimal`` (default), ``none``, ``all``, ``sqrt`` or ``every:k``.

    Returns:
        The :class:`~memfit.plan.Plan`, with its predicted peak and step time.

    Raises:
        InfeasibleBudgetError: no plan fits; carries the smallest feasible budget.
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
    budget_bytes = (
        None
        if parsed is None
        else parsed.resolve(prof.measurement.held_bytes, prof.measurement.activation_bytes)
    )
    result = solve(prof.costs, budget_bytes, strategy)
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
    if applied_plan(model) is not None:
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
    """Undo :func:`apply`; returns whether a plan was removed."""
    return remove_plan(model)


def auto(
    model: nn.Module,
    sample: Any,
    *,
    budget: int | float | str | Budget,
    strategy: str = "optimal",
    **profile_options: Any,
) -> Plan:
    """Profile, plan and apply in one call; returns the plan applied.

    Example:
        >>> p = memfit.auto(model, (tokens, targets), budget="40%")
        >>> loss = model(tokens, targets); loss.backward()  # train as before
    """
    result = plan(model, sample, budget=budget, strategy=strategy, **profile_options)
    apply(model, result, sample)
    return result


@dataclass(frozen=True, kw_only=True, slots=True)
class Verification:
    """What :func:`verify` found.

    Attributes:
        gradients_equal: every parameter gradient bitwise equal to the unplanned model's.
        loss_equal: the loss bitwise equal.
        mismatched: names of parameters whose gradients differ.
        measured_peak_bytes: the planned step's measured peak.
        baseline_peak_bytes: the unplanned step's measured peak.
        predicted_peak_bytes: the plan's prediction.
        budget_bytes: the plan's budget (None without one).
        overhead: planned step time / unplanned step time - 1 (medians, interleaved runs).
    """

    gradients_equal: bool
    loss_equal: bool
    mismatched: tuple[str, ...]
    measured_peak_bytes: int
    baseline_peak_bytes: int
    predicted_peak_bytes: int
    budget_bytes: int | None
    overhead: float
    planned: Measurement
    baseline: Measurement

    @property
    def ok(self) -> bool:
        """Gradients and loss equal, and the peak within the budget."""
        fits = self.budget_bytes is None or self.measured_peak_bytes <= self.budget_bytes
        return self.gradients_equal and self.loss_equal and fits

    @property
    def prediction_error(self) -> float:
        """(predicted - measured) / measured peak."""
        return self.predicted_peak_bytes / self.measured_peak_bytes - 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok, "prediction_error": self.prediction_error}


def seeded_gradients(
    model: nn.Module, sample: Any, loss_fn: LossFn | None, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Loss and parameter gradients of one step from RNG seed ``seed``; the user's RNG state is
    restored, the model's ``.grad`` fields are left at ``None``."""
    reset_grads(model, accumulate=False)
    args, kwargs = split_sample(sample)
    device = sample_device(model, sample)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        loss = compute_loss(model(*args, **kwargs), loss_fn)
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    reset_grads(model, accumulate=False)
    return loss.detach(), grads


def verify(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> Verification:
    """Check a planned model against itself unplanned: gradients, loss, peak and overhead.

    Runs one step with and without the plan from the same RNG state (dropout on) and compares
    every parameter gradient and the loss bit for bit; measures both peaks; times both steps in
    pairs (planned, unplanned; ``repeats`` pairs) and reports the median of the paired ratios.

    Raises:
        MemfitError: the model carries no plan.
        ValueError: ``repeats < 1``.

    Example:
        >>> memfit.auto(model, batch, budget="40%")
        >>> report = memfit.verify(model, batch)
        >>> assert report.gradients_equal and report.ok
    """
    current = applied_plan(model)
    if current is None:
        raise MemfitError("memfit.verify needs a planned model: call memfit.apply or memfit.auto")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (timed pairs of steps); got {repeats}")
    chain = chain_of_plan(model, current)
    saved_grads = {p: p.grad for p in model.parameters()}
    try:
        planned_loss, planned_grads = seeded_gradients(model, sample, loss_fn, seed)
        planned = measure(model, sample, loss_fn=loss_fn, repeats=1)
        remove_plan(model)
        reference_loss, reference_grads = seeded_gradients(model, sample, loss_fn, seed)
        baseline = measure(model, sample, loss_fn=loss_fn, repeats=1)
        ratios = [
            timed_step_under(model, sample, current, loss_fn)
            / timed_step_under(model, sample, None, loss_fn)
            for _ in range(repeats)
        ]
    finally:
        if applied_plan(model) is None:
            apply_plan(model, chain, current)
        for parameter, grad in saved_grads.items():
            parameter.grad = grad
    mismatched = tuple(
        name
        for name, grad in reference_grads.items()
        if not same_tensors(grad, planned_grads.get(name))
    )
    return Verification(
        gradients_equal=not mismatched,
        loss_equal=torch.equal(reference_loss, planned_loss),
        mismatched=mismatched,
        measured_peak_bytes=planned.peak_bytes,
        baseline_peak_bytes=baseline.peak_bytes,
        predicted_peak_bytes=current.predicted_peak_bytes,
        budget_bytes=current.budget_bytes,
        overhead=statistics.median(ratios) - 1.0,
        planned=planned,
        baseline=baseline,
    )


def timed_step_under(
    model: nn.Module, sample: Any, plan: Plan | None, loss_fn: LossFn | None = None
) -> float:
    """Seconds of one step of ``model`` under ``plan`` (``None``: unplanned; ``model`` must not
    carry a plan), after one untimed step: right after another way of running, the allocator's
    state (pages a leaner plan gave back) would otherwise be charged to this one."""
    chain = None if plan is None else chain_of_plan(model, plan)
    with _planned(model, chain, plan):
        time_step(model, sample, loss_fn=loss_fn)
        return time_step(model, sample, loss_fn=loss_fn)


def same_tensors(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bitwise equal, or both missing."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)
