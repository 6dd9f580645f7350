"""``memfit.profile``: find the model's chain and measure every stage under every option.

Every way of running the blocks (keep, recompute, each option) is timed in turns and metered once;
the readings become the :class:`~memfit.measuring.Profile` the planner reads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from memfit.errors import UnsupportedModelError
from memfit.measuring.chain import Chain, find_chain
from memfit.measuring.clock import profiler_share, wall_factor, wall_scaled
from memfit.measuring.library_blocks import coverage_note, find_blocks
from memfit.measuring.offload import SavedActivations, host_bandwidth, saved_activations
from memfit.measuring.ops import (
    candidate_policies,
    profile_ops,
    selective_detail,
    timed_policies,
)
from memfit.measuring.profile import Profile, build_profile, no_gradient
from memfit.measuring.readings import StageReading
from memfit.measuring.run import measure_stages, stage_clock, stages_without_gradient
from memfit.measuring.state import preserving_state
from memfit.measuring.step import LossFn, split_sample
from memfit.planning.costs import CHECKPOINT, KEEP
from memfit.planning.offload import with_offload
from memfit.planning.plan import Plan, Stage, recompute_one
from memfit.runtime import (
    REBUILD,
    REBUILD_LINEAR,
    REBUILD_OPS,
    recording,
    saved_ops,
)
from memfit.runtime.apply import planned, refuse_planned
from memfit.runtime.compiled import (
    blocks_compiled,
    compiled_blocks,
    refuse_compiled_model,
)
from memfit.runtime.compress import compress_format, compress_log, is_compress
from memfit.runtime.head import (
    HEAD_OPTIONS,
    head_usage,
)
from memfit.runtime.hf_switches import hf_checkpointing_off, refuse_layerdrop
from memfit.runtime.options import is_exact, is_selective
from memfit.verbs.distributed import agree, describe_sample, merge_profiles, rank0, ranks
from memfit.verbs.menu import (
    NO_LOSS,
    OFFLOAD_NOTE,
    TIMED_NOTE,
    Menu,
    compiled_menu,
    menu_for,
)
from memfit.verbs.profile_options import Blocks, ProfileOptions
from memfit.verbs.verification import group_errors, parameter_groups, seeded_gradients

logger = logging.getLogger(__name__)

RECOMPUTE = "recompute"


def _chain(model: nn.Module, sample: Any, blocks: Blocks) -> tuple[Chain, list[str]]:
    """The chain to profile and notes on how it was chosen: ``blocks=`` as named, else the
    model's real blocks (:func:`~memfit.measuring.library_blocks.find_blocks`)."""
    args, kwargs = split_sample(sample)

    def run() -> Any:
        return model(*args, **kwargs)

    if blocks is not None:
        return find_chain(model, run, blocks), []
    return find_blocks(model, run)


def _head_way(chain: Chain, option: str) -> Plan:
    """Every block kept, the last stage (head and loss) run with ``option``."""
    last = len(chain) - 1
    tree = tuple(Stage(i, option if i == last else KEEP) for i in range(len(chain)))
    return Plan.from_tree(chain.stage_names, tree, f"<post> {option}")


def _every_block(
    chain: Chain, option: str | None, head: str | None = None, kept: frozenset[int] = frozenset()
) -> Plan:
    """Every block run with ``option`` (``None``: each recomputed on its own), but the stages
    in ``kept`` (the blocks no gradient reaches, which every plan keeps); the last stage (head
    and loss) with ``head``, or kept."""
    blocks = [chain.block_of_stage(i) is not None and i not in kept for i in range(len(chain))]
    tree = [
        (recompute_one(i) if option is None else Stage(i, option)) if block else Stage(i)
        for i, block in enumerate(blocks)
    ]
    strategy = "all" if option is None else f"every block {option}"
    if head is not None:
        tree[-1] = Stage(len(tree) - 1, head)
        strategy = f"{strategy}, <post> {head}"
    return Plan.from_tree(chain.stage_names, tuple(tree), strategy)


def _dead_checkpointed(chain: Chain, dead: frozenset[int]) -> Plan:
    """The blocks no gradient reaches (``dead``) under the ``checkpoint`` option, every other
    stage kept: what each of them holds that way, and whether the rest of the step is the
    kept step's (:func:`memfit.measuring.profile.build_profile` checks it)."""
    tree = tuple(Stage(i, CHECKPOINT if i in dead else KEEP) for i in range(len(chain)))
    return Plan.from_tree(chain.stage_names, tree, "cut-off blocks checkpointed")


