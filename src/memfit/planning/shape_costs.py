"""A chain's costs as functions of the batch's shape, fitted over profiles at a few shapes (no
torch here).

Every figure of a :class:`~memfit.planning.costs.ChainCosts` (each stage's tensor sizes, saved
bytes, peaks and seconds, per option; the held bytes; the checkpoint and side-input bytes) is
fitted as a function of the shape ``(batch, seq)`` (:mod:`memfit.planning.shape_fits`: the
bases and how each is chosen).

:class:`ShapeCosts` holds the fits and gives a synthetic ``ChainCosts`` at any shape
(:meth:`ShapeCosts.costs_at`), which the simulator and every solver read as they read measured
ones: planning an unseen shape is evaluating the fits plus one DP (milliseconds).

Known limits: a fit is only as good as the profiled shapes cover the model's behaviour (an
attention kernel that changes algorithm above some length, an allocator's rounding); the
fit's residuals and an extrapolation check (:attr:`ShapeCosts.holdout_error`) say how far to
trust it, and :meth:`ShapeCosts.trust` refuses shapes too far beyond the profiled ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from memfit.errors import InfeasibleBudgetError
from memfit.planning.baselines import keep_all, recompute_all
from memfit.planning.costs import KEEP, ChainCosts
from memfit.planning.plan import Plan
from memfit.planning.shape_fits import (
    FEATURES,
    Fit,
    Shape,
    fit_seconds,
    fit_with_probes,
    probes,
    seconds_basis,
)
from memfit.planning.simulate import budget_base, simulate
from memfit.planning.solve import min_peak_bytes, solve
from memfit.units import Budget, infeasible_message

# beyond this factor over the largest profiled tokens (or seq), estimates are not trusted
MAX_EXTRAPOLATION = 16.0
# an extrapolation check worse than this marks the fit as not trusted
MAX_HOLDOUT_ERROR = 0.05
# the same for step times (the goal for time estimates: within 15%)
MAX_TIME_HOLDOUT_ERROR = 0.15

Path = tuple[Any, ...]
_OPTION_BYTES = ("saved_bytes", "forward_peak_bytes", "backward_peak_bytes", "backward_delta_bytes")
_OPTION_SECONDS = ("forward_s", "backward_s")
_STAGE_BYTES = (
    "input_bytes",
    "output_bytes",
    "nosave_forward_peak_bytes",
    "tail_bytes",
    "offload_bytes",
    "released_input_bytes",
    "nosave_held_bytes",
    "recompute_peak_bytes",
    "recompute_lead_bytes",
)
_CHAIN_BYTES = (
    "held_bytes",
    "gradient_bytes",
    "checkpoint_bytes",
    "side_input_bytes",
    "side_grad_bytes",
)
# figures that are never negative (the others are level changes)
_NON_NEGATIVE = {"forward_peak_bytes", "backward_peak_bytes", *_STAGE_BYTES, *_CHAIN_BYTES}


def _figures(costs: ChainCosts, options: Mapping[int, Sequence[str]]) -> dict[Path, float]:
    """Every number of ``costs`` the fits cover, by path (options: those common to all)."""
    out: dict[Path, float] = {(name,): float(getattr(costs, name)) for name in _CHAIN_BYTES}
    for index, stage in enumerate(costs.stages):
        for name in (*_STAGE_BYTES, "nosave_forward_s"):
            # a rerun's peak not measured is the kept forward's (StageCosts.recompute_peak)
            value = (
                stage.recompute_peak() if name == "recompute_peak_bytes" else getattr(stage, name)
            )
            out[(index, name)] = float(value)
        for option in options[index]:
            for name in (*_OPTION_BYTES, *_OPTION_SECONDS):
                out[(index, option, name)] = float(getattr(stage.options[option], name))
    return out


def _is_seconds(path: Path) -> bool:
    return str(path[-1]).endswith("_s")


def _value(path: Path, fit: Fit, shape: Shape) -> float | int:
    value = fit(shape)
    if _is_seconds(path):
        return max(0.0, value)
    rounded = math.ceil(value - 0.5)  # nearest byte (the fits are exact to a few bytes)
    return max(0, rounded) if path[-1] in _NON_NEGATIVE else rounded


@dataclass(frozen=True, kw_only=True)
class ShapeCosts:
    """A chain's costs as functions of the shape, fitted over profiles at a few shapes.

    Attributes:
        template: the costs of the largest profiled shape: names, flags, option details.
        shapes: the profiled shapes.
        fits: path -> fit, for every number of the chain (``("held_bytes",)``,
            ``(stage, "input_bytes")``, ``(stage, option, "saved_bytes")``...).
        holdout_error: the extrapolation check: fitted without the largest profiled shape, the
            relative error of the keep-all and all-recompute peaks predicted there (the larger
            of the two, signed by the worse); ``None`` when too few shapes were profiled.
        time_holdout_error: the same check for the step time: fitted without the longest
            profiled seq, the plain step's relative time error there (:func:`seconds_basis`).
        info: JSON-ready facts (what was fitted how).
    """

    template: ChainCosts
    shapes: tuple[Shape, ...]
    fits: Mapping[Path, Fit]
    holdout_error: float | None = None
    time_holdout_error: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def largest(self) -> Shape:
        return max(self.shapes, key=lambda s: (s.tokens, s.seq))

    @property
    def inexact(self) -> list[Path]:
        """Byte figures no exact basis was found for."""
        return [p for p, f in self.fits.items() if not f.exact and not _is_seconds(p)]

    @property
    def memory_residual(self) -> float:
        """The largest residual of an inexact byte figure, relative to the keep-all step's
        activation memory at the largest profiled shape (0.0 when every figure is exact)."""
        worst = max((self.fits[p].residual for p in self.inexact), default=0.0)
        _, activation = budget_base(self.template)
        return worst / activation if activation > 0 else 0.0

    @property
    def seconds_residual(self) -> float:
        """The largest relative residual of the time fits (noise in the measured times)."""
        scale = sum(f.scale for p, f in self.fits.items() if _is_seconds(p))
        worst = sum(f.residual for p, f in self.fits.items() if _is_seconds(p))
        return worst / scale if scale else 0.0

    def extrapolation(self, shape: Shape) -> float:
        """How far ``shape`` lies beyond the profiled ones: the larger ratio of its tokens and
        its seq to the largest profiled (1.0 or less: within)."""
        tokens = max(s.tokens for s in self.shapes)
        seqs = max(s.seq for s in self.shapes)
        ratio = shape.tokens / tokens
        if shape.seq and seqs:
            ratio = max(ratio, shape.seq / seqs)
        return ratio

    def trust(self, shape: Shape) -> list[str]:
        """Why estimates at ``shape`` should not be trusted (empty: no reason known)."""
        reasons = []
        factor = self.extrapolation(shape)
        if factor > MAX_EXTRAPOLATION:
            reasons.append(
                f"{factor:.0f}x beyond the largest profiled shape {self.largest} (trusted up to "
                f"{MAX_EXTRAPOLATION:.0f}x): profile at larger shapes"
            )
        # with long probes the added seq² terms over-predict the short shapes on purpose (an
        # upper bound up to the probe): there only an under-prediction counts
        probed = any(f.long_branch for f in self.fits.values())
        check = self.holdout_error
        if check is not None and (
            check < -MAX_HOLDOUT_ERROR or (check > MAX_HOLDOUT_ERROR and not probed)
        ):
            reasons.append(
                f"the fits missed the largest profiled shape by {self.holdout_error:+.1%} when "
                f"it was left out (trusted to {MAX_HOLDOUT_ERROR:.0%})"
            )
        hidden = self.hidden_branches(shape)
        if hidden:
            longest = max(s.seq for s in self.shapes)
            reasons.append(
                f"beyond the profiled seq {longest}: {len(hidden)} stage peak(s) (first: "
                f"{hidden[0]}) were fitted without a seq² term while the stage keeps seq² "
                f"bytes, so a seq² op may set them there: profile a batch-1 sample at seq "
                f"{shape.seq} too"
            )
        residual = self.memory_residual
        if residual > MAX_HOLDOUT_ERROR:
            reasons.append(
                f"memory figures fit the profiles only to {residual:.1%} of activation memory"
            )
        return reasons

    def hidden_branches(self, shape: Shape) -> list[str]:
        """Stage peaks that may be set by another op at ``shape``: beyond the longest profiled
        seq, a peak fitted without a ``seq²`` term in a stage whose saved bytes have one
        worth half that peak or more there (eager attention's probabilities: their gradient,
        as large, appears in the backward). Measured: a Llama with eager attention profiled
        to 2 x 64 has its kept blocks' backward peaks linear (270 KB at 2 x 256) while the
        scores' gradient there is 1.3 MB (``benchmarks/results/design-figures.md``, "Hidden
        seq² branches")."""
        if not shape.seq or shape.seq <= max(s.seq for s in self.shapes):
            return []
        quadratic = {"batch·seq²", "seq²"}
        found = []
        for index, stage in enumerate(self.template.stages):
            for option in stage.options:
                saved = self.fits.get((index, option, "saved_bytes"))
                if saved is None:
                    continue
                part = sum(
                    c * FEATURES[f](shape.batch, shape.seq)
                    for f, c in zip(saved.features, saved.coefficients, strict=True)
                    if f in quadratic and c > 0
                )
                for name in ("forward_peak_bytes", "backward_peak_bytes"):
                    peak = self.fits[(index, option, name)]
                    grows = peak.long_branch or any(
                        f in quadratic and c > 0
                        for f, c in zip(peak.features, peak.coefficients, strict=True)
                    )
                    if part > 0 and not grows and part >= 0.5 * peak(shape):
                        found.append(f"{stage.name} {option} {name.removesuffix('_bytes')}")
        return found

    def time_trust(self, shape: Shape) -> list[str]:
        """Why step times at ``shape`` should not be trusted (empty: no reason known)."""
        reasons = []
        check = self.time_holdout_error
        if check is None:
            reasons.append("no time check (fewer than five profiled shapes)")
        elif abs(check) > MAX_TIME_HOLDOUT_ERROR:
            reasons.append(
                f"the time fits missed the longest profiled seq by {check:+.0%} when it was left "
                f"out (trusted to {MAX_TIME_HOLDOUT_ERROR:.0%})"
            )
        factor = self.extrapolation(shape)
        if factor > MAX_EXTRAPOLATION:
            reasons.append(f"{factor:.0f}x beyond the largest profiled shape {self.largest}")
        return reasons

    def costs_at(self, shape: Shape) -> ChainCosts:
        """The chain's costs at ``shape``, from the fits (a ``ChainCosts`` like a profile's).

        Example:
            >>> from memfit.planning.costs import uniform_chain
            >>> shapes = [Shape(1, 32), Shape(2, 32), Shape(1, 64), Shape(4, 32), Shape(2, 64)]
            >>> fitted = fit_shapes(shapes, [uniform_chain(4, activation_bytes=1024 * s.tokens)
            ...                              for s in shapes])
            >>> fitted.costs_at(Shape(8, 64)).stages[1].output_bytes  # 1 KiB a token
            524288
        """
        values: dict[Path, Any] = {p: _value(p, fit, shape) for p, fit in self.fits.items()}
        stages = []
        for index, stage in enumerate(self.template.stages):
            menu = {
                option: replace(
                    costs,
                    **{
                        name: values[(index, option, name)]
                        for name in (*_OPTION_BYTES, *_OPTION_SECONDS)
                    },
                )
                for option, costs in stage.options.items()
            }
            stages.append(
                replace(
                    stage,
                    options=menu,
                    **{name: values[(index, name)] for name in (*_STAGE_BYTES, "nosave_forward_s")},
                )
            )
        digest = f"{self.template.fingerprint.partition('-')[0]}-{shape.batch}x{shape.seq}"
        return replace(
            self.template,
            stages=stages,
            fingerprint=digest,
            **{name: values[(name,)] for name in _CHAIN_BYTES},
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready: shapes, how many figures fit exactly, residuals, the holdout check."""
        byte_fits = [f for p, f in self.fits.items() if not _is_seconds(p)]
        return {
            "profiled_shapes": [[s.batch, s.seq] for s in self.shapes],
            "byte_figures": len(byte_fits),
            "exact_byte_figures": sum(f.exact for f in byte_fits),
            "memory_residual": self.memory_residual,
            "seconds_residual": self.seconds_residual,
            "holdout_error": self.holdout_error,
            "time_holdout_error": self.time_holdout_error,
            "time_basis": self.info.get("time_basis", ""),
            "bases": sorted({" + ".join(f.features) for f in byte_fits if f.features}),
        }


def scale_seconds(costs: ChainCosts, factor: float) -> ChainCosts:
    """``costs`` with every time figure multiplied by ``factor`` (bytes unchanged)."""
    stages = [
        replace(
            stage,
            nosave_forward_s=stage.nosave_forward_s * factor,
            options={
                name: replace(
                    option,
                    forward_s=option.forward_s * factor,
                    backward_s=option.backward_s * factor,
                )
                for name, option in stage.options.items()
            },
        )
        for stage in costs.stages
    ]
    return replace(costs, stages=stages)


def _common_options(profiles: Sequence[ChainCosts]) -> dict[int, list[str]]:
    first = profiles[-1]
    return {
        index: [
            option
            for option in stage.options
            if all(option in other.stages[index].options for other in profiles)
        ]
        for index, stage in enumerate(first.stages)
    }


def _check_same_chain(shapes: Sequence[Shape], profiles: Sequence[ChainCosts]) -> None:
    names = [tuple(s.name for s in costs.stages) for costs in profiles]
    for shape, stage_names in zip(shapes, names, strict=True):
        if stage_names != names[0]:
            raise ValueError(
                f"the chain differs between shapes: {shapes[0]} has stages "
                f"{list(names[0])[:4]}... ({len(names[0])}), {shape} has "
                f"{list(stage_names)[:4]}... ({len(stage_names)}); shape fits need one chain"
            )


def _fit_all(
    shapes: Sequence[Shape], profiles: Sequence[ChainCosts], probed: Sequence[Shape] | None = None
) -> tuple[ChainCosts, dict[Path, Fit], tuple[tuple[str, ...], float | None]]:
    options = _common_options(profiles)
    figures = [_figures(costs, options) for costs in profiles]
    # one basis for every time figure, checked on the plain step's total (the sum of many noisy
    # figures is far less noisy than any one of them)
    totals = [
        sum(v for p, v in figure.items() if len(p) == 3 and p[1] == KEEP and _is_seconds(p))
        for figure in figures
    ]
    # probes: given (the holdout keeps the full fit's), else found
    long = probes(shapes) if probed is None else [i for i, s in enumerate(shapes) if s in probed]
    # one basis and its check over every shape: the long shapes carry attention's seq² term
    basis, time_holdout = seconds_basis(shapes, totals)
    fits = {}
    for path in figures[0]:
        values = [figure[path] for figure in figures]
        if _is_seconds(path):
            fits[path] = fit_seconds(shapes, values, basis)
        else:
            fits[path] = fit_with_probes(shapes, values, long)
    reference = profiles[-1]
    stages = []
    for index, stage in enumerate(reference.stages):
        stages.append(
            replace(
                stage,
                options={o: stage.options[o] for o in options[index]},
                # a flag must hold at every shape to hold at all
                checkpointable=all(p.stages[index].checkpointable for p in profiles),
                joins_previous=all(p.stages[index].joins_previous for p in profiles),
                input_offloadable=all(p.stages[index].input_offloadable for p in profiles),
            )
        )
    return replace(reference, stages=stages), fits, (basis, time_holdout)


def _holdout(shapes: Sequence[Shape], profiles: Sequence[ChainCosts]) -> float | None:
    """Fit without the largest shape and predict it: the relative peak error (see
    :attr:`ShapeCosts.holdout_error`)."""

    if len(set(shapes)) < 4:
        return None
    long = set(probes(shapes))  # probes stay in: they are the long branch's evidence
    grid = [i for i in range(len(shapes)) if i not in long]
    last = max(grid, key=lambda i: (shapes[i].tokens, shapes[i].seq))
    rest = [i for i in range(len(shapes)) if shapes[i] != shapes[last]]
    template, fits, _ = _fit_all(
        [shapes[i] for i in rest], [profiles[i] for i in rest], [shapes[i] for i in long]
    )
    partial = ShapeCosts(template=template, shapes=tuple(shapes[i] for i in rest), fits=fits)
    predicted = partial.costs_at(shapes[last])
    measured = profiles[last]
    worst = 0.0
    for tree in (keep_all, recompute_all):
        truth = simulate(measured, tree(measured)).peak_bytes
        guess = simulate(predicted, tree(measured)).peak_bytes
        error = guess / truth - 1.0 if truth else 0.0
        if abs(error) > abs(worst):
            worst = error
    return worst


def fit_shapes(shapes: Sequence[Shape], profiles: Sequence[ChainCosts]) -> ShapeCosts:
    """Fit a chain's costs over profiles at several shapes.

    Args:
        shapes: the profiled shapes (at least two distinct ones; five or more give the
            extrapolation check).
        profiles: the costs measured at each shape, one chain (same stage names).

    Returns:
        The :class:`ShapeCosts`; options measured at every shape are kept, others dropped.

    Raises:
        ValueError: mismatched lengths, too few shapes, or chains that differ between shapes.

    Example:
        >>> from memfit.planning.costs import uniform_chain
        >>> shapes = [Shape(1, 32), Shape(2, 32), Shape(1, 64), Shape(4, 32), Shape(2, 64)]
        >>> chains = [uniform_chain(4, activation_bytes=1024 * s.tokens) for s in shapes]
        >>> fit_shapes(shapes, chains).costs_at(Shape(8, 64)).stages[1].output_bytes
        524288
    """
    if len(shapes) != len(profiles):
        raise ValueError(f"need one profile per shape; got {len(shapes)} and {len(profiles)}")
    if len(set(shapes)) < 2:
        raise ValueError(
            f"shape fits need profiles at two shapes at least; got {[str(s) for s in shapes]}"
        )
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i].tokens, shapes[i].seq))
    shapes = [shapes[i] for i in order]
    profiles = [profiles[i] for i in order]
    _check_same_chain(shapes, profiles)
    template, fits, (basis, time_holdout) = _fit_all(shapes, profiles)
    return ShapeCosts(
        template=template,
        shapes=tuple(shapes),
        fits=fits,
        holdout_error=_holdout(shapes, profiles),
        time_holdout_error=time_holdout,
        info={"time_basis": " + ".join(basis)},
    )


def largest_shape(
    fitted: ShapeCosts,
    budget_bytes: int,
    *,
    batch: int | None = None,
    seq: int | None = None,
    limit: int = 1 << 24,
) -> Shape | None:
    """The largest shape whose smallest feasible peak (every plan of the class, from the fits)
    fits ``budget_bytes``: the largest seq at ``batch``, or the largest batch at ``seq``.

    Assumes the peak grows with the size (every fitted figure does over its profiled range).
    ``None`` when even size 1 does not fit. Sizes are searched up to ``limit``.

    Raises:
        ValueError: not exactly one of ``batch`` and ``seq`` given.

    Example:
        >>> from memfit.planning.costs import uniform_chain
        >>> shapes = [Shape(1, 32), Shape(2, 32), Shape(1, 64), Shape(4, 32), Shape(2, 64)]
        >>> chains = [uniform_chain(4, activation_bytes=1024 * s.tokens) for s in shapes]
        >>> print(largest_shape(fit_shapes(shapes, chains), 64 * 2**20, batch=8))
        8 x 2389
    """

    if (batch is None) == (seq is None):
        raise ValueError("give exactly one of batch= (to find the seq) or seq= (the batch)")

    def shape(size: int) -> Shape:
        return Shape(batch, size) if batch is not None else Shape(size, seq or 0)

    def fits(size: int) -> bool:
        return min_peak_bytes(fitted.costs_at(shape(size))) <= budget_bytes

    if not fits(1):
        return None
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    if high > limit:
        return shape(low)
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return shape(low)


def plan_shape(
    fitted: ShapeCosts,
    shape: Shape,
    budget: Budget,
    *,
    strategy: str = "optimal",
    margin: float = 0.0,
) -> Plan:
    """Plan ``shape`` from the fits: evaluate them and solve (milliseconds, nothing runs).

    Args:
        fitted: the fits.
        shape: the batch's shape.
        budget: bytes of step peak, or a fraction of the step's activation memory at
            ``shape`` (the keep-all step's, from the fits).
        strategy: as for :func:`~memfit.planning.solve.solve`.
        margin: plan for ``(1 - margin)`` of the budget's activation share (the bytes above
            the held bytes), to absorb what the fits miss; the plan's ``budget_bytes`` stays the
            budget itself.

    Raises:
        InfeasibleBudgetError: no plan fits at this shape, naming the shape and the smallest
            feasible budget there.
    """

    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1); got {margin!r}")
    costs = fitted.costs_at(shape)
    held, activation = budget_base(costs)
    budget_bytes = budget.resolve(held, activation)
    target = budget_bytes
    if budget_bytes > held:
        target = held + int((budget_bytes - held) * (1.0 - margin))
    try:
        plan = solve(costs, target, strategy)
    except InfeasibleBudgetError as error:
        needed = held + math.ceil((error.min_feasible_bytes - held) / (1.0 - margin))
        message = infeasible_message(budget, budget_bytes, needed, held, activation)
        extra = f" with a margin of {margin:.1%}" if margin else ""
        raise InfeasibleBudgetError(
            budget_bytes,
            needed,
            error.detail,
            message=f"at shape {shape} (batch x seq){extra}: {message}",
        ) from None
    info = dict(plan.info) | {"shape": [shape.batch, shape.seq], "margin": margin}
    if margin:
        info["planned_for_bytes"] = target
    return replace(plan, budget_bytes=budget_bytes, info=info)
