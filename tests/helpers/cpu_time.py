"""``--cpu-durations=N``: the N tests that took the most CPU seconds (setup, call and teardown).

pytest's ``--durations`` reports wall time, which on a shared machine measures the other work as
much as the test; the process's CPU time does not (what ``make quick``'s split into slow and
quick tests is judged by). Works under pytest-xdist: each worker measures its own tests and sends
the figure with the test's report.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Generator

import pytest

CPU_S = pytest.StashKey[float]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("terminal reporting").addoption(
        "--cpu-durations",
        type=int,
        default=None,
        metavar="N",
        help="show the N tests that took the most CPU seconds (0: all)",
    )


def _timed(item: pytest.Item) -> Generator[None, None, None]:
    start = time.process_time()
    try:
        yield
    finally:
        item.stash[CPU_S] = time.process_time() - start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    yield from _timed(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield from _timed(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield from _timed(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    report.user_properties.append(("cpu_s", item.stash.get(CPU_S, 0.0)))
    item.stash[CPU_S] = 0.0


# CPU seconds by test, its phases summed, in the process that prints the summary
_totals: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in report.user_properties:
        if key == "cpu_s":
            _totals[report.nodeid] += float(value)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    count = config.getoption("cpu_durations")
    if count is None or not _totals:
        return
    ranked = sorted(_totals.items(), key=lambda pair: pair[1], reverse=True)
    shown = ranked if count == 0 else ranked[:count]
    total = sum(_totals.values())
    terminalreporter.write_sep("=", f"slowest {len(shown)} tests by CPU seconds")
    for nodeid, seconds in shown:
        terminalreporter.write_line(f"{seconds:8.2f}s cpu  {nodeid}")
    terminalreporter.write_line(
        f"{total:8.2f}s cpu  in all {len(ranked)} tests (collection not included)"
    )
