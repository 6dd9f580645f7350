"""The ranks' profiles merge to the worst figures (no processes: the merge itself)."""

from __future__ import annotations

import json

import pytest
import torch

from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts, uniform_chain
from memfit.verbs.distributed import describe_sample, merge, ranks


def test_merge_takes_the_worst_rank() -> None:
    merged = merge(
        [
            {"peak": 10, "time": 1.5, "ok": True, "ops": {"a": 1, "b": 2}, "name": "r0"},
            {"peak": 12, "time": 1.0, "ok": False, "ops": {"a": 3}, "name": "r1"},
        ]
    )
    assert merged == {"peak": 12, "time": 1.5, "ok": False, "ops": {"a": 3}, "name": "r0"}
    assert merge([[1, -5], [2, -7]]) == [2, -5]  # a smaller free is the worse one
    assert merge([[1, 2], [1]]) == [1, 2]  # shapes differ: rank 0's


def _costs(scale: int, seconds: float, joins: bool, rebuild: bool = True) -> ChainCosts:
    chain = uniform_chain(3, activation_bytes=scale, saved_bytes=4 * scale, forward_s=seconds)
    stages = list(chain.stages)
    stages[1] = StageCosts(
        **{
            **{k: getattr(stages[1], k) for k in StageCosts.__dataclass_fields__},
            "joins_previous": joins,
            "options": {
                KEEP: stages[1].options[KEEP],
                "rebuild": OptionCosts(
                    forward_s=seconds,
                    backward_s=seconds,
                    saved_bytes=scale,
                    forward_peak_bytes=scale,
                    backward_peak_bytes=scale,
                    backward_delta_bytes=-scale,
                ),
            }
            if rebuild
            else {KEEP: stages[1].options[KEEP]},
        }
    )
    return ChainCosts(stages=stages, held_bytes=scale, fingerprint="f")


def test_merged_costs_are_costs_every_rank_can_run() -> None:
    left, right = _costs(100, 1.0, True), _costs(120, 0.5, False)
    merged = ChainCosts.from_dict(merge([json.loads(c.to_json()) for c in (left, right)]))
    assert merged.held_bytes == 120
    assert merged.stages[0].options[KEEP].forward_s == 1.0  # the slowest rank's time
    assert merged.stages[0].options[KEEP].saved_bytes == 480  # the largest rank's memory
    assert not merged.stages[1].joins_previous  # joins only where every rank's does
    assert set(merged.stages[1].options) == {KEEP, "rebuild"}
    # an option one rank lacks is off every rank's menu
    lacking = _costs(100, 1.0, True, rebuild=False)
    merged = ChainCosts.from_dict(merge([json.loads(c.to_json()) for c in (left, lacking)]))
    assert set(merged.stages[1].options) == {KEEP}


def test_sample_description_names_shapes() -> None:
    rows = describe_sample({"input_ids": torch.zeros(2, 5, dtype=torch.long), "flag": True})
    assert rows == [["flag", "bool"], ["input_ids", "(2, 5)", "torch.int64"]]


def test_distributed_true_needs_a_process_group() -> None:
    assert ranks() == 1 and ranks(False) == 1
    with pytest.raises(ValueError, match="init_process_group"):
        ranks(True)
