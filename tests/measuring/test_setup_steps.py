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


def _ways(profile: memfit.Profile) -> int:
    """Ways of running the model: keep, recompute, each block option, each head option."""
    stages = profile.costs.stages
    return 2 + len(stages[1].options) - 1 + len(stages[-1].options) - 1


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
    # the selective options picked by measured op times are the thorough path's alone
    assert set(fast.costs.stages[1].options) == {
        "keep",
        "rebuild",
        "rebuild+linear",
        "rebuild+ops",
        "selective:matmul",
    }
    assert fast.info["timed_options"] == []
    timed = thorough.info["timed_options"]
    assert timed and set(timed) <= set(thorough.costs.stages[1].options)
    assert any(
        note.startswith("['selective:save=") and "thorough=True" in note for note in fast.notes
    )
    # 7 ways (keep, recompute, 3 rebuild, 1 selective, 1 head): 6 metered steps, keep's
    # plain one, the chain finder's and the op profile's forwards
    assert fast_steps <= 9
    # per way one step, metered and timed, head options riding in a rebuild option's step;
    # keep's plain timed step; the chain finder and the op profile one forward each
    heads = len(fast.costs.stages[-1].options) - 1
    assert heads >= 1
    assert fast_steps <= _ways(fast) - heads + 3
    # thorough: 3 timed steps after an untimed one each, then an untimed and a metered step
    # (its ways counted on its own menu: the selective options picked by measured op times
    # may differ between the two profiles)
    assert thorough_steps >= 8 * _ways(thorough)
    assert fast.measurement.repeats == 1 and thorough.measurement.repeats == 3


def test_repeats_choose_the_interleaved_path() -> None:
    model, sample = build("mlp", layers=2, width=16, hidden=32, batch=4)
    assert memfit.profile(model, sample, repeats=2, options=()).measurement.repeats == 2
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        memfit.profile(model, sample, repeats=0)
