"""The error budget of lossy options: which of a profile's options a plan may use.

A lossy option (``compress:*``) and an option exact only to rounding (``head:chunked``) carry in
their costs' ``detail`` ``"exact": False`` and ``"error"``: the largest relative gradient error
over parameter groups of one step with every block under the option, measured by the profile
against the step with every block kept, from the seed :func:`memfit.verify` uses. A plan that
mixes the option with exact blocks rounds fewer saved tensors, so with every block under it the
error is at its most, and :func:`within_error` keeps an option exactly when that error is within
the budget. The check is per option on the profile's sample; :func:`memfit.verify` measures the
plan's own error.
"""

from __future__ import annotations

from dataclasses import replace

from memfit.planning.costs import ChainCosts

__all__ = ["check_max_error", "over_error", "within_error"]


def check_max_error(max_error: object) -> float:
    """``max_error`` as a float, checked.

    Raises:
        TypeError: not a number.
        ValueError: not positive and finite.
    """
    if isinstance(max_error, bool) or not isinstance(max_error, int | float):
        raise TypeError(f"max_error must be a number such as 0.01; got {max_error!r}")
    if not 0 < max_error < float("inf"):
        raise ValueError(
            f"max_error must be a positive finite number (the largest relative gradient error "
            f"of a parameter group, 0.01 for 1%); got {max_error!r}"
        )
    return float(max_error)


def over_error(costs: ChainCosts, max_error: float) -> dict[str, float | None]:
    """Option -> its measured error, for every option that is not bit-identical and whose
    error is above ``max_error`` (``None``: no error measured, so none can be promised)."""
    over: dict[str, float | None] = {}
    for stage in costs.stages:
        for name, option in stage.options.items():
            if option.detail.get("exact") is not False:
                continue
            error = option.detail.get("error")
            if error is None or not error <= max_error:
                over[name] = None if error is None else float(error)
    return over


def within_error(costs: ChainCosts, max_error: float) -> tuple[ChainCosts, list[str]]:
    """``costs`` without the options whose error is above ``max_error`` (see
    :func:`over_error`), and a note for each saying why.

    Raises:
        TypeError, ValueError: ``max_error`` malformed (:func:`check_max_error`).
    """
    max_error = check_max_error(max_error)
    over = over_error(costs, max_error)
    if not over:
        return costs, []
    stages = [
        replace(stage, options={k: v for k, v in stage.options.items() if k not in over})
        if over.keys() & stage.options.keys()
        else stage
        for stage in costs.stages
    ]
    notes = [
        f"{name} left out: "
        + (
            "no gradient error measured for it"
            if error is None
            else f"gradient error {error:.1e} (every block under it, on the profile's sample)"
        )
        + f" is above max_error {max_error:g}"
        for name, error in sorted(over.items())
    ]
    return replace(costs, stages=stages), notes
