"""``memfit.profile``: find the model's chain and measure every stage under every option.

Every way of running the blocks (keep, recompute, each option) is timed in turns and metered once;
the readings become the :class:`~memfit.measuring.Profile` the planner reads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memfit.distributed import agree, describe_sample, merge_profiles, rank0, ranks
from memfit.errors import UnsupportedModelError
from memfit.measuring.chain import Chain, find_chain
from memfit.measuring.clock import profiler_share, wall_factor, wall_scaled
from memfit.measuring.offload import SavedActivations, host_bandwidth, saved_activations
from memfit.measuring.ops import (
    candidate_policies,
    draws_random,
    profile_ops,
    selective_detail,
    timed_policies,
)
from memfit.measuring.profile import Profile, build_profile, no_gradient
from memfit.measuring.readings import StageReading
from memfit.measuring.run import measure_stages, stage_clock, stages_without_gradient
from memfit.measuring.state import preserving_state
from memfit.measuring.step import LossFn, check_step_arguments, split_sample
from memfit.planning.costs import KEEP
from memfit.planning.offload import OFFLOAD, with_offload
from memfit.planning.plan import Plan, Stage, recompute_one
from memfit.runtime import (
    REBUILD,
    REBUILD_LINEAR,
    REBUILD_OPS,
    recording,
    saved_ops,
    stage_wrapper,
)
from memfit.runtime.apply import planned, refuse_planned
from memfit.runtime.compiled import (
    COMPILE_BUDGETS,
    blocks_compiled,
    compile_options,
    compiled_blocks,
    is_compile_budget,
    refuse_compiled_model,
)
from memfit.runtime.head import (
    CHUNKED,
    HEAD_OPTIONS,
    INEXACT_NOTE,
    LEAN_LOSS,
    chunked_head_support,
    head_option,
    head_usage,
    is_head_option,
)
from memfit.runtime.hf_switches import hf_checkpointing_off, refuse_layerdrop
from memfit.runtime.options import hooks_inside, is_selective

logger = logging.getLogger(__name__)

Blocks = Sequence[str] | str | None
RECOMPUTE = "recompute"
COMPILED_NOTE = (
    "blocks compiled (torch.compile {options}): rebuild and selective:* left out of the menu, "
    "their saved-tensor hooks and dispatch modes cannot see inside a compiled block; keep, "
    "recompute (checkpoints around the compiled blocks) and compile-budget:<fraction> "
    "(compile's own activation_memory_budget per block) remain"
)


COMPILED_HEAD_NOTE = (
    "head:* left out too: a compile around the planned model (supported for plans with "
    "compiled blocks) would trace the head option's hooks and run the head as it is, so the "
    "plan's peak would not hold; profile with compile=False for them"
)


OFFLOAD_NOTE = (
    "offload left out of the menu: the model is on {device}, and offload moves saved "
    "activations from a CUDA device's memory to host memory; there is nothing to move to here"
)


RANDOM_NOTE = (
    "compile-budget:* left out too: the model draws random numbers in training (dropout), and "
    "compile's activation_memory_budget recomputes them in backward with other numbers than the "
    "forward's (torch 2.13, CPU: gradients off by 2e-2 against the same compile without it; "
    "equal with dropout off)"
)


TIMED_NOTE = (
    "{options} not measured: selective options picked by the blocks' measured op times; "
    "profile with thorough=True (CLI --thorough) to measure them"
)


class _RandomDraws(TorchDispatchMode):
    """Notes whether any op drawn through it draws random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.found = self.found or draws_random(func, args, kwargs)
        return func(*args, **kwargs)


def _draws_random(model: nn.Module, sample: Any) -> bool:
    """Whether one training forward of the model draws random numbers (dropout on)."""
    args, kwargs = split_sample(sample)
    with torch.no_grad(), _RandomDraws() as mode:  # the RNG state is restored by the caller
        model(*args, **kwargs)
    return mode.found


def _hooked_options(options: Sequence[str]) -> list[str]:
    """The options made of saved-tensor hooks or dispatch modes (useless on compiled blocks)."""
    return [name for name in options if hooks_inside(name)]


def _chain(model: nn.Module, sample: Any, blocks: Blocks) -> Chain:
    args, kwargs = split_sample(sample)
    return find_chain(model, lambda: model(*args, **kwargs), blocks)


def _head_way(chain: Chain, option: str) -> Plan:
    """Every block kept, the last stage (head and loss) run with ``option``."""
    last = len(chain) - 1
    tree = tuple(Stage(i, option if i == last else KEEP) for i in range(len(chain)))
    return Plan.from_tree(chain.stage_names, tree, f"<post> {option}")


