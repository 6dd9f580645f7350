"""torch.compile with memfit: blocks compiled beneath memfit's checkpoints (``compile=``), and a
compile around a planned model (``torch.compile(model)``, ``block.compile()`` per block).

The backend here is ``aot_eager``: Dynamo and AOT autograd as with inductor (graphs, graph
breaks, guards, recompiles, the partitioner's saved tensors), without inductor's code generation,
which takes half a minute per block class on this machine. ``benchmarks/bench_compile.py`` runs
inductor. Checked: gradients ``torch.equal`` to the same compile without memfit (dropout on),
graph breaks and recompiles counted with Dynamo's counters, none after warm-up, memory as the
plan predicts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import memfit
from memfit.errors import PlanMismatchError
from memfit.models import build
from memfit.planning import Plan, Stage, recompute_one
from memfit.runtime import compiled
from memfit.runtime.apply import planned_module
from memfit.runtime.compiled import runs_compiled_blocks
from memfit.verbs.timing import fastest
from memfit.verbs.verification import mismatched_gradients, seeded_gradients

COMPILE = {"backend": "aot_eager"}
# Dynamo reads .grad of fake tensors while it traces (its own warning, triggered inside torch)
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
    ),
    # torch's own, when a backend first imports inductor's passes (torch.fx imports torch.jit)
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # Dynamo's caches and skip marks live on code objects that every GPT shares
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gpt() -> tuple[torch.nn.Module, Any]:
    return build("gpt", layers=4, width=64, heads=2, seq=64, batch=2)  # dropout 0.1


def _by_hand(model: torch.nn.Module, sample: Any, options: dict[int, str]) -> Plan:
    """Every stage kept but ``options`` (stage index -> option)."""
    names = memfit.profile(model, sample, repeats=1, options=()).stage_names
    tree = tuple(Stage(i, options.get(i, "keep")) for i in range(len(names)))
    return Plan.from_tree(names, tree, "by hand")


def _dynamo_counts() -> dict[str, int]:
    """Graphs compiled and graph breaks since the last ``counters.clear()``."""
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }


def _compile_around(model: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "model":
        return torch.compile(model, **COMPILE)
    for block in model.blocks:  # torchtitan's order: plan, then compile each block
        block.compile(**COMPILE)
    return model


def _steps_match(
    planned: torch.nn.Module, reference: torch.nn.Module, sample: Any, steps: int = 3
) -> list[dict[str, int]]:
    """Run ``steps`` seeded steps of both; assert loss and gradients bit for bit; return the
    planned model's Dynamo counts per step."""
    counts = []
    for seed in range(steps):
        counters.clear()
        loss, grads = seeded_gradients(planned, sample, None, seed)
        counts.append(_dynamo_counts())
        reference_loss, reference_grads = seeded_gradients(reference, sample, None, seed)
        assert torch.equal(loss, reference_loss)
        assert not mismatched_gradients(reference_grads, grads)
    return counts


def test_a_compiled_plan_runs_as_profiled() -> None:
    model, sample = _gpt()
    reference = copy.deepcopy(model)
    counters.clear()
    plan = memfit.auto(model, sample, budget="50%", repeats=1, compile=COMPILE)
    # one graph for every block (the class forward, compiled once), no graph break
    assert _dynamo_counts() == {"graphs": 1, "breaks": 0}
    assert plan.compile == COMPILE
    assert any("rebuild and selective:* left out" in note for note in plan.notes)
    # dropout on: compile's activation_memory_budget would replay it wrongly, so not offered
    assert any("compile-budget:* left out" in note for note in plan.notes)
    assert set(plan.options.values()) <= {"keep", "recompute"}
    assert "recompute" in plan.options.values()
    assert all(runs_compiled_blocks(block.forward) for block in model.blocks)
    assert Plan.from_json(plan.to_json()).compile == COMPILE
    _compile_around(reference, "blocks")
    counts = _steps_match(model, reference, sample)
    assert counts == [{"graphs": 0, "breaks": 0}] * 3  # compiled while profiling, never again
    measured = memfit.measure(model, sample, repeats=1).peak_bytes
    assert plan.budget_bytes is not None and measured <= plan.budget_bytes
    assert abs(plan.predicted_peak_bytes / measured - 1.0) <= 0.02
    assert memfit.remove(model)
    assert not any("forward" in block.__dict__ for block in model.blocks)


