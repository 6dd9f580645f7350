"""The baseline schedules: their shapes, and that they respect the chain's constraints."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings

from memfit.planning import baselines
from memfit.planning.costs import ChainCosts, uniform_chain
from memfit.planning.plan import Segment, Stage, keep_tree, recompute_one
from memfit.planning.simulate import check_tree
from tests.helpers.strategies import chains


def _constrained(
    n: int, *, frozen: tuple[int, ...] = (), breaks: tuple[int, ...] = ()
) -> ChainCosts:
    costs = uniform_chain(n)
    stages = [
        dataclasses.replace(stage, checkpointable=i not in frozen, joins_previous=i not in breaks)
        for i, stage in enumerate(costs.stages)
    ]
    return dataclasses.replace(costs, stages=stages)


def test_keep_and_all() -> None:
    costs = _constrained(4, frozen=(0,))
    assert baselines.keep_all(costs) == keep_tree(0, 4)
    assert baselines.recompute_all(costs) == (
        Stage(0),
        recompute_one(1),
        recompute_one(2),
        recompute_one(3),
    )


def test_every_k_counts_checkpointable_stages_only() -> None:
    costs = _constrained(6, frozen=(0, 3))
    assert baselines.every_k(costs, 2) == (
        Stage(0),
        recompute_one(1),
        Stage(2),
        Stage(3),
        recompute_one(4),
        Stage(5),
    )
    with pytest.raises(ValueError, match="k >= 1"):
        baselines.every_k(costs, 0)


def test_sqrt_makes_about_sqrt_n_segments() -> None:
    tree = baselines.sqrt_segments(uniform_chain(16))
    assert tree == tuple(Segment(i, i + 4, keep_tree(i, i + 4)) for i in range(0, 16, 4))
    assert len(baselines.sqrt_segments(uniform_chain(100))) == 10


def test_sqrt_breaks_segments_at_constraints() -> None:
    costs = _constrained(9, frozen=(0,), breaks=(3,))
    tree = baselines.sqrt_segments(costs)
    assert tree == (
        Stage(0),
        Segment(1, 3, keep_tree(1, 3)),
        Segment(3, 6, keep_tree(3, 6)),
        Segment(6, 9, keep_tree(6, 9)),
    )
    assert baselines.sqrt_segments(_constrained(3, frozen=(0, 1, 2))) == keep_tree(0, 3)


@settings(deadline=None, max_examples=60)
@given(costs=chains(min_stages=1, max_stages=12))
def test_baselines_are_valid_schedules(costs: ChainCosts) -> None:
    for k in (1, 2, 3):
        check_tree(costs, baselines.every_k(costs, k))
    check_tree(costs, baselines.sqrt_segments(costs))
    check_tree(costs, baselines.keep_all(costs))
