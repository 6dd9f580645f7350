import gc
import os
import pathlib

# the profiler's start/stop lines on stderr, for the test process only (6: none; 5 still prints them)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import pytest

pytest_plugins = ["tests.helpers.cpu_time", "tests.helpers.xdist_groups"]


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread where tests run: the tests check bytes and bits, not speed, and tiny
    ops on a busy 2-core machine lose far more to OpenMP spinning than they gain from a second
    thread. xdist's controller runs no test and imports no test module: it does not import
    torch either (4 CPU s of each ``make quick``)."""
    if getattr(config.option, "dist", "no") != "no":
        return  # xdist's controller (its workers run with dist "no")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Put what collection made (torch, transformers, hypothesis, the test modules: some 400,000
    objects) out of the garbage collector's walks (``gc.freeze``): a full collection walked them
    all, a quarter to half a second of CPU each, and memfit collects before every timed step as
    timeit does (``verify``'s pairs, ``plan(candidates=)``, ``bench``). What the tests make is
    collected as before; the frozen objects live as long as the process anyway."""
    gc.collect()
    gc.freeze()


# Slow by file (``make quick`` leaves them out; ``make test`` and CI run everything): real Hugging
# Face models (import and build), several processes, torch.compile, shape sweeps, and the
# README's commands. A test elsewhere can still say ``@pytest.mark.slow`` itself.
SLOW = (
    "integrations/",
    "distributed/",
    "test_estimation.py",
    "test_readme.py",
    "runtime/test_compiled.py",
    "runtime/test_caches.py",
    "runtime/test_dynamic.py",
    "test_timing.py",
)

# Slow by test: each took 2 s of CPU or more in a run with ``--cpu-durations=0`` (real models
# profiled and verified, CLI runs end to end), except the planning property tests, which
# ``make quick`` keeps; every parameter of a listed test. A name no test has is an error.
SLOW_TESTS = (
    "runtime/test_compress.py::test_auto_with_its_defaults_measures_and_plans_no_lossy_option",
    "test_cli.py::test_lossy_options_enter_no_cli_plan_without_inexact",
    "runtime/test_compress.py::test_a_lossy_plan_fits_its_budget_as_predicted_and_reports_its_error",
    "measuring/test_between_stages.py::test_a_block_before_a_pass_through_stage_keeps_its_own_backward",
    "measuring/test_chain.py::test_stable_diffusion_unet_up_blocks_are_not_a_chain",
    "measuring/test_groups.py::test_plans_over_both_lists_are_exact",
    "measuring/test_session.py::test_auto_and_verify_print_nothing_in_this_process",
    "measuring/test_session.py::test_auto_prints_nothing_and_leaves_the_users_profiler_as_it_was",
    "measuring/test_session.py::test_two_threads_planning_two_models_take_turns",
    "measuring/test_setup_steps.py::test_fast_path_measures_the_same_bytes_in_a_sixth_of_the_steps",
    "runtime/test_head.py::test_chunked_is_opt_in",
    "runtime/test_head.py::test_floor_plans_predict_the_measured_peak",
    "runtime/test_offload_hooks.py::test_simulated_peaks_match_the_stand_in_to_the_byte",
    "runtime/test_saved_writes.py::test_falcon_eager_attention",
    "runtime/test_segments.py::test_hugging_face_hidden_states_under_the_tightest_plan",
    "test_api.py::test_all_keep_replays_the_measured_step_to_the_byte",
    "test_api.py::test_auto_then_remove_round_trips",
    "test_api.py::test_planned_steps_fit_their_budget_and_keep_gradients",
    "test_api.py::test_stage_times_add_up_to_the_step",
    "test_bf16_weights.py::test_bf16_weights",
    "test_budget_base.py::test_gradients_are_in_the_base_not_in_the_percentage",
    "test_cli.py::test_bench_writes_plot_and_json",
    "test_cli.py::test_demo_json",
    "test_cli.py::test_estimate_prints_a_table_and_the_largest_seq",
    "test_cli.py::test_hugging_face_target",
    "test_cli.py::test_plan_for_a_loss_only_loop",
    "test_cli.py::test_plan_times_candidates",
    "test_cli.py::test_plan_writes_json",
    "test_cli.py::test_profile_json_and_file",
    "test_draws_between_blocks.py::test_plans_keep_draws_outside_segments_and_train_bit_identical",
    "test_early_stop.py::test_multi_block_segments_within_two_percent",
    "test_early_stop.py::test_recompute_predicted_to_the_byte",
    "test_frozen_layers.py::test_llama_with_frozen_lower_layers_holds_40_percent",
    "test_frozen_layers.py::test_llama_with_frozen_lower_layers_holds_its_floor",
    "test_frozen_layers.py::test_toy_floor_holds",
    "test_frozen_layers.py::test_toy_with_a_frozen_first_block_holds_its_budget",
    "test_grad_inputs.py::test_input_requiring_grad_is_planned_and_left_alone",
    "test_no_gradient.py::test_a_cut_off_block_whose_graph_outlives_the_forward_runs_under_a_checkpoint",
    "test_no_gradient.py::test_plan_at_the_floor_holds",
    "test_nosave_held.py::test_quick_gelu_blocks_hold_their_scalar",
    "test_rng_budget.py::test_optimal_plans_on_a_toy_model_fit_their_budget",
    "test_side_effects.py::test_cnn_with_batchnorm_and_dropout",
    "test_side_effects.py::test_repeated_profiles_keep_nothing",
    "test_verify.py::test_a_model_that_does_not_repeat_itself_is_named_not_the_plan",
    "test_verify.py::test_a_planned_gpt2_runs_the_plain_steps_ops",
    "test_verify.py::test_the_trace_sees_what_equal_gradients_on_this_machine_hide",
)


