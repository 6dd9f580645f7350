"""The Hugging Face Trainer trains a planned model as it trains the model itself."""

import copy
import pathlib

import pytest
import torch

import memfit
from memfit.integrations.hf import build_hf

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


def _train(model: torch.nn.Module, sample: dict, out: pathlib.Path) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Batches(sample))
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
