"""Parsing and printing bytes and budgets (no torch here).

>>> parse_bytes("1.5KiB")
1536
>>> format_bytes(3 * 2**30)
'3.00 GiB'
>>> parse_budget("40%")
Budget(bytes=None, fraction=0.4)
"""

from __future__ import annotations

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


def parse_bytes(value: int | float | str) -> int:
    """Parse a byte count: an int, or a string with an optional unit ("12GiB", "800MB").

    Raises:
        ValueError: the value is not a non-negative size.
        TypeError: the value is neither a number nor a string.
    """
    if isinstance(value, bool):
        raise TypeError(f"expected a byte count such as {_EXAMPLES}; got the bool {value!r}")
    if isinstance(value, int | float):
        if value < 0 or value != value:
            raise ValueError(f"expected a non-negative byte count; got {value!r}")
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
    return round(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True, slots=True)
class Budget:
    """A memory budget: absolute bytes, or a fraction of the step's activation memory."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise ValueError("a Budget holds exactly one of bytes= or fraction=")
        if self.fraction is not None and not self.fraction >= 0.0:
            raise ValueError(f"budget fraction must be >= 0; got {self.fraction}")

    def resolve(self, held_bytes: int, activation_bytes: int) -> int:
        """The budget in bytes of step peak, given what is held before the step and the
        step's activation memory without memfit."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(held_bytes + self.fraction * activation_bytes)

    def __str__(self) -> str:
        if self.bytes is not None:
            return format_bytes(self.bytes)
        assert self.fraction is not None
        return f"{self.fraction * 100:g}%"


def parse_budget(value: int | float | str | Budget) -> Budget:
    """Parse a budget: bytes ("12GiB", 12 * 2**30) or a percentage of activation memory ("40%").

    Raises:
        ValueError: malformed, with an example of a valid budget.
    """
    if isinstance(value, Budget):
        return value
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1].strip()
        try:
            percent = float(number)
        except ValueError:
            raise ValueError(
                f'cannot read budget {value!r}; a percentage looks like "40%" '
                f"(of the step's activation memory without memfit)"
            ) from None
        if not percent >= 0.0:
            raise ValueError(f'budget percentage must be >= 0, e.g. "40%"; got {value!r}')
        return Budget(fraction=percent / 100.0)
    try:
        return Budget(bytes=parse_bytes(value))
    except ValueError as error:
        raise ValueError(f"invalid budget {value!r}: {error}") from None


def format_bytes(n: int | float) -> str:
    """Human-readable bytes with binary units: ``format_bytes(1536) == '1.50 KiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