# block options that run without a checkpoint (saved-tensor hooks only)
_UNCHECKPOINTED = (REBUILD, REBUILD_LINEAR, REBUILD_OPS)


@preserving_state
def profile(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    blocks: Blocks = None,
    accumulate: bool = False,
    repeats: int | None = None,
    options: Sequence[str] | str = "auto",
    optimizer: Any = None,
    keep_output: bool = True,
    distributed: bool | None = None,
    compile: bool | dict[str, Any] = False,
    exact: bool = True,
    thorough: bool = False,
) -> Profile:
    """Find the model's chain and measure every stage under every option.

    Args:
        model: the model, in training mode.
        sample: a tuple of positional or a dict of keyword arguments for ``model(...)``.
        loss_fn: maps the output to the scalar loss when needed (see :func:`measure`).
        blocks: the blocks' fqns (or their container's); ``None`` finds them.
        accumulate: profile the gradient-accumulation steady state.
        repeats: timed steps per way of running the model, taken in turns (keep, recompute,
            options, keep, ...) after an untimed step each; ``None`` (default): 3 when
            ``thorough``, else the fast path (see ``thorough``).
        options: per-stage options to measure beside keep and recompute: ``"auto"`` (default)
            measures ``rebuild``, ``rebuild+linear``, ``rebuild+ops`` and a few
            selective-recompute policies picked from the blocks' op profile (those picked by
            measured op times only with ``thorough`` or ``repeats``; a note says so), on CUDA
            ``offload`` (its costs derive from keep's, the bytes it would move and the measured
            copy bandwidth; on other devices ``profile.notes`` says why it is absent), and the
            options of the last stage (head and loss, :mod:`memfit.runtime.head`):
            ``head:lean-loss``, and with ``exact=False`` ``head:chunked``; or a list such as
            ``["rebuild", "selective:matmul", "offload", "head:lean-loss"]``; ``()`` for none.
        optimizer: its state counts as held before the step.
        keep_output: the loop to plan for: ``True`` (default) keeps the model's output alive
            through backward, as ``out = model(**batch); out.loss.backward()`` does; ``False``
            for a loop that keeps only the loss (see :func:`measure`).
        distributed: ``None`` (default): when a process group of several ranks is initialised
            (``torchrun``), every rank must call this with the same sample shapes; each
            measures, and all get the same merged profile (the worst rank's memory, the slowest
            rank's times), so that every rank plans the same schedule
            (:mod:`memfit.verbs.distributed`). ``False``: this process alone.
        compile: profile the blocks compiled, as the plan will run them: ``True`` or a dict of
            ``torch.compile`` arguments (``{"backend": "inductor", "mode": ...}``). Each block's
            own forward is compiled and memfit's checkpoints run around it
            (:mod:`memfit.runtime.compiled`), so every cost is the compiled block's. The menu
            is then keep and recompute: ``rebuild`` and ``selective:*`` cannot see inside a
            compiled block (``options="auto"`` leaves them out, with a note in
            ``profile.notes``; naming one is a ``ValueError``); in their place
            ``options="auto"`` measures ``compile-budget:0.5`` and ``compile-budget:0.1``,
            each block compiled with compile's own ``activation_memory_budget``. Plans made from the
            profile record the options (``plan.compile``) and :func:`memfit.apply`
            compiles the blocks. Blocks already compiled by memfit are profiled as they are.
        exact: ``True`` (default): only options whose gradients and loss are bit-identical to
            the unplanned model's. ``False`` also measures options exact only to rounding
            (``head:chunked``: head and loss fused in chunks of tokens, as Liger's fused linear
            cross-entropy; it lowers the floor of large-vocabulary models most). Plans that
            use one say so (``plan.exact``, ``plan.inexact``). Options that cannot run
            on the model are left out with a note in ``profile.notes``.
        thorough: ``False`` (default): each way of running the model takes one step,
            metered (memory, to the byte) and timed at once; keep also takes a plain timed
            step, which measures the profiler's share of the metered times: about 15
            training steps' worth for the built-in GPT and Hugging Face decoders
            (``benchmarks/bench_setup.py``). ``True``: ``repeats`` (default 3) timed steps
            per way in turns, each after an untimed step, then the metered steps after an
            untimed step each: about seven times as long, for step-time predictions on a
            noisy machine. Memory figures are the same either way.

    Returns:
        A :class:`~memfit.measuring.Profile`; ``profile.costs`` is what the planner reads. The
        model and the process are left as they were: parameters, buffers (BatchNorm
        statistics), ``.grad``, ``requires_grad``, train/eval modes, RNG states, Hugging Face
        config and checkpointing switches (see :mod:`memfit.measuring.state`).

    Raises:
        AlreadyPlannedError: the model carries a plan (``memfit.remove(model)`` first).
        UnsupportedModelError: no chain of blocks found, or only one inside a block of those
            the model's own checkpointing switch checkpoints, which are no chain either (the
            message names them and why); pass ``blocks=``.
        ValueError: an unknown option name (checked before anything is measured), or an
            option that cannot run on compiled blocks; nothing to train (every parameter
            frozen and no input requiring grad).
        TypeError: ``loss_fn`` not callable, ``optimizer`` not an optimizer, a
            ``torch.compile`` wrapper as the model (profile ``model._orig_mod`` with
            ``compile=True``). Usage errors are all raised before anything runs.
        RankMismatchError: ranks with other sample shapes, chains or options (on every rank).

    Example:
        >>> prof = memfit.profile(model, (tokens, targets))
        >>> prof.measurement.peak_bytes
    """
    options_ = ProfileOptions.of(
        loss_fn=loss_fn,
        blocks=blocks,
        accumulate=accumulate,
        repeats=repeats,
        options=options,
        optimizer=optimizer,
        keep_output=keep_output,
        distributed=distributed,
        compile=compile,
        exact=exact,
        thorough=thorough,
    )
    return profile_with(model, sample, options_)