@pytest.mark.parametrize("how", ["model", "blocks"])
@pytest.mark.parametrize("compiled_plan", [False, True], ids=["eager-plan", "compiled-plan"])
def test_compile_around_a_plan(how: str, compiled_plan: bool) -> None:
    model, sample = _gpt()
    reference = copy.deepcopy(model)
    extra: dict[str, Any] = {"compile": COMPILE} if compiled_plan else {"options": ()}
    plan = memfit.auto(model, sample, budget="50%", repeats=1, **extra)
    assert "recompute" in plan.options.values()
    planned = _compile_around(model, how)
    if compiled_plan:
        counts = _steps_match(planned, _compile_around(reference, how), sample)
    else:  # the plan's budget does not hold under a compile around it: said once
        with pytest.warns(UserWarning, match="plan's memory budget does not hold"):
            counts = _steps_match(planned, _compile_around(reference, how), sample)
    if compiled_plan:
        # memfit's checkpoints stay outside compiled code: one break where a planned block is
        # called, per kind of override (Head, TopStage, PassThrough), not per block
        assert counts[0]["breaks"] <= 3
    else:  # traced through: checkpoints become compile's own, no break at all
        assert counts[0]["breaks"] == 0
    assert counts[1:] == [{"graphs": 0, "breaks": 0}] * 2  # no recompile after warm-up
    if compiled_plan:  # the plan's prediction holds for the compiled model
        measured = memfit.measure(planned, sample, repeats=1).peak_bytes
        assert abs(plan.predicted_peak_bytes / measured - 1.0) <= 0.05


def test_rebuild_runs_eagerly_inside_a_compiled_model() -> None:
    # a plan made without compile may hold rebuild: under a compile around it, the rebuilt
    # stage is a graph break (its saved-tensor hooks run eagerly), not a recompile storm
    model, sample = _gpt()
    reference = copy.deepcopy(model)
    memfit.apply(model, _by_hand(model, sample, {2: "rebuild"}))
    planned = _compile_around(model, "blocks")
    with pytest.warns(UserWarning, match="plan's memory budget does not hold"):
        counts = _steps_match(planned, _compile_around(reference, "blocks"), sample)
    assert 1 <= counts[0]["breaks"] <= 3  # at the rebuilt stage (one per frame it unwinds)
    # Dynamo compiles the frames under the break lazily: one graph more in the second step
    # (measured), none after; a plan made for compiled blocks (compile=) has no such stage
    assert counts[1]["breaks"] == 0 and counts[1]["graphs"] <= 1
    assert counts[2] == {"graphs": 0, "breaks": 0}
    # rebuild's module hook is gone after the step (torch forgot a flag of it: compile warned)
    assert not torch.nn.modules.module._has_any_global_hook()


# torch's min-cut partitioner imports code that warns about torch.jit (torch's own warning)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_budget_per_block() -> None:
    # compile's own knob per block, measured and mixed by the planner; a backend whose
    # partitioner reads the knob (min-cut, as inductor's), dropout off (see the note above)
    backend = {"backend": "aot_eager_decomp_partition"}
    model, sample = build("gpt", layers=4, width=64, heads=2, seq=64, batch=2, dropout=0.0)
    reference = copy.deepcopy(model)
    prof = memfit.profile(model, sample, repeats=1, compile=backend)
    block = prof.costs.stages[1]
    saved = {name: costs.saved_bytes for name, costs in block.options.items()}
    assert saved["compile-budget:0.1"] < saved["compile-budget:0.5"] < saved["keep"]
    plan = memfit.plan(prof, budget="70%")
    assert any(o.startswith("compile-budget:") for o in plan.options.values())
    memfit.apply(model, plan, sample)
    for block_module in reference.blocks:
        block_module.compile(**backend)
    loss, grads = seeded_gradients(model, sample, None, 0)
    reference_loss, reference_grads = seeded_gradients(reference, sample, None, 0)
    assert torch.equal(loss, reference_loss)
    for name, grad in reference_grads.items():  # measured bit-equal; compile promises less
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
    measured = memfit.measure(model, sample, repeats=1).peak_bytes
    assert plan.budget_bytes is not None and measured <= plan.budget_bytes
    assert abs(plan.predicted_peak_bytes / measured - 1.0) <= 0.02


