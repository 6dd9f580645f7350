"""Profiles at a few shapes made from one sample, fitted to the shape: :func:`profile_shapes`.

The model is profiled (:func:`memfit.profile`) at a few shapes made from the sample
(:mod:`memfit.measuring.sample_shapes`: rows taken in turn, sequence positions spread), the plain
step is timed at every one of them in rounds, and every figure of the chain's costs is fitted as a
function of ``(batch, seq)`` (:mod:`memfit.planning.shape_costs`). :mod:`memfit.verbs.estimation` reads
the fits at shapes never run.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from memfit.measuring.sample_shapes import (
    SampleLayout,
    resize_sample,
    sample_layout,
    step_seconds_at,
)
from memfit.measuring.state import preserving_state
from memfit.planning.baselines import keep_all
from memfit.planning.costs import KEEP
from memfit.planning.plan import Plan
from memfit.planning.shape_costs import ShapeCosts, fit_shapes, scale_seconds
from memfit.planning.shape_fits import Shape
from memfit.planning.simulate import simulate
from memfit.runtime.apply import chain_of_plan, planned
from memfit.verbs.distributed import ranks
from memfit.verbs.profile_options import ProfileOptions
from memfit.verbs.profiling import profile_with

logger = logging.getLogger(__name__)

ShapesArg = Mapping[str, int | Sequence[int]] | Iterable[Shape | tuple[int, int]]


@dataclass(frozen=True, kw_only=True)
class ShapeProfile:
    """A model profiled at several shapes, with its costs fitted as functions of the shape.

    Attributes:
        fitted: the fits (:class:`~memfit.planning.shape_costs.ShapeCosts`).
        layout: where the sample's batch and sequence axes are.
        keep_output, accumulate: the training loop profiled (as in :func:`memfit.profile`).
        profile_s: seconds spent profiling.
        wall_per_cpu: the wall / CPU seconds factor every profile's times were put on (the
            median of the profiles' own: other processes' load moves it between shapes).
        calibration: shape -> the factor its stage times were scaled by, so that the
            keep-all step's total equals the plain step timed at every shape in rounds,
            without stage marks (empty: not calibrated, compiled blocks or several ranks).
    """

    fitted: ShapeCosts
    layout: SampleLayout
    keep_output: bool = True
    accumulate: bool = False
    profile_s: float = 0.0
    wall_per_cpu: float = 1.0
    calibration: Mapping[Shape, float] = field(default_factory=dict)


def default_profile_shapes(
    shape: Shape, longest_seq: int | None = None, max_seq: int | None = None
) -> list[Shape]:
    """The shapes profiled by default, from the sample's own ``shape``.

    A grid, batches ``B/2`` and ``B`` (``1`` and ``2`` for a batch of one) by seqs ``S/8``,
    ``S/4``, ``S/2``, ``S``, and a ladder: the grid's largest tokens at longer seqs, the batch
    halved as the seq doubles (``B/2 x 2S``, ``B/4 x 4S``; as far as the batch halves to 1).
    Shapes of equal tokens and other seqs tell the time fits the tokens term from attention's
    ``batch·seq²`` one (measured, see :func:`~memfit.planning.shape_fits.seconds_basis`), and the
    longer seqs are where the step time grows fastest. With ``longest_seq`` (the longest seq
    an estimate is asked for) the ladder goes on towards it while the batch allows; it never
    goes beyond ``max_seq`` (a model's position limit). A rung holds the sample's tokens, but
    eager attention's scores grow with ``seq²``: ``B/4 x 4S`` keeps four times the sample's.
    Without a sequence axis: batches ``B/4``, ``B/2``,
    ``3B/4``, ``B`` (more when ``B`` is small).

    Example:
        >>> default_profile_shapes(Shape(2, 128))[-1]
        Shape(batch=1, seq=256)
    """
    batch, seq = shape.batch, shape.seq
    if not seq:
        sizes = sorted({max(1, batch * k // 4) for k in (1, 2, 3, 4)} | {batch})
        while len(sizes) < 4:
            sizes.append(sizes[-1] + batch)
        return [Shape(b, 0) for b in sizes]
    batches = sorted({max(1, batch // 2), batch}) if batch > 1 else [1, 2]
    seqs = sorted({max(1, seq // 8), max(1, seq // 4), max(1, seq // 2), seq})
    grid = [Shape(b, s) for b in batches for s in seqs]
    top = batches[-1]
    rung = 1
    while (
        top >> rung >= 1
        and (max_seq is None or seq << rung <= max_seq)
        and (rung <= 2 or seq << (rung - 1) < (longest_seq or 0))
    ):
        grid.append(Shape(top >> rung, seq << rung))
        rung += 1
    return grid


def position_limit(model: nn.Module) -> int | None:
    """The longest seq a model's config says its positions reach (Hugging Face's
    ``n_positions`` or ``max_position_embeddings``), or ``None``."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _option_names(prof: Any) -> list[str]:
    names = {name for stage in prof.costs.stages for name in stage.options}
    return sorted(names - {KEEP})


