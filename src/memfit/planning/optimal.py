"""The optimal schedule: least step time under a peak budget, by dynamic programming.

Algorithm: the Rotor dynamic program of Beaumont, Eyraud-Dubois, Herrmann, Joly and Shilova,
"Optimal checkpointing for heterogeneous chains: how to train deep neural networks with limited
memory" (2019), recast over memfit's schedule trees (:mod:`memfit.planning.plan`: nested recompute
segments, per-stage option menus, ``checkpointable``/``joins_previous``) and derived from the
simulator's semantics (:mod:`memfit.planning.simulate`), so that the two agree.

Subproblem ``P(s, t, drop)``: run a tree over ``[s, t)`` forward then backward, dropping
``output_bytes[t-1]`` in between when ``drop`` (a segment's inner tree; the whole chain has no
drop). Peel the first item ``X`` (a stage option, or ``Segment(s, e, inner)``) off the rest
``R = P(s', t, drop)``; the simulator runs ``F(X), F(R), [drop], B(R), B(X)``, so with ``a(X)``
the level ``X``'s forward leaves and ``Tot(R)`` the level change of the whole of ``R``:

    peak(X + R) = max(fpeak(X), a(X) + peak(R), a(X) + Tot(R) + bpeak(X))

where a segment's ``fpeak``/``a`` are its no-save forward's and its ``bpeak`` is the peak of
``P(s, e, drop=True)`` for its inner tree. ``Tot(R)`` does not depend on ``R``'s choices when every
option of a stage frees in backward what it saved in forward and each stage's input is the
previous output (true of measured profiles): then, with ``T(s, t, m)`` the least seconds of
``P(s, t, .)`` within ``m`` free bytes,

    T(s, t, m) = min over X of  time(X) + T_inner(X, m - a(X) - Tot(R)) + T(s', t, m - a(X))
                 subject to fpeak(X) <= m and a(X) + Tot(R) + bpeak_stage(X) <= m

(``T_inner`` is 0 for a stage option). Otherwise ``Tot(R)`` is replaced by an upper bound and
the DP stays safe but may miss the optimum (see below). A segment's inner tree is never a segment
of the same range (that only reruns the same forward), which keeps the class finite.

Two sweeps solve it (the line of Rotor, with its memory axis split in two):

* segments (:mod:`memfit.planning._tables`): ``T`` above for every interval of at most ``K`` stages
  with ``drop``, vectorised with numpy over a grid of memory slots; every byte figure is rounded
  up to whole slots, so every tree the tables accept fits. The grid reaches the largest memory any
  segment's fastest inner tree needs (above it nothing gets faster) and depends on the chain, not
  the budget, so more budget never costs time. When every byte figure is a multiple of one unit
  and that memory spans at most ``EXACT_SLOTS`` units, the unit is the slot and the tables are
  exact;
* the whole chain (:mod:`memfit.planning._top`): a forward sweep over stage boundaries keeping the
  Pareto set of ``(level, seconds)``, with levels in exact bytes. The recurrence read forwards:
  choosing ``X`` at level ``L`` needs ``L + fpeak(X) <= B`` and, since ``Tot(rest)`` is known,
  ``L + a(X) + Tot(rest) + bpeak(X) <= B`` (a segment reads its inner time from the tables at the
  bytes left), and leads to level ``L + a(X)``. States that cannot finish above the exact
  min-peak of the rest are dropped.

Budgets at or above the fastest tree's peak get that tree. The exact min-peak DP
(:mod:`memfit.planning.min_peak`) gives the minimal feasible budget. The returned tree is
re-simulated.

Known inefficiencies:

* rounding segments up to slots loses up to one slot per item inside a segment, so on a coarse
  grid a segment's inner tree can be slower than needed;
* a long chain's top-level sets can grow past ``max_states`` (default 2048); they are thinned by
  level buckets, losing some fast plans (why 2048: on a synthetic 1000-stage chain it loses
  0.1% of step time at half the activation memory against 16,384 states, which take seven
  times longer; ``benchmarks/results/design-figures.md``, "Top-level states");
* when the sweep finds nothing that a baseline or the min-peak tree beats (or nothing at all),
  the result is the fastest of those that fit: never worse than a baseline;
* time is ``O(n K (K + k) M)`` for the tables plus ``O(n (K + k) S log S)`` for the sweep, with
  ``n`` stages, ``k`` options per stage, segments capped at ``K`` stages, ``M`` slots and ``S``
  states; the cap (:func:`default_segment_cap`) also bounds how low the peak can go;
* a stage's backward is assumed to free what its forward saved whatever the option; where costs
  say otherwise the DP uses an upper bound on ``Tot`` and stays safe but may miss the optimum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from memfit.errors import InfeasibleBudgetError
from memfit.planning import baselines
from memfit.planning._chain import ChainArrays, default_segment_cap
from memfit.planning._skip_top import solve_top_skips
from memfit.planning._tables import SegmentTables
from memfit.planning._top import OffloadRows, solve_top
from memfit.planning.costs import ChainCosts
from memfit.planning.min_peak import MinPeak
from memfit.planning.offload import (
    OFFLOAD,
    exposed_s,
    host_bytes,
    in_flight_bytes,
    is_offload,
    offloads,
    offloads_input,
    runs_ahead,
    without_offload,
)
from memfit.planning.plan import Segment, Stage, Tree
from memfit.planning.simulate import Simulation, holds_inputs, simulate

EXACT_SLOTS = 4096


def default_slots(n: int) -> int:
    """Memory slots of the segment grid (when the costs do not fit an exact grid)."""
    return 500


@dataclass(frozen=True, kw_only=True, slots=True)
class Solution:
    """A solved schedule.

    Attributes:
        tree: the schedule tree.
        simulation: its exact simulated peak and time.
        info: how it was found (grid, cap, source, solve seconds), JSON-serialisable.
    """

    tree: Tree
    simulation: Simulation
    info: dict[str, Any] = field(default_factory=dict)


def unit_bytes(costs: ChainCosts) -> int:
    """The largest unit that every byte figure of the chain is a multiple of (at least 1)."""
    values: list[int] = [costs.checkpoint_bytes]
    for stage in costs.stages:
        values += [stage.input_bytes, stage.output_bytes, stage.nosave_forward_peak_bytes]
        values.append(stage.nosave_held_bytes)
        values += [stage.recompute_peak(), stage.recompute_lead_bytes]
        for option in stage.options.values():
            values += [
                option.saved_bytes,
                option.forward_peak_bytes,
                option.backward_peak_bytes,
                option.backward_delta_bytes,
            ]
    return max(1, int(np.gcd.reduce(np.abs(np.array(values, dtype=np.int64)))))


def segment_tables(arrays: ChainArrays, unit: int, slots: int) -> SegmentTables:
    """The segment DP on a grid that reaches every segment's fastest inner tree.

    The grid depends on the chain, not the budget, so that more budget never costs time: exact
    (the common unit of the byte figures) when that takes at most ``EXACT_SLOTS`` slots, else
    about ``slots`` slots plus room for rounding.
    """
    span = arrays.fastest_segment_peak()
    if span // unit <= max(EXACT_SLOTS, slots):
        return SegmentTables(arrays, unit, -(-span // unit))
    slot_bytes = max(unit, -(-span // slots))
    return SegmentTables(arrays, slot_bytes, -(-span // slot_bytes) + arrays.cap + 2)


def fastest_tree(costs: ChainCosts) -> Tree:
    """The unconstrained fastest tree: every stage's fastest option (``keep`` on ties), no
    recompute (a segment only adds its no-save forward)."""
    items = []
    for index, stage in enumerate(costs.stages):
        names = sorted(stage.options, key=lambda name: (name != "keep", name))
        best = min(
            names, key=lambda name: stage.options[name].forward_s + stage.options[name].backward_s
        )
        items.append(Stage(index, best))
    return tuple(items)


def offload_rows(costs: ChainCosts, arrays: ChainArrays, allowed: frozenset[int]) -> OffloadRows:
    """The DP's offloaded top-level segments: those starting at ``allowed`` stages, priced with
    the next stage's kept backward as the fetch's window (a lower bound of any item's there)."""
    n, rate = len(costs.stages), costs.host_bytes_per_s
    moved = np.zeros(n, dtype=np.int64)
    extra = np.zeros((n, arrays.cap + 1))
    for start in allowed:
        moved[start] = costs.stages[start].input_bytes
        for length in range(1, int(arrays.max_length[start]) + 1):
            stop = start + length
            forward = exposed_s(int(moved[start]), rate, float(arrays.segment_time[start, length]))
            window = costs.stages[stop].options["keep"].backward_s if runs_ahead(costs, stop) else 0
            extra[start, length] = forward + exposed_s(int(moved[start]), rate, window)
    return OffloadRows(moved=moved, extra_s=extra)


def offload_floor_trees(costs: ChainCosts, floor_tree: Tree) -> dict[str, Tree]:
    """Low-peak trees with offload (the min-peak DP does not offload): the min-peak tree with
    its top-level segments' inputs offloaded, and every block recomputed with its input
    offloaded."""
    return {
        "min-peak+offload": baselines.offloaded(costs, floor_tree),
        "all+offload": baselines.offloaded(costs, baselines.recompute_all(costs)),
    }


def _fallbacks(costs: ChainCosts, floor_tree: Tree) -> dict[str, Callable[[], Tree]]:
    makers: dict[str, Callable[[], Tree]] = {
        "min-peak": lambda: floor_tree,
        "none": partial(baselines.keep_all, costs),
        "all": partial(baselines.recompute_all, costs),
        "sqrt": partial(baselines.sqrt_segments, costs),
    }
    for k in (2, 3, 4):
        makers[f"every:{k}"] = partial(baselines.every_k, costs, k)
    return makers


class Planner:
    """The optimal solver for one chain: the budget-independent work done once, then any number
    of budgets (:meth:`solve`), as :mod:`memfit.planning.frontier` does.

    Args:
        costs: the chain.
        slots: memory slots of the segment grid (default :func:`default_slots`).
        max_segment_stages: the longest recompute segment (default :func:`default_segment_cap`).
        max_states: the most top-level states kept per stage boundary.

    Raises:
        ValueError: ``slots``, ``max_segment_stages`` or ``max_states`` below 1.
    """

    def __init__(
        self,
        costs: ChainCosts,
        *,
        slots: int | None = None,
        max_segment_stages: int | None = None,
        max_states: int = 2048,
        host_budget_bytes: int | None = None,
    ) -> None:
        started = time.perf_counter()
        n = len(costs.stages)
        cap = default_segment_cap(n) if max_segment_stages is None else max_segment_stages
        slots = default_slots(n) if slots is None else slots
        if min(cap, slots, max_states) < 1:
            raise ValueError(
                f"slots, max_segment_stages and max_states must be >= 1; got {slots}, {cap} "
                f"and {max_states}"
            )
        self.costs, self.max_states = costs, max_states
        self.host_budget_bytes = host_budget_bytes
        # with offload the DP runs twice: on the menu without it (exact, as it always was) and
        # with it, keeping the bytes one item may have in flight in reserve
        self.offload = offloads(costs)
        plain = without_offload(costs) if self.offload else costs
        self.fastest = fastest_tree(plain)
        self.fastest_simulation = simulate(costs, self.fastest)
        self.arrays = ChainArrays(plain, cap)
        self.floor = MinPeak(self.arrays)
        self.floor_tree = self.floor.tree()
        self.floor_simulation = simulate(costs, self.floor_tree)
        self.tables = segment_tables(self.arrays, unit_bytes(plain), slots)
        self.info: dict[str, Any] = {
            "max_segment_stages": cap,
            "slot_bytes": self.tables.slot_bytes,
            "slots": self.tables.slots,
        }
        if self.offload:
            self.offload_arrays = ChainArrays(costs, cap)
            self.offload_tables = segment_tables(self.offload_arrays, unit_bytes(costs), slots)
            self.in_flight = in_flight_bytes(costs)
            for name, tree in offload_floor_trees(costs, self.floor_tree).items():
                simulation = simulate(costs, tree)
                if self._host_fits(tree) and (
                    simulation.peak_bytes + self.reserve(tree)
                    < self.floor_simulation.peak_bytes + self.reserve(self.floor_tree)
                ):
                    self.floor_tree, self.floor_simulation = tree, simulation
                    self.info["floor"] = name
        if costs.skips:
            self._skip_floor()
        self.info["setup_s"] = time.perf_counter() - started

    def _dp_budget(self, budget_bytes: int) -> int:
        """What the DP plans within: the budget less the reserves for what it does not see
        (see :meth:`solve`)."""
        costs = self.costs
        tail = max(stage.tail_bytes for stage in costs.stages)
        released = max(stage.released_input_bytes for stage in costs.stages)
        return (
            budget_bytes
            - costs.side_input_bytes
            - costs.side_grad_bytes
            - costs.gathered_bytes
            - costs.fragmentation_bytes
            - tail
            - released
        )

    def _top(self, dp_budget: int) -> tuple[Tree, float] | None:
        """The top-level sweep: the plain one, or with the skips held (chains with skips);
        with a host, segments may offload their skips, unless that tree holds more host
        memory than the host budget (then the sweep runs again without)."""
        if not self.costs.skips:
            return solve_top(self.arrays, self.tables, dp_budget, self.floor.top, self.max_states)
        arguments = (self.costs, self.arrays, self.tables, dp_budget, self.floor.top)
        if self.costs.host_bytes_per_s > 0:
            found = solve_top_skips(*arguments, self.max_states, offload_skips=True)
            if found is None or self._host_fits(found[0]):
                return found
        return solve_top_skips(*arguments, self.max_states)

    def _skip_floor(self) -> None:
        """The smallest peak with skips: the min-peak DP does not see them (its peak without
        them is a lower bound, its tree simulated with them an upper one), so the sweep with
        skips is bisected between the two, keeping the lowest tree that fits."""
        plain = replace(self.costs, skips=())
        low = simulate(plain, self.floor_tree).peak_bytes + self.reserve(self.floor_tree) - 1
        high = self.floor_simulation.peak_bytes + self.reserve(self.floor_tree)
        while high - low > 1:
            middle = (low + high) // 2
            found = self._top(self._dp_budget(middle))
            if found is None:
                low = middle
                continue
            simulation = simulate(self.costs, found[0])
            peak = simulation.peak_bytes + self.reserve(found[0])
            if peak <= middle:
                high = peak
                self.floor_tree, self.floor_simulation = found[0], simulation
            else:
                low = middle
        self.info["floor"] = "skip sweep"

    def _host_fits(self, tree: Tree) -> bool:
        limit = self.host_budget_bytes
        return limit is None or host_bytes(self.costs, tree) <= limit

    def reserve(self, tree: Tree) -> int:
        """Bytes a tree keeps free under the budget beyond its simulated peak: the side-input
        gradient reserve (``ChainCosts.side_grad_bytes``) when any block runs under a
        checkpoint, whose timing the costs measured with every block kept do not show, the
        reserve for a late-freed FSDP2 buffer (``ChainCosts.gathered_bytes``) and the caching
        allocator's slack (``ChainCosts.fragmentation_bytes``, CUDA)."""
        side = self.costs.side_grad_bytes if any(map(holds_inputs, tree)) else 0
        return side + self.costs.gathered_bytes + self.costs.fragmentation_bytes

    def _offload_trees(self, dp_budget: int) -> dict[str, Tree]:
        """The DP's trees with offload in the menu, under the in-flight reserve, within the host
        budget: where the first tree holds too much host memory, the stages it offloads are
        taken out of the menu one at a time, last first (a few rounds at most)."""
        costs = self.costs
        allowed = frozenset(i for i in range(len(costs.stages)) if offloads_input(costs, i))
        # a round's smaller menu holds for this budget only: the planner serves many budgets
        arrays, tables = self.offload_arrays, self.offload_tables
        trees: dict[str, Tree] = {}
        for round_ in range(4):
            rows = offload_rows(costs, arrays, allowed)
            found = solve_top(
                arrays,
                tables,
                dp_budget - self.in_flight,
                np.zeros(len(costs.stages) + 1, dtype=np.int64),  # the min-peak DP cannot offload
                self.max_states,
                offload=rows,
            )
            if found is None:
                break
            tree = found[0]
            if self._host_fits(tree):
                trees["dp+offload" if not round_ else f"dp+offload:{round_}"] = tree
                break
            offloaded = [i for i, item in enumerate(tree) if is_offload(item)]
            last = tree[offloaded[-1]]
            start = last.start if isinstance(last, Segment) else last.index
            allowed -= {start}
            costs = _drop_option(costs, start)
            arrays = ChainArrays(costs, arrays.cap)
            tables = segment_tables(arrays, unit_bytes(costs), self.tables.slots)
        return trees

    def _input_offload_tree(self, dp_budget: int) -> dict[str, Tree]:
        """The DP with segment inputs as the only offload: one item then has at most the
        largest block input in flight, where the full menu's reserve is the largest block's
        saved bytes, about what separates the floor from a budget that fits one more kept
        block, so that near the floor the full DP finds nothing."""
        costs = self.costs
        allowed = frozenset(i for i in range(len(costs.stages)) if offloads_input(costs, i))
        reserve = max((costs.stages[i].input_bytes for i in allowed), default=0)
        found = solve_top(
            self.arrays,
            self.tables,
            dp_budget - reserve,
            np.zeros(len(costs.stages) + 1, dtype=np.int64),
            self.max_states,
            offload=offload_rows(costs, self.arrays, allowed),
        )
        return {} if found is None else {"dp+inputs-offload": found[0]}

    def solve(self, budget_bytes: int) -> Solution:
        """The fastest tree whose simulated peak fits ``budget_bytes``.

        Raises:
            InfeasibleBudgetError: no tree of the class fits; carries the minimal peak.
        """
        started = time.perf_counter()
        costs, info = self.costs, dict(self.info)
        fastest_peak = self.fastest_simulation.peak_bytes + self.reserve(self.fastest)
        if fastest_peak <= budget_bytes:
            info.update(source="fastest", solve_time_s=time.perf_counter() - started)
            return Solution(tree=self.fastest, simulation=self.fastest_simulation, info=info)
        floor_peak = self.floor_simulation.peak_bytes + self.reserve(self.floor_tree)
        if floor_peak > budget_bytes and not self.offload:
            raise InfeasibleBudgetError(budget_bytes, floor_peak)
        # with offload the floor is the lowest of a few trees, not the min-peak DP's: the
        # offload DP may still fit below it
        # the DP does not see the side inputs that checkpoints hold, nor the tails their
        # callers hold, nor the inputs a recompute holds that its first stage lets go when kept
        # (the simulator does): it plans as if they were held all step (one tail and one input
        # at a time: the largest), and the tree it finds is simulated below
        dp_budget = self._dp_budget(budget_bytes)
        found = self._top(dp_budget)
        trees = {} if found is None else {"dp": found[0]}
        if self.offload:
            trees.update(self._offload_trees(dp_budget))
            trees.update(self._input_offload_tree(dp_budget))
        trees.update({name: make() for name, make in _fallbacks(costs, self.floor_tree).items()})
        simulations = {name: simulate(costs, tree) for name, tree in trees.items()}
        fits = [
            name
            for name, sim in simulations.items()
            if sim.peak_bytes + self.reserve(trees[name]) <= budget_bytes
            and self._host_fits(trees[name])
        ]
        if not fits:
            raise InfeasibleBudgetError(budget_bytes, floor_peak)
        source = min(fits, key=lambda name: simulations[name].step_s)  # dp first on ties
        info.update(source=source, solve_time_s=time.perf_counter() - started)
        return Solution(tree=trees[source], simulation=simulations[source], info=info)


def _drop_option(costs: ChainCosts, index: int) -> ChainCosts:
    """``costs`` without stage ``index``'s ``offload`` option."""
    stages = list(costs.stages)
    stage = stages[index]
    if OFFLOAD in stage.options:
        options = {name: c for name, c in stage.options.items() if name != OFFLOAD}
        stages[index] = replace(stage, options=options)
    return replace(costs, stages=stages)


def solve_optimal(
    costs: ChainCosts,
    budget_bytes: int,
    *,
    slots: int | None = None,
    max_segment_stages: int | None = None,
) -> Solution:
    """The fastest schedule tree whose simulated peak fits ``budget_bytes``.

    Args:
        costs: the chain.
        budget_bytes: the peak cap, ``held_bytes`` included.
        slots: memory slots of the segment grid (default :func:`default_slots`).
        max_segment_stages: the longest recompute segment (default :func:`default_segment_cap`).

    Returns:
        The :class:`Solution`; ``info["solve_time_s"]`` counts the whole call.

    Raises:
        InfeasibleBudgetError: no tree of the class fits; carries the minimal peak.

    Example:
        >>> from memfit.planning import uniform_chain
        >>> costs = uniform_chain(4, activation_bytes=1, saved_bytes=4)
        >>> solution = solve_optimal(costs, 20)
        >>> solution.simulation.peak_bytes <= 20
        True
    """
    started = time.perf_counter()
    planner = Planner(costs, slots=slots, max_segment_stages=max_segment_stages)
    solution = planner.solve(budget_bytes)
    solution.info["solve_time_s"] = time.perf_counter() - started
    return solution