def test_compiled_blocks_refuse_hooked_options() -> None:
    model, sample = _gpt()
    with pytest.raises(ValueError, match="wrong gradients"):  # dropout on
        memfit.profile(model, sample, options=("compile-budget:0.5",), compile=COMPILE)
    with pytest.raises(ValueError, match="profile with compile=True"):
        memfit.profile(model, sample, options=("compile-budget:0.5",))
    with pytest.raises(ValueError, match="compile-budget:<fraction in"):
        memfit.profile(model, sample, options=("compile-budget:2",), compile=COMPILE)
    with pytest.raises(PlanMismatchError, match="run on compiled blocks"):
        memfit.apply(model, _by_hand(model, sample, {2: "compile-budget:0.5"}))
    with pytest.raises(ValueError, match="cannot run on compiled blocks"):
        memfit.profile(model, sample, repeats=1, options=("rebuild",), compile=COMPILE)
    with pytest.raises(ValueError, match="keys \\['cache'\\]"):
        memfit.profile(model, sample, compile={"cache": True})
    edited = dataclasses.replace(_by_hand(model, sample, {2: "rebuild"}), compile=COMPILE)
    with pytest.raises(PlanMismatchError, match="cannot see inside compiled blocks"):
        memfit.apply(model, edited)
    assert not any("forward" in block.__dict__ for block in model.blocks)


def test_candidates_are_timed_with_the_blocks_compiled() -> None:
    # a plan with compile-budget options runs only on blocks memfit compiled: timing the
    # candidates must compile them as apply does (it raised PlanMismatchError before)
    backend = {"backend": "aot_eager_decomp_partition"}
    model, sample = build("gpt", layers=4, width=64, heads=2, seq=64, batch=2, dropout=0.0)
    plan = memfit.plan(model, sample, budget="70%", repeats=1, compile=backend, candidates=3)
    timed = plan.info["timed"]
    assert len(timed) >= 2 and not any("error" in entry for entry in timed)
    assert any("compile-budget:" in entry["options"] for entry in timed)
    assert plan.compile == backend
    assert all("forward" not in block.__dict__ for block in model.blocks)  # left uncompiled
    memfit.apply(model, plan, sample)
    try:
        measured = memfit.measure(model, sample, repeats=1).peak_bytes
        assert plan.budget_bytes is not None and measured <= plan.budget_bytes
    finally:
        memfit.remove(model)


def _recompute_block_2(model: torch.nn.Module, sample: Any) -> Plan:
    kept = _by_hand(model, sample, {})
    tree = tuple(recompute_one(2) if stage.index == 2 else stage for stage in kept.tree)
    return Plan.from_tree(kept.stage_names, tree, "by hand")


def _with_compile(plan: Plan, settings: Any) -> Plan:
    """``plan`` as a file would carry it, with ``info.compile`` set to ``settings`` (``Plan.compile``)."""
    data = plan.to_dict()
    data["info"] = {**data["info"], "compile": settings}
    return Plan.from_json(json.dumps(data))


def _uncompiled(model: torch.nn.Module) -> bool:
    return planned_module(model) is None and not any(
        "forward" in block.__dict__ for block in model.blocks
    )


