"""Costs as functions of the batch's shape: fits over profiles at a few shapes (no torch here).

Every figure of a :class:`~memfit.planning.costs.ChainCosts` (each stage's tensor sizes, saved
bytes, peaks and seconds, per option; the held bytes; the checkpoint and side-input bytes) is
fitted as a function of the shape ``(batch, seq)`` by least squares over the profiled shapes, on
a basis chosen per figure from a few features:

* bytes: the smallest subset of ``1, tokens, batch·seq², seq, batch, seq²`` (in that order of
  preference; ``tokens = batch·seq``) that reproduces every profiled value exactly (to a few
  bytes: the CPU meter counts bytes, and tensor sizes are products of the shape). Activations
  are linear in tokens, eager attention's scores quadratic in ``seq`` per sample, a causal mask
  or position table may be shared by the batch. A figure that is a maximum of such terms (a
  peak whose op changes with the size) fits no subset over all shapes: it is fitted on the
  larger shapes only (the branch that holds further out), and failing that by least squares
  over ``1, tokens, batch·seq²``, marked inexact;
* seconds: non-negative least squares (all coefficients >= 0, so that no time goes negative
  out of range) over ``1, tokens, batch·seq²`` (``1, tokens`` with one seq), checked on the
  plain step's total by extrapolation (:func:`seconds_basis`).

:class:`ShapeCosts` holds the fits and gives a synthetic ``ChainCosts`` at any shape
(:meth:`ShapeCosts.costs_at`), which the simulator and every solver read as they read measured
ones: planning an unseen shape is evaluating the fits plus one DP (milliseconds).

Known limits: a fit is only as good as the profiled shapes cover the model's behaviour (an
attention kernel that changes algorithm above some length, an allocator's rounding); the
fit's residuals and an extrapolation check (:attr:`ShapeCosts.holdout_error`) say how far to
trust it, and :meth:`ShapeCosts.trust` refuses shapes too far beyond the profiled ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from memfit.errors import InfeasibleBudgetError
from memfit.planning.baselines import keep_all, recompute_all
from memfit.planning.costs import KEEP, ChainCosts
from memfit.planning.plan import Plan
from memfit.planning.simulate import budget_base, simulate
from memfit.planning.solve import min_peak_bytes, solve
from memfit.units import Budget, infeasible_message

FEATURES: dict[str, Callable[[int, int], float]] = {
    "1": lambda batch, seq: 1.0,
    "tokens": lambda batch, seq: float(batch * seq),
    "batch·seq²": lambda batch, seq: float(batch * seq * seq),
    "seq": lambda batch, seq: float(seq),
    "batch": lambda batch, seq: float(batch),
    "seq²": lambda batch, seq: float(seq * seq),
}
BYTES_FEATURES = ("1", "tokens", "batch·seq²", "seq", "batch", "seq²")
SECONDS_FEATURES = ("1", "tokens", "batch·seq²")
# a byte figure fits exactly when every profiled value is reproduced within this many bytes, or
# this fraction of the figure's largest value (float rounding of large products)
EXACT_BYTES = 16
EXACT_FRACTION = 1e-6
# beyond this factor over the largest profiled tokens (or seq), estimates are not trusted
MAX_EXTRAPOLATION = 16.0
# shapes beyond a basis's size that must agree with it for it to count as exact
CHECKS = 2
# an extrapolation check worse than this marks the fit as not trusted
MAX_HOLDOUT_ERROR = 0.05
# the same for step times (the goal for them: within 15%)
MAX_TIME_HOLDOUT_ERROR = 0.15


@dataclass(frozen=True, slots=True, order=True)
class Shape:
    """A batch's shape: ``batch`` samples of ``seq`` tokens (``seq`` 0: no sequence axis)."""

    batch: int
    seq: int

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 0:
            raise ValueError(f"a shape has batch >= 1 and seq >= 0; got {self.batch} x {self.seq}")

    @property
    def tokens(self) -> int:
        return self.batch * max(self.seq, 1)

    def __str__(self) -> str:
        return f"{self.batch} x {self.seq}" if self.seq else f"batch {self.batch}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Fit:
    """One figure as a function of the shape.

    Attributes:
        features: the basis (names from :data:`FEATURES`).
        coefficients: one per feature.
        exact: every value it was fitted on is reproduced (bytes: within :data:`EXACT_BYTES`).
        residual: the largest absolute residual over the shapes it was fitted on.
        scale: the largest absolute value it was fitted on (to read the residual against).
        points: how many profiled shapes it was fitted on (the larger ones when fewer than all).
        long_coefficient, long_from_seq: a term ``long_coefficient·batch·(seq² -
            long_from_seq²)`` beyond ``long_from_seq`` (nothing below it), added to reach
            long probes (see :func:`fit_with_probes`): the fit is then an upper bound between
            the grid's longest seq and the probe's.
    """

    features: tuple[str, ...]
    coefficients: tuple[float, ...]
    exact: bool
    residual: float
    scale: float
    points: int
    long_coefficient: float = 0.0
    long_from_seq: int = 0

    def __call__(self, shape: Shape) -> float:
        value = sum(
            c * FEATURES[f](shape.batch, shape.seq)
            for f, c in zip(self.features, self.coefficients, strict=True)
        )
        if self.long_coefficient and shape.seq > self.long_from_seq:
            value += self.long_coefficient * shape.batch * (shape.seq**2 - self.long_from_seq**2)
        return value

    @property
    def long_branch(self) -> bool:
        """A long-probe term was added (:func:`fit_with_probes`)."""
        return self.long_coefficient > 0

    @property
    def relative_residual(self) -> float:
        return self.residual / self.scale if self.scale else 0.0

    def describe(self) -> str:
        """``"12 + 1024·tokens"``: the fit as a formula."""
        terms = [
            f"{c:.4g}" if f == "1" else f"{c:.4g}·{f}"
            for f, c in zip(self.features, self.coefficients, strict=True)
            if c
        ]
        if self.long_branch:
            terms.append(f"{self.long_coefficient:.4g}·batch·(seq² - {self.long_from_seq}²)⁺")
        return " + ".join(terms) or "0"


