"""The simulator against hand-computed schedules, and its validation."""

from __future__ import annotations

import dataclasses
import importlib
import pathlib

import pytest

from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts, uniform_chain
from memfit.planning.plan import Segment, Stage, keep_tree, recompute_one
from memfit.planning.simulate import simulate


def _stage(
    name: str, *, inp: int, out: int, keep: tuple[int, ...], nosave: int, seconds: tuple[int, int]
) -> StageCosts:
    saved, forward_peak, backward_peak, backward_delta = keep
    forward_s, backward_s = seconds
    option = OptionCosts(
        forward_s=forward_s,
        backward_s=backward_s,
        saved_bytes=saved,
        forward_peak_bytes=forward_peak,
        backward_peak_bytes=backward_peak,
        backward_delta_bytes=backward_delta,
    )
    return StageCosts(
        name=name,
        input_bytes=inp,
        output_bytes=out,
        options={KEEP: option},
        nosave_forward_s=forward_s,
        nosave_forward_peak_bytes=nosave,
    )


@pytest.fixture
def chain() -> ChainCosts:
    """Three stages with round numbers; the hand computations below follow costs.py."""
    return ChainCosts(
        stages=[
            _stage("s0", inp=10, out=20, keep=(30, 60, 70, -50), nosave=25, seconds=(1, 2)),
            _stage("s1", inp=20, out=20, keep=(40, 70, 60, -60), nosave=30, seconds=(3, 4)),
            _stage("s2", inp=20, out=5, keep=(10, 20, 100, -15), nosave=15, seconds=(5, 6)),
        ],
        held_bytes=100,
    )


def test_keep_all(chain: ChainCosts) -> None:
    # F s0: 100+60=160, L=150; F s1: 150+70=220, L=210; F s2: 210+20=230, L=225
    # B s2: 225+100=325, L=210; B s1: 210+60=270, L=150; B s0: 150+70=220, L=100
    result = simulate(chain, keep_tree(0, 3), timeline=True)
    assert result.peak_bytes == 325
    assert result.step_s == 21
    assert result.peak_where == "backward of stage 2 (s2)"
    assert result.peak_phase == "backward"
    assert [level for _, level in result.timeline] == [150, 210, 225, 210, 150, 100]


def test_segment(chain: ChainCosts) -> None:
    # F seg j=0: 100+25=125, L=120; j=1: 120+30=150, L=120+20-20=120; F s2: 140, L=135
    # B s2: 135+100=235, L=120; replay s0: 180, L=170; s1: 240, L=230; drop 20: L=210
    # B s1: 210+60=270, L=150; B s0: 220, L=100
    tree = (Segment(0, 2, keep_tree(0, 2)), Stage(2))
    result = simulate(chain, tree, timeline=True)
    assert result.peak_bytes == 270
    assert result.step_s == 21 + 1 + 3
    assert result.peak_where == "backward of stage 1 (s1) inside segment [0, 2)"
    levels = [level for _, level in result.timeline]
    assert levels == [120, 120, 135, 120, 170, 230, 210, 150, 100]


def test_nested_segment(chain: ChainCosts) -> None:
    # ... as above until B s2 (L=120); outer replay: seg [0,1) no-save: 145, L=140;
    # s1: 140+70=210, L=200; drop out1: L=180; B s1: 180+60=240, L=120;
    # inner segment replay s0: 180, L=170; drop out0: L=150; B s0: 220, L=100
    tree = (Segment(0, 2, (recompute_one(0), Stage(1))), Stage(2))
    result = simulate(chain, tree)
    assert result.peak_bytes == 240
    assert result.step_s == 11 + (1 + 3) + (1 + 3) + 7
    assert result.peak_where == "backward of stage 1 (s1) inside segment [0, 2)"