def _head_menu(
    model: nn.Module, options: Sequence[str] | str, exact: bool
) -> tuple[list[str], list[str]]:
    """The ``<post>`` options to measure, and notes on the ones left out.

    Raises:
        ValueError: an unknown ``head:`` option, or one exact only to rounding while ``exact``.
    """
    if isinstance(options, str):
        wanted = [name for name, head in HEAD_OPTIONS.items() if head.exact or not exact]
    else:
        wanted = [name for name in options if is_head_option(name)]
        for name in wanted:
            if not head_option(name).exact and exact:
                raise ValueError(
                    f"option {name!r} is {INEXACT_NOTE}; pass exact=False to measure it"
                )
    notes = []
    if CHUNKED in wanted:
        reason = chunked_head_support(model)
        if reason is not None:
            wanted.remove(CHUNKED)
            notes.append(f"{CHUNKED} left out: {reason}")
    elif exact and isinstance(options, str) and chunked_head_support(model) is None:
        notes.append(f"{CHUNKED} not measured: it is {INEXACT_NOTE}; exact=False offers it")
    return wanted, notes


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
            copy bandwidth; on other devices ``info["notes"]`` says why it is absent), and the
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
            (:mod:`memfit.distributed`). ``False``: this process alone.
        compile: profile the blocks compiled, as the plan will run them: ``True`` or a dict of
            ``torch.compile`` arguments (``{"backend": "inductor", "mode": ...}``). Each block's
            own forward is compiled and memfit's checkpoints run around it
            (:mod:`memfit.runtime.compiled`), so every cost is the compiled block's. The menu
            is then keep and recompute: ``rebuild`` and ``selective:*`` cannot see inside a
            compiled block (``options="auto"`` leaves them out, with a note in
            ``profile.info["notes"]``; naming one is a ``ValueError``); in their place
            ``options="auto"`` measures ``compile-budget:0.5`` and ``compile-budget:0.1``,
            each block compiled with compile's own ``activation_memory_budget``. Plans made from the
            profile record the options (``plan.info["compile"]``) and :func:`memfit.apply`
            compiles the blocks. Blocks already compiled by memfit are profiled as they are.
        exact: ``True`` (default): only options whose gradients and loss are bit-identical to
            the unplanned model's. ``False`` also measures options exact only to rounding
            (``head:chunked``: head and loss fused in chunks of tokens, as Liger's fused linear
            cross-entropy; it lowers the floor of large-vocabulary models most). Plans that
            use one say so (``plan.exact``, ``plan.info["inexact"]``). Options that cannot run
            on the model are left out with a note in ``profile.info["notes"]``.
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
        UnsupportedModelError: no chain of blocks found; pass ``blocks=``.
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
    refuse_compiled_model(model, "profile")
    check_step_arguments(model, sample, loss_fn, optimizer)
    refuse_planned(model, "profiling")
    if repeats is not None and repeats < 1:
        raise ValueError(
            f"repeats must be at least 1 (timed steps per way of running); got {repeats}"
        )
    if isinstance(options, str):
        if options != "auto":
            raise ValueError(f'options must be "auto" or a list of option names; got {options!r}')
        offload = True
    else:
        options = list(options)
        for name in options:  # a bad name fails here, before anything is measured or changed
            if not is_head_option(name):
                stage_wrapper(name)
        # offload's costs come from keep's and two measured figures (CUDA), not a step of its own
        offload = OFFLOAD in options
        options = [name for name in options if name != OFFLOAD]
    heads, head_notes = _head_menu(model, options, exact)
    if not isinstance(options, str):
        options = [name for name in options if not is_head_option(name)]
    world = ranks(distributed)
    if world > 1:  # before the first step: a step one rank skips hangs the others
        agree(
            "sample shapes",
            describe_sample(sample),
            "Give every rank a sample of the same shapes (pad to one length), or pass "
            "distributed=False to plan each rank alone (ranks may then run different plans and "
            "wait for each other at every collective)",
        )
    compiling = compile_options(compile)
    if compiling is not None and not isinstance(options, str) and _hooked_options(options):
        raise ValueError(
            f"options {_hooked_options(options)} cannot run on compiled blocks (saved-tensor "
            f"hooks and dispatch modes do not see inside compiled code); profile with "
            f"compile=False for them, or leave them out"
        )
    if compiling is not None and heads and not isinstance(options, str):
        raise ValueError(
            f"options {heads} cannot be planned with compiled blocks: "
            f"{COMPILED_HEAD_NOTE.partition(': ')[2]}"
        )
    budgets = [] if isinstance(options, str) else [o for o in options if is_compile_budget(o)]
    if compiling is None and budgets:
        raise ValueError(
            f"options {budgets} compile the blocks with compile's activation_memory_budget; "
            f"profile with compile=True (or a dict of torch.compile arguments) for them"
        )
    refuse_layerdrop(model)
    # Measure the model as memfit will run it: HF's own checkpointing off. Silently: it is
    # switched back on when profiling ends (apply, which leaves it off, is the one that warns).
    hf = hf_checkpointing_off(model, warn=False)
    try:
        return _profile_chain(
            model,
            sample,
            blocks,
            loss_fn,
            accumulate,
            repeats,
            options,
            optimizer,
            keep_output,
            world,
            compiling,
            heads,
            head_notes,
            offload,
            thorough,
        )
    finally:
        if hf is not None:  # PEFT's input hooks too, which the state snapshot does not hold
            hf.restore()