def _matrix(shapes: Sequence[Shape], features: Sequence[str]) -> np.ndarray:
    return np.array(
        [[FEATURES[f](s.batch, s.seq) for f in features] for s in shapes], dtype=np.float64
    ).reshape(len(shapes), len(features))


def _lstsq(
    shapes: Sequence[Shape], values: np.ndarray, features: Sequence[str]
) -> tuple[np.ndarray, float]:
    if not features:
        return np.zeros(0), float(np.max(np.abs(values))) if len(values) else 0.0
    matrix = _matrix(shapes, features)
    # columns scaled to unit size: tokens² reach 1e10 next to a constant 1
    norms = np.maximum(np.abs(matrix).max(axis=0), 1e-300)
    solution, *_ = np.linalg.lstsq(matrix / norms, values, rcond=None)
    coefficients = solution / norms
    residual = float(np.max(np.abs(matrix @ coefficients - values))) if len(values) else 0.0
    return coefficients, residual


def fit_bytes(shapes: Sequence[Shape], values: Sequence[float]) -> Fit:
    """Fit a byte figure: the smallest exact basis (see the module docstring).

    A basis of ``k`` features is accepted only when at least ``k + 2`` distinct shapes check
    it (a basis as large as the data fits anything). Without an exact basis over all shapes, the
    smallest shapes are dropped one by one (a peak made by another op at small sizes); without
    one at all, least squares over ``1, tokens, batch·seq²`` on all shapes, marked inexact.

    Example:
        >>> shapes = [Shape(1, 32), Shape(2, 32), Shape(1, 64)]
        >>> fit_bytes(shapes, [100 + 4 * s.tokens for s in shapes]).describe()
        '100 + 4·tokens'
    """
    if len(shapes) != len(values) or not shapes:
        raise ValueError(f"need one value per shape; got {len(shapes)} shapes, {len(values)}")
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i].tokens, shapes[i].seq))
    ordered = [shapes[i] for i in order]
    array = np.array([values[i] for i in order], dtype=np.float64)
    scale = float(np.max(np.abs(array)))
    tolerance = max(EXACT_BYTES, EXACT_FRACTION * scale)
    if float(np.max(array) - np.min(array)) <= tolerance:  # constant: no need to look further
        constant = float(array[-1])
        residual = float(np.max(np.abs(array - constant)))
        return Fit(
            features=("1",) if constant else (),
            coefficients=(constant,) if constant else (),
            exact=True,
            residual=residual,
            scale=scale,
            points=len(array),
        )
    # the smallest basis first, over all the larger-shape subsets, so that dropping shapes
    # never buys a bigger basis that fits by having as many coefficients as shapes
    for size in range(1, len(BYTES_FEATURES) + 1):
        for drop in range(len(ordered)):
            kept, kept_values = ordered[drop:], array[drop:]
            if len(set(kept)) < size + CHECKS:
                break
            if drop and len({s.tokens for s in kept}) <= size:
                # larger shapes of few token counts (the default shapes' ladder holds the
                # sample's tokens at every rung) check no token term: measured, a constant
                # over the three 256-token shapes of a BERT config's 4 x 64 profile stood in
                # for its held bytes, 278,900 + 24·tokens (18 KB low at 16 x 64), and for
                # two peaks of its embedding and head (plans at 16 x 64 then +10% high)
                continue
            for features in itertools.combinations(BYTES_FEATURES, size):
                coefficients, residual = _lstsq(kept, kept_values, features)
                if residual <= tolerance:
                    return Fit(
                        features=features,
                        coefficients=tuple(float(c) for c in coefficients),
                        exact=True,
                        residual=residual,
                        scale=scale,
                        points=len(kept),
                    )
    features = tuple(f for f in SECONDS_FEATURES if f != "batch·seq²" or _varies(ordered))
    coefficients, residual = _lstsq(ordered, array, features)
    return Fit(
        features=features,
        coefficients=tuple(float(c) for c in coefficients),
        exact=False,
        residual=residual,
        scale=scale,
        points=len(ordered),
    )


