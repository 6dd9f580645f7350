"""Random chains for the planning tests, and two brute-force references.

Random chains are *consistent* like measured profiles: each stage's input is the previous output,
and every option frees in backward what it saved (``saved + output + backward_delta`` is the
stage's parameter gradients, whatever the option). Sizes are whole units and times whole seconds,
so sums are exact and the solver's grid is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from hypothesis import strategies as st

from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts
from memfit.planning.plan import Item, Segment, Stage, Tree
from memfit.planning.simulate import Simulation, simulate

UNIT = 1 << 20


@st.composite
def chains(
    draw: st.DrawFn,
    *,
    min_stages: int = 1,
    max_stages: int = 6,
    max_options: int = 3,
    unit: int = UNIT,
    constraints: bool = True,
    consistent: bool = True,
) -> ChainCosts:
    """A chain of ``min_stages..max_stages`` stages with 1..``max_options`` options; when not
    ``consistent``, inputs and backward deltas are drawn freely (costs no profile would give)."""
    n = draw(st.integers(min_stages, max_stages))
    size = st.integers(0, 8)
    first_input = draw(size)
    outputs = [draw(st.integers(1, 8)) for _ in range(n)]
    stages = []
    for i in range(n):
        output = outputs[i]
        grads = draw(st.integers(0, 3))
        saved = draw(size)
        forward_s, backward_s = draw(st.integers(1, 5)), draw(st.integers(1, 9))
        forward_peak = saved + output + draw(st.integers(0, 4))
        given = first_input if i == 0 else outputs[i - 1]
        if not consistent:
            grads = draw(st.integers(-4, 4))
            given = max(0, given + draw(st.integers(-1, 1)) * (i > 0))
        options = {KEEP: _option(draw, forward_s, backward_s, saved, output, grads, forward_peak)}
        for number in range(draw(st.integers(1, max_options)) - 1):
            less = draw(st.integers(0, saved))
            slower = backward_s + draw(st.integers(1, 6))
            peak = draw(st.integers(less + output, forward_peak))
            freed = grads if consistent else draw(st.integers(-4, 4))
            option = _option(draw, forward_s, slower, less, output, freed, peak)
            options[f"selective:{number}"] = option
        stages.append(
            StageCosts(
                name=f"s{i}",
                input_bytes=given * unit,
                output_bytes=output * unit,
                options=options,
                nosave_forward_s=forward_s,
                nosave_forward_peak_bytes=draw(st.integers(0, forward_peak)) * unit,
                checkpointable=not constraints or draw(st.integers(0, 5)) > 0,
                joins_previous=not constraints or i == 0 or draw(st.integers(0, 5)) > 0,
                nosave_held_bytes=draw(st.sampled_from([0, 0, 1, 2])) * unit,
                # torch's early stop: the last stage of a recompute peaks lower (or, measured,
                # higher); its backward's gradients before the rerun lift the whole recompute
                recompute_peak_bytes=draw(
                    st.none() | st.integers(0, forward_peak + 2).map(lambda peak: peak * unit)
                ),
                recompute_lead_bytes=draw(st.integers(0, 3)) * unit,
            )
        )
    held = draw(st.integers(0, 10)) * unit
    return ChainCosts(stages=stages, held_bytes=held, fingerprint="random")


def _option(
    draw: st.DrawFn,
    forward_s: int,
    backward_s: int,
    saved: int,
    output: int,
    grads: int,
    forward_peak: int,
) -> OptionCosts:
    delta = grads - saved - output
    return OptionCosts(
        forward_s=float(forward_s),
        backward_s=float(backward_s),
        saved_bytes=saved * UNIT,
        forward_peak_bytes=forward_peak * UNIT,
        backward_peak_bytes=(max(0, delta) + draw(st.integers(0, 6))) * UNIT,
        backward_delta_bytes=delta * UNIT,
    )


def _segment_ok(costs: ChainCosts, start: int, stop: int) -> bool:
    stages = costs.stages
    return all(stages[i].checkpointable for i in range(start, stop)) and all(
        stages[i].joins_previous for i in range(start + 1, stop)
    )


def all_trees(costs: ChainCosts) -> Iterator[Tree]:
    """Every schedule tree of the class, one by one (tiny chains only)."""

    def trees(start: int, stop: int, whole: bool, inside: bool) -> Iterator[tuple[Item, ...]]:
        if start == stop:
            yield ()
            return
        names = [KEEP] if inside else list(costs.stages[start].options)  # keep-only in segments
        firsts: list[Item] = [Stage(start, name) for name in names]
        for end in range(start + 1, stop + 1):
            if (end < stop or whole) and _segment_ok(costs, start, end):
                firsts += [Segment(start, end, inner) for inner in trees(start, end, False, True)]
        for first in firsts:
            end = first.index + 1 if isinstance(first, Stage) else first.stop
            for rest in trees(end, stop, True, inside):
                yield (first, *rest)

    return trees(0, len(costs.stages), True, False)


Summary = tuple[int, int, float, Tree]  # (peak above start, level change, seconds, tree)


def pareto_summaries(costs: ChainCosts) -> list[Summary]:
    """Every non-dominated (peak, level change, seconds) of whole-chain trees, exactly.

    Built by composing items with the simulator's event rules; a summary dominated in all three
    is never part of a better tree, so pruning keeps the minimum exact. Checked against
    :func:`all_trees` on tiny chains.
    """
    stages = costs.stages

    def event(state: tuple[int, int], peak: int, delta: int, lead: int = 0) -> tuple[int, int]:
        top, level = state
        return max(top, level + max(peak, delta) + lead), level + delta

    @cache
    def solve(start: int, stop: int, drop: bool, whole: bool) -> list[Summary]:
        if start == stop:
            return [(0, -stages[stop - 1].output_bytes if drop else 0, 0.0, ())]
        found: list[Summary] = []
        menu = {KEEP: stages[start].options[KEEP]} if drop else stages[start].options
        # a recompute's forward: above its last stage's lead, which stops early
        lead = stages[stop - 1].recompute_lead_bytes if drop else 0
        for name, option in menu.items():
            peak_above = option.forward_peak_bytes
            if drop and start == stop - 1:
                peak_above = stages[start].recompute_peak()
            # kept in a recompute: less what the step's no-save forward kept already
            held = stages[start].nosave_held_bytes if drop else 0
            delta = option.saved_bytes + stages[start].output_bytes - held
            forward = event((0, 0), peak_above, delta, lead)
            for peak, total, seconds, tree in solve(start + 1, stop, drop, True):
                state = (max(forward[0], forward[1] + peak), forward[1] + total)
                state = event(state, option.backward_peak_bytes, option.backward_delta_bytes)
                time_s = seconds + option.forward_s + option.backward_s
                found.append((*state, time_s, (Stage(start, name), *tree)))
        for end in range(start + 1, stop + 1):
            if (end == stop and not whole) or not _segment_ok(costs, start, end):
                continue
            forward, nosave_s = (0, 0), 0.0
            for j in range(start, end):
                delta = stages[j].output_bytes - (stages[j].input_bytes if j > start else 0)
                # the step's no-save forward keeps nosave_held_bytes to each stage's backward
                delta += 0 if drop else stages[j].nosave_held_bytes
                forward = event(forward, stages[j].nosave_forward_peak_bytes, delta, lead)
                nosave_s += stages[j].nosave_forward_s
            for rest in solve(end, stop, drop, True):
                for inner in solve(start, end, True, False):
                    level = forward[1] + rest[1]
                    top = max(forward[0], forward[1] + rest[0], level + inner[0])
                    item = Segment(start, end, inner[3])
                    found.append(
                        (top, level + inner[1], nosave_s + rest[2] + inner[2], (item, *rest[3]))
                    )
        return _pareto(found)

    return solve(0, len(stages), False, True)


def _pareto(found: list[Summary]) -> list[Summary]:
    found.sort(key=lambda s: (s[0], s[1], s[2]))
    kept: list[Summary] = []
    for candidate in found:
        if not any(
            k[0] <= candidate[0] and k[1] <= candidate[1] and k[2] <= candidate[2] for k in kept
        ):
            kept.append(candidate)
    return kept


def best_time(costs: ChainCosts, budget_bytes: int) -> float | None:
    """The least simulated step time of any tree within ``budget_bytes`` (``None``: none fits)."""
    fits = [s[2] for s in pareto_summaries(costs) if costs.held_bytes + s[0] <= budget_bytes]
    return min(fits, default=None)


def peaks(costs: ChainCosts) -> list[int]:
    """The simulated peaks of the Pareto trees (interesting budgets)."""
    return sorted({simulate(costs, s[3]).peak_bytes for s in pareto_summaries(costs)})


def assert_optimal_matches_brute_force(
    costs: ChainCosts, budget: int, runs: list[Simulation]
) -> None:
    """The optimal DP against every tree's simulation ``runs``: the same floor (named by the
    error where ``budget`` is below it), and within the budget the fastest step."""
    import pytest

    from memfit.errors import InfeasibleBudgetError
    from memfit.planning.optimal import solve_optimal
    from memfit.planning.solve import min_peak_bytes

    floor = min(run.peak_bytes for run in runs)
    fitting = [run.step_s for run in runs if run.peak_bytes <= budget]
    assert min_peak_bytes(costs) == floor
    if not fitting:
        with pytest.raises(InfeasibleBudgetError) as error:
            solve_optimal(costs, budget)
        assert error.value.min_feasible_bytes == floor
        return
    solution = solve_optimal(costs, budget)
    assert solution.simulation.peak_bytes <= budget
    assert solution.simulation.step_s == min(fitting)