def _profile_chain(
    model: nn.Module,
    sample: Any,
    blocks: Blocks,
    loss_fn: LossFn | None,
    accumulate: bool,
    repeats: int | None,
    options: Sequence[str] | str,
    optimizer: Any,
    keep_output: bool,
    world: int,
    compiling: dict[str, Any] | None,
    heads: list[str],
    head_notes: list[str],
    offload: bool,
    thorough: bool,
) -> Profile:
    """:func:`profile` once its arguments are checked and HF's checkpointing is off."""
    chain = _chain(model, sample, blocks)
    if world > 1:
        agree("chains", chain.stage_names, "Pass the same blocks= on every rank")
    already = compiled_blocks(chain.blocks)
    if compiling is not None and already is not None and already != compiling:
        raise ValueError(
            f"the blocks are compiled by memfit with {already}, not with compile={compiling}; "
            f"profile with compile={already} (or compile=False to take them as they are)"
        )
    compiling = already if compiling is None else compiling
    menu: Sequence[str] | str = options
    info: dict[str, Any] = {}
    if compiling is not None:
        menu = list(COMPILE_BUDGETS) if isinstance(options, str) else list(options)
        notes = [COMPILED_NOTE.format(options=compiling)]
        if any(map(is_compile_budget, menu)) and _draws_random(model, sample):
            if not isinstance(options, str):
                raise ValueError(
                    f"options {[o for o in menu if is_compile_budget(o)]} would give wrong "
                    f"gradients here: {RANDOM_NOTE.partition(': ')[2]}; leave them out or turn "
                    f"dropout off"
                )
            menu, notes = [], [*notes, RANDOM_NOTE]
        if heads or head_notes:
            notes = [*notes, COMPILED_HEAD_NOTE]
            heads, head_notes = [], []
        info = {"compile": compiling, "notes": notes}
    if head_notes:
        info["notes"] = [*info.get("notes", []), *head_notes]
    with blocks_compiled(chain.blocks, compiling):  # already compiled: left as they are
        return _profile(
            model,
            sample,
            chain,
            loss_fn,
            accumulate,
            repeats,
            menu,
            optimizer,
            keep_output,
            info,
            world,
            offload,
            heads,
            thorough,
        )


