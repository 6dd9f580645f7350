"""``memfit.verify``: a planned model against itself unplanned, bit for bit, byte for byte.

The checks here (seeded gradients compared with ``torch.equal``, metered peaks, paired timings)
are the ones the benchmark (:mod:`memfit.verbs.bench`) runs for every row too.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from memfit.errors import MemfitError
from memfit.measuring.loop import TrainingLoop
from memfit.measuring.readings import Measurement
from memfit.measuring.run import USUAL, measure_loop, time_step
from memfit.measuring.state import Buffers, buffer_values, preserving_state
from memfit.measuring.step import (
    LossFn,
    check_step_arguments,
    compute_loss,
    held_bytes,
    reset_grads,
    sample_device,
    split_sample,
)
from memfit.measuring.trace import Trace, compare_traces, exempt_regions, tracing
from memfit.planning.plan import Plan
from memfit.runtime.apply import (
    applied_plan,
    apply_plan,
    chain_of_plan,
    planned,
    planned_module,
    remove_plan,
)
from memfit.runtime.head import inexact_options, marking_head
from memfit.runtime.options import is_exact

# what "exact to rounding" allows: relative to the largest reference value (float32 sums in
# another order differ by about 1e-6 of it; measured 3e-7 to 8e-7 on the head's gradients)
ROUNDING = 1e-4


@dataclass(frozen=True, kw_only=True, slots=True)
class Verification:
    """What :func:`verify` found.

    Attributes:
        gradients_equal: every parameter gradient bitwise equal to the unplanned model's.
        loss_equal: the loss bitwise equal.
        mismatched: names of parameters whose gradients differ.
        exact: whether the plan promises bit-identity (``Plan.exact``); a plan with an option
            exact to rounding only (``head:chunked``) is held to :data:`ROUNDING` instead.
        gradient_error: the largest over parameters of ``max |planned - reference|`` over
            ``max |reference|`` (0.0 when equal).
        loss_error: ``|planned - reference|`` over ``|reference|`` of the loss.
        measured_peak_bytes: the planned step's measured peak.
        baseline_peak_bytes: the unplanned step's measured peak.
        predicted_peak_bytes: the plan's prediction.
        budget_bytes: the plan's budget (None without one).
        overhead: planned step time / unplanned step time - 1 (medians, interleaved runs).
        trace_difference: with ``trace=True``, the first op the planned step runs that the
            plain step does not run on the same shapes, strides and dtypes (``""``: none, the
            same kernels run on any machine; ``None``: not traced). Ops that a ``<post>``
            option replaces by design (``head:lean-loss``'s row-chunked cross-entropy) are not
            compared; ``by_design`` names them.
        by_design: with ``trace=True``, the regions cut out of both traces by design, one line
            each (forward, then backward): the option and the call (``head:lean-loss:
            cross_entropy over 64 x 512 logits (forward)``), the plain step's ops there and the
            planned step's. Every op outside them is compared.
        reference_repeatable: ``False`` when the unplanned step itself gives other gradients
            from the same seed (the model draws random numbers memfit cannot seed, e.g. with
            NumPy): a mismatch is then the model's, not the plan's.
        group_errors: parameter group (each block of the chain, and
            :data:`OUTSIDE_BLOCKS`) -> ``||planned - reference|| / ||reference||`` over its
            parameters' gradients together (0.0 where equal).
        cosine: cosine similarity of the step's whole gradient (every parameter's, as one
            vector) to the reference's (1.0: the same direction).
        max_error: the plan's error budget (``Plan.max_error``): a lossy plan (``compress:*``)
            is held to ``relative_error <= max_error``; ``None``: no bound was asked for, and
            only the loss and the peak are held.
        mismatched_buffers: the buffers whose values after the planned step differ from their
            values after the plain step (both steps start from the same buffers): a plan must
            leave running statistics and other state as training without it does.
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
    exact: bool = True
    gradient_error: float = 0.0
    loss_error: float = 0.0
    trace_difference: str | None = None
    reference_repeatable: bool = True
    by_design: tuple[str, ...] = ()
    mismatched_buffers: tuple[str, ...] = ()
    group_errors: Mapping[str, float] = field(default_factory=dict)
    cosine: float = 1.0
    lossy: bool = False
    max_error: float | None = None

    @property
    def relative_error(self) -> float:
        """The largest of :attr:`group_errors` (0.0 when every gradient is equal): what
        ``plan(max_error=...)`` bounds."""
        return max(self.group_errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        """Gradients and loss equal (within :data:`ROUNDING` for a plan that is exact to
        rounding only; a lossy plan's gradients within its ``max_error``), the same ops when
        traced, and the peak within the budget."""
        fits = self.budget_bytes is None or self.measured_peak_bytes <= self.budget_bytes
        if self.exact:
            same_ops = not self.trace_difference
            same_state = not self.mismatched_buffers
            return self.gradients_equal and self.loss_equal and fits and same_ops and same_state
        if self.lossy:
            bounded = self.max_error is None or self.relative_error <= self.max_error
            return bounded and self.loss_error <= ROUNDING and fits
        return self.gradient_error <= ROUNDING and self.loss_error <= ROUNDING and fits

    @property
    def reserved_peak_bytes(self) -> int:
        """CUDA: the planned step's reserved peak (allocated plus the allocator's slack); the
        measured peak on CPU, where nothing is reserved beyond it."""
        return self.planned.reserved_peak_bytes or self.measured_peak_bytes

    @property
    def prediction_error(self) -> float:
        """(predicted - measured) / measured peak."""
        return self.predicted_peak_bytes / self.measured_peak_bytes - 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "ok": self.ok,
            "prediction_error": self.prediction_error,
            "relative_error": self.relative_error,
            "reserved_peak_bytes": self.reserved_peak_bytes,
        }