@pytest.fixture
def compile_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every ``torch.compile`` call from now on (memfit's cache of
    compiled forwards emptied, so that none is skipped)."""
    calls: list[dict[str, Any]] = []
    real = torch.compile

    def recording(function: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(function, **kwargs)

    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", recording)
    return calls


def test_a_plan_file_cannot_configure_the_compiler(
    tmp_path: pathlib.Path, compile_calls: list[dict[str, Any]]
) -> None:
    # a plan file's compile settings reached torch.compile unchecked: inductor's options ran
    # this script as the C++ compiler and wrote a trace into a folder of the file's choice
    marker = tmp_path / "ran"
    script = tmp_path / "cxx.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    debug = tmp_path / "debug"
    settings = {
        "backend": "inductor",
        "options": {"cpp.cxx": [str(script)], "trace.enabled": True, "trace.debug_dir": str(debug)},
    }
    model, sample = _gpt()
    path = tmp_path / "plan.json"
    path.write_text(_with_compile(_recompute_block_2(model, sample), settings).to_json())
    plan = Plan.from_json(path.read_text())
    with pytest.raises(PlanMismatchError, match=r"'options'.*compile=") as caught:
        memfit.apply(model, plan, sample)
    assert "memfit.apply(model, plan, compile=" in str(caught.value)
    assert _uncompiled(model)
    seeded_gradients(model, sample, None, 0)  # a training step after the refusal
    assert compile_calls == []
    assert not marker.exists() and not debug.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cxx.sh", "plan.json"]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"bogus": 1}, "'bogus'"),
        ({"backend": "no-such-backend"}, "'backend'"),
        ({"backend": "cudagraphs"}, "'backend'"),
        ({"backend": ["inductor"]}, "'backend'"),
        ({"mode": "fastest"}, "'mode'"),
        ({"backend": "aot_eager", "mode": "max-autotune"}, "'mode'"),
        ({"fullgraph": "yes"}, "'fullgraph'"),
        ({"dynamic": 1}, "'dynamic'"),
        ({"options": {}}, "'options'"),
        ("inductor", "plan.compile is 'inductor'"),
    ],
)
def test_malformed_compile_settings_are_refused_at_apply(settings: Any, named: str) -> None:
    # they were accepted by apply and failed only inside the first forward
    model, sample = _gpt()
    plan = _with_compile(_recompute_block_2(model, sample), settings)
    with pytest.raises(PlanMismatchError, match=named):
        memfit.apply(model, plan)
    assert _uncompiled(model)


def test_the_callers_compile_arguments_run_the_blocks(
    compile_calls: list[dict[str, Any]],
) -> None:
    model, sample = _gpt()
    reference = copy.deepcopy(model)
    by_hand = _recompute_block_2(model, sample)
    recorded = _with_compile(by_hand, {"backend": "aot_eager", "options": {"trace.enabled": 1}})
    with pytest.raises(PlanMismatchError, match="uncompiled blocks"):
        memfit.apply(model, by_hand, compile=COMPILE)
    with pytest.raises(PlanMismatchError, match="compiled blocks"):
        memfit.apply(model, recorded, compile=False)
    with pytest.raises(ValueError, match="keys \\['cache'\\]"):
        memfit.apply(model, recorded, compile={"cache": True})
    assert _uncompiled(model)
    # settings within the allow-list need no compile=
    memfit.apply(model, _with_compile(by_hand, {**COMPILE, "dynamic": False}))
    seeded_gradients(model, sample, None, 0)
    assert compile_calls == [{**COMPILE, "dynamic": False}]
    assert memfit.remove(model) and _uncompiled(model)
    memfit.apply(model, recorded, compile=COMPILE)  # the caller's arguments, not the file's
    seeded_gradients(model, sample, None, 0)
    assert compile_calls[1:] == [COMPILE]  # one compile of the block class's forward
    _steps_match(model, _compile_around(reference, "blocks"), sample, steps=1)


def test_timing_checks_the_plans_compile_settings() -> None:
    model, sample = _gpt()
    plain = _recompute_block_2(model, sample)
    plans = [_with_compile(plain, {"options": {"trace.enabled": True}}), plain]
    with pytest.raises(PlanMismatchError, match="'options'"):
        fastest(model, sample, plans)
    assert _uncompiled(model)


def test_auto_passes_the_callers_own_compile_arguments_on() -> None:
    # compile= may hold what a plan file may not ("options"): auto applies with the caller's
    model, sample = _gpt()
    settings = {"backend": "aot_eager", "options": {}}
    plan = memfit.auto(model, sample, budget="50%", repeats=1, compile=settings)
    assert plan.compile == settings
    assert all(runs_compiled_blocks(block.forward) for block in model.blocks)
    fresh, _ = _gpt()
    with pytest.raises(PlanMismatchError, match="'options'"):  # the same plan, from a file
        memfit.apply(fresh, Plan.from_json(plan.to_json()))
    assert _uncompiled(fresh)


@pytest.mark.parametrize("call", ["auto", "plan", "profile", "apply"])
def test_a_compiled_model_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, call) -> None:
    # nanoGPT compiles before its first batch: memfit must not plan the wrapper (eager numbers,
    # minutes of compiling, a plan that does not hold compiled), and must say how to plan it
    import memfit.verbs.profiling

    def profiled(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("profiling started before the refusal")

    monkeypatch.setattr(memfit.verbs.profiling, "_chain", profiled)
    model, sample = _gpt()
    compiled = torch.compile(model, **COMPILE)
    counters.clear()
    arguments: dict[str, Any] = {"budget": "50%"} if call in ("auto", "plan") else {}
    args: tuple[Any, ...] = (sample,)
    if call == "apply":
        names = ("<pre>", "blocks.0", "<post>")
        args = (Plan.from_tree(names, tuple(Stage(i) for i in range(3)), "by hand"),)
    with pytest.raises(TypeError) as caught:
        getattr(memfit, call)(compiled, *args, **arguments)
    message = str(caught.value)
    assert f"memfit.{call}" in message and "OptimizedModule" in message
    assert "model._orig_mod" in message and "compile=True" in message
    assert counters["stats"]["unique_graphs"] == 0  # nothing was compiled either


def test_a_compiled_block_inside_the_model_is_refused() -> None:
    model, sample = _gpt()
    model.blocks[1] = torch.compile(model.blocks[1], **COMPILE)
    with pytest.raises(TypeError, match=r"model\.blocks\.1 is a torch\.compile wrapper"):
        memfit.auto(model, sample, budget="50%")


def test_compiling_a_plan_made_without_compile_warns_once_with_the_fix() -> None:
    # torch.compile(model) around a plan on eager blocks: compile's partitioner decides what
    # the checkpoints save, and the plan's budget does not hold; the first compiled step says
    # so, once, with the fix
    model, sample = _gpt()
    memfit.auto(model, sample, budget="50%", repeats=1, options=())
    compiled = torch.compile(model, **COMPILE)
    with pytest.warns(UserWarning, match="plan's memory budget does not hold") as caught:
        for _ in range(3):
            compiled(*sample).backward()
    ours = [w for w in caught if "memfit" in str(w.message)]
    assert len(ours) == 1
    assert "compile=True" in str(ours[0].message) and "memfit.remove(model)" in str(ours[0].message)
    counters.clear()
    compiled(*sample).backward()  # and the warning cost no recompile nor graph break
    assert _dynamo_counts() == {"graphs": 0, "breaks": 0}
    assert memfit.remove(model)


def test_blocks_compiled_undoes_only_what_it_compiled() -> None:
    blocks = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]

    def compiled_now() -> dict[str, Any] | None:
        return compiled.compiled_blocks(blocks)

    with compiled.blocks_compiled(blocks, None) as here:  # no compile asked: nothing done
        assert not here and compiled_now() is None
    with compiled.blocks_compiled(blocks, COMPILE) as here:  # profile, fastest: for the with
        assert here and compiled_now() == COMPILE
    assert compiled_now() is None
    with compiled.blocks_compiled(blocks, COMPILE, keep=True):  # apply: kept on success
        pass
    assert compiled_now() == COMPILE
    with compiled.blocks_compiled(blocks, {"backend": "eager"}) as here:  # memfit's: as found
        assert not here
    assert compiled_now() == COMPILE
    compiled.uncompile_blocks(blocks)
    failing = compiled.blocks_compiled(blocks, COMPILE, keep=True)  # apply failed: undone
    with pytest.raises(RuntimeError, match="apply failed"), failing:
        raise RuntimeError("apply failed")
    assert compiled_now() is None