@preserving_state
def profile_with(model: nn.Module, sample: Any, options: ProfileOptions) -> Profile:
    """:func:`profile` with its options checked and held in one value (what ``plan``,
    ``auto`` and the shape profiles call once they have built it)."""
    refuse_compiled_model(model, "profile")
    options.loop.check(model, sample)
    refuse_planned(model, "profiling")
    menu = menu_for(model, options.options, options.exact)
    world = ranks(options.distributed)
    if world > 1:  # before the first step: a step one rank skips hangs the others
        agree(
            "sample shapes",
            describe_sample(sample),
            "Give every rank a sample of the same shapes (pad to one length), or pass "
            "distributed=False to plan each rank alone (ranks may then run different plans and "
            "wait for each other at every collective)",
        )
    refuse_layerdrop(model)
    # Measure the model as memfit will run it: HF's own checkpointing off. Silently: it is
    # switched back on when profiling ends (apply, which leaves it off, is the one that warns).
    hf = hf_checkpointing_off(model, warn=False)
    try:
        return _profile_chain(model, sample, options, menu, world)
    finally:
        if hf is not None:  # PEFT's input hooks too, which the state snapshot does not hold
            hf.restore()


def _profile_chain(
    model: nn.Module, sample: Any, options: ProfileOptions, menu: Menu, world: int
) -> Profile:
    """:func:`profile` once its arguments are checked and HF's checkpointing is off."""
    chain, chain_notes = _chain(model, sample, options.blocks)
    if world > 1:
        agree("chains", chain.stage_names, "Pass the same blocks= on every rank")
    compiling = options.compile
    already = compiled_blocks(chain.blocks)
    if compiling is not None and already is not None and already != compiling:
        raise ValueError(
            f"the blocks are compiled by memfit with {already}, not with compile={compiling}; "
            f"profile with compile={already} (or compile=False to take them as they are)"
        )
    compiling = already if compiling is None else compiling
    if compiling is not None:
        menu = compiled_menu(menu, compiling, model, sample)
    with blocks_compiled(chain.blocks, compiling):  # already compiled: left as they are
        result = _profile(model, sample, chain, options, menu, compiling, world)
    note = coverage_note(result, chain)
    notes = (*chain_notes, *result.notes, *([] if note is None else [note]))
    return dataclasses.replace(result, notes=notes) if notes != result.notes else result