def _varies(shapes: Sequence[Shape]) -> bool:
    """Whether the shapes tell ``tokens`` from ``batch·seq²`` (more than one seq)."""
    return len({s.seq for s in shapes}) > 1


def probes(shapes: Sequence[Shape]) -> list[int]:
    """Indices of the long probes among ``shapes``: seqs beyond the longest one profiled at
    two batch sizes or more (a batch-1 sample at the longest seq a user trains, say)."""
    batches: dict[int, set[int]] = {}
    for shape in shapes:
        batches.setdefault(shape.seq, set()).add(shape.batch)
    grid = [seq for seq, sizes in batches.items() if len(sizes) > 1]
    if not grid or not _varies(shapes):
        return []
    return [i for i, shape in enumerate(shapes) if shape.seq > max(grid)]


def fit_with_probes(shapes: Sequence[Shape], values: Sequence[float], long: Sequence[int]) -> Fit:
    """Fit a byte figure over a grid plus long probes (:func:`probes`).

    A peak is a maximum over a stage's events, and the event that wins at long sequences (the
    attention scores' gradient, ``batch·seq²``) may lose at every grid shape: the grid's fit
    then misses it. Where one exact basis holds for grid and probes alike, that is the fit;
    else the grid's fit plus ``c·batch·(seq² - G²)`` beyond the grid's longest seq ``G``
    (nothing up to it, where the grid's fit holds), with ``c`` the largest excess at a probe
    over its ``batch·(seq² - G²)``. Between ``G`` and the probe's seq ``P`` the term is an
    upper bound when the long branch is ``q·batch·seq²`` and the grid's ``l·batch·seq`` per
    sample: the difference of the term and the true excess is concave in ``seq``, at least
    zero at ``G`` (the grid branch wins there) and zero at ``P``. Beyond ``P`` it is not.

    The first version added ``c·batch·seq²`` at every seq, lifting the grid's own seqs too
    (``(s / S)²`` of the excess per sample); the default shapes' ladder makes every profile
    hold such probes (its rungs).
    """
    whole = fit_bytes(shapes, values)
    if whole.exact or not long:
        return whole
    grid = [i for i in range(len(shapes)) if i not in set(long)]
    base = fit_bytes([shapes[i] for i in grid], [values[i] for i in grid])
    tolerance = max(EXACT_BYTES, EXACT_FRACTION * base.scale)
    if max(values[i] - base(shapes[i]) for i in long) <= tolerance:
        return base  # the probes hold no branch the grid missed
    edge = max(shapes[i].seq for i in grid)
    extra = max(
        (values[i] - base(shapes[i])) / (shapes[i].batch * (shapes[i].seq ** 2 - edge**2))
        for i in long
    )
    fit = replace(
        base,
        residual=0.0,
        scale=float(np.max(np.abs(values))),
        points=len(shapes),
        long_coefficient=extra,
        long_from_seq=edge,
    )
    residual = max(abs(fit(shape) - value) for shape, value in zip(shapes, values, strict=True))
    return replace(fit, residual=residual)