def profile_shapes(
    model: nn.Module,
    sample: Any,
    *,
    shapes: Iterable[Shape | tuple[int, int]] | None = None,
    longest_seq: int | None = None,
    **profile_options: Any,
) -> ShapeProfile:
    """Profile ``model`` at a few shapes made from ``sample`` and fit its costs to the shape.

    Args:
        model: the model, in training mode.
        sample: a tuple of positional or a dict of keyword arguments; its batch is dim 0 of
            its tensors, its sequence dim 1 of its token ids (see
            :mod:`memfit.measuring.sample_shapes`).
        shapes: ``(batch, seq)`` pairs to profile; default :func:`default_profile_shapes`
            (eight shapes up to the sample's own, and the sample's tokens at two longer seqs).
            At least two; five or more give the fits' extrapolation checks. Shapes larger than
            the sample repeat its rows and positions. The default's longer seqs stop at the
            model's position limit where its config names one (``n_positions``,
            ``max_position_embeddings``), and one that fails to run is left out with a
            warning (positions a model without such a config cannot take).
        longest_seq: with the default shapes, the longest seq the fits will be asked about:
            the ladder of longer seqs goes on towards it (see :func:`default_profile_shapes`).
        **profile_options: passed to :func:`memfit.profile` (``keep_output``,
            ``accumulate``, ``repeats``, ``loss_fn``, ...). ``options`` defaults to ``()``
            here (keep and recompute: a quick profile per shape); ``options="auto"`` adds
            rebuild and selective options, chosen at the largest shape and measured at every
            shape (several times slower).

    Returns:
        A :class:`ShapeProfile`.

    Raises:
        ValueError: the sample has no batch axis, or shapes ask for a sequence it lacks.

    Example:
        >>> shaped = memfit.profile_shapes(model, {"input_ids": ids, "labels": ids})
        >>> shaped.fitted.summary()["holdout_error"]
    """
    return shape_profile_with(
        model,
        sample,
        shapes=shapes,
        longest_seq=longest_seq,
        options=shape_profile_options(**profile_options),
    )


def shape_profile_options(**profile_options: Any) -> ProfileOptions:
    """:func:`profile_shapes`'s ``profile_options`` as one value: ``options`` ``()`` unless
    given; ``repeats`` ``None`` unless given above 0 (then 3 at each shape, see
    :func:`shape_profile_with`).

    Raises:
        ValueError, TypeError: as :func:`memfit.profile` for the same options.
    """
    repeats = profile_options.pop("repeats", None) or None
    return ProfileOptions.of(**{"options": (), **profile_options, "repeats": repeats})


