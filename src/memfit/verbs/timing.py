"""Choose among plans that fit the same budget by timing them on the model, side by side.

:func:`fastest` runs whole training steps under each plan in turns (A, B, C, A, B, C, ...:
each round starts at another plan, so that no plan always follows the same one and the
machine's drift reaches them all alike), each timed step after one untimed step (the
allocator's state after another plan's step is not charged to this one), and compares each
plan with the first (the optimal plan of the predicted costs) by the median of their ratios
in the same round. Another plan replaces the first only when it is faster by more than
:data:`MARGIN`: a measured choice must not flip on noise. Plans made from a compiled profile
(``plan.compile``) are timed with the blocks compiled, as :func:`memfit.apply` runs
them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from memfit.errors import MemfitError, PlanMismatchError
from memfit.measuring.loop import TrainingLoop
from memfit.measuring.state import preserving_state
from memfit.planning.plan import Plan
from memfit.runtime.apply import chain_of_plan
from memfit.runtime.compiled import blocks_compiled, plan_compile_options
from memfit.runtime.hf_switches import hf_checkpointing_off
from memfit.verbs.verification import timed_step_under

MARGIN = 0.01  # another plan must be at least 1% faster (median of paired ratios) to be chosen
ROUNDS = 5  # timed steps per plan (each after an untimed one)
ALONE = "prediction: no other plan to time"


@contextmanager
def _as_applied(model: nn.Module, plan: Plan, compiling: dict[str, Any] | None) -> Iterator[None]:
    """The model as :func:`memfit.apply` would run ``plan``'s kind of plan: blocks compiled
    with ``compiling`` for a plan from a compiled profile; Hugging Face's own checkpointing off
    (silently: the caller's state comes back afterwards)."""
    hf = hf_checkpointing_off(model, warn=False)
    blocks = chain_of_plan(model, plan).blocks
    try:
        with blocks_compiled(blocks, compiling):
            yield
    finally:
        if hf is not None:  # PEFT's input hooks too, which the state snapshot does not hold
            hf.restore()


@preserving_state
def fastest(
    model: nn.Module,
    sample: Any,
    plans: Sequence[Plan],
    *,
    rounds: int = ROUNDS,
    loop: TrainingLoop | None = None,
    drop_failures: bool = True,
    progress: Callable[[str], None] | None = None,
    compile: bool | Mapping[str, Any] | None = None,
) -> Plan:
    """The plan of ``plans`` whose steps measured fastest on ``model``; the first plan unless
    another is faster by more than :data:`MARGIN` (median over ``rounds`` of the ratio of its
    step time to the first plan's in the same round). A single plan is returned untimed
    (``info["chosen_by"]`` says so). Each plan costs ``2 * rounds`` steps.

    The returned plan's ``info["timed"]`` lists every plan timed: its options in words,
    predicted step seconds, the median measured step seconds, the median ratio to the first
    plan, and whether it was chosen; ``info["chosen_by"]`` says ``"timing"``. A plan other
    than the first that fails to run (out of memory, say) is dropped, with its error in its
    entry (``drop_failures=False``: its error propagates, as the first plan's always do; ranks
    timing in lockstep must all stop). The model is left unplanned, with its RNG
    state, gradients, buffers and training mode as found.

    ``loop``: the training loop to time (``loss_fn``, ``keep_output``, ``accumulate``; the
    optimizer plays no part in a step's time); ``None``: ``TrainingLoop()``, the usual loop.

    ``compile``: the caller's ``torch.compile`` arguments for plans from a compiled profile,
    as for :func:`memfit.apply` (``None``: the plans' own settings, checked against its
    allow-list).

    Raises:
        ValueError: no plans, or ``rounds < 1``.
        PlanMismatchError: compile settings a plan may not set, or plans that compile their
            blocks differently (before any step).
    """
    if not plans:
        raise ValueError("fastest() needs at least one plan to time")
    loop = TrainingLoop() if loop is None else loop
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (timed steps per plan); got {rounds}")
    settings = [plan_compile_options(plan, compile) for plan in plans]
    if any(setting != settings[0] for setting in settings):
        raise PlanMismatchError(
            f"the plans to time compile their blocks differently ({settings}); time plans "
            f"made from one profile"
        )
    if len(plans) == 1:
        only = plans[0]
        return replace(only, info={**only.info, "chosen_by": ALONE})
    say = progress or (lambda _message: None)
    steps: list[list[float]] = [[] for _ in plans]
    ratios: list[list[float]] = [[] for _ in plans]
    failed: dict[int, str] = {}
    with _as_applied(model, plans[0], settings[0]):
        for round_ in range(rounds):
            say(f"timing {len(plans)} plans side by side: round {round_ + 1} of {rounds}")
            shift = round_ % len(plans)
            times: dict[int, float] = {}
            for index in [*range(shift, len(plans)), *range(shift)]:
                if index in failed:
                    continue
                try:
                    times[index] = timed_step_under(model, sample, plans[index], loop)
                except (torch.OutOfMemoryError, MemfitError, RuntimeError) as error:
                    if index == 0 or not drop_failures:
                        raise
                    failed[index] = f"{type(error).__name__}: {error}"
            for index, seconds in times.items():
                steps[index].append(seconds)
                ratios[index].append(seconds / times[0])
    medians = [
        statistics.median(r) if r and i not in failed else None for i, r in enumerate(ratios)
    ]
    chosen = min(
        (i for i, m in enumerate(medians) if m is not None), key=lambda i: medians[i] or 0.0
    )
    if (medians[chosen] or 1.0) > 1.0 - MARGIN:
        chosen = 0  # ties and near-ties go to the optimal plan of the predicted costs
    timed = []
    for i, plan in enumerate(plans):
        entry: dict[str, Any] = {
            "options": plan.summary,
            "predicted_step_s": plan.predicted_step_s,
            "measured_step_s": statistics.median(steps[i]) if i not in failed else None,
            "ratio_to_optimal": medians[i],
            "chosen": i == chosen,
        }
        if i in failed:
            entry["error"] = failed[i]
        timed.append(entry)
    result = plans[chosen]
    return replace(result, info={**result.info, "timed": timed, "chosen_by": "timing"})
