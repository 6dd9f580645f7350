"""The memfit command through main(argv): every subcommand, bad arguments, infeasible budgets."""

import json
import logging
from pathlib import Path

import pytest

from memfit.cli import main

# profile and plan run the default (fast) profile, as the README's commands do; bench and demo
# take --repeats 1 (one timed pair per row instead of 3; their profile then takes the timed path)
TINY = ["--layers", "2", "--width", "32", "--seq", "16", "--batch", "2"]
# 4 blocks whose activations outweigh the embedding and head, so that 60% is feasible
SMALL = ["--layers", "4", "--width", "64", "--seq", "64", "--batch", "2"]
ONE_PAIR = ["--repeats", "1"]


def test_profile_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "gpt", *TINY]) == 0
    out = capsys.readouterr().out
    assert "blocks.1" in out and "<post>" in out and "Profile" in out
    assert "Ops of blocks.0" in out and "needs" in out and "random numbers" in out


def test_profile_json_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "profile.json"
    assert main(["profile", "mlp", "--layers", "2", "--json", "-o", str(target)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["costs"]["stages"][1]["name"] == "blocks.0"
    assert json.loads(target.read_text())["measurement"] == data["measurement"]


def test_plan_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "plan.json"
    assert main(["plan", "gpt", *SMALL, "--budget", "60%", "-o", str(target)]) == 0
    from memfit import Plan

    plan = Plan.from_json(target.read_text())
    assert plan.strategy == "optimal" and plan.keep_output
    out = capsys.readouterr().out
    assert "plan written" in out and "output kept through backward" in out
    assert "offload left out" in out  # a CPU model: the plan says why, as a note row


def test_plan_times_candidates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "plan.json"
    argv = ["plan", "gpt", *SMALL, "--budget", "50%", "--candidates", "3", "-o", str(target)]
    assert main(argv) == 0
    from memfit import Plan

    plan = Plan.from_json(target.read_text())
    assert "chosen_by" in plan.info
    out = capsys.readouterr().out
    if "timed" in plan.info:  # more than one plan fits: the table shows what was measured
        assert "chosen" in out and "measured" in out and "predicted" in out
    assert (
        main(["plan", "gpt", *TINY, "--budget", "60%", "--strategy", "all", "--candidates", "2"])
        == 2
    )
    assert "--candidates times optimal plans" in capsys.readouterr().err


def test_plan_host_budget_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt", *TINY, "--budget", "60%", "--host-budget", "lots"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_plan_for_a_loss_only_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "plan.json"
    argv = ["plan", "mlp", "--layers", "4", "--budget", "60%"]
    assert main([*argv, "--drop-output", "-o", str(target)]) == 0
    from memfit import Plan

    assert not Plan.from_json(target.read_text()).keep_output
    assert "only the loss kept" in capsys.readouterr().out


def test_plan_infeasible_budget_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt", *TINY, "--budget", "1%"]) == 1
    err = capsys.readouterr().err
    assert "infeasible" in err and "raise the budget" in err
    assert "budget 1% of " in err and "activation memory" in err  # in the units given
    assert "smallest feasible is" in err and 'at least "' in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["plan", "gpt"],  # no --budget
        ["profile", "gpt", "--layers", "many"],
        ["profile", "gpt", "--repeats", "0"],
        ["profile", "gpt", "--width", "0"],
        ["profile", "gpt", "--seq", "0"],
        ["profile", "gpt", "--layers", "0"],
        ["plan", "gpt", "--budget", "50%", "--batch", "-1"],
        ["bench", "gpt", "--heads", "0"],
        ["estimate", "gpt", "--width", "0"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_bad_values_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt", *TINY, "--budget", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memfit: error:") and "40%" in err and "Traceback" not in err
    assert main(["profile", "no-such-model"]) == 2
    assert "unknown target" in capsys.readouterr().err


def test_debug_shows_the_traceback() -> None:
    with pytest.raises(ValueError, match="unknown target"):
        main(["--debug", "profile", "no-such-model"])


def test_user_file_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "mine.py"
    source.write_text(
        "from memfit.models import mlp\n"
        "def build():\n"
        "    return mlp(layers=2, width=16, hidden=32, batch=4)\n"
    )
    assert main(["profile", f"{source}:build"]) == 0
    assert "blocks.1" in capsys.readouterr().out
    assert main(["profile", f"{source}:nothing"]) == 2


def test_bench_writes_plot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "gpt", *SMALL, *ONE_PAIR, "--budgets", "60%,80%", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "optimal" in out and "all (HF-style)" in out
    data = json.loads((tmp_path / "gpt.json").read_text())
    rows = data["result"]["rows"]
    assert {row["strategy"] for row in rows} >= {"none", "all", "sqrt", "optimal"}
    assert all(row["gradients_equal"] for row in rows if row["feasible"])
    assert (tmp_path / "gpt.png").stat().st_size > 10_000


def test_demo_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "demo",
        *TINY,
        *ONE_PAIR,
        "--models",
        "mlp",
        "--budgets",
        "80%",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["target"] == "mlp"
    assert (tmp_path / "mlp.png").exists()


@pytest.mark.filterwarnings("ignore::UserWarning:transformers")
def test_hugging_face_target(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    assert main(["profile", "hf:gpt2", "--layers", "2"]) == 0
    assert "transformer.h.1" in capsys.readouterr().out
    assert main(["profile", "hf:t5"]) == 2
    assert "unknown Hugging Face architecture" in capsys.readouterr().err


BROKEN_MODEL = """
import torch
from torch import nn


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, x):
        raise ValueError("my model refuses this batch")


def build():
    return Broken(), (torch.randn(2, 4),)


def build_fails():
    raise TypeError("cannot build: no weights here")
"""


@pytest.mark.parametrize(
    ("function", "message"),
    [("build", "my model refuses this batch"), ("build_fails", "cannot build: no weights here")],
)
def test_errors_of_the_users_model_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], function: str, message: str
) -> None:
    """A ValueError or TypeError raised by the user's own code is no usage error."""
    source = tmp_path / "broken.py"
    source.write_text(BROKEN_MODEL)
    assert main(["profile", f"{source}:{function}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("memfit: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("budget", ["0.0", "2.5", "-1%", "inf%", "nan%", "0%", "0", "0GiB"])
def test_bad_budgets_exit_2_before_loading(budget: str, capsys: pytest.CaptureFixture[str]) -> None:
    # the target does not exist: the budget is read first
    assert main(["plan", "no-such-model", "--budget", budget]) == 2
    err = capsys.readouterr().err
    assert "budget" in err and "unknown target" not in err


def test_estimate_prints_a_table_and_the_largest_seq(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    sizes = ["--layers", "2", "--width", "32", "--repeats", "1"]
    args = ["estimate", "gpt", *sizes, "--seq", "256,512", "--batch", "8"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--budget", "64MiB", "--largest", "seq"]) == 0
    # the built-in GPT was built with positions up to 512: its longer profile shapes ran
    assert "left out of the shape profile" not in caplog.text
    out = capsys.readouterr().out
    assert "Estimate (budget 64.00 MiB" in out and "extrapolation check" in out
    assert "time check" in out and "time trusted" in out  # the time fits' own flag, per row
    assert "largest seq that fits 64.00 MiB at batch 8:" in out
    assert main([*args, "--budget", "50%", "--largest", "seq"]) == 2  # a percentage: no largest
    assert "needs a budget in bytes" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning:transformers")
def test_inexact_options_are_opt_in(capsys: pytest.CaptureFixture[str]) -> None:
    # absent without the flag: tests/runtime/test_head.py::test_chunked_is_opt_in
    pytest.importorskip("transformers")
    assert main(["profile", "hf:llama", *TINY, "--json", "--inexact"]) == 0
    post = json.loads(capsys.readouterr().out)["costs"]["stages"][-1]["options"]
    assert {"head:lean-loss", "head:chunked"} <= set(post)
    assert post["head:chunked"]["detail"]["exact"] is False


@pytest.fixture
def unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Profiling fails the test: a usage error must come before any work."""
    import memfit.verbs.profiling

    def profiled(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiling started before the usage error")

    monkeypatch.setattr(memfit.verbs.profiling, "_chain", profiled)


@pytest.mark.usefixtures("unmeasured")
@pytest.mark.parametrize("command", ["plan", "profile"])
def test_output_into_a_missing_folder_exits_2_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    budget = ["--budget", "60%"] if command == "plan" else []
    target = tmp_path / "missing" / "out.json"
    assert main([command, "gpt", *TINY, *budget, "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main([command, "gpt", *TINY, *budget, "-o", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.usefixtures("unmeasured")
@pytest.mark.parametrize("command", ["bench", "demo"])
def test_out_onto_a_file_exits_2_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    target = ["gpt"] if command == "bench" else ["--models", "mlp"]
    assert main([command, *target, *TINY, "--out", str(existing)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert existing.read_text() == "mine"


FROZEN_MODEL = """
from memfit.models import mlp


def build():
    model, sample = mlp(layers=2, width=16, hidden=32, batch=4)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, sample
"""


@pytest.mark.usefixtures("unmeasured")
def test_nothing_to_train_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "frozen.py"
    source.write_text(FROZEN_MODEL)
    assert main(["plan", f"{source}:build", "--budget", "50%"]) == 2
    err = capsys.readouterr().err
    assert "nothing to train" in err and "Traceback" not in err


def test_lossy_options_enter_no_cli_plan_without_inexact(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "gpt", *TINY, "--budget", "90%", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert "inexact" not in plan["info"] and "compress:" not in json.dumps(plan["tree"])
    assert main(["profile", "gpt", *TINY, "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["costs"]["stages"]
    assert not [name for stage in stages for name in stage["options"] if "compress:" in name]


@pytest.mark.usefixtures("unmeasured")
def test_max_error_without_inexact_exits_2_before_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt", *TINY, "--budget", "30%", "--max-error", "0.01"]) == 2
    assert "--inexact" in capsys.readouterr().err
    assert main(["plan", "gpt", *TINY, "--budget", "30%", "--inexact", "--max-error", "-1"]) == 2
    assert "max_error" in capsys.readouterr().err
