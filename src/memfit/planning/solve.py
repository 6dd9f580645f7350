"""One entry point for every strategy: ``solve(costs, budget_bytes, strategy) -> Plan``."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from typing import Any

from memfit.errors import InfeasibleBudgetError
from memfit.planning import baselines
from memfit.planning.costs import ChainCosts
from memfit.planning.min_peak import min_peak
from memfit.planning.optimal import Planner
from memfit.planning.plan import Plan, Tree, stage_options
from memfit.planning.simulate import simulate
from memfit.units import format_bytes


class Strategy(str, enum.Enum):
    """How a plan is made. ``every`` takes its period after a colon: ``"every:2"``."""

    NONE = "none"
    ALL = "all"
    ALL_OFFLOAD = "all+offload"
    EVERY = "every"
    SQRT = "sqrt"
    OPTIMAL = "optimal"

    @classmethod
    def choices(cls) -> list[str]:
        """The strategy strings users may write, as error messages and the CLI list them."""
        return [f"{member.value}:k" if member is cls.EVERY else member.value for member in cls]


def parse_strategy(strategy: str | Strategy) -> tuple[Strategy, int]:
    """``"every:3"`` -> ``(Strategy.EVERY, 3)``; other strategies carry 0.

    Raises:
        ValueError: not a known strategy, or ``every`` without a period of at least 1.
    """
    if isinstance(strategy, Strategy):
        if strategy is Strategy.EVERY:
            raise ValueError('strategy "every" needs its period: write "every:k", e.g. "every:2"')
        return strategy, 0
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a string such as 'optimal'; got {strategy!r}")
    name, colon, argument = strategy.strip().lower().partition(":")
    valid = ", ".join(Strategy.choices())
    try:
        member = Strategy(name)
    except ValueError:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {valid}") from None
    if member is not Strategy.EVERY:
        if colon:
            raise ValueError(f"strategy {name!r} takes no argument; got {strategy!r}")
        return member, 0
    if not argument.isdigit() or int(argument) < 1:
        raise ValueError(f"strategy {strategy!r}: write every:k with an integer k >= 1")
    return member, int(argument)


def solve(
    costs: ChainCosts,
    budget_bytes: int | None,
    strategy: str | Strategy = "optimal",
    **options: Any,
) -> Plan:
    """Make a plan for ``costs`` within ``budget_bytes`` with ``strategy``.

    Args:
        costs: the chain.
        budget_bytes: the peak cap in bytes, ``held_bytes`` included; ``None``: no cap (baselines
            as they are; ``optimal`` gives the fastest plan).
        strategy: one of ``Strategy.choices()``: ``none``, ``all``, ``every:k``, ``sqrt``,
            ``optimal``.
        **options: passed to :class:`~memfit.planning.optimal.Planner` for ``optimal`` (``slots``,
            ``max_segment_stages``, ``max_states``, ``host_budget_bytes``).

    Returns:
        The :class:`~memfit.planning.plan.Plan` with the simulator's predictions.

    Raises:
        InfeasibleBudgetError: the strategy's plan does not fit the budget (``optimal``: no plan
            does); carries the smallest budget that works.
        ValueError: an unknown strategy or a negative budget.

    Example:
        >>> from memfit.planning import uniform_chain
        >>> plan = solve(uniform_chain(4), None, "every:2")
        >>> plan.options["stage0"], plan.options["stage1"]
        ('recompute', 'keep')
    """
    member, period = parse_strategy(strategy)
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
            raise TypeError(f"budget_bytes must be an int or None; got {budget_bytes!r}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0; got {budget_bytes}")
    if options and member is not Strategy.OPTIMAL:
        raise ValueError(f"options {sorted(options)} only apply to strategy 'optimal'")
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if member is Strategy.OPTIMAL:
        planner = Planner(costs, **options)
        budget = planner.fastest_simulation.peak_bytes if budget_bytes is None else budget_bytes
        solution = planner.solve(budget)
        tree, simulation, info = solution.tree, solution.simulation, solution.info
    else:
        tree = _baseline(costs, member, period)
        simulation = simulate(costs, tree)
        if budget_bytes is not None and simulation.peak_bytes > budget_bytes:
            floor = min_peak_bytes(costs)
            raise InfeasibleBudgetError(
                budget_bytes,
                simulation.peak_bytes,
                f"strategy {strategy!r} always peaks there; strategy 'optimal' fits budgets "
                f"down to {format_bytes(floor)}",
            )
    info["solve_time_s"] = time.perf_counter() - started
    if simulation.host_peak_bytes:
        info["host_peak_bytes"] = simulation.host_peak_bytes
    ops = _option_details(costs, tree)
    if ops:
        info["ops"] = ops
    # never silently: the plan, its JSON and its table say so
    chosen = stage_options(tree)
    names = [stage.name for stage in costs.stages]
    inexact = {
        name: f"{chosen[names.index(name)]}: {_why_inexact(detail)}"
        for name, detail in ops.items()
        if detail.get("exact") is False
    }
    return Plan(
        stage_names=tuple(stage.name for stage in costs.stages),
        tree=tree,
        strategy=member.value if member is not Strategy.EVERY else f"every:{period}",
        predicted_peak_bytes=simulation.peak_bytes,
        predicted_step_s=simulation.step_s,
        budget_bytes=budget_bytes,
        fingerprint=costs.fingerprint,
        inexact=inexact,
        info=info,
    )


def _why_inexact(detail: Mapping[str, Any]) -> str:
    """Why an option is not bit-identical, from its profile detail: lossy (``compress:*``:
    ``stores`` names the format, ``error`` the gradient error measured with every block under
    it) or exact to rounding (``head:chunked``)."""
    if "stores" not in detail:
        return "exact to rounding, not bit for bit"
    measured = f", gradient error {detail['error']:.1e} measured" if "error" in detail else ""
    return f"lossy, saved activations stored in {detail['stores']}{measured}"


def _option_details(costs: ChainCosts, tree: Tree) -> dict[str, dict[str, Any]]:
    """Stage name -> what its top-level option saves and reruns, where the profile says so."""
    details = {}
    for index, option in stage_options(tree).items():
        menu = costs.stages[index].options
        if option in menu and menu[option].detail:
            details[costs.stages[index].name] = dict(menu[option].detail)
    return details


def _baseline(costs: ChainCosts, member: Strategy, period: int) -> Tree:
    if member is Strategy.NONE:
        return baselines.keep_all(costs)
    if member is Strategy.ALL:
        return baselines.recompute_all(costs)
    if member is Strategy.ALL_OFFLOAD:
        return baselines.recompute_all_offload(costs)
    if member is Strategy.SQRT:
        return baselines.sqrt_segments(costs)
    return baselines.every_k(costs, period)


def min_peak_bytes(costs: ChainCosts) -> int:
    """The smallest step peak any plan of the class reaches (exact, no discretisation).

    Args:
        costs: the chain.

    Returns:
        The simulated peak of the min-peak tree, ``held_bytes`` included.

    Example:
        >>> from memfit.planning import uniform_chain
        >>> min_peak_bytes(uniform_chain(8, activation_bytes=1, saved_bytes=4))
        11
    """
    if costs.skips:  # the min-peak DP does not see them: the optimal planner's floor does
        return Planner(costs).floor_simulation.peak_bytes
    return simulate(costs, min_peak(costs).tree()).peak_bytes