def _profile(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    profile_options: ProfileOptions,
    menu: Menu,
    compiling: Mapping[str, Any] | None,
    world: int,
) -> Profile:
    """Measure every way of running the chain's stages: keep, recompute and ``menu``."""
    loop, repeats, thorough = (
        profile_options.loop,
        profile_options.repeats,
        profile_options.thorough,
    )
    options: Sequence[str] | str = menu.blocks
    heads = menu.heads
    info: dict[str, Any] = {}  # free-form facts
    notes = list(menu.notes)  # what the menu leaves out, and why
    if isinstance(options, str):
        block_ops = profile_ops(model, sample, chain)
        timed = timed_policies(block_ops)  # by measured op times: no floor rests on them
        fixed = [name for name in candidate_policies(block_ops) if name not in timed]
        if repeats is None and not thorough and timed:
            # The fast path leaves them out (a step each, the dearest steps to meter): another
            # profile may pick others, and on the built-in GPT and HF GPT-2 and Llama configs
            # no optimal plan took one, at budgets from the floor to 100% (issue 22).
            notes.append(TIMED_NOTE.format(options=timed))
            timed = []
        options = [REBUILD, REBUILD_LINEAR, REBUILD_OPS, *fixed, *timed, *menu.lossy]
        if world > 1:  # picked from each rank's op profile: rank 0's are measured everywhere
            options, timed = list(rank0(options)), list(rank0(timed))
        info["timed_options"] = timed
    else:
        block_ops = profile_ops(model, sample, chain) if any(map(is_selective, options)) else []
        options = [*options, *menu.lossy]
    # Every way of running the blocks: keep, recompute (each block its own segment), options.
    # keep is measured as a plan too (every block kept), as the plans will run it
    ways: dict[str, Plan | None] = {
        KEEP: _every_block(chain, KEEP),
        RECOMPUTE: _every_block(chain, None),
    }
    ways |= {option: _every_block(chain, option) for option in options if option != KEEP}
    ways |= {option: _head_way(chain, option) for option in heads}
    used: dict[str, list[str]] = {option: [] for option in heads}

    def clock(warmup: int) -> dict[str, float]:
        return stage_clock(model, sample, chain, loop=loop, warmup=warmup)

    def meter(warmup: int, way_clocks: Any, clock_metered: bool = False) -> StageReading:
        return measure_stages(
            model,
            sample,
            chain,
            loop=loop,
            warmup=warmup,
            clocks=way_clocks,
            clock_metered=clock_metered,
        )

    def timed_after(timed: list[dict[str, float]]) -> list[dict[str, float]]:
        timed.append(clock(0))  # warmed up by the metered step before it
        return timed

    readings: dict[str, StageReading] = {}
    details: dict[str, list[dict[str, Any]]] = {}
    rebuilds: dict[str, list[Any]] = {}
    compressed: dict[str, list[tuple[int, int]]] = {}

    def drop(way: str, error: Exception) -> None:
        """A way that failed: a head option the model's forward does not take, or an option
        this model cannot run correctly (a selective option saving an op whose output is then
        written in place, where no copy can stand in), leaves the menu, so no plan picks it."""
        if way in used:
            _drop_head(way, f"{type(error).__name__}: {error}", ways, clocks, used, notes)
            return
        if way in (KEEP, RECOMPUTE) or not isinstance(error, UnsupportedModelError):
            raise error
        logger.warning("option %r left out of the profile: %s", way, error)
        del ways[way], clocks[way]

    dead: frozenset[int] = frozenset()

    def keep_dead(cut_off: frozenset[int]) -> None:
        """Blocks cut off from the loss (an argmin, a detach after them: their graph gets no
        gradient) run kept in every way: their saved tensors go when the model drops their
        graph, whatever runs them, and no recompute of theirs ever runs, so checkpointing them
        saves nothing; kept in every way, they free the same bytes in the same stage's span in
        every reading, and the other stages' figures stay their own."""
        nonlocal dead
        dead = cut_off
        if dead:
            for way in ways:
                if way in options or way == RECOMPUTE:
                    option = None if way == RECOMPUTE else way
                    ways[way] = _every_block(chain, option, kept=dead)
            if compiling is None:  # the cut-off blocks under a checkpoint, the rest kept
                ways[CHECKPOINT] = _dead_checkpointed(chain, dead)
                clocks[CHECKPOINT] = []

    clocks: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    if repeats is None and not thorough:
        # The fast path: one step per way, metered and timed at once (its marks run the meter
        # and a clock). keep alone takes a second, plain timed step, which the metered one warms
        # up: the profiler's cost, keep's metered CPU seconds over its plain ones, comes off
        # every other way's times (issue 22: the setup in at most 20 steps' worth). keep comes
        # first: its reading says which blocks get no gradient.
        # A head option rides in the step of a block option without checkpoints (rebuild*):
        # the head's span is then the one it has with every block kept (no checkpoint holds
        # side inputs through it), and the blocks' spans close before the head runs.
        unchecked = [w for w in ways if w in _UNCHECKPOINTED or is_compress(w)]
        rides = dict(zip(unchecked, heads, strict=False))
        queue = [way for way in ways if way not in rides.values()]
        while queue:
            way = queue.pop(0)
            if way not in ways:
                continue
            head = rides.pop(way, None)
            way_plan = ways[way] if head is None else _every_block(chain, way, head, dead)
            try:
                with (
                    planned(model, chain, way_plan),
                    head_usage() as lines,
                    recording() as rb,
                    compress_log() as packed,
                ):
                    after = partial(timed_after, clocks[way]) if way == KEEP else None
                    readings[way] = meter(0, after, clock_metered=True)
            except Exception as error:
                readings.pop(way, None)
                if head is not None:  # apart, so that only the way that fails is dropped
                    queue[:0] = [way, head]
                else:
                    drop(way, error)
                continue
            rebuilds[way], compressed[way] = rb, packed
            if head is not None:
                readings[head], used[head] = readings[way], lines
            if way in used:
                used[way] = lines
            if way == KEEP:
                keep_dead(no_gradient(chain, readings[KEEP]))
                queue += [CHECKPOINT] if CHECKPOINT in ways else []
            else:
                clocks[way].append(dict(readings[way].metered_s))
        _drop_unused(used, ways, clocks, notes)
        readings = {way: readings[way] for way in ways}
        factor = wall_factor(clocks)
        profiler = profiler_share(readings[KEEP].metered_s, clocks[KEEP][0])
        readings = {
            way: reading.times(factor if way == KEEP else factor * profiler)
            for way, reading in readings.items()
        }
    else:
        # Times first, in turns (keep, recompute, options, keep, ...), so that the machine's
        # drift reaches every way alike and the planner compares options measured side by side.
        keep_dead(stages_without_gradient(model, sample, chain, loop=loop))
        for _ in range(3 if repeats is None else repeats):
            for way, way_plan in list(ways.items()):
                try:
                    with planned(model, chain, way_plan), head_usage() as lines:
                        clocks[way].append(clock(1))
                except Exception as error:
                    drop(way, error)
                    continue
                if way in used:
                    used[way] = lines
        _drop_unused(used, ways, clocks, notes)
        factor = wall_factor(clocks)
        scaled = wall_scaled(clocks)  # CPU time: another process's load does not reorder ways
        for way, way_plan in ways.items():
            with (
                planned(model, chain, way_plan),
                recording() as rebuilds[way],
                compress_log() as compressed[way],
            ):
                readings[way] = meter(1, scaled[way])
    errors = _lossy_errors(model, sample, chain, ways, loop.loss_fn)
    for way in ways:
        rebuilt = rebuilds.get(way)
        if is_compress(way):
            blocks = len(chain.block_names)
            stored: list[Any] = compressed.get(way, [])[:blocks]
            if len(stored) < blocks:  # blocks no gradient reaches ran kept: no per-block log
                stored = [None] * blocks
            lossy = {"exact": False, "stores": str(compress_format(way)).removeprefix("torch.")}
            details[way] = [
                lossy
                | ({} if entry is None else {"compressed": list(entry)})
                | {"error": errors[way]}
                for entry in stored
            ]
        elif is_selective(way):
            saved = saved_ops(way)
            details[way] = [selective_detail(block, saved) for block in block_ops]
        elif rebuilt:  # the first metered forward's blocks, in chain order
            details[way] = [{"rebuilds": entry} for entry in rebuilt[: len(chain.block_names)]]
    keep, recompute = readings.pop(KEEP), readings.pop(RECOMPUTE)
    post = {way: readings.pop(way) for way in used}
    post_details = {
        way: {"exact": HEAD_OPTIONS[way].exact, "does": HEAD_OPTIONS[way].does, "ran": lines[0]}
        | ({"error": errors[way]} if way in errors else {})
        for way, lines in used.items()
    }
    ops = {block.name: block.to_rows() for block in block_ops}
    if ops:
        info["ops"] = ops
    # wall / CPU seconds while timing: shape fits put every shape's times on one factor
    info["wall_per_cpu"] = factor
    result = build_profile(
        model,
        sample,
        chain,
        keep,
        recompute=recompute,
        options=readings,
        details=details,
        info=info,
        compile=compiling,
        notes=notes,
        post_options=post,
        post_details=post_details,
    )
    if menu.offload:
        result = _with_offload(model, sample, chain, result)
    return merge_profiles(result) if world > 1 else result


