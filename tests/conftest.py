import os
import pathlib

# the profiler's start/stop lines on stderr, for the test process only (6: none; 5 still prints them)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import pytest
import torch

pytest_plugins = ["tests.helpers.cpu_time"]

# One intra-op thread: the tests check bytes and bits, not speed, and tiny ops on a busy
# 2-core machine lose far more to OpenMP spinning than they gain from a second thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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
)


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
            params.append(f"{name}[{callspec.indices[name]}]")
    return ",".join(sorted(params)) if shared else None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA")
    tests = pathlib.Path(__file__).parent
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        where = item.path.relative_to(tests).as_posix()
        if any(where.startswith(prefix) or where.endswith(prefix) for prefix in SLOW):
            item.add_marker(pytest.mark.slow)
        group = shared_fixture_group(item)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(f"{where}:{group}" if group else where))
