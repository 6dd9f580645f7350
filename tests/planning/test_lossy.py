"""Lossy options in the planner: mixed with exact and recomputed stages, marked in the plan,
and held to an error budget."""

from dataclasses import replace

import pytest

from memfit.planning.candidates import used_options
from memfit.planning.costs import KEEP, ChainCosts, uniform_chain
from memfit.planning.lossy import over_error, within_error
from memfit.planning.plan import Segment
from memfit.planning.solve import min_peak_bytes, solve

BF16, FP8 = "compress:bf16", "compress:fp8"
ERRORS = {BF16: 2e-3, FP8: 3e-2}


def lossy_chain(n: int = 6) -> ChainCosts:
    """A uniform chain whose stages may also store their saved bytes in half (``bf16``, 10% of
    the step's time more) or a quarter (``fp8``, 20% more)."""
    costs = uniform_chain(n, activation_bytes=1 << 20, saved_bytes=8 << 20)
    stages = []
    for stage in costs.stages:
        keep = stage.options[KEEP]
        menu = dict(stage.options)
        for option, divisor, extra in ((BF16, 2, 0.3), (FP8, 4, 0.6)):
            saved = keep.saved_bytes // divisor
            menu[option] = replace(
                keep,
                backward_s=keep.backward_s + extra,
                saved_bytes=saved,
                forward_peak_bytes=keep.forward_peak_bytes,
                backward_peak_bytes=saved + (1 << 20),
                backward_delta_bytes=-(saved + (1 << 20)),
                detail={"exact": False, "stores": option[9:], "error": ERRORS[option]},
            )
        stages.append(replace(stage, options=menu))
    return replace(costs, stages=stages)


def test_the_planner_mixes_compressed_kept_and_recomputed_stages_under_the_budget() -> None:
    costs = lossy_chain()
    exact = replace(
        costs, stages=[replace(s, options={KEEP: s.options[KEEP]}) for s in costs.stages]
    )
    assert min_peak_bytes(costs) <= min_peak_bytes(exact)
    seen: set[str] = set()
    recomputed = False
    for megabytes in range(20, 60, 2):
        budget = megabytes << 20
        try:
            plan = solve(costs, budget)
        except Exception:
            continue
        assert plan.predicted_peak_bytes <= budget
        chosen = used_options(plan.tree)
        seen |= chosen
        recomputed |= any(isinstance(item, Segment) for item in plan.tree)
        lossy = chosen & {BF16, FP8}
        assert plan.exact == (not lossy)
        assert {why.split(": ")[0] for why in plan.inexact.values()} == lossy
        assert all("lossy" in why for why in plan.inexact.values())
    assert {BF16, FP8} <= seen and recomputed
    # and within one plan: a budget between the all-bf16 peak and the all-fp8 one
    plan = solve(costs, 26 << 20)
    assert used_options(plan.tree) & {BF16, FP8} and len(set(plan.options.values())) >= 2


def test_an_error_budget_takes_out_the_options_above_it_with_a_note() -> None:
    costs = lossy_chain()
    assert over_error(costs, 1e-2) == {FP8: ERRORS[FP8]}
    bounded, notes = within_error(costs, 1e-2)
    assert all(FP8 not in s.options and BF16 in s.options for s in bounded.stages)
    assert len(notes) == 1 and notes[0].startswith(f"{FP8} left out") and "0.01" in notes[0]
    strict, notes = within_error(costs, 1e-3)
    assert all(set(s.options) == {KEEP} for s in strict.stages) and len(notes) == 2
    assert within_error(costs, 0.05) == (costs, [])
    # a lossy option without a measured error cannot be promised anything
    unmeasured = replace(
        costs,
        stages=[
            replace(
                s,
                options={
                    k: replace(v, detail={"exact": False}) if k == BF16 else v
                    for k, v in s.options.items()
                },
            )
            for s in costs.stages
        ],
    )
    assert over_error(unmeasured, 0.05) == {BF16: None}


@pytest.mark.parametrize("bad", [0, -1e-3, float("inf"), float("nan")])
def test_a_malformed_error_budget_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="max_error"):
        within_error(lossy_chain(), bad)
    with pytest.raises(TypeError, match="max_error"):
        within_error(lossy_chain(), "1%")  # type: ignore[arg-type]


def test_exact_costs_give_exact_plans_at_every_budget() -> None:
    costs = uniform_chain(6, saved_bytes=8 << 20)
    for megabytes in (20, 30, 40, 60):
        try:
            plan = solve(costs, megabytes << 20)
        except Exception:
            continue
        assert plan.exact and not plan.inexact


def test_a_plans_error_budget_survives_its_json_and_is_read_by_type() -> None:
    from memfit.planning.fields import PlanFormatError
    from memfit.planning.plan import Plan

    plan = replace(solve(lossy_chain(), 26 << 20), max_error=0.01)
    data = plan.to_dict()
    assert data["info"]["max_error"] == 0.01 and "inexact" in data["info"]
    again = Plan.from_json(plan.to_json())
    assert again.max_error == 0.01 and again.inexact == plan.inexact and not again.exact
    assert Plan.from_dict(solve(lossy_chain(), None).to_dict()).max_error is None
    data["info"]["max_error"] = "0.01"
    with pytest.raises(PlanFormatError, match="max_error"):
        Plan.from_dict(data)
