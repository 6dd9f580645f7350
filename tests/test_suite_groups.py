"""The xdist groups of ``tests/conftest.py``: tests sharing a module-scoped fixture's instance
run on one worker, so the fixture is built once (``make test`` runs two workers)."""

from __future__ import annotations

import gc
import pathlib
from types import SimpleNamespace
from typing import Any

import pytest
from _pytest.nodeid import NodeId
from xdist.scheduler.loadgroup import LoadGroupScheduling

from tests.conftest import pytest_ignore_collect, shared_fixture_group
from tests.helpers.xdist_groups import suffix_group


def fixture(scope: str, baseid: str = "tests/test_x.py") -> SimpleNamespace:
    return SimpleNamespace(scope=scope, baseid=baseid)


def item(fixtures: dict[str, SimpleNamespace], indices: dict[str, int] | None = None) -> Any:
    info = SimpleNamespace(name2fixturedefs={name: [f] for name, f in fixtures.items()})
    callspec = None if indices is None else SimpleNamespace(indices=indices)
    return SimpleNamespace(_fixtureinfo=info, fixturenames=list(fixtures), callspec=callspec)


def test_function_fixtures_and_pytests_own_make_no_group() -> None:
    own = {"tmp_path": fixture("function", ""), "tmp_path_factory": fixture("session", "")}
    assert shared_fixture_group(item(own)) is None
    assert shared_fixture_group(item({"model": fixture("function")})) is None


def test_a_module_fixture_makes_one_group_per_file() -> None:
    assert shared_fixture_group(item({"gpt2": fixture("module")})) == ""
    # another test of the file, with a second module fixture: still the file's one group
    both = {"gpt2": fixture("module"), "three": fixture("module"), "x": fixture("function")}
    assert shared_fixture_group(item(both, indices={"x": 2})) == ""


def test_each_parameter_of_a_parametrized_module_fixture_is_a_group() -> None:
    profiled = {"profiled": fixture("module"), "budget": fixture("function")}
    first = shared_fixture_group(item(profiled, indices={"profiled": 0, "budget": 1}))
    again = shared_fixture_group(item(profiled, indices={"profiled": 0, "budget": 0}))
    other = shared_fixture_group(item(profiled, indices={"profiled": 3, "budget": 1}))
    assert first == again == "profiled=0" and other == "profiled=3"


def test_what_collection_made_is_out_of_the_collectors_walks() -> None:
    """``tests/conftest.py`` freezes the heap after collection: memfit's timed steps each run
    ``gc.collect()``, which walked every object torch and transformers had made."""
    assert gc.get_freeze_count() > 0


def test_quick_runs_do_not_import_files_slow_as_a_whole() -> None:
    tests = pathlib.Path(__file__).parent

    def ignored(where: str, markexpr: str) -> bool | None:
        config = SimpleNamespace(getoption=lambda name, default=None: markexpr)
        return pytest_ignore_collect(tests / where, config)

    for where in ("integrations", "integrations/test_hf.py", "distributed", "test_timing.py"):
        assert ignored(where, "not slow") is True, where
        assert ignored(where, "") is None and ignored(where, "slow") is None, where
    # a file with some slow tests (test_api.py) is collected: its other tests are quick
    for where in ("runtime", "runtime/test_apply.py", "test_api.py", "helpers"):
        assert ignored(where, "not slow") is None, where
    assert ignored("runtime/test_compiled.py", "not slow") is True


class Collected:
    """A collected test as pytest 9.2 holds it: the node id is the structured ``_id``."""

    def __init__(self, nodeid: str, group: str) -> None:
        self._id = NodeId.parse(nodeid)
        self.marks = [pytest.mark.xdist_group(group).mark]

    @property
    def nodeid(self) -> str:
        return str(self._id)

    def iter_markers(self, name: str) -> Any:
        return (mark for mark in self.marks if mark.name == name)


def test_the_tests_of_a_fixtures_parameter_are_one_scheduling_unit() -> None:
    """Two tests sharing the first family's profile go to one worker: the group reaches
    xdist's scheduler through the node id pytest reports, and a group name ending in ``]``
    would read as no group at all."""
    profiled = {"profiled": fixture("module"), "budget": fixture("function")}
    where = "integrations/test_families.py"
    group = f"{where}:{shared_fixture_group(item(profiled, indices={'profiled': 0}))}"
    first = Collected(f"tests/{where}::test_plans[gpt2-eager-30%]", group)
    second = Collected(f"tests/{where}::test_floor[gpt2-eager]", group)
    for test in (first, second):
        test._nodeid = f"{test.nodeid}@{group}"  # what xdist 3.8 writes, unread by pytest 9.2
        suffix_group(test)
        suffix_group(test)  # once only
    assert first.nodeid == f"tests/{where}::test_plans[gpt2-eager-30%]@{group}"
    scope = LoadGroupScheduling._split_scope
    assert scope(None, first.nodeid) == scope(None, second.nodeid) == group


@pytest.fixture(scope="module")
def shared() -> int:
    return 1


def test_a_test_under_loadgroup_carries_its_group(
    request: pytest.FixtureRequest, shared: int
) -> None:
    """``make quick`` and ``make test`` (``--dist loadgroup``): this test's module fixture puts it
    in its file's group, and the id the scheduler read says so."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under pytest-xdist's --dist loadgroup only (make quick, make test)")
    assert request.node.nodeid.endswith("@test_suite_groups.py")


def test_tests_run_on_one_intra_op_thread() -> None:
    """``tests/conftest.py`` sets it where tests run (in each xdist worker, not the controller)."""
    import torch

    assert torch.get_num_threads() == 1
