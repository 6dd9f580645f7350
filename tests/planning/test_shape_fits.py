"""Shape fits on synthetic chains (pure numbers): exact bases recovered, peaks with a branch
change fitted on the larger shapes, seconds non-negative with attention's seq² term and their
extrapolation check, trust and the largest shape."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memfit.errors import InfeasibleBudgetError
from memfit.planning import uniform_chain
from memfit.planning.baselines import keep_all, recompute_all
from memfit.planning.costs import KEEP
from memfit.planning.shape_costs import fit_shapes, largest_shape, plan_shape
from memfit.planning.shape_fits import (
    Shape,
    fit_bytes,
    fit_seconds,
    fit_with_probes,
    probes,
    seconds_basis,
)
from memfit.planning.simulate import simulate
from memfit.planning.solve import min_peak_bytes
from memfit.units import Budget

GRID = [Shape(b, s) for b in (1, 2) for s in (16, 32, 64)]


def test_exact_basis_recovered() -> None:
    truth = [4096 + 1024 * s.tokens + 32 * s.batch * s.seq**2 + 8 * s.seq for s in GRID]
    fit = fit_bytes(GRID, truth)
    assert fit.exact and set(fit.features) == {"1", "tokens", "batch·seq²", "seq"}
    big = Shape(8, 1024)
    assert round(fit(big)) == 4096 + 1024 * big.tokens + 32 * 8 * 1024**2 + 8 * 1024


def test_peak_with_a_branch_change_fits_the_larger_shapes() -> None:
    # a max of a constant (a weight gradient) and an activation: the constant wins when small
    values = [max(20_000, 512 * s.tokens) for s in GRID]
    fit = fit_bytes(GRID, values)
    assert fit.exact and fit.points < len(GRID)
    assert round(fit(Shape(4, 256))) == 512 * 4 * 256


def test_no_exact_basis_is_marked_inexact() -> None:
    values = [1000 * float(s.tokens) ** 1.5 for s in GRID]
    assert not fit_bytes(GRID, values).exact


def test_seconds_stay_non_negative() -> None:
    noisy = [0.002 + 1e-5 * s.tokens * (1.1 if i % 2 else 0.9) for i, s in enumerate(GRID)]
    fit = fit_seconds(GRID, noisy)
    assert all(c >= 0 for c in fit.coefficients)
    assert fit(Shape(1, 1)) >= 0


def chain_at(shape: Shape):
    """A uniform chain whose activations are linear in tokens, held bytes too."""
    costs = uniform_chain(
        6, activation_bytes=64 * shape.tokens, saved_bytes=256 * shape.tokens, held_bytes=10_000
    )
    return replace(costs, held_bytes=10_000 + 8 * shape.tokens)


def test_fitted_chain_equals_the_chain_at_an_unseen_shape() -> None:
    fitted = fit_shapes(GRID, [chain_at(s) for s in GRID])
    big = Shape(4, 256)
    predicted, truth = fitted.costs_at(big), chain_at(big)
    for tree in (keep_all(truth), recompute_all(truth)):
        assert simulate(predicted, tree).peak_bytes == simulate(truth, tree).peak_bytes
        assert simulate(predicted, tree).step_s == pytest.approx(simulate(truth, tree).step_s)
    assert predicted.held_bytes == truth.held_bytes
    assert fitted.holdout_error == 0.0
    assert fitted.trust(big) == []
    assert fitted.trust(Shape(64, 4096))  # 4096x the largest profiled tokens


def test_plan_shape_and_largest_shape() -> None:
    fitted = fit_shapes(GRID, [chain_at(s) for s in GRID])
    shape = Shape(4, 256)
    costs = fitted.costs_at(shape)
    plain = simulate(costs, keep_all(costs)).peak_bytes
    plan = plan_shape(fitted, shape, Budget(fraction=0.5))
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert plan.budget_bytes == costs.held_bytes + (plain - costs.held_bytes) // 2
    with pytest.raises(InfeasibleBudgetError, match=r"at shape 4 x 256"):
        plan_shape(fitted, shape, Budget(fraction=0.05))
    budget = min_peak_bytes(fitted.costs_at(Shape(4, 1000)))
    found = largest_shape(fitted, budget, batch=4)
    assert found == Shape(4, 1000)
    assert largest_shape(fitted, 1, batch=4) is None
    with pytest.raises(ValueError, match="exactly one"):
        largest_shape(fitted, budget)


def test_options_and_flags_common_to_every_shape() -> None:
    profiles = [chain_at(s) for s in GRID]
    stage = profiles[0].stages[2]
    other = replace(stage, options={**stage.options, "rebuild": stage.options[KEEP]})
    profiles[0] = replace(
        profiles[0], stages=[*profiles[0].stages[:2], other, *profiles[0].stages[3:]]
    )
    fitted = fit_shapes(GRID, profiles)
    assert list(fitted.template.stages[2].options) == [KEEP]
    with pytest.raises(ValueError, match="chain differs"):
        fit_shapes(GRID, [*profiles[:5], uniform_chain(3)])


# the default profile shapes for a 2 x 64 sample: a grid and the sample's tokens at 2x the seq
LADDER = [*(Shape(b, s) for b in (1, 2) for s in (8, 16, 32, 64)), Shape(1, 128)]


def timed_chain_at(shape: Shape):
    """A uniform chain whose stage times are ``1 ms + tokens·1 µs + batch·seq²·10 ns``."""
    seconds = 1e-3 + 1e-6 * shape.tokens + 1e-8 * shape.batch * shape.seq**2
    costs = chain_at(shape)
    stages = [
        replace(
            stage,
            options={
                name: replace(option, forward_s=seconds, backward_s=2 * seconds)
                for name, option in stage.options.items()
            },
        )
        for stage in costs.stages
    ]
    return replace(costs, stages=stages)


def test_time_fits_carry_attention_seq_squared_term() -> None:
    fitted = fit_shapes(LADDER, [timed_chain_at(s) for s in LADDER])
    assert fitted.info["time_basis"] == "1 + tokens + batch·seq²"
    assert fitted.time_holdout_error == pytest.approx(0.0, abs=1e-9)
    assert fitted.time_trust(Shape(2, 256)) == []
    for shape in (Shape(4, 128), Shape(2, 256), Shape(1, 512)):
        truth = timed_chain_at(shape)
        predicted = fitted.costs_at(shape)
        expected = simulate(truth, keep_all(truth)).step_s
        assert simulate(predicted, keep_all(predicted)).step_s == pytest.approx(expected)


def test_time_basis_is_linear_with_one_seq_and_checked_on_the_longest() -> None:
    batches = [Shape(b, 64) for b in (1, 2, 3, 4, 6)]
    assert seconds_basis(batches, [0.001 * s.tokens for s in batches]) == (
        ("1", "tokens"),
        pytest.approx(0.0, abs=1e-9),
    )
    # a step 30% slower at the longest seq than any fit of the others can say: flagged
    totals = [1e-5 + 1e-6 * s.tokens * (1.3 if s.seq == 128 else 1.0) for s in LADDER]
    basis, miss = seconds_basis(LADDER, totals)
    assert basis == ("1", "tokens", "batch·seq²") and miss is not None and miss < -0.15
    assert seconds_basis(LADDER[:4], totals[:4])[1] is None  # fewer than five shapes


def test_equal_token_shapes_do_not_stand_in_for_a_token_term() -> None:
    # the ladder's top shapes share the sample's tokens: a constant fits them exactly
    held = [278_900 + 24 * s.tokens for s in LADDER]
    fit = fit_bytes(LADDER, held)
    assert fit.exact and fit.features == ("1", "tokens")
    assert round(fit(Shape(16, 64))) == 278_900 + 24 * 16 * 64


def test_long_probe_term_starts_at_the_grid_seq() -> None:
    # a peak: the grid's per-token branch, or beyond some length the scores' gradient
    values = [max(400 * s.tokens, 6 * s.batch * s.seq**2) for s in LADDER]
    fit = fit_with_probes(LADDER, values, probes(LADDER))
    assert fit.long_branch and fit.long_from_seq == 64
    assert fit(Shape(16, 64)) == pytest.approx(400 * 16 * 64)  # nothing added up to the grid's seq
    for shape in (Shape(2, 96), Shape(1, 128), Shape(4, 100)):  # an upper bound up to the probe
        assert fit(shape) >= max(400 * shape.tokens, 6 * shape.batch * shape.seq**2)


def test_offload_bytes_are_fitted_too() -> None:
    from memfit.planning.baselines import recompute_all_offload
    from memfit.planning.offload import OFFLOAD, with_offload

    def offload_chain_at(shape: Shape):
        costs = chain_at(shape)
        stages = [replace(s, offload_bytes=200 * shape.tokens) for s in costs.stages]
        return with_offload(replace(costs, stages=stages, host_bytes_per_s=1e6))

    fitted = fit_shapes(GRID, [offload_chain_at(s) for s in GRID])
    big = Shape(4, 256)
    predicted, truth = fitted.costs_at(big), offload_chain_at(big)
    assert [s.offload_bytes for s in predicted.stages] == [s.offload_bytes for s in truth.stages]
    every = tuple(replace(item, option=OFFLOAD) for item in keep_all(truth))
    for tree in (every, recompute_all_offload(truth)):
        assert simulate(predicted, tree).peak_bytes == simulate(truth, tree).peak_bytes
        assert simulate(predicted, tree).host_peak_bytes == simulate(truth, tree).host_peak_bytes
