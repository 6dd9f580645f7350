"""Parsing and printing bytes and budgets (no torch here).

>>> parse_bytes("1.5KiB")
1536
>>> format_bytes(3 * 2**30)
'3.00 GiB'
>>> parse_budget("40%")
Budget(bytes=None, fraction=0.4)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_EXAMPLES = '"12GiB", "800MB", "1.5 GiB", 12884901888 or "40%"'
_BUDGET_FORMS = (
    'a percentage of activation memory ("40%", or a float in (0, 1] such as 0.4), '
    'or bytes of step peak ("12GiB", "800MB", or an integer such as 12884901888)'
)


def parse_bytes(value: int | float | str) -> int:
    """Parse a byte count: an int, or a string with an optional unit ("12GiB", "800MB").

    Raises:
        ValueError: the value is not a non-negative size.
        TypeError: the value is neither a number nor a string.
    """
    if isinstance(value, bool):
        raise TypeError(f"expected a byte count such as {_EXAMPLES}; got the bool {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"expected a finite, non-negative byte count; got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(
            f"expected a byte count such as {_EXAMPLES}; got {type(value).__name__} {value!r}"
        )
    match = _BYTES_RE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as a size; write a number with an optional unit "
            f"(B, KB, MB, GB, KiB, MiB, GiB), e.g. {_EXAMPLES}"
        )
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(size):
        raise ValueError(f"cannot read {value!r} as a size: it is not finite; e.g. {_EXAMPLES}")
    return round(size)


@dataclass(frozen=True, slots=True)
class Budget:
    """A memory budget: absolute bytes, or a fraction of the step's activation memory."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise ValueError("a Budget holds exactly one of bytes= or fraction=")
        if self.fraction is not None and not 0.0 <= self.fraction < math.inf:
            raise ValueError(f"budget fraction must be finite and >= 0; got {self.fraction}")

    def resolve(self, base_bytes: int, activation_bytes: int) -> int:
        """The budget in bytes of step peak, given its base (what no plan removes: what is
        held before the step and the gradients it makes, ``Measurement.base_bytes``) and the
        step's activation memory without memfit (the rest of its peak)."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(base_bytes + self.fraction * activation_bytes)

    def __str__(self) -> str:
        if self.bytes is not None:
            return format_bytes(self.bytes)
        assert self.fraction is not None
        return f"{self.fraction * 100:g}%"


def parse_budget(value: int | float | str | Budget) -> Budget:
    """Parse a budget.

    Accepted forms:

    * a fraction of the step's activation memory without memfit (its peak above what it
      holds before it and the gradients it makes, which no plan removes): ``"40%"``, or a float in
      ``(0, 1]`` (``0.4`` is ``"40%"``; ``1.0`` is ``"100%"``), or a plain number in ``(0, 1]``
      written as a string (``"0.4"``);
    * bytes of step peak: an int (``12 * 2**30``), an integral float above 1 (``12e9``), or a
      string with an optional unit (``"12GiB"``, ``"800MB"``, ``"4096"``).

    Args:
        value: the budget as the user wrote it.

    Returns:
        A :class:`Budget`.

    Raises:
        ValueError: anything else (``0.0``, ``2.5``, ``"1.5"`` bytes, zero or negative
            budgets such as ``0``, ``"0%"`` or ``"-5%"``, NaN and infinite ones such as
            ``"inf%"``), naming the value received and the accepted forms.
        TypeError: neither a number, a string nor a :class:`Budget`.

    Example:
        >>> parse_budget(0.4) == parse_budget("40%")
        True
    """
    if isinstance(value, Budget):
        return value
    if isinstance(value, float):
        return _float_budget(value, repr(value))
    text = value.strip() if isinstance(value, str) else ""
    if _BYTES_RE.match(text) and text[-1:].isdigit() and not text.isdigit():
        return _float_budget(float(text), repr(value))  # a float written out, "0.4": as 0.4
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1].strip()
        try:
            percent = float(number)
        except ValueError:
            raise ValueError(
                f'cannot read budget {value!r}; a percentage looks like "40%" '
                f"(of the step's activation memory without memfit)"
            ) from None
        if not 0.0 < percent < math.inf:
            raise ValueError(
                f'budget percentage must be above 0 and finite, e.g. "40%" (of the step\'s '
                f"activation memory without memfit); got {value!r}"
            )
        return Budget(fraction=percent / 100.0)
    try:
        size = parse_bytes(value)
    except ValueError as error:
        raise ValueError(f"invalid budget {value!r}: {error}") from None
    if size == 0:
        raise ValueError(
            f"budget {value!r} is 0 bytes, which no step fits (the parameters alone take "
            f"more); accepted forms: {_BUDGET_FORMS}"
        )
    return Budget(bytes=size)


def _float_budget(number: float, received: str) -> Budget:
    if 0.0 < number <= 1.0:
        return Budget(fraction=number)
    if number > 1.0 and number != float("inf") and number.is_integer():
        return Budget(bytes=int(number))
    raise ValueError(
        f"cannot read budget {received}: a number is either a fraction in (0, 1] of activation "
        f"memory or a whole number of bytes above 1; accepted forms: {_BUDGET_FORMS}"
    )


def infeasible_message(
    budget: Budget, budget_bytes: int, min_bytes: int, held_bytes: int, activation_bytes: int
) -> str:
    """Why a budget is infeasible, in the units the user wrote it in.

    Args:
        budget: the budget as parsed.
        budget_bytes: it resolved, in bytes of step peak.
        min_bytes: the smallest feasible step peak.
        held_bytes, activation_bytes: the profile's base (held before the step, and the
            gradients it makes) and activation memory (see :meth:`Budget.resolve`).

    Example:
        >>> infeasible_message(Budget(fraction=0.4), 3000, 3600, 2000, 2500)
        'budget 40% of 2.44 KiB activation memory = 1000 B (step peak 2.93 KiB with 1.95 KiB held and gradients) is infeasible; the smallest feasible is 1.56 KiB of activation memory = 64% (step peak 3.52 KiB); raise the budget to at least "64%"'
    """
    smallest = format_bytes(min_bytes - held_bytes)
    if activation_bytes <= 0:
        return (
            f"budget {budget} = {format_bytes(budget_bytes)} of step peak is infeasible; the "
            f"smallest feasible is {format_bytes(min_bytes)} ({min_bytes} bytes); raise the "
            f"budget to at least that"
        )
    percent = math.ceil((min_bytes - held_bytes) * 100 / activation_bytes)
    while Budget(fraction=percent / 100).resolve(held_bytes, activation_bytes) < min_bytes:
        percent += 1  # float rounding in resolve: the suggestion must be feasible itself
    activation = format_bytes(activation_bytes)
    if budget.fraction is not None:
        return (
            f"budget {budget} of {activation} activation memory = "
            f"{format_bytes(budget_bytes - held_bytes)} (step peak {format_bytes(budget_bytes)} "
            f"with {format_bytes(held_bytes)} held and gradients) is infeasible; the smallest feasible is "
            f"{smallest} of activation memory = {percent}% (step peak {format_bytes(min_bytes)}); "
            f'raise the budget to at least "{percent}%"'
        )
    share = (budget_bytes - held_bytes) * 100 / activation_bytes
    parts = (
        f"{format_bytes(held_bytes)} held and gradients + {share:.0f}% of {activation} "
        f"activation memory"
        if share >= 0
        else f"less than the {format_bytes(held_bytes)} held before the step and its gradients"
    )
    return (
        f"budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) of step peak = {parts} is "
        f"infeasible; the smallest feasible is {format_bytes(min_bytes)} ({min_bytes} bytes) = "
        f"{format_bytes(held_bytes)} held and gradients + {percent}% of {activation}; raise the budget to at "
        f"least that"
    )


def format_bytes(n: int | float) -> str:
    """Human-readable bytes with binary units: ``format_bytes(1536) == '1.50 KiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
