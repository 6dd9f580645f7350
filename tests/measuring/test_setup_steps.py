"""The profile's default (fast) path: one step per way of running the model, metered and timed
at once (keep takes a plain timed step too), the same memory figures as the thorough path, a
sixth of its steps (issue 22: setup time)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from torch import nn

import memfit
from memfit.models import build


def _byte_figures(profile: memfit.Profile) -> dict[tuple[Any, ...], int]:
    """Every ``*_bytes`` figure of the costs, by path; the candidate selective policies are
    left out (their names follow measured op times, which differ run to run)."""
    found: dict[tuple[Any, ...], int] = {}

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*path, index))
        elif (
            isinstance(value, int)
            and str(path[-1]).endswith("bytes")
            and not any(str(part).startswith("selective:save=") for part in path)
        ):
            found[path] = value

    walk(json.loads(profile.costs.to_json()), ())
    return found


def _counting(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _module, _args: calls.append(1))
    return calls


def test_fast_path_measures_the_same_bytes_in_a_sixth_of_the_steps() -> None:
    model, sample = build("gpt", layers=2, width=32, heads=2, seq=16, batch=2)
    calls = _counting(model)
    fast = memfit.profile(model, sample)
    fast_steps = len(calls)
    calls.clear()
    thorough = memfit.profile(model, sample, thorough=True)
    thorough_steps = len(calls)
    assert _byte_figures(fast) == _byte_figures(thorough)
    assert set(fast.costs.stages[1].options) >= {"keep", "rebuild", "selective:matmul"}
    ways = 2 + len(fast.costs.stages[1].options) - 1 + len(fast.costs.stages[-1].options) - 1
    # per way one step, metered and timed; keep's plain timed step; the chain finder and the
    # op profile one forward each
    assert fast_steps <= ways + 3
    # thorough: 3 timed steps after an untimed one each, then an untimed and a metered step
    assert thorough_steps >= 8 * ways
    assert fast.measurement.repeats == 1 and thorough.measurement.repeats == 3


def test_repeats_choose_the_interleaved_path() -> None:
    model, sample = build("mlp", layers=2, width=16, hidden=32, batch=4)
    assert memfit.profile(model, sample, repeats=2, options=()).measurement.repeats == 2
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        memfit.profile(model, sample, repeats=0)