def seeded_gradients(
    model: nn.Module, sample: Any, loss_fn: LossFn | None, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Loss and parameter gradients of one step from RNG seed ``seed``; the user's RNG state is
    restored, the model's ``.grad`` fields are left at ``None``."""
    return _seeded_step(model, sample, loss_fn, seed)


def traced_gradients(
    model: nn.Module, sample: Any, loss_fn: LossFn | None, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], Trace]:
    """:func:`seeded_gradients` and the step's op trace (:mod:`memfit.measuring.trace`)."""
    with tracing() as trace:
        loss, grads = _seeded_step(model, sample, loss_fn, seed)
    return loss, grads, trace


def _seeded_step(
    model: nn.Module, sample: Any, loss_fn: LossFn | None, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    reset_grads(model, accumulate=False, sample=sample)
    args, kwargs = split_sample(sample)
    device = sample_device(model, sample)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        loss = compute_loss(model(*args, **kwargs), loss_fn)
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    reset_grads(model, accumulate=False, sample=sample)
    return loss.detach(), grads


@preserving_state
def verify(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    repeats: int = 5,
    seed: int = 0,
    optimizer: Any = None,
    accumulate: bool | None = None,
    keep_output: bool | None = None,
    trace: bool = False,
) -> Verification:
    """Check a planned model against itself unplanned: gradients, loss, peak and overhead.

    Runs one step with and without the plan from the same RNG state (dropout on) and compares
    every parameter gradient and the loss bit for bit (a plan exact to rounding only,
    ``plan.exact`` false, is held to a relative error of :data:`ROUNDING` instead; a lossy
    one, ``compress:*``, to its ``max_error``: ``Verification.group_errors``, ``cosine``);
    measures both peaks; times both steps in pairs (planned, unplanned; ``repeats`` pairs) and reports the median of the paired ratios.
    The peaks are measured in the steady state the plan was made for. The model (gradients,
    buffers, modes) and the RNG states are left as they were.

    Args:
        optimizer: its state counts as held before the step (pass the one the plan was
            profiled with, so that the peak compares with a budget in bytes).
        accumulate: measure the gradient-accumulation steady state; ``None``: as the plan
            records (``plan.accumulate``).
        keep_output: keep the model's output alive through backward (the usual loop);
            ``None``: as the plan records (``plan.keep_output``).
        trace: also record every aten op of both seeded steps with its shapes, strides and
            dtypes, and check that the planned step runs the plain step's ops op for op (its
            forward and backward) and recomputes only ops the plain forward ran on the same
            layouts (``Verification.trace_difference``). Equal gradients show identity on this
            machine; equal traces show it on any machine, since the same ops on the same
            layouts take the same kernels. The ops a ``<post>`` option replaces by design
            (``head:*``) are cut out of both steps, where the plain step marks the calls the
            option would replace, and named in ``Verification.by_design``; everything else is
            compared. A step under tracing runs several times slower.

    Raises:
        MemfitError: the model carries no plan.
        ValueError: ``repeats < 1``.

    Example:
        >>> memfit.auto(model, batch, budget="40%")
        >>> report = memfit.verify(model, batch)
        >>> assert report.gradients_equal and report.ok
    """
    check_step_arguments(model, sample, loss_fn, optimizer)
    # the planned model may sit inside a wrapper made after planning (DDP): steps run through
    # the wrapper, the plan comes off and goes back on the module that carries it
    target = planned_module(model)
    current = None if target is None else applied_plan(target)
    if target is None or current is None:
        raise MemfitError("memfit.verify needs a planned model: call memfit.apply or memfit.auto")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (timed pairs of steps); got {repeats}")
    chain = chain_of_plan(target, current)
    wrapped = held_bytes(model, sample) - held_bytes(target, sample)
    if wrapped:
        warnings.warn(
            f"the plan was made for {type(target).__name__}, which {type(model).__name__} "
            f"wrapped afterwards and holds {wrapped} bytes more for (DDP's gradient buckets): "
            f"the plan's predicted peak lacks them. Plan the wrapped model for figures that "
            f"include them",
            UserWarning,
            stacklevel=3,
        )
    loop = TrainingLoop(
        loss_fn=loss_fn,
        optimizer=optimizer,
        accumulate=current.accumulate if accumulate is None else accumulate,
        keep_output=current.keep_output if keep_output is None else keep_output,
    )
    run = traced_gradients if trace else _untraced_gradients
    start = Buffers(model)  # each seeded step starts from them (I-BERT's statistics move)
    try:
        planned_loss, planned_grads, planned_trace = run(model, sample, loss_fn, seed)
        planned_buffers = buffer_values(model)
        planned = measure_loop(model, sample, loop, repeats=1)
        remove_plan(target)
        # the plain step marks what the plan's <post> option replaces by design
        marks = (
            marking_head(target, chain.blocks[-1], current.options.values())
            if trace
            else nullcontext()
        )
        start.restore()
        with marks:
            reference_loss, reference_grads, reference_trace = run(model, sample, loss_fn, seed)
        reference_buffers = buffer_values(model)
        mismatched = mismatched_gradients(reference_grads, planned_grads)
        repeatable = True
        if mismatched or not torch.equal(reference_loss, planned_loss):
            start.restore()
            again_loss, again_grads = seeded_gradients(model, sample, loss_fn, seed)
            repeatable = torch.equal(again_loss, reference_loss) and not mismatched_gradients(
                reference_grads, again_grads
            )
        baseline = measure_loop(model, sample, loop, repeats=1)
        ratios = [
            timed_step_under(model, sample, current, loop, target)
            / timed_step_under(model, sample, None, loop, target)
            for _ in range(repeats)
        ]
    finally:
        if applied_plan(target) is None:
            apply_plan(target, chain, current)
    root = next((name for name, module in model.named_modules() if module is target), "")
    groups = parameter_groups(model, chain.block_names, root)
    difference = None
    by_design: tuple[str, ...] = ()
    if reference_trace is not None and planned_trace is not None:
        difference = str(compare_traces(reference_trace, planned_trace) or "")
        by_design = exempt_regions(reference_trace, planned_trace)
    return Verification(
        gradients_equal=not mismatched,
        loss_equal=torch.equal(reference_loss, planned_loss),
        mismatched=mismatched,
        exact=current.exact and not inexact_options(current.options.values()),
        gradient_error=max(
            (relative_error(reference_grads[name], planned_grads.get(name)) for name in mismatched),
            default=0.0,
        ),
        loss_error=relative_error(reference_loss, planned_loss),
        measured_peak_bytes=planned.peak_bytes,
        baseline_peak_bytes=baseline.peak_bytes,
        predicted_peak_bytes=current.predicted_peak_bytes,
        budget_bytes=current.budget_bytes,
        overhead=statistics.median(ratios) - 1.0,
        planned=planned,
        baseline=baseline,
        trace_difference=difference,
        reference_repeatable=repeatable,
        by_design=by_design,
        group_errors=group_errors(reference_grads, planned_grads, groups),
        cosine=cosine_similarity(reference_grads, planned_grads),
        lossy=any(not is_exact(option) for option in current.options.values()),
        max_error=current.max_error,
        mismatched_buffers=_mismatched_buffers(reference_buffers, planned_buffers),
    )


def _mismatched_buffers(
    reference: Mapping[str, torch.Tensor], planned: Mapping[str, torch.Tensor]
) -> tuple[str, ...]:
    """Names of the buffers whose values after the planned step differ from the plain step's."""
    names = sorted(reference.keys() | planned.keys())
    return tuple(
        name
        for name in names
        if name not in reference
        or name not in planned
        or reference[name].dtype != planned[name].dtype
        or reference[name].shape != planned[name].shape
        or not torch.equal(reference[name], planned[name])
    )


def _untraced_gradients(
    model: nn.Module, sample: Any, loss_fn: LossFn | None, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], None]:
    return (*_seeded_step(model, sample, loss_fn, seed), None)


