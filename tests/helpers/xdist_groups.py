"""The ``xdist_group`` marks reach pytest-xdist's ``--dist loadgroup`` scheduler.

xdist's workers pass a test's group to the scheduler inside its node id (``...::test@group``):
xdist 3.8 writes the suffix into ``item._nodeid``, which pytest 9.2 no longer reads (node ids
are the structured ``item._id``), so every group was silently split over the workers: a
module's profile built on both (``test_api.py``'s, 17 CPU s each in ``make quick``) and two
distributed launches at once (pytest-xdist issue 1386, fix not released). This plugin writes the
same suffix where pytest reads it, on the workers only, after selection (``-k``, ``-m``,
``--deselect`` match the ids as written), and does nothing where xdist's suffix took effect.
"""

from __future__ import annotations

from typing import Any

import pytest


def group_name(item: Any) -> str | None:
    """The group ``item``'s ``xdist_group`` marks put it in, as xdist names it (several marks
    join, sorted, with ``_``); ``None``: no mark."""
    names = {
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    }
    return "_".join(sorted(names)) if names else None


def suffix_group(item: Any) -> None:
    """Append ``@group`` to ``item``'s node id where the scheduler reads it, once."""
    group = group_name(item)
    if group is None or item.nodeid.endswith(f"@{group}"):
        return
    nodeid = f"{item.nodeid}@{group}"
    if hasattr(item, "_id"):  # pytest 9.2: the id is structured
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(nodeid)
    else:
        item._nodeid = nodeid


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # set by xdist on its workers only, under --dist loadgroup
    if getattr(config.option, "loadgroup", False):
        for item in items:
            suffix_group(item)