def _nnls(shapes: Sequence[Shape], values: np.ndarray, features: Sequence[str]) -> np.ndarray:
    """Non-negative least squares over ``features`` (few of them): the best least-squares
    solution among the feature subsets whose coefficients are all >= 0 (the NNLS optimum is
    the plain solution on its own support), as coefficients over all ``features``."""
    best: tuple[float, np.ndarray] | None = None
    for size in range(len(features), 0, -1):
        for subset in itertools.combinations(range(len(features)), size):
            coefficients, _ = _lstsq(shapes, values, [features[i] for i in subset])
            if np.any(coefficients < 0):
                continue
            full = np.zeros(len(features))
            full[list(subset)] = coefficients
            error = float(np.sum((_matrix(shapes, features) @ full - values) ** 2))
            if best is None or error < best[0]:
                best = (error, full)
    return np.zeros(len(features)) if best is None else best[1]


def seconds_basis(
    shapes: Sequence[Shape], totals: Sequence[float]
) -> tuple[tuple[str, ...], float | None]:
    """The basis for time figures and its extrapolation check on the step's total.

    The basis is ``1 + tokens + batch·seq²`` when the shapes have more than one seq, else
    ``1 + tokens``: every attention has a term in ``batch·seq²`` (the scores), and the fits'
    non-negative least squares drop it where the data do not carry it. The check fits the
    totals without the shapes of the longest profiled seq (with one seq: the most tokens) and
    predicts them; it returns the signed worst relative miss there (``None``: fewer than five
    shapes).

    Measured on CPU (HF GPT-2, Llama and BERT configs, 4 layers, width 64, one thread, 33
    shapes each up to 8 x 256 and 2 x 512, every fit held against steps measured at 2-4x its
    largest profiled tokens): choosing between ``1 + tokens`` and the quadratic basis by this
    same check kept ``1 + tokens`` on noise for Llama (SDPA: attention is a few percent of a
    short step) and predicted 2-4x along the seq 22-49% low; the quadratic basis always
    brought 88 of 129 cells within 15% to 117 (with shapes of equal tokens at longer seqs
    among the profiled ones, :func:`memfit.shape_profiles.default_profile_shapes`).
    """
    array = np.array(totals, dtype=np.float64)
    linear = ("1", "tokens")
    basis = (*linear, "batch·seq²") if _varies(shapes) else linear
    if len(set(shapes)) < 5:
        return basis, None
    if _varies(shapes):
        longest = max(s.seq for s in shapes)
        held = [i for i, s in enumerate(shapes) if s.seq == longest]
    else:
        held = [max(range(len(shapes)), key=lambda i: shapes[i].tokens)]
    rest = [i for i in range(len(shapes)) if i not in held]
    rest_shapes = [shapes[i] for i in rest]
    features = basis if _varies(rest_shapes) else linear
    coefficients = _nnls(rest_shapes, array[rest], features)
    predicted = _matrix([shapes[i] for i in held], features) @ coefficients
    errors = [p / t - 1.0 if t > 0 else 0.0 for p, t in zip(predicted, array[held], strict=True)]
    return basis, max(errors, key=abs)