def timed_step_under(
    model: nn.Module,
    sample: Any,
    plan: Plan | None,
    loop: TrainingLoop = USUAL,
    target: nn.Module | None = None,
) -> float:
    """Seconds of one step of ``model`` under ``plan`` (``None``: unplanned; ``model`` must not
    carry a plan), run as ``loop`` runs it, after one untimed step: right after another way of
    running, the allocator's state (pages a leaner plan gave back) would otherwise be charged
    to this one. ``target``: the module of ``model`` the plan goes on (default ``model``; a
    wrapper's inner model)."""
    target = model if target is None else target
    chain = None if plan is None else chain_of_plan(target, plan)
    with planned(target, chain, plan):
        for _ in range(2):  # the first one untimed
            seconds = time_step(model, sample, loop=loop)
        return seconds


def same_tensors(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bitwise equal, or both missing."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def relative_error(reference: torch.Tensor | None, planned: torch.Tensor | None) -> float:
    """``max |planned - reference| / max |reference|`` (inf when one is missing or shapes
    differ, 0.0 when both are missing or equal)."""
    if reference is None or planned is None:
        return 0.0 if reference is None and planned is None else float("inf")
    if reference.shape != planned.shape:
        return float("inf")
    if torch.equal(reference, planned):
        return 0.0
    difference = (planned.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return difference / scale if scale > 0 else float("inf")


OUTSIDE_BLOCKS = "<outside the blocks>"


def parameter_groups(
    model: nn.Module, block_names: Sequence[str], root: str = ""
) -> dict[str, str]:
    """Parameter name -> its group: the block (chain stage) it lies in, or
    :data:`OUTSIDE_BLOCKS` (embeddings, final norm, head). ``root``: the fqn in ``model`` of
    the module the block names start from (a wrapper's inner model)."""
    start = f"{root}." if root else ""
    prefixes = [(f"{start}{name}.", name) for name in block_names]
    groups = {}
    for name, _ in model.named_parameters():
        found = next((group for prefix, group in prefixes if name.startswith(prefix)), None)
        groups[name] = OUTSIDE_BLOCKS if found is None else found
    return groups


def group_errors(
    reference: Mapping[str, torch.Tensor | None],
    planned: Mapping[str, torch.Tensor | None],
    groups: Mapping[str, str],
) -> dict[str, float]:
    """Group -> relative error of its gradients, ``||planned - reference|| / ||reference||``
    (Euclidean norms over the group's parameters together; 0.0 where equal, inf where a
    gradient is missing on one side only or the reference is zero and the planned one not)."""
    squares: dict[str, list[float]] = {}
    for name, grad in reference.items():
        other = planned.get(name)
        totals = squares.setdefault(groups.get(name, OUTSIDE_BLOCKS), [0.0, 0.0])
        if grad is None or other is None:
            if (grad is None) != (other is None):
                totals[0] = float("inf")
            continue
        totals[0] += float((other.double() - grad.double()).square().sum())
        totals[1] += float(grad.double().square().sum())
    return {
        group: 0.0 if diff == 0 else (math.sqrt(diff / ref) if ref > 0 else float("inf"))
        for group, (diff, ref) in squares.items()
    }


def cosine_similarity(
    reference: Mapping[str, torch.Tensor | None], planned: Mapping[str, torch.Tensor | None]
) -> float:
    """Cosine of the angle between the step's whole planned gradient and the reference (every
    parameter's gradient as one vector; 1.0: the same direction)."""
    dot = norm_ref = norm_planned = 0.0
    for name, grad in reference.items():
        other = planned.get(name)
        if grad is None or other is None:
            continue
        dot += float((grad.double() * other.double()).sum())
        norm_ref += float(grad.double().square().sum())
        norm_planned += float(other.double().square().sum())
    if norm_ref == 0 or norm_planned == 0:
        return 1.0 if norm_ref == norm_planned else 0.0
    return dot / math.sqrt(norm_ref * norm_planned)


def mismatched_gradients(
    reference: Mapping[str, torch.Tensor | None], planned: Mapping[str, torch.Tensor | None]
) -> tuple[str, ...]:
    """Names of the parameters whose planned gradient is not bitwise the reference's (the check
    :func:`verify` and the benchmark's rows make)."""
    return tuple(
        name for name, grad in reference.items() if not same_tensors(grad, planned.get(name))
    )
