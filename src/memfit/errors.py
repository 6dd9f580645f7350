"""memfit's error types.

One base, :class:`MemfitError`, so that callers can catch everything memfit raises on purpose.
Malformed arguments raise the built-in ``ValueError``/``TypeError`` instead.
"""

from __future__ import annotations


class MemfitError(RuntimeError):
    """Base of every error memfit raises on purpose."""


class InfeasibleBudgetError(MemfitError):
    """No plan fits the budget.

    Attributes:
        budget_bytes: the budget asked for, in bytes of step peak.
        min_feasible_bytes: the smallest budget for which a plan exists.
        detail: why, when the solver says more (e.g. a baseline that always peaks there).
    """

    def __init__(
        self,
        budget_bytes: int,
        min_feasible_bytes: int,
        detail: str = "",
        *,
        message: str | None = None,
    ) -> None:
        from memfit.units import format_bytes

        self.budget_bytes = int(budget_bytes)
        self.min_feasible_bytes = int(min_feasible_bytes)
        self.detail = detail
        if message is None:  # only bytes known (the solver's view); memfit.plan words it better
            message = (
                f"budget {format_bytes(self.budget_bytes)} is infeasible: the smallest peak any "
                f"plan reaches is {format_bytes(self.min_feasible_bytes)} "
                f"({self.min_feasible_bytes} bytes); raise the budget to at least that"
            )
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class PlanMismatchError(MemfitError):
    """A plan does not fit the model it is applied to (other stages, shapes or dtypes)."""


class PlanFormatError(MemfitError, ValueError):
    """A plan's JSON (or dict) is malformed: the message names the field (``tree[1].offload``),
    the value that came and what was expected. A ``ValueError`` too, as malformed input is."""


class UnsupportedModelError(MemfitError):
    """memfit cannot find or run the model's chain of stages."""


class AlreadyPlannedError(MemfitError):
    """The model already carries a memfit plan; remove it first."""


class RankMismatchError(MemfitError):
    """The ranks of a distributed job disagree on what memfit must plan for (sample shapes,
    chain, options): raised on every rank alike, so that none waits for the others."""
