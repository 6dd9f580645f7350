"""Reading a plan's JSON by type, field by field.

Nothing is converted: ``"false"`` is not a boolean, ``0.7`` is not a stage index and
``"abcdef"`` is not a list of names. Every error is a :class:`~memfit.errors.PlanFormatError`
that names the field (``tree[1].offload``), the value that came and what was expected. Nesting
is bounded (:data:`MAX_DEPTH`), so no reader recurses without limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from memfit.errors import PlanFormatError

__all__ = [
    "MAX_DEPTH",
    "array",
    "boolean",
    "fail",
    "integer",
    "json_data",
    "number",
    "record",
    "text",
]

MAX_DEPTH = 64  # levels of arrays and objects in free-form data (plan.info)


def _shown(value: Any) -> str:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{shown} ({type(value).__name__})"


def fail(field: str, expected: str, value: Any) -> PlanFormatError:
    """The error for ``field``: what was expected and what came."""
    return PlanFormatError(f'plan field "{field}": expected {expected}; got {_shown(value)}')


def integer(value: Any, field: str, minimum: int = 0) -> int:
    """An integer ``>= minimum`` (not a bool, not a float, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(field, f"an integer >= {minimum}", value)
    return int(value)


def number(value: Any, field: str, minimum: float = 0.0) -> float:
    """A number ``>= minimum`` (an integer or a float; not a bool, a string or NaN)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or math.isnan(value) or value < minimum:
        raise fail(field, f"a number >= {minimum:g}", value)
    return float(value)


def boolean(value: Any, field: str) -> bool:
    """``true`` or ``false`` (not ``"false"``, not 0 or 1)."""
    if not isinstance(value, bool):
        raise fail(field, "true or false", value)
    return value


def text(value: Any, field: str, *, empty: bool = True) -> str:
    """A string (non-empty unless ``empty``)."""
    if not isinstance(value, str) or (not empty and not value):
        raise fail(field, "a string" if empty else "a non-empty string", value)
    return value


def array(value: Any, field: str) -> Sequence[Any]:
    """A JSON array (a list, or a tuple from Python; not a string)."""
    if not isinstance(value, list | tuple):
        raise fail(field, "a list", value)
    return value


def record(
    value: Any, field: str, keys: Iterable[str], *, required: Iterable[str] = ()
) -> Mapping[str, Any]:
    """A JSON object whose keys are among ``keys``, with every key of ``required``.

    Args:
        field: its name in messages; its keys are named ``field.key`` (``key`` when empty).
    """
    if not isinstance(value, Mapping):
        raise fail(field or "plan", "a JSON object", value)
    allowed = list(keys)
    prefix = f"{field}." if field else ""
    for key in value:
        if key not in allowed:
            raise PlanFormatError(
                f'plan field "{prefix}{key}" is unknown; expected only {allowed} there'
            )
    missing = [key for key in required if key not in value]
    if missing:
        raise PlanFormatError(
            f'plan field "{prefix}{missing[0]}" is missing ({field or "the plan"} needs '
            f"{list(required)})"
        )
    return value


def json_data(value: Any, field: str) -> Any:
    """Free-form JSON data (``plan.info``): strings, numbers, booleans, null, lists and objects
    with string keys, nested at most :data:`MAX_DEPTH` levels. Returned as found."""
    # iterative: data nested a hundred thousand levels gives this error, not a RecursionError
    pending: list[tuple[Any, str, int]] = [(value, field, 0)]
    while pending:
        item, where, depth = pending.pop()
        if isinstance(item, str | int | float | bool) or item is None:
            continue
        if depth >= MAX_DEPTH:
            raise PlanFormatError(
                f'plan field "{where.split("[")[0]}" is nested deeper than {MAX_DEPTH} levels'
            )
        if isinstance(item, Mapping):
            for key, inner in item.items():
                if not isinstance(key, str):
                    raise fail(f"{where}", "an object with string keys", key)
                pending.append((inner, f"{where}.{key}", depth + 1))
        elif isinstance(item, list | tuple):
            pending.extend((inner, f"{where}[{i}]", depth + 1) for i, inner in enumerate(item))
        else:
            raise fail(where, "JSON data (string, number, boolean, null, list or object)", item)
    return value
