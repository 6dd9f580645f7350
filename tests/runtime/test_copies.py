"""Copies and saves of a planned model: deepcopy (EMA, AveragedModel), pickle, torch.save.

Every copy gets weights that differ from the original's, so a copy that still ran the original's
blocks would give the original's numbers. The trees cover a multi-block segment with a nested
one, top-level option stages (selective, rebuild, rebuild+linear).
"""

import copy
import io
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from memfit.models import build
from memfit.planning.plan import Plan
from memfit.runtime import applied_plan, apply_plan, remove_plan
from tests.helpers.plans import make_plan
from tests.helpers.steps import SIZES, assert_same_step, chain_of, step
from tests.helpers.trees import RUNTIME_TREES as TREES

LABELS = ["nested", "rebuild mixed"]


def perturb(model: nn.Module, seed: int) -> None:
    """New weights, the same for every model given the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


@contextmanager
def counting(model: nn.Module) -> Iterator[list[int]]:
    """How often each block's attention runs (forward and recompute) inside the ``with``."""
    counts = [0] * len(model.blocks)
    handles = [
        block.attn.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(model.blocks)
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def planned_gpt(label: str) -> tuple[nn.Module, nn.Module, Any, Plan, list[int]]:
    """A planned model, its unplanned twin (same weights), the sample, the plan, and how often
    each block's attention runs in a planned step."""
    model, sample = build("gpt", **SIZES["gpt"])
    twin = copy.deepcopy(model)
    chain = chain_of(model, sample)
    plan = make_plan(chain, TREES[label])
    apply_plan(model, chain, plan)
    with counting(model) as runs:
        step(model, sample)
    assert max(runs) > 1, "the plan recomputes some block"
    return model, twin, sample, plan, runs


def assert_runs_its_plan(
    copied: nn.Module, original: nn.Module, sample: Any, runs: list[int]
) -> None:
    """``copied`` carries the plan and reruns *its own* blocks as the original does."""
    with counting(copied) as copied_runs, counting(original) as original_runs:
        step(copied, sample)
    assert copied_runs == runs
    assert original_runs == [0] * len(runs)


def assert_same_plan(copied: nn.Module, plan: Plan) -> None:
    carried = applied_plan(copied)
    assert carried is not None
    assert (carried.stage_names, carried.tree) == (plan.stage_names, plan.tree)


@pytest.mark.parametrize("label", LABELS)
def test_deepcopy_runs_its_own_weights_with_the_plan(label: str) -> None:
    model, twin, sample, plan, runs = planned_gpt(label)
    before = step(model, sample)
    copied = copy.deepcopy(model)
    assert list(copied.state_dict()) == list(model.state_dict())
    assert_same_plan(copied, plan)
    perturb(copied, seed=1)
    perturb(twin, seed=1)
    assert_same_step(step(twin, sample), step(copied, sample))
    assert_runs_its_plan(copied, model, sample, runs)
    assert applied_plan(model) is plan
    assert_same_step(before, step(model, sample))  # the original is untouched


@pytest.mark.parametrize("label", LABELS)
def test_averaged_model_and_ema_copies(label: str) -> None:
    model, twin, sample, plan, runs = planned_gpt(label)
    averaged = AveragedModel(model)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # the model moves away from its copies
        step(model, sample)
        optimizer.step()
        averaged.update_parameters(model)
        with torch.no_grad():
            for average, parameter in zip(ema.parameters(), model.parameters(), strict=True):
                average.lerp_(parameter, 0.25)
    for copied in (averaged.module, ema):
        assert_same_plan(copied, plan)
        twin.load_state_dict(copied.state_dict())
        assert_same_step(step(twin, sample), step(copied, sample))
        assert_runs_its_plan(copied, model, sample, runs)
    with torch.no_grad():  # AveragedModel's own forward, as evaluation calls it
        torch.manual_seed(2)
        expected = twin(*sample)
        torch.manual_seed(2)
        assert torch.equal(ema(*sample), expected)


def pickled(model: nn.Module) -> nn.Module:
    loaded = pickle.loads(pickle.dumps(model))
    assert isinstance(loaded, nn.Module)
    return loaded


def torch_saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, nn.Module)
    return loaded


@pytest.mark.parametrize("save", [pickled, torch_saved], ids=["pickle", "torch.save"])
@pytest.mark.parametrize("label", LABELS)
def test_saved_and_loaded_models_train_with_the_plan(label: str, save: Any) -> None:
    model, _, sample, plan, runs = planned_gpt(label)
    loaded = save(model)
    assert_same_plan(loaded, plan)
    assert list(loaded.state_dict()) == list(model.state_dict())
    perturb(loaded, seed=3)
    planned_step = step(loaded, sample)
    assert_runs_its_plan(loaded, model, sample, runs)
    assert remove_plan(loaded) is True
    assert all("forward" not in vars(block) for block in loaded.blocks)
    assert_same_step(step(loaded, sample), planned_step)


def test_load_state_dict_into_a_planned_model() -> None:
    model, twin, sample, _, runs = planned_gpt("nested")
    perturb(twin, seed=4)
    model.load_state_dict(twin.state_dict())
    assert_same_step(step(twin, sample), step(model, sample))
    with counting(model) as after:
        step(model, sample)
    assert after == runs


def test_remove_on_a_copy_leaves_the_original_planned() -> None:
    model, twin, sample, plan, runs = planned_gpt("rebuild mixed")
    before = step(model, sample)
    overridden = [i for i, block in enumerate(model.blocks) if "forward" in vars(block)]
    copied = copy.deepcopy(model)
    assert remove_plan(copied) is True
    assert applied_plan(copied) is None
    assert all("forward" not in vars(block) for block in copied.blocks)
    assert_same_step(step(twin, sample), step(copied, sample))
    assert applied_plan(model) is plan
    assert [i for i, block in enumerate(model.blocks) if "forward" in vars(block)] == overridden
    assert_same_step(before, step(model, sample))
    with counting(model) as after:
        step(model, sample)
    assert after == runs