def _slow_by_file(where: str) -> bool:
    """Whether the file or folder ``where`` (relative to ``tests/``) is in :data:`SLOW`."""
    return any(
        where.startswith(prefix) or where.endswith(prefix) or f"{where}/" == prefix
        for prefix in SLOW
    )


def pytest_ignore_collect(collection_path: pathlib.Path, config: pytest.Config) -> bool | None:
    """``-m "not slow"`` (``make quick``) leaves out every test of a file slow as a whole, so
    such files are not even imported: ``integrations/`` alone imports diffusers, peft and
    accelerate, seconds of CPU in each xdist worker. Any other selection collects them."""
    if config.getoption("markexpr", "") != "not slow":
        return None
    tests = pathlib.Path(__file__).parent
    if not collection_path.is_relative_to(tests) or collection_path == tests:
        return None
    return True if _slow_by_file(collection_path.relative_to(tests).as_posix()) else None


def shared_fixture_group(item: pytest.Item) -> str | None:
    """Which instance of its file's module-scoped fixtures ``item`` shares (``""``: the file's
    only one; ``None``: the test uses none), for pytest-xdist's ``--dist loadgroup``: one worker
    runs every test of a group, so a module's profile is built once, not once per worker. A
    parametrized fixture makes a group of each parameter (a family of the Hugging Face sweep)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    callspec = getattr(item, "callspec", None)
    shared = False
    params = []
    for name in item.fixturenames:
        definitions = info.name2fixturedefs.get(name)
        # the tests' own fixtures (pytest's session-scoped ``tmp_path_factory`` costs nothing)
        if not definitions or definitions[-1].scope == "function" or not definitions[-1].baseid:
            continue
        shared = True
        if callspec is not None and name in callspec.indices:
            # no brackets: xdist takes a node id ending in "]" for one without a group
            params.append(f"{name}={callspec.indices[name]}")
    return ",".join(sorted(params)) if shared else None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip = pytest.mark.skip(reason="needs CUDA")
    tests = pathlib.Path(__file__).parent
    listed = {name: False for name in SLOW_TESTS}
    files = set()
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        where = item.path.relative_to(tests).as_posix()
        files.add(where)
        name = f"{where}::{getattr(item, 'originalname', item.name)}"
        if name in listed:
            listed[name] = True
            item.add_marker(pytest.mark.slow)
        if _slow_by_file(where):
            item.add_marker(pytest.mark.slow)
        if where.startswith("distributed/"):
            # each launches 2 ranks: one launch at a time, not 4 ranks on 2 cores (under load
            # the FSDP2 scenario then ran past its 300 s limit)
            item.add_marker(pytest.mark.xdist_group("distributed"))
        group = shared_fixture_group(item)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(f"{where}:{group}" if group else where))
    stale = [name for name, seen in listed.items() if not seen and name.partition("::")[0] in files]
    if stale:
        raise pytest.UsageError(f"SLOW_TESTS in tests/conftest.py names no test: {stale}")