def test_peak_in_recompute(chain: ChainCosts) -> None:
    big = dataclasses.replace(chain.stages[1].options[KEEP], forward_peak_bytes=200)
    costs = _with_stage(chain, 1, options={KEEP: big})
    # replay of s1 inside the segment: 170 + 200 = 370
    result = simulate(costs, (Segment(0, 2, keep_tree(0, 2)), Stage(2)))
    assert (result.peak_bytes, result.peak_phase) == (370, "recompute")
    assert result.peak_where == "recompute of stage 1 (s1) inside segment [0, 2)"


def test_uniform_two_stages() -> None:
    costs = uniform_chain(2, activation_bytes=1, saved_bytes=4, held_bytes=7)
    assert simulate(costs, keep_tree(0, 2)).peak_bytes == 7 + 15
    # each stage recomputed (levels above held):
    # L=0 -> seg0 no-save peak 5, L=1 -> seg1 no-save peak 1+5=6, L=2;
    # replay s1: peak 2+5=7, L=7; drop 1: L=6; B s1: 6+5=11, L=1
    # replay s0: peak 1+5=6, L=6; drop 1: L=5; B s0: 5+5=10, L=0
    result = simulate(costs, (recompute_one(0), recompute_one(1)))
    assert result.peak_bytes == 7 + 11
    assert result.step_s == 2 * (1 + 1 + 2)


def test_level_counts_as_peak() -> None:
    costs = uniform_chain(1, activation_bytes=3, saved_bytes=4)
    option = dataclasses.replace(
        costs.stages[0].options[KEEP], forward_peak_bytes=0, backward_peak_bytes=0
    )
    stage = dataclasses.replace(costs.stages[0], options={KEEP: option})
    assert simulate(dataclasses.replace(costs, stages=[stage]), keep_tree(0, 1)).peak_bytes == 7


def test_unknown_option(chain: ChainCosts) -> None:
    with pytest.raises(ValueError, match=r"stage 1 \('s1'\) has no option 'offload'"):
        simulate(chain, (Stage(0), Stage(1, "offload"), Stage(2)))


def _with_stage(chain: ChainCosts, index: int, **changes: object) -> ChainCosts:
    stages = list(chain.stages)
    stages[index] = dataclasses.replace(stages[index], **changes)
    return dataclasses.replace(chain, stages=stages)


def test_not_checkpointable(chain: ChainCosts) -> None:
    costs = _with_stage(chain, 1, checkpointable=False)
    with pytest.raises(ValueError, match=r"stage 1 \('s1'\), which is not checkpointable"):
        simulate(costs, (Segment(0, 2, keep_tree(0, 2)), Stage(2)))
    with pytest.raises(ValueError, match="not checkpointable"):
        simulate(costs, (Stage(0), recompute_one(1), Stage(2)))


def test_joins_previous(chain: ChainCosts) -> None:
    costs = _with_stage(chain, 1, joins_previous=False)
    with pytest.raises(ValueError, match=r"spans stage 1 \('s1'\)"):
        simulate(costs, (Segment(0, 2, keep_tree(0, 2)), Stage(2)))
    assert simulate(costs, (Stage(0), Segment(1, 3, keep_tree(1, 3)))).peak_bytes > 0


def test_invalid_nested(chain: ChainCosts) -> None:
    with pytest.raises(ValueError, match="no option 'x'"):
        simulate(chain, (Segment(0, 3, (Stage(0), Segment(1, 3, (Stage(1), Stage(2, "x"))))),))


def test_tree_must_cover_chain(chain: ChainCosts) -> None:
    with pytest.raises(ValueError, match="must cover"):
        simulate(chain, keep_tree(0, 2))


def test_the_memory_semantics_have_one_home_that_the_modules_link_to() -> None:
    page = pathlib.Path(__file__).parents[2] / "docs" / "memory-model.md"
    text = page.read_text()
    for term in ("Early stop", "nosave_held_bytes", "recompute_lead_bytes", "output_bytes[t-1]"):
        assert term in text, term
    for name in ("costs", "simulate"):
        module = importlib.import_module(f"memfit.planning.{name}")
        doc = module.__doc__ or ""
        assert "docs/memory-model.md" in doc, module.__name__
        assert "L += saved_bytes" not in doc, f"{module.__name__} restates the semantics"
