"""The Hugging Face Trainer trains a planned model as it trains the model itself."""

import copy
import logging
import pathlib

import pytest
import torch

import memfit
from memfit.integrations.hf import MemfitCallback, build_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")


class Batches(torch.utils.data.Dataset):
    """The rows of one sample batch, served as a data set."""

    def __init__(self, sample: dict[str, torch.Tensor]) -> None:
        self.sample = sample

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = index % len(self.sample["input_ids"])
        return {key: value[row] for key, value in self.sample.items()}


def _train(
    model: torch.nn.Module,
    sample: dict,
    out: pathlib.Path,
    callbacks: list | None = None,
    warns: str | None = None,
    **arguments: object,
) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **arguments,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Batches(sample), callbacks=callbacks
    )
    if warns is None:
        trainer.train()
    else:
        with pytest.warns(UserWarning, match=warns):
            trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_steps_are_bit_identical(tmp_path: pathlib.Path) -> None:
    # GPT-2 with its defaults: dropout 0.1 everywhere, use_cache=True
    model, sample = build_hf("gpt2", layers=4, seq=64)
    unplanned = copy.deepcopy(model)
    plan = memfit.auto(model, sample, budget="60%", repeats=1)
    assert any(option != "keep" for option in plan.options.values())
    planned_losses = _train(model, sample, tmp_path / "planned")
    reference_losses = _train(unplanned, sample, tmp_path / "unplanned")
    assert len(planned_losses) == 3
    assert planned_losses == reference_losses
    assert memfit.runtime.applied_plan(model) is not None  # the Trainer kept the plan
    reference = dict(unplanned.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, reference[name]), name


def _hf_checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@pytest.mark.parametrize("hf_checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_callback_plans_the_first_batch(
    tmp_path: pathlib.Path, hf_checkpointing: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # a Llama with the library's defaults (use_cache=True); the Trainer's own loop, one line
    model, sample = build_hf("llama", layers=4, hidden=32, seq=64)
    unplanned = copy.deepcopy(model)
    callback = MemfitCallback(budget="50%", repeats=1)
    caplog.set_level(logging.INFO, logger="memfit")
    if hf_checkpointing:  # the Trainer turns HF's checkpointing on; memfit takes over, warning
        planned_losses = _train(
            model,
            sample,
            tmp_path / "p",
            [callback],
            warns="memfit's plan replaces",
            gradient_checkpointing=True,
        )
    else:
        planned_losses = _train(model, sample, tmp_path / "p", [callback])
    reference_losses = _train(unplanned, sample, tmp_path / "u")
    assert len(planned_losses) == 3
    assert planned_losses == reference_losses
    plan = callback.plan
    assert plan is not None and memfit.runtime.applied_plan(model) is plan
    # one line, from the callback, naming the plan it applied
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("memfit")]
    assert len(lines) == 1 and plan.summary in lines[0], lines
    assert any(option != "keep" for option in plan.options.values())
    assert not plan.keep_output  # the Trainer keeps only the loss through backward
    assert not _hf_checkpointing_on(model)  # memfit took over, nothing recomputes twice
    reference = dict(unplanned.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, reference[name]), name
    # the plan fits its budget, predicted and measured (the Trainer's loop, memfit's meter)
    assert plan.budget_bytes is not None
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    measured = memfit.measure(model, sample, repeats=1, keep_output=False).peak_bytes
    assert measured <= plan.budget_bytes
    assert abs(plan.predicted_peak_bytes / measured - 1.0) <= 0.02


def test_callback_rejects_a_bad_budget() -> None:
    with pytest.raises(ValueError, match="budget"):
        MemfitCallback(budget="lots")


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"repeets": 1}, TypeError, "repeets"),
        ({"repeats": 0}, ValueError, "repeats"),
        ({"options": ("selective:nonsense",)}, ValueError, "nonsense"),
        ({"shapes": "dynamic", "shapes_profiled": [(1, 8)], "blocs": "h"}, TypeError, "blocs"),
    ],
)
def test_callback_rejects_a_bad_profile_option_before_training(
    options: dict, error: type, names: str
) -> None:
    """Checked at construction as memfit.profile checks them, not at the first training batch."""
    with pytest.raises(error, match=names):
        MemfitCallback(budget="50%", **options)


def test_callback_takes_autos_own_keywords() -> None:
    callback = MemfitCallback(budget="50%", candidates=2, repeats=1)
    assert callback.profile_options == {"keep_output": False, "candidates": 2, "repeats": 1}
