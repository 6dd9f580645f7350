"""Choose among plans that fit the same budget by timing them on the model, side by side.

:func:`fastest` runs whole training steps under each plan in turns (A, B, C, A, B, C, ...:
each round starts at another plan, so that no plan always follows the same one and the
machine's drift reaches them all alike), each timed step after one untimed step (the
allocator's state after another plan's step is not charged to this one), and compares each
plan with the first (the optimal plan of the predicted costs) by the median of their ratios
in the same round. Another plan replaces the first only when it is faster by more than
:data:`MARGIN`: a measured choice must not flip on noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from memfit.measuring.state import preserving_state
from memfit.measuring.step import LossFn
from memfit.planning.plan import Plan
from memfit.verification import timed_step_under

MARGIN = 0.01  # another plan must be at least 1% faster (median of paired ratios) to be chosen
ROUNDS = 5  # timed steps per plan


def _summary(plan: Plan) -> str:
    counts: dict[str, int] = {}
    for option in plan.options.values():
        counts[option] = counts.get(option, 0) + 1
    return ", ".join(f"{n} {option}" for option, n in sorted(counts.items()))


@preserving_state
def fastest(
    model: nn.Module,
    sample: Any,
    plans: Sequence[Plan],
    *,
    rounds: int = ROUNDS,
    loss_fn: LossFn | None = None,
    keep_output: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """The plan of ``plans`` whose steps measured fastest on ``model``; the first plan unless
    another is faster by more than :data:`MARGIN` (median over ``rounds`` of the ratio of its
    step time to the first plan's in the same round). A single plan is returned untimed
    (``info["chosen_by"]`` says so).

    The returned plan's ``info["timed"]`` lists every plan timed: its options in words,
    predicted step seconds, the median measured step seconds, and the median ratio to the
    first plan; ``info["chosen_by"]`` says ``"timing"``. The model is left unplanned, with its
    RNG state, gradients and training mode as found.

    Raises:
        ValueError: no plans, or ``rounds < 1``.
    """
    if not plans:
        raise ValueError("fastest() needs at least one plan to time")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (timed steps per plan); got {rounds}")
    if len(plans) == 1:
        only = plans[0]
        return replace(only, info={**only.info, "chosen_by": "prediction: no other plan fits"})
    say = progress or (lambda _message: None)
    steps: list[list[float]] = [[] for _ in plans]
    ratios: list[list[float]] = [[] for _ in plans]
    for round_ in range(rounds):
        say(f"timing {len(plans)} plans side by side: round {round_ + 1} of {rounds}")
        shift = round_ % len(plans)
        order = [*range(shift, len(plans)), *range(shift)]
        times = {i: timed_step_under(model, sample, plans[i], loss_fn, keep_output) for i in order}
        for index, seconds in times.items():
            steps[index].append(seconds)
            ratios[index].append(seconds / times[0])
    medians = [statistics.median(r) for r in ratios]
    chosen = min(range(len(plans)), key=lambda i: medians[i])
    if medians[chosen] > 1.0 - MARGIN:
        chosen = 0
    timed = [
        {
            "options": _summary(plan),
            "predicted_step_s": plan.predicted_step_s,
            "measured_step_s": statistics.median(steps[i]),
            "ratio_to_optimal": medians[i],
            "chosen": i == chosen,
        }
        for i, plan in enumerate(plans)
    ]
    result = plans[chosen]
    return replace(result, info={**result.info, "timed": timed, "chosen_by": "timing"})