def _lossy_errors(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    ways: Mapping[str, Plan | None],
    loss_fn: Any,
) -> dict[str, float]:
    """Way -> the largest relative gradient error over parameter groups
    (:func:`~memfit.verbs.verification.group_errors`) of one step run that way, against the step with
    every block kept, both from the seed :func:`memfit.verify` uses (0), for every way that is
    not bit-identical (``compress:*``, ``head:chunked``): what ``plan(max_error=...)`` compares.
    With every block under it, this is an option's error at its most: a plan that mixes it
    with exact blocks rounds fewer saved tensors."""
    lossy = [
        w for w in ways if (w in HEAD_OPTIONS and not HEAD_OPTIONS[w].exact) or not is_exact(w)
    ]
    if not lossy:
        return {}
    groups = parameter_groups(model, chain.block_names)
    with planned(model, chain, ways[KEEP]):
        _loss, reference = seeded_gradients(model, sample, loss_fn, 0)
    errors = {}
    for way in lossy:
        with planned(model, chain, ways[way]):
            _loss, grads = seeded_gradients(model, sample, loss_fn, 0)
        errors[way] = max(group_errors(reference, grads, groups).values(), default=0.0)
    return errors


def _with_offload(model: nn.Module, sample: Any, chain: Chain, result: Profile) -> Profile:
    """Offload in the menu (CUDA): each block's offloadable saved bytes, measured by one more
    forward, and the copy bandwidth. On other devices a note says why it is absent."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cuda":
        notes = (*result.notes, OFFLOAD_NOTE.format(device=device.type))
        return dataclasses.replace(result, notes=notes)
    blocks = {i: block for i in chain.block_stages if (block := chain.block_of_stage(i))}
    args, kwargs = split_sample(sample)
    saved = SavedActivations(offload_bytes={}, inputs_stay=frozenset())
    if result.compile is None:  # hooks cannot see inside compiled blocks: inputs only
        with planned(model, chain, _every_block(chain, KEEP)):
            saved = saved_activations(blocks, lambda: model(*args, **kwargs))
    stages = [
        dataclasses.replace(
            stage,
            offload_bytes=saved.offload_bytes.get(index, 0),
            input_offloadable=index not in saved.inputs_stay,
        )
        for index, stage in enumerate(result.costs.stages)
    ]
    costs = dataclasses.replace(
        result.costs, stages=stages, host_bytes_per_s=host_bandwidth(device)
    )
    return dataclasses.replace(result, costs=with_offload(costs))


def _drop_unused(
    used: dict[str, list[str]],
    ways: dict[str, Plan | None],
    clocks: dict[str, list[dict[str, float]]],
    notes: list[str],
) -> None:
    """Take off the menu each ``<post>`` option that never took effect: no loss it knows
    inside the forward."""
    for way, lines in list(used.items()):
        if not lines:
            _drop_head(way, NO_LOSS[way], ways, clocks, used, notes)


def _drop_head(
    way: str,
    reason: str,
    ways: dict[str, Plan | None],
    clocks: dict[str, list[dict[str, float]]],
    used: dict[str, list[str]],
    notes: list[str],
) -> None:
    """Take a ``<post>`` option off the menu, with a note saying why."""
    logger.info("option %r left out of the profile: %s", way, reason)
    del ways[way], clocks[way], used[way]
    notes.append(f"{way} left out: {reason}")
