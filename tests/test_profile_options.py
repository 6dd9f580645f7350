"""``ProfileOptions`` and ``TrainingLoop``: profile options built and checked once, at the top of
every verb that profiles (``profile``, ``plan``, ``auto``, ``estimate``, ``profile_shapes``),
before anything runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import memfit
from memfit.measuring.loop import TrainingLoop
from memfit.models import build
from memfit.verbs.profile_options import ProfileOptions
from memfit.verbs.shape_profiles import shape_profile_options


def test_the_options_are_read_once_into_one_frozen_value() -> None:
    loss_fn = torch.sum
    options = ProfileOptions.of(
        loss_fn=loss_fn, keep_output=False, options=["rebuild", "head:lean-loss"], compile=False
    )
    assert options.loop == TrainingLoop(loss_fn=loss_fn, keep_output=False)
    assert options.options == ("rebuild", "head:lean-loss")
    assert options.compile is None and options.repeats is None and options.exact
    assert ProfileOptions.of(compile=True).compile == {}
    assert ProfileOptions.of(compile={"backend": "eager"}).compile == {"backend": "eager"}
    assert ProfileOptions.of().options == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.repeats = 2  # type: ignore[misc]
    # checked again when a field is replaced
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        dataclasses.replace(options, repeats=0)


def test_the_shape_profiles_measure_keep_and_recompute_unless_told() -> None:
    assert shape_profile_options().options == ()
    assert shape_profile_options(options="auto", repeats=2).options == "auto"
    assert shape_profile_options(repeats=0).repeats is None  # 3 at every shape, as before


@pytest.fixture
def unmeasured(monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, Any]:
    """A small MLP that fails the test if anything profiles it or runs it."""
    import memfit.verbs.profiling

    def profiled(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("profiling started before the usage error")

    monkeypatch.setattr(memfit.verbs.profiling, "_chain", profiled)
    monkeypatch.setattr("memfit.verbs.estimation.shape_profile_with", profiled)
    model, sample = build("mlp", layers=2, width=16, hidden=32, batch=4)

    def ran(module: Any, args: Any) -> None:
        raise AssertionError("the model ran before the usage error")

    model.register_forward_pre_hook(ran)
    return model, sample


CALLS = {
    "profile": lambda model, sample, **kw: memfit.profile(model, sample, **kw),
    "plan": lambda model, sample, **kw: memfit.plan(model, sample, budget="50%", **kw),
    "auto": lambda model, sample, **kw: memfit.auto(model, sample, budget="50%", **kw),
    "auto-dynamic": lambda model, sample, **kw: memfit.auto(
        model, sample, budget="50%", shapes="dynamic", **kw
    ),
    "estimate": lambda model, sample, **kw: memfit.estimate(
        model, sample, shapes=[(4, 0)], budget="50%", **kw
    ),
    "profile_shapes": lambda model, sample, **kw: memfit.profile_shapes(model, sample, **kw),
}


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"options": "fast"}, ValueError, 'options must be "auto"'),
        ({"options": ["no-such-option"]}, ValueError, "no-such-option"),
        ({"options": ["head:chunked"]}, ValueError, "exact=False"),
        ({"options": ["rebuild"], "compile": True}, ValueError, "cannot run on compiled"),
        ({"compile": "yes"}, TypeError, "compile must be True, False or a dict"),
        ({"compile": {"cache": True}}, ValueError, "keys \\['cache'\\]"),
        ({"loss_fn": 5}, TypeError, "loss_fn must be a function"),
        ({"optimizer": 5}, TypeError, "optimizer must be"),
        ({"keep_outputs": False}, TypeError, "'keep_outputs'"),
    ],
)
@pytest.mark.parametrize("call", list(CALLS))
def test_every_verb_refuses_a_bad_option_before_profiling(
    unmeasured: tuple[torch.nn.Module, Any], call: str, arguments: dict[str, Any], error, match
) -> None:
    model, sample = unmeasured
    with pytest.raises(error, match=match):
        CALLS[call](model, sample, **arguments)


@pytest.mark.parametrize("call", ["profile", "plan", "auto"])
def test_repeats_below_one_are_refused_before_profiling(
    unmeasured: tuple[torch.nn.Module, Any], call: str
) -> None:
    model, sample = unmeasured
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        CALLS[call](model, sample, repeats=0)