def _profile(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    loss_fn: LossFn | None,
    accumulate: bool,
    repeats: int | None,
    options: Sequence[str] | str,
    optimizer: Any,
    keep_output: bool,
    info: dict[str, Any],
    world: int,
    offload: bool = True,
    heads: Sequence[str] = (),
    thorough: bool = False,
) -> Profile:
    if isinstance(options, str):
        block_ops = profile_ops(model, sample, chain)
        timed = timed_policies(block_ops)  # by measured op times: no floor rests on them
        fixed = [name for name in candidate_policies(block_ops) if name not in timed]
        if repeats is None and not thorough and timed:
            # The fast path leaves them out (a step each, the dearest steps to meter): another
            # profile may pick others, and on the built-in GPT and HF GPT-2 and Llama configs
            # no optimal plan took one, at budgets from the floor to 100% (issue 22).
            info["notes"] = [*info.get("notes", []), TIMED_NOTE.format(options=timed)]
            timed = []
        options = [REBUILD, REBUILD_LINEAR, REBUILD_OPS, *fixed, *timed]
        if world > 1:  # picked from each rank's op profile: rank 0's are measured everywhere
            options, timed = list(rank0(options)), list(rank0(timed))
        info["timed_options"] = timed
    else:
        block_ops = profile_ops(model, sample, chain) if any(map(is_selective, options)) else []
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
        return stage_clock(
            model,
            sample,
            chain,
            loss_fn=loss_fn,
            accumulate=accumulate,
            keep_output=keep_output,
            warmup=warmup,
        )

    def meter(warmup: int, way_clocks: Any, clock_metered: bool = False) -> StageReading:
        return measure_stages(
            model,
            sample,
            chain,
            loss_fn=loss_fn,
            accumulate=accumulate,
            optimizer=optimizer,
            keep_output=keep_output,
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

    def drop(way: str, error: Exception) -> None:
        """A way that failed: a head option the model's forward does not take, or an option
        this model cannot run correctly (a selective option saving an op whose output is then
        written in place, where no copy can stand in), leaves the menu, so no plan picks it."""
        if way in used:
            _drop_head(way, f"{type(error).__name__}: {error}", ways, clocks, used, info)
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
        rides = dict(zip([w for w in ways if w in _UNCHECKPOINTED], heads, strict=False))
        queue = [way for way in ways if way not in rides.values()]
        while queue:
            way = queue.pop(0)
            if way not in ways:
                continue
            head = rides.pop(way, None)
            way_plan = ways[way] if head is None else _every_block(chain, way, head, dead)
            try:
                with planned(model, chain, way_plan), head_usage() as lines, recording() as rb:
                    after = partial(timed_after, clocks[way]) if way == KEEP else None
                    readings[way] = meter(0, after, clock_metered=True)
            except Exception as error:
                readings.pop(way, None)
                if head is not None:  # apart, so that only the way that fails is dropped
                    queue[:0] = [way, head]
                else:
                    drop(way, error)
                continue
            rebuilds[way] = rb
            if head is not None:
                readings[head], used[head] = readings[way], lines
            if way in used:
                used[way] = lines
            if way == KEEP:
                keep_dead(no_gradient(chain, readings[KEEP]))
            else:
                clocks[way].append(dict(readings[way].metered_s))
        _drop_unused(used, ways, clocks, info)
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
        keep_dead(
            stages_without_gradient(
                model,
                sample,
                chain,
                loss_fn=loss_fn,
                accumulate=accumulate,
                keep_output=keep_output,
            )
        )
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
        _drop_unused(used, ways, clocks, info)
        factor = wall_factor(clocks)
        scaled = wall_scaled(clocks)  # CPU time: another process's load does not reorder ways
        for way, way_plan in ways.items():
            with planned(model, chain, way_plan), recording() as rebuilds[way]:
                readings[way] = meter(1, scaled[way])
    for way in ways:
        rebuilt = rebuilds.get(way)
        if is_selective(way):
            saved = saved_ops(way)
            details[way] = [selective_detail(block, saved) for block in block_ops]
        elif rebuilt:  # the first metered forward's blocks, in chain order
            details[way] = [{"rebuilds": entry} for entry in rebuilt[: len(chain.block_names)]]
    keep, recompute = readings.pop(KEEP), readings.pop(RECOMPUTE)
    post = {way: readings.pop(way) for way in used}
    post_details = {
        way: {"exact": HEAD_OPTIONS[way].exact, "does": HEAD_OPTIONS[way].does, "ran": lines[0]}
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
        post_options=post,
        post_details=post_details,
    )
    if offload:
        result = _with_offload(model, sample, chain, result)
    return merge_profiles(result) if world > 1 else result


def _with_offload(model: nn.Module, sample: Any, chain: Chain, result: Profile) -> Profile:
    """Offload in the menu (CUDA): each block's offloadable saved bytes, measured by one more
    forward, and the copy bandwidth. On other devices a note says why it is absent."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cuda":
        notes = [*result.info.get("notes", []), OFFLOAD_NOTE.format(device=device.type)]
        return dataclasses.replace(result, info={**result.info, "notes": notes})
    blocks = {i: block for i in chain.block_stages if (block := chain.block_of_stage(i))}
    args, kwargs = split_sample(sample)
    saved = SavedActivations(offload_bytes={}, inputs_stay=frozenset())
    if "compile" not in result.info:  # hooks cannot see inside compiled blocks: inputs only
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


_NO_LOSS = {
    LEAN_LOSS: "no F.cross_entropy over 2-D logits ran inside the model's forward after its "
    "last block (a loss computed afterwards, by loss_fn or the training loop, is out of its "
    "reach)",
    CHUNKED: "the model's loss_function never computed a loss from the head (no labels in "
    "the sample?)",
}


def _drop_unused(
    used: dict[str, list[str]],
    ways: dict[str, Plan | None],
    clocks: dict[str, list[dict[str, float]]],
    info: dict[str, Any],
) -> None:
    """Take off the menu each ``<post>`` option that never took effect: no loss it knows
    inside the forward."""
    for way, lines in list(used.items()):
        if not lines:
            _drop_head(way, _NO_LOSS[way], ways, clocks, used, info)


def _drop_head(
    way: str,
    reason: str,
    ways: dict[str, Plan | None],
    clocks: dict[str, list[dict[str, float]]],
    used: dict[str, list[str]],
    info: dict[str, Any],
) -> None:
    """Take a ``<post>`` option off the menu, with a note saying why."""
    logger.info("option %r left out of the profile: %s", way, reason)
    del ways[way], clocks[way], used[way]
    info["notes"] = [*info.get("notes", []), f"{way} left out: {reason}"]
