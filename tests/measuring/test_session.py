"""torch's profiler is one per process (issue 22, finding 6, and "quiet by default"): memfit
takes it under a process-wide lock, never inside (nor ending) the user's own session, and keeps
its start and stop lines off the user's terminal."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import memfit
from memfit.measuring.meter import MemoryMeter


def chain(width: int = 32, blocks: int = 4) -> nn.Module:
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(blocks)]
    ).train()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, without the test process's ``KINETO_LOG_LEVEL``."""
    env = {key: value for key, value in os.environ.items() if key != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, ["src", env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_plan_inside_the_users_profiler_is_refused_and_leaves_the_session_alone() -> None:
    model = chain()
    sample = (torch.randn(16, 32),)
    loss_fn = torch.Tensor.mean
    with profile(activities=[ProfilerActivity.CPU]) as session:
        model(*sample).mean().backward()
        with pytest.raises(memfit.MemfitError, match="session is running now"):
            memfit.profile(model, sample, loss_fn=loss_fn, repeats=1)
        with pytest.raises(memfit.MemfitError, match="session is running now"):
            memfit.auto(model, sample, budget="100%", loss_fn=loss_fn, repeats=1)
        with pytest.raises(memfit.MemfitError, match="session is running now"):
            memfit.verify(model, sample, loss_fn=loss_fn)
        meter = MemoryMeter()
        with pytest.raises(memfit.MemfitError, match="session is running now"):
            meter.__enter__()
        torch.ones(3).add(1)  # recorded: the session still runs
    names = {event.name for event in session.events()}
    assert "aten::addmm" in names and "aten::add" in names
    # and the lock was let go: memfit runs once the user's session has ended
    assert memfit.measure(model, sample, loss_fn=loss_fn, repeats=1).peak_bytes > 0


def test_two_threads_planning_two_models_take_turns() -> None:
    result = run_python(
        """
        import threading, torch
        from torch import nn
        import memfit
        torch.set_num_threads(1)

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(64, 64)

            def forward(self, x):
                return x + torch.tanh(self.linear(x))

        def model_and_sample():
            model = nn.Sequential(*[Block() for _ in range(6)]).train()
            return model, (torch.randn(64, 64),)

        def work(seed, plans):
            torch.manual_seed(seed)
            model, sample = model_and_sample()
            for _ in range(2):
                try:
                    plan = memfit.auto(model, sample, budget="85%", loss_fn=torch.Tensor.mean,
                                       repeats=1, options=())
                    check = memfit.verify(model, sample, loss_fn=torch.Tensor.mean, repeats=1)
                    memfit.remove(model)
                    fits = check.measured_peak_bytes <= plan.budget_bytes
                    plans.append((check.gradients_equal, fits))
                except Exception as error:
                    plans.append(repr(error))

        plans = []
        threads = [threading.Thread(target=work, args=(seed, plans)) for seed in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(plans)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str([(True, True)] * 4), result.stdout


def test_auto_prints_nothing_and_leaves_the_users_profiler_as_it_was() -> None:
    """Without KINETO_LOG_LEVEL, the profiler writes its start/stop lines to fd 2 at every
    session; memfit's own sessions write nothing, the user's sessions before and after still
    write theirs (memfit changed nothing in the process for them)."""
    result = run_python(
        """
        import sys, torch
        from torch import nn
        from torch.profiler import ProfilerActivity, profile
        import memfit
        torch.set_num_threads(1)

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(64, 64)

            def forward(self, x):
                return x + torch.tanh(self.linear(x))

        def model_and_sample():
            model = nn.Sequential(*[Block() for _ in range(6)]).train()
            return model, (torch.randn(64, 64),)

        def users_session(tag):
            sys.stderr.write(f"<{tag}>\\n"); sys.stderr.flush()
            with profile(activities=[ProfilerActivity.CPU]):
                torch.ones(3).sum()
            sys.stderr.write(f"</{tag}>\\n"); sys.stderr.flush()

        users_session("before")
        model, sample = model_and_sample()
        sys.stderr.write("<memfit>\\n"); sys.stderr.flush()
        memfit.auto(model, sample, budget="85%", loss_fn=torch.Tensor.mean, repeats=1)
        memfit.verify(model, sample, loss_fn=torch.Tensor.mean, repeats=1)
        sys.stderr.write("</memfit>\\n"); sys.stderr.flush()
        users_session("after")
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ""
    err = result.stderr
    ours = err[err.index("<memfit>") : err.index("</memfit>")]
    assert ours == "<memfit>\n"  # memfit wrote nothing at all
    for tag in ("before", "after"):  # the user's sessions as they always were
        theirs = err[err.index(f"<{tag}>") : err.index(f"</{tag}>")]
        assert "profiler_start" in theirs and "profiler_stop" in theirs, err


def test_auto_and_verify_print_nothing_in_this_process(capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = chain(width=64, blocks=6)
    sample = (torch.randn(256, 64),)
    capfd.readouterr()
    memfit.auto(model, sample, budget="95%", loss_fn=torch.Tensor.mean, repeats=1, options=())
    memfit.verify(model, sample, loss_fn=torch.Tensor.mean, repeats=1)
    memfit.remove(model)
    assert capfd.readouterr() == ("", "")
