"""The README runs as written: every ``memfit ...`` line of its shell blocks and its Python
example, in a fresh folder (outputs such as ``-o plan.json`` land in ``tmp_path``)."""

import re
import shlex
from pathlib import Path

import pytest

from memfit.cli import main

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
COMMANDS = [
    shlex.split(line, comments=True)[1:]
    for language, body in BLOCKS
    if language in ("bash", "sh", "console")
    for line in body.splitlines()
    if line.startswith("memfit ")
]
PYTHON = [body for language, body in BLOCKS if language == "python"]
# Commands that take minutes at the README's sizes run smaller here, through size options that
# the README itself documents (checked below). `profile` runs its default (fast) profile, as the
# README's line does; bench, demo and estimate time one step per row or shape (`--repeats 1`).
SMALLER = {
    "demo": ["--layers", "2", "--width", "64", "--seq", "32", "--batch", "2", "--repeats", "1"],
    "gpt": ["--width", "64", "--seq", "64", "--batch", "2"],
    # ten rows, each timed against the unplanned model; 4 of its 8 layers (its budgets stay
    # feasible: the README claims rows, a plot and JSON, not a size)
    "hf:gpt2": ["--layers", "4", "--repeats", "1"],
    "estimate": ["--layers", "2", "--repeats", "1"],  # eight profiles
}
# `memfit profile path/to/model.py:build` needs the user's file: one as the README describes it.
USER_FILE = """
import torch
from torch import nn


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        layers = (nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(4))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.blocks(x), y)


def build():
    return Regression(), (torch.randn(16, 32), torch.randn(16, 32))
"""


def command_id(argv: list[str]) -> str:
    return " ".join(argv)


def test_the_readme_has_commands_and_an_example() -> None:
    assert len(COMMANDS) >= 5, COMMANDS
    assert {argv[0] for argv in COMMANDS} >= {"demo", "profile", "plan", "bench"}
    assert len(PYTHON) == 1
    for flags in SMALLER.values():
        for flag in flags[::2]:
            assert f"`{flag}" in README or f" {flag}" in README, f"README does not show {flag}"


@pytest.mark.parametrize("argv", COMMANDS, ids=command_id)
def test_command(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    target = argv[1] if len(argv) > 1 else ""
    if target.endswith(".py:build"):
        path = tmp_path / target.rpartition(":")[0]
        path.parent.mkdir(parents=True)
        path.write_text(USER_FILE)
    extra = SMALLER.get(argv[0], SMALLER.get(target, []))
    code = main([*argv, *extra])
    output = capsys.readouterr()
    assert code == 0, output.err[-2000:]
    for flag in ("-o", "--out"):
        if flag in argv:
            written = tmp_path / argv[argv.index(flag) + 1]
            assert written.exists() and written.is_relative_to(tmp_path)


def test_python_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(PYTHON[0], "README.md", "exec"), namespace)
    assert namespace["plan"].budget_bytes is not None
    assert namespace["out"].loss.isfinite()