def fit_seconds(
    shapes: Sequence[Shape], values: Sequence[float], features: Sequence[str] | None = None
) -> Fit:
    """Fit seconds: non-negative least squares (all coefficients >= 0, so times stay positive
    out of range) over ``features``, by default the basis :func:`seconds_basis` picks.

    Example:
        >>> shapes = [Shape(1, 32), Shape(2, 32), Shape(1, 64), Shape(2, 64)]
        >>> fit = fit_seconds(shapes, [0.001 + 1e-5 * s.tokens for s in shapes])
        >>> round(fit(Shape(4, 64)), 6)
        0.00356
    """
    if len(shapes) != len(values) or not shapes:
        raise ValueError(f"need one value per shape; got {len(shapes)} shapes, {len(values)}")
    array = np.array(values, dtype=np.float64)
    scale = float(np.max(np.abs(array)))
    if features is None:
        features = seconds_basis(shapes, values)[0]
    features = tuple(f for f in features if f != "batch·seq²" or _varies(shapes))
    coefficients = _nnls(shapes, array, features)
    kept = tuple(f for f, c in zip(features, coefficients, strict=True) if c > 0)
    values_kept = tuple(float(c) for c in coefficients if c > 0)
    residual = float(np.max(np.abs(_matrix(shapes, features) @ coefficients - array)))
    return Fit(
        features=kept,
        coefficients=values_kept,
        exact=residual <= 1e-12,
        residual=residual,
        scale=scale,
        points=len(shapes),
    )


# ----- a whole chain -------------------------------------------------------------------------

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
)
_CHAIN_BYTES = (
    "held_bytes",
    "gradient_bytes",
    "checkpoint_bytes",
    "side_input_bytes",
    "side_grad_bytes",
)
# figures that are never negative (the others are level changes)
_NON_NEGATIVE = {
    "forward_peak_bytes",
    "backward_peak_bytes",
    "input_bytes",
    "output_bytes",
    "nosave_forward_peak_bytes",
    "tail_bytes",
    "offload_bytes",
    "released_input_bytes",
    "nosave_held_bytes",
    *_CHAIN_BYTES,
}


def _figures(costs: ChainCosts, options: Mapping[int, Sequence[str]]) -> dict[Path, float]:
    """Every number of ``costs`` the fits cover, by path (options: those common to all)."""
    out: dict[Path, float] = {(name,): float(getattr(costs, name)) for name in _CHAIN_BYTES}
    for index, stage in enumerate(costs.stages):
        for name in (*_STAGE_BYTES, "nosave_forward_s"):
            out[(index, name)] = float(getattr(stage, name))
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
        scores' gradient there is 1.3 MB."""
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
            >>> costs = fitted.costs_at(Shape(8, 1024))
            >>> solve(costs, budget_bytes, "optimal").predicted_peak_bytes
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
        >>> fitted = fit_shapes([Shape(1, 32), Shape(2, 32), Shape(1, 64)], [c1, c2, c3])
        >>> fitted.costs_at(Shape(4, 256)).held_bytes
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
        >>> largest_shape(fitted, 8 * 2**30, batch=8)
        Shape(batch=8, seq=3072)
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
