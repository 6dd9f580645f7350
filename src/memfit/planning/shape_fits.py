"""Fits of one figure as a function of the batch's shape ``(batch, seq)`` (no torch here).

A figure is fitted by least squares over the profiled shapes, on a basis chosen per figure
from a few features:

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

:mod:`memfit.planning.shape_costs` fits every figure of a chain's costs with these.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

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
# shapes beyond a basis's size that must agree with it for it to count as exact
CHECKS = 2


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
        >>> shapes = [Shape(1, 32), Shape(2, 32), Shape(1, 64), Shape(4, 32)]
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
                # sample's tokens at every rung) check no token term: on a BERT config a
                # constant over three 256-token shapes stood in for token terms, and plans at
                # 16 x 64 were then +10% high (benchmarks/results/design-figures.md, "Token
                # terms of byte fits")
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
    The default shapes' ladder makes every profile hold such probes (its rungs).
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
    the plain solution on its own support), as coefficients over all ``features``. Exact for
    the two or three features the fits use, and no dependency: ``scipy.optimize.nnls`` would
    be memfit's only use of SciPy."""
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

    Why always the quadratic basis when the seq varies, rather than choosing by this check:
    the check kept ``1 + tokens`` on noise for Llama (SDPA: attention is a few percent of a
    short step), which then predicted 2-4x along the seq 22-49% low; the quadratic basis
    brought 117 of 129 cells within 15% instead of 88 (HF GPT-2, Llama and BERT configs on
    CPU, with shapes of equal tokens at longer seqs among the profiled ones,
    :func:`memfit.verbs.shape_profiles.default_profile_shapes`; conditions in
    ``benchmarks/results/design-figures.md``, "Time basis of shape fits").
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
