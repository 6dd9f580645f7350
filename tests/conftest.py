import os
import pathlib

# the profiler's start/stop lines on stderr, for the test process only (6: none; 5 still prints them)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import pytest
import torch

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA")
    tests = pathlib.Path(__file__).parent
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        where = item.path.relative_to(tests).as_posix()
        if any(where.startswith(prefix) or where.endswith(prefix) for prefix in SLOW):
            item.add_marker(pytest.mark.slow)
