"""Stage times that another process's load does not reorder (CPU time, one wall factor)."""

from __future__ import annotations

import time

import pytest

import memfit
from memfit.measuring import clock
from memfit.measuring.clock import CPU, WALL, profiler_share, wall_scaled
from memfit.models import gpt
from memfit.runtime.apply import applied_plan


def test_wall_scaled_keeps_the_cpu_order() -> None:
    clocks = {
        "keep": [{"F:0": 1.0, "B:0": 2.0, WALL: 9.0, CPU: 3.0}],  # timed while loaded
        "recompute": [{"F:0": 1.5, "B:0": 3.0, WALL: 4.5, CPU: 4.5}],
        "rebuild": [{"F:0": 1.2, "B:0": 2.2, WALL: 3.4, CPU: 3.4}],
    }
    scaled = wall_scaled(clocks)
    assert scaled["keep"] == [{"F:0": 1.0, "B:0": 2.0}]  # median factor: 1
    assert scaled["recompute"][0]["B:0"] == 3.0
    assert wall_scaled({"keep": [{"F:0": 2.0}]}) == {"keep": [{"F:0": 2.0}]}  # wall clocks


def test_a_loaded_machine_does_not_reorder_the_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the keep way is timed, a synthetic load makes wall time run three times as fast
    as the model's work: wall-time costs would make every kept block look slower than its
    rebuilt twin, and the fastest plan would rebuild them all."""
    model, sample = gpt(layers=3, width=64, heads=2, seq=64, batch=4, vocab=128)
    real = time.perf_counter
    state = {"last": real(), "load": 0.0}

    def loaded() -> float:
        now = real()
        plan = applied_plan(model)
        if plan is not None and plan.strategy == "every block keep":
            state["load"] += 2 * (now - state["last"])
        state["last"] = now
        return now + state["load"]

    monkeypatch.setattr(clock.time, "perf_counter", loaded)
    prof = memfit.profile(model, sample, options=["rebuild"], repeats=3)
    monkeypatch.undo()
    assert state["load"] > 0  # the load hit the keep way's steps
    plan = memfit.plan(prof, budget=None)  # no cap: the fastest way of running every block
    assert set(plan.options.values()) == {"keep"}, plan.options
    step = prof.measurement.step_s
    assert step > 0 and prof.costs.stages[1].options["keep"].forward_s < step


def test_the_fast_path_takes_the_profilers_cost_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default profile times each way in its metered step (issue 22: setup time). A
    synthetic profiler cost (CPU time runs ten times as fast while the profiler is on) must
    come off those times, as keep's plain timed step measures it: else every other way looks
    ten times as slow as keep, and recompute ten times as dear."""
    from torch.autograd import profiler

    model, sample = gpt(layers=3, width=64, heads=2, seq=64, batch=4, vocab=128)
    real = time.process_time
    state = {"last": real(), "cost": 0.0}

    def costly() -> float:
        now = real()
        if profiler._is_profiler_enabled:
            state["cost"] += 9 * (now - state["last"])
        state["last"] = now
        return now + state["cost"]

    monkeypatch.setattr(clock.time, "process_time", costly)
    prof = memfit.profile(model, sample, options=["rebuild"])
    monkeypatch.undo()
    assert state["cost"] > 0 and prof.measurement.repeats == 1

    def block_s(option: str) -> float:
        return sum(
            stage.options[option].forward_s + stage.options[option].backward_s
            for stage in prof.costs.stages[1:-1]
        )

    # without the correction both ratios are about 10; with it about 1, give or take a loaded
    # machine's noise between two steps (measured up to 2.9)
    assert block_s("rebuild") < 5 * block_s("keep")
    nosave = sum(stage.nosave_forward_s for stage in prof.costs.stages[1:-1])
    kept = sum(stage.options["keep"].forward_s for stage in prof.costs.stages[1:-1])
    assert nosave < 5 * kept


def test_the_profilers_share_is_at_most_one() -> None:
    """The profiler only adds work: a plain step slower than the metered one is noise."""
    assert (
        profiler_share({"F:0": 3.0, WALL: 3.0, CPU: 4.0}, {"F:0": 1.0, WALL: 1.0, CPU: 2.0}) == 0.5
    )
    assert (
        profiler_share({"F:0": 1.0, WALL: 1.0, CPU: 1.0}, {"F:0": 2.0, WALL: 2.0, CPU: 2.0}) == 1.0
    )
    assert profiler_share({"F:0": 2.0}, {"F:0": 1.0}) == 0.5  # wall clocks (CUDA): the spans
    assert profiler_share({}, {"F:0": 1.0}) == 1.0