@preserving_state
def shape_profile_with(
    model: nn.Module,
    sample: Any,
    *,
    shapes: Iterable[Shape | tuple[int, int]] | None,
    longest_seq: int | None,
    options: ProfileOptions,
) -> ShapeProfile:
    """:func:`profile_shapes` with its profile options in one value
    (:func:`shape_profile_options`): each shape profiled with them, its ``repeats`` timed
    steps (3 for ``None``) and twice as many at the larger shapes."""
    options.loop.check(model, sample)
    layout = sample_layout(sample)
    if shapes is None:
        chosen = default_profile_shapes(layout.shape, longest_seq, position_limit(model))
        optional = {shape for shape in chosen if shape.seq > layout.shape.seq}
    else:
        chosen, optional = parse_shapes(shapes, layout), set()
    if len(set(chosen)) < 2:
        raise ValueError(f"profile shapes need two distinct shapes at least; got {chosen}")
    order = sorted(set(chosen), key=lambda s: (s.tokens, s.seq), reverse=True)
    started = time.perf_counter()
    profiles = {}
    menu = options.options
    repeats = int(options.repeats or 3)
    for shape in order:  # the largest first: its options are measured at every shape
        # the larger shapes carry the time fits' slope: twice the timed steps there
        twice = 2 * shape.tokens >= order[0].tokens
        at_shape = replace(options, options=menu, repeats=2 * repeats if twice else repeats)
        try:
            prof = profile_with(model, resize_sample(sample, shape, layout), at_shape)
        except Exception as error:
            if shape not in optional:
                raise
            logger.warning("memfit: shape %s left out of the shape profile: %s", shape, error)
            continue
        if isinstance(menu, str):
            menu = tuple(_option_names(prof))
        profiles[shape] = prof
    shapes_ = list(profiles)
    # each profile turned CPU seconds into wall seconds by its own wall/CPU factor, which
    # other processes' load moves from shape to shape: one factor (the median) for all
    factors = {s: float(profiles[s].info.get("wall_per_cpu", 1.0)) for s in shapes_}
    common = statistics.median(factors.values())
    costs = {s: scale_seconds(profiles[s].costs, common / factors[s]) for s in shapes_}
    first = profiles[shapes_[0]]  # the largest profiled
    measured = first.measurement
    calibration = {}
    if _calibrates(first, options):
        # the plain step timed at every shape in rounds, without stage marks: each profile's
        # stage times are scaled to it (the marks' own cost out, one machine state for all)
        plan = _keep_plan(first.costs)
        samples = {s: resize_sample(sample, s, layout) for s in shapes_}
        with warnings.catch_warnings(), planned(model, chain_of_plan(model, plan), plan):
            warnings.simplefilter("ignore", UserWarning)  # HF checkpointing: restored after
            steps = step_seconds_at(
                model,
                samples,
                rounds=2 * repeats + 1,
                loop=options.loop,
            )
        for shape in shapes_:
            total = simulate(costs[shape], keep_all(costs[shape])).step_s
            if total > 0 and steps[shape] > 0:
                calibration[shape] = steps[shape] * common / total
                costs[shape] = scale_seconds(costs[shape], calibration[shape])
    return ShapeProfile(
        fitted=fit_shapes(shapes_, [costs[s] for s in shapes_]),
        layout=layout,
        keep_output=measured.keep_output,
        accumulate=measured.accumulate,
        profile_s=time.perf_counter() - started,
        wall_per_cpu=common,
        calibration=calibration,
    )


def _keep_plan(costs: Any) -> Plan:
    """Every stage kept, as a plan: the profile's keep way (HF decoders without their cache)."""
    return Plan.from_tree([stage.name for stage in costs.stages], keep_all(costs), "none")


def _calibrates(prof: Any, options: ProfileOptions) -> bool:
    """Whether the stage times are scaled to unmarked steps: not for compiled blocks (the
    step would run them uncompiled) nor across ranks (each rank's own scale would give the
    ranks other plans; their merged profile is the slowest rank's)."""
    return prof.compile is None and ranks(options.distributed) <= 1


def parse_shapes(shapes: ShapesArg, layout: SampleLayout) -> list[Shape]:
    """Shapes (checked against the sample's ``layout``) from ``[(batch, seq), ...]`` or ``{"batch": 8, "seq": [512, 1024]}``."""
    if isinstance(shapes, Mapping):
        unknown = sorted(set(shapes) - {"batch", "seq"})
        if unknown:
            raise ValueError(
                f"shapes as a dict takes the keys 'batch' and 'seq' (an int or a list each); "
                f"got {unknown}"
            )

        def sizes(key: str, default: int) -> list[int]:
            value = shapes.get(key, default)
            return [value] if isinstance(value, int) else list(value)

        pairs: list[Any] = [
            (b, s)
            for b in sizes("batch", layout.shape.batch)
            for s in sizes("seq", layout.shape.seq)
        ]
    else:
        pairs = list(shapes)
    out = []
    for pair in pairs:
        if isinstance(pair, Shape):
            out.append(pair)
            continue
        if not (
            isinstance(pair, tuple | list)
            and len(pair) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in pair)
        ):
            raise ValueError(
                f"a shape is a (batch, seq) pair of ints, e.g. (8, 1024); got {pair!r}"
            )
        out.append(Shape(int(pair[0]), int(pair[1])))
    for shape in out:
        if shape.seq and not layout.has_seq:
            raise ValueError(
                f"shape {shape} asks for a sequence length, but the sample has no sequence "
                f"axis (expected token ids of shape (batch, seq)); give (batch, 0)"
            )
        if not shape.seq and layout.has_seq:
            raise ValueError(
                f"shape {shape} has no sequence length; the sample's tokens are "
                f"{layout.shape.seq} long: give (batch, seq) with seq >= 1"
            )
    if not out:
        raise ValueError("shapes is empty; give (batch, seq) pairs such as [(8, 1024)]")
    return out
