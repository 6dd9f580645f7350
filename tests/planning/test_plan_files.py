"""Plan files written before the typed fields (``tests/data/plan-2026-12-07*.json``: the output of
``Plan.to_json`` at main 695a4de, with compile settings, exactness and notes under ``info``) still
load, apply and write themselves out unchanged."""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch

import memfit
from memfit.models import build
from memfit.planning import Plan
from memfit.runtime.compiled import plan_compile_options
from memfit.verbs.verification import mismatched_gradients, seeded_gradients

DATA = pathlib.Path(__file__).parent.parent / "data"
FILES = ["plan-2026-12-07.json", "plan-2026-12-07-compiled.json", "plan-2026-12-07-inexact.json"]


def _gpt() -> tuple[torch.nn.Module, object]:
    # the model and sample the files were made for (dropout 0.1)
    return build("gpt", layers=4, width=64, heads=2, seq=64, batch=2)


@pytest.mark.parametrize("name", FILES)
def test_an_old_plan_file_writes_itself_out_unchanged(name: str) -> None:
    text = (DATA / name).read_text()
    assert Plan.from_json(text).to_json() + "\n" == text


def test_an_old_plan_file_applies_with_the_same_gradients() -> None:
    plan = Plan.from_json((DATA / "plan-2026-12-07.json").read_text())
    assert any("offload left out" in note for note in plan.notes)
    assert plan.exact and plan.compile is None and plan_compile_options(plan) is None
    assert not set(plan.info) & {"compile", "inexact", "notes"}  # free-form facts only
    model, sample = _gpt()
    reference = copy.deepcopy(model)
    memfit.apply(model, plan, sample)  # checks the fingerprint against this model and sample
    try:
        loss, grads = seeded_gradients(model, sample, None, 0)
    finally:
        assert memfit.remove(model)
    reference_loss, reference_grads = seeded_gradients(reference, sample, None, 0)
    assert torch.equal(loss, reference_loss)
    assert not mismatched_gradients(reference_grads, grads)


def test_an_old_compiled_plan_file_keeps_its_compile_settings() -> None:
    plan = Plan.from_json((DATA / "plan-2026-12-07-compiled.json").read_text())
    assert plan.compile == {"backend": "aot_eager"}
    assert plan_compile_options(plan) == {"backend": "aot_eager"}  # on the allow-list
    assert any("rebuild and selective:* left out" in note for note in plan.notes)


def test_an_old_inexact_plan_file_says_so() -> None:
    plan = Plan.from_json((DATA / "plan-2026-12-07-inexact.json").read_text())
    assert not plan.exact
    assert plan.options["<post>"] == "head:chunked"
    assert set(plan.inexact) == {"<post>"} and "exact to rounding" in plan.inexact["<post>"]
