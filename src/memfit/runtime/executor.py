"""Running a plan's schedule items over the blocks: the objects that replace blocks' ``forward``.

A top-level ``Segment(s, t, inner)`` is one ``torch.utils.checkpoint`` (non-reentrant) over
blocks ``s..t-1``, following ``inner``: nested segments are nested checkpoints, i.e.
multi-level recompute. A one-block segment runs as one ``checkpoint`` call in its block's
forward. A longer one is opened when block ``s`` is called (:class:`SegmentStart`) and closed when block
``t-1`` returns (:class:`Member`), each block running in its own call and returning its own
output, after checking that a rerun of the segment from block ``s``'s input will give it the same
arguments (:mod:`memfit.runtime.regions`, ``guards``). A top-level ``Stage`` runs the block
wrapped for its option (a kept block too: every planned block runs on a private copy of its KV
cache in training).

Every override (:class:`SegmentStart`, :class:`Member`, :class:`TopStage`) is a plain object holding
the :class:`Executor`, which holds the chain's blocks: ``copy.deepcopy`` (EMA copies,
``AveragedModel``) and ``pickle``/``torch.save`` copy them with the model and rebind them to the
copy's blocks. What one forward leaves for the next blocks (:class:`SegmentRun`: open
checkpoints, weak references) is never copied or pickled.

In a forward with gradients, planned blocks run on private copies of their KV caches
(``caches``, done in ``replay.BlockForward``) and of the dicts of shared keys and values of
one-block items (``shared_states``: snapshots taken here, before a checkpoint holds them), and
each recomputed item is watched in its first run for in-place changes of its arguments and writes to its modules' state (``guards.Watch``);
the attributes it rebinds are put back around each rerun (``state_replay``).
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from memfit.errors import PlanMismatchError
from memfit.measuring.carry import (
    MAIN_ONLY,
    Carry,
    hand_on,
    ordered,
    output_items,
    slot_values,
    uncarried,
)
from memfit.measuring.chain import MAIN_KEYWORD, Chain, main_tensor, split_main
from memfit.measuring.offload import module_tensors, storage_keys
from memfit.measuring.step import own_fsdp_unit, storage_key
from memfit.planning.plan import Item, Segment, Stage
from memfit.runtime.compiled import eager_around_compiled_blocks
from memfit.runtime.guards import (
    Inputs,
    NamedModules,
    Watch,
    guard_input,
    rng_state,
    same_rng_state,
    same_side_inputs,
)
from memfit.runtime.offload import Group, Offloader
from memfit.runtime.options import KEEP, OFFLOAD, Forward, option_kind
from memfit.runtime.regions import Region, Regions
from memfit.runtime.replay import replaying
from memfit.runtime.sharding import enter_block, gather_for_backward
from memfit.runtime.shared_states import reads_shared_states, snapshot_shared_states
from memfit.runtime.state_replay import StateReplay, Write, remember

logger = logging.getLogger(__name__)

Call = tuple[Any, tuple[Any, ...], dict[str, Any]]  # (main input, positional rest, keywords)


@dataclass
class SegmentCall:
    """What a segment's first block leaves for the later ones while torch.compile traces."""

    side_inputs: Inputs  # as the head received them (before its cache was dropped)
    output: weakref.ref[torch.Tensor]  # weak: never keep an activation alive past its use
    tail: tuple[Any, ...] | list[Any] | None  # the head output's items after the hidden state
    rng: tuple[torch.Tensor, ...]


def split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """A planned block call's main input and the rest (PlanMismatchError without a main input)."""
    main, rest, side = split_main(args, kwargs)
    if main is None:
        raise PlanMismatchError(
            f"a planned block was called without its main input: expected the hidden state as "
            f"the first positional argument or as {MAIN_KEYWORD}=...; got only the keywords "
            f"{sorted(kwargs)}. Call the blocks that way, or memfit.remove(model)"
        )
    return main, rest, side


class Executor:
    """Runs schedule items over the blocks of one chain.

    Args:
        chain: the chain.
        forwards: ``(stage, option)`` -> the block's forward wrapped for the option.
        modules: stage -> its block and the block's submodules, with fqns (for ``Watch``).
        places: stage -> the block's parent module and its name there (to notice a block
            replaced after the plan was applied).
    """

    # class defaults: executors pickled before these existed load with them
    sharded = False  # whether the first block was its own FSDP2 unit when the plan was applied
    resharding_told = False
    offloading = False  # whether the plan offloads anything (set by apply_plan)
    _offloader: Offloader | None = None
    places: dict[int, tuple[torch.nn.Module, str]] = {}  # noqa: RUF012 (read-only default)
    links: dict[int, Carry] = {}  # noqa: RUF012 (read-only default)
    # maker stage -> reader stage of the skips the plan offloads (runtime.skip_offload)
    skip_readers: dict[int, int] = {}  # noqa: RUF012 (read-only default)

    def __init__(
        self,
        chain: Chain,
        forwards: dict[tuple[int, str], Forward],
        modules: Mapping[int, NamedModules],
        places: Mapping[int, tuple[torch.nn.Module, str]] | None = None,
    ) -> None:
        self.chain = chain
        self.forwards = forwards
        self.modules = modules
        self.places = dict(places or {})
        # segment start -> its current forward (SegmentCall: while torch.compile traces)
        self.calls: dict[int, SegmentRun | SegmentCall] = {}
        # block stage -> how its output becomes the next block's arguments in a segment's
        # rerun, as the forward saw it (carries of several tensors: memfit.measuring.carry)
        self.links: dict[int, Carry] = {}
        self.nesting: dict[int, dict[int, list[Segment]]] = {}
        # FSDP2 applied after the plan (or removed): the plan's figures are another model's
        self.sharded = own_fsdp_unit(chain.blocks[0]) if chain.blocks else False
        self.resharding_told = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        state["calls"] = {}  # per-forward, with weak references: never copied or pickled
        return state

    def name(self, index: int) -> str:
        return self.chain.stage_names[index]

    @property
    def offloader(self) -> Offloader:
        if self._offloader is None:
            self._offloader = Offloader()
        return self._offloader

    def offload_group(self, start: int, offloads: bool) -> Group | None:
        """The offload group of the top-level item at ``start`` when it ``offloads`` (``None``
        without gradients or when the plan offloads nothing). The first block's call starts a
        new forward (``Offloader.start_forward``)."""
        if not self.offloading or not torch.is_grad_enabled():
            return None
        if start == self.chain.block_stages[0]:
            self.offloader.start_forward()
        return Group(self.name(start)) if offloads else None

    def abandon_offload(self) -> None:
        """A top-level item's forward raised (see ``Offloader.abandon``)."""
        if self.offloading and self._offloader is not None:
            self._offloader.abandon()

    def item_done(self, stop: int, out: Any, group: Group | None, *, segment: bool) -> None:
        """A top-level item's forward over ``[.., stop)`` ended (see ``Offloader.item_done``)."""
        if self.offloading and torch.is_grad_enabled():
            ahead = self.chain.block_of_stage(stop) is not None
            self.offloader.item_done(main_tensor(out), group, segment=segment, ahead=ahead)

    def skips_before(self, index: int) -> None:
        """Stage ``index``'s forward starts: the offloaded skips it reads come back."""
        if self.skip_readers and torch.is_grad_enabled() and self._offloader is not None:
            self._offloader.skips.fetch(index)

    def skips_after(self, index: int, out: Any) -> None:
        """Stage ``index``'s forward ended with ``out``: the skips it reads are back; its
        output goes to host memory when it is an offloaded skip, and the skip made by the
        stage before leaves the device."""
        if not self.skip_readers or not torch.is_grad_enabled():
            return
        trips = self.offloader.skips
        trips.arrived(index)
        trips.release(index - 1, main_tensor(out))
        reader = self.skip_readers.get(index)
        if reader is not None:
            trips.leave(index, self.name(index), reader, main_tensor(out))

    def call(
        self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any], *, one_block: bool = True
    ) -> Call:
        """Split a planned top-level call; for an item of ``one_block``, with a snapshot of each
        dict of shared keys and values in it (:mod:`memfit.runtime.shared_states`)."""
        if not self.resharding_told and own_fsdp_unit(self.chain.blocks[0]) != self.sharded:
            self.resharding_told = True
            logger.warning(
                "memfit: the model's blocks were %s after the plan was made. "
                "The plan runs correctly (same gradients, no extra all-gathers), but its memory "
                "figures are those of the model as it was profiled, and its recompute segments "
                "may span FSDP2 units (holding their gathered parameters together). For figures "
                "per rank, shard first, then call memfit.auto",
                "sharded with fully_shard" if not self.sharded else "unsharded",
            )
        args, kwargs = self.snapshot(args, kwargs, one_block=one_block)
        return split(args, kwargs)

    def snapshot(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, one_block: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A planned block call's arguments with a snapshot of each dict of shared keys and
        values in them (:mod:`memfit.runtime.shared_states`)."""
        read = vars(self).get("_reads_shared")
        if read is None:
            modules = (module for named in self.modules.values() for _, module in named)
            read = self._reads_shared = reads_shared_states(modules)
        return snapshot_shared_states(args, kwargs, read=read, one_block=one_block)

    def check_in_place(self, segment: Segment) -> None:
        """Raise if a block of ``segment`` is no longer where the plan found it (replaced in
        its container after apply: the segment's rerun would run the old one)."""
        for index in range(segment.start, segment.stop):
            place = self.places.get(index)
            block = self.chain.block_of_stage(index)
            if place is None or block is None:
                continue
            parent, key = place
            now = parent._modules.get(key)
            if now is not block:
                raise PlanMismatchError(
                    f"stage {self.name(index)!r} is not the module the plan was applied to: the "
                    f"model now holds {type(now).__name__} there (replaced after memfit.apply). "
                    f"Call memfit.remove(model) before changing blocks, then plan again"
                )

    def start_segment(self, segment: Segment, call: Call) -> Any:
        """The first block of a multi-block segment is called: open its checkpoint, run it."""
        self.check_in_place(segment)
        stale = self.calls.pop(segment.start, None)
        if isinstance(stale, SegmentRun):  # a forward that never reached the segment's end
            stale.regions.abandon(PlanMismatchError("a new forward started"))
        x, rest, side = call
        run = SegmentRun(
            segment,
            side_inputs=(rest, side),
            sides={},
            watch=self.watched(segment.start, segment.stop, call),
            group=self.offload_group(segment.start, segment.offload),
            regions=Regions(),
            next=segment.start,
        )
        self.calls[segment.start] = run
        body = SegmentBody(self, segment, segment.start, run.sides)
        try:
            if run.group is None:
                region = Region(body, (x, *rest), side)
            else:  # the offload hooks see what the checkpoint keeps: its inputs
                storage = storage_key(x)
                with self.offloader.saving(run.group, keep=lambda t: storage_key(t) != storage):
                    region = Region(body, (x, *rest), side)
        except BaseException:
            self.calls.pop(segment.start, None)
            self.abandon_offload()
            raise
        run.regions.enter(segment.stop, region)
        return self._run_member(run, segment.start, call)

    def continue_segment(self, segment: Segment, index: int, call: Call) -> Any:
        """A later block of a multi-block segment is called: check it gets what the rerun will
        give it, then run it inside the segment's checkpoint."""
        run = self.calls.get(segment.start)
        x, rest, side = call
        main = main_tensor(x)
        name = self.name(index)
        joined = f"{self.name(segment.start)!r} in one recompute segment"
        problem = None
        if not isinstance(run, SegmentRun) or run.next != index:
            problem = (
                f"stage {name!r} was called without the blocks before it, joined with it from "
                f"{joined}, having just run: the model skips or reorders blocks"
            )
        elif main is None or (carry := _handed_on(run, call)) is None:
            problem = (
                f"stage {name!r} did not get the output of the block before it (joined with it "
                f"from {joined}): the model changes the hidden state between blocks"
            )
        elif not same_rng_state(run.rng, rng_state(main.device)):
            problem = (
                f"the model drew random numbers before stage {name!r}, between blocks joined "
                f"from {joined} (e.g. LayerDrop): a rerun of the segment would draw other ones"
            )
        if problem is not None:
            error = PlanMismatchError(f"{problem}; recompute these blocks one by one")
            self.drop_run(segment.start, error)
            raise error
        assert isinstance(run, SegmentRun) and carry is not None
        if "links" not in vars(self):  # an executor pickled before links existed
            self.links = {}
        self.links[index - 1] = carry
        # its own side inputs (a resnet's temb, an attention's encoder states, a sliding
        # window's mask): the segment's rerun hands them to it, held until then
        run.sides[index] = uncarried(carry, rest, side)
        return self._run_member(run, index, call)

    def _run_member(self, run: SegmentRun, index: int, call: Call) -> Any:
        segment = run.segment
        x, rest, side = call
        try:
            run.regions.resume()
            nested = self.nesting.setdefault(segment.start, _nested(segment.inner, {}))
            for inner in nested.get(index, ()):
                body = SegmentBody(self, inner, segment.start, run.sides)
                run.regions.enter(inner.stop, Region(body, (x, *rest), side))
            self.skips_before(index)
            out = self.forwards[(index, KEEP)](x, *rest, **side)
            for region in run.regions.close_through(index + 1):
                guarded = region.input() if region.input is not None else None
                out = guard_input(out, guarded, self.name(segment.start))
            self.skips_after(index, out)
        except BaseException as error:
            self.drop_run(segment.start, error)
            raise
        main = main_tensor(out)
        if index == segment.stop - 1:
            del self.calls[segment.start]
            if run.watch is not None:
                self.replay(segment, run.watch.check())
            self.item_done(segment.stop, out, run.group, segment=True)
            earlier = [self.chain.block_of_stage(i) for i in range(segment.start, index)]
            gather_for_backward([block for block in earlier if block is not None], out)
            return out
        if main is None:
            mismatch = PlanMismatchError(
                f"stage {self.name(index)!r} returns {type(out).__name__} without a tensor "
                f"to hand on; blocks joined in one recompute segment must return the hidden "
                f"state (a tensor, or first in a tuple): recompute them one by one"
            )
            self.drop_run(segment.start, mismatch)
            raise mismatch
        items = [
            (k, weakref.ref(item), item._version)
            for k, item in enumerate(output_items(out))
            if isinstance(item, torch.Tensor)
        ]
        run.expected = Handed(items, (weakref.ref(main), main._version))
        run.next = index + 1
        run.rng = rng_state(main.device)
        run.regions.suspend()
        return out

    def drop_run(self, start: int, error: BaseException) -> None:
        """End the segment forward at ``start`` after ``error``: its checkpoints closed."""
        run = self.calls.pop(start, None)
        if isinstance(run, SegmentRun):
            run.regions.abandon(error)
            self.abandon_offload()

    def watched(self, start: int, stop: int, call: Call) -> Watch | None:
        """A watch over stages ``start..stop-1`` for their first run, when backward follows."""
        if not torch.is_grad_enabled() or replaying():
            return None
        modules = [named for index in range(start, stop) for named in self.modules[index]]
        return Watch(self.name(start), modules, *call)

    def replay(self, item: Item, writes: list[Write]) -> None:
        """Keep what the first run of the top-level ``item`` rebound for the reruns of its
        blocks (:mod:`memfit.runtime.state_replay`), each block its own."""
        if not writes:
            return
        start, stop = (
            (item.index, item.index + 1) if isinstance(item, Stage) else (item.start, item.stop)
        )
        for index in range(start, stop):
            block = self.chain.block_of_stage(index)
            if block is None:
                continue
            owned = {id(module) for module in block.modules()}
            mine = [write for write in writes if id(write.module) in owned]
            if mine:
                remember(block, StateReplay(self.name(index), mine, _reruns((item,), index)))

    def run_stage(
        self,
        stage: Stage,
        x: Any,
        rest: tuple[Any, ...],
        kwargs: dict[str, Any],
        head: int | None = None,
    ) -> Any:
        if head is not None and stage.index != head:
            # a later block of a segment, run by its head: its FSDP2 pre-hook first (sharding)
            block = self.chain.block_of_stage(stage.index)
            assert block is not None
            (x, *more), kwargs = enter_block(block, (x, *rest), kwargs)
            rest = tuple(more)
        if not torch.is_grad_enabled():  # no backward: nothing to save or recompute
            return self.forwards[(stage.index, KEEP)](x, *rest, **kwargs)
        out = self.forwards[(stage.index, stage.option)](x, *rest, **kwargs)
        if option_kind(stage.option).recomputes:
            guard_input(out, x, self.name(stage.index))
        return out

    def run_items(
        self,
        items: Sequence[Item],
        x: Any,
        rest: tuple[Any, ...],
        kwargs: dict[str, Any],
        head: int,
        sides: Mapping[int, Inputs] | None = None,
    ) -> Any:
        """Run ``items`` inside the top-level segment whose first block is ``head``; ``sides``:
        each block's own side inputs, as its first run got them (without: the first item's)."""
        out: Any = x
        for item in items:
            if isinstance(item, Stage):
                out = self.run_stage(item, x, rest, kwargs, head)
            else:
                out = self.run_segment(item, x, rest, kwargs, head, sides=sides)
            last = item.index if isinstance(item, Stage) else item.stop - 1
            carry = self.links.get(last, MAIN_ONLY)
            own = sides.get(last + 1) if sides else None
            if own is not None:
                rest, kwargs = own
            x, rest, kwargs = hand_on(carry, out, x, rest, kwargs, main_tensor)
        return out

    def run_segment(
        self,
        segment: Segment,
        x: Any,
        rest: tuple[Any, ...],
        kwargs: dict[str, Any],
        head: int | None = None,
        group: Group | None = None,
        sides: Mapping[int, Inputs] | None = None,
    ) -> Any:
        """Run ``segment`` under a checkpoint; ``head``: the first block of the top-level
        segment it lies in (``None``: it is that segment); ``group``: offload its input;
        ``sides``: as :meth:`run_items`'s."""
        head = segment.start if head is None else head
        if not torch.is_grad_enabled():
            return self.run_items(segment.inner, x, rest, kwargs, head, sides)
        body = SegmentBody(self, segment, head, sides)
        if group is None:
            out = checkpoint(body, x, *rest, use_reentrant=False, **kwargs)
        else:  # outside the checkpoint, the hooks see what it keeps: its inputs
            storage = storage_key(x)
            with self.offloader.saving(group, keep=lambda t: storage_key(t) != storage):
                out = checkpoint(body, x, *rest, use_reentrant=False, **kwargs)
        return guard_input(out, x, self.name(segment.start))


class SegmentBody:
    """The function a segment's checkpoint runs (and reruns in backward)."""

    def __init__(
        self,
        executor: Executor,
        segment: Segment,
        head: int,
        sides: Mapping[int, Inputs] | None = None,
    ) -> None:
        self.executor = executor
        self.segment = segment
        self.head = head
        self.sides = sides  # each block's own side inputs (a multi-block top-level segment's)

    def __call__(self, x: Any, *rest: Any, **kwargs: Any) -> Any:
        sides = getattr(self, "sides", None)  # bodies pickled before it existed have none
        return self.executor.run_items(self.segment.inner, x, rest, kwargs, self.head, sides)


_SegmentBody = SegmentBody  # the name executors pickled before it was public refer to


@dataclass
class SegmentRun:
    """One forward of a multi-block top-level segment, from its first block's call to its last
    block's return (:mod:`memfit.runtime.regions`)."""

    segment: Segment
    side_inputs: Inputs  # the first block's
    sides: dict[int, Inputs]  # every block's own side inputs, carried slots left out
    watch: Watch | None
    group: Group | None
    regions: Regions
    next: int  # the block expected next
    expected: Handed | None = None  # the previous block's output
    rng: tuple[torch.Tensor, ...] = ()  # the random generators when the previous block returned


def _reruns(items: Sequence[Item], index: int) -> int:
    """How many times a backward reruns stage ``index`` under ``items``: once per segment
    around it, and once more for a recomputing option of its own."""
    for item in items:
        if isinstance(item, Stage) and item.index == index:
            return int(option_kind(item.option).recomputes)
        if isinstance(item, Segment) and item.start <= index < item.stop:
            return 1 + _reruns(item.inner, index)
    return 0


def _nested(items: Sequence[Item], into: dict[int, list[Segment]]) -> dict[int, list[Segment]]:
    """Block index -> the segments nested in ``items`` that start there, outermost first."""
    for item in items:
        if isinstance(item, Segment):
            into.setdefault(item.start, []).append(item)
            _nested(item.inner, into)
    return into


@dataclass
class Handed:
    """A block's output as its call returned it, weakly (never keep an activation alive past
    its use), each tensor with its version then: the tensor items of its output tuple (their
    positions in it) and its main tensor."""

    items: list[tuple[int, weakref.ref[torch.Tensor], int]]
    main: tuple[weakref.ref[torch.Tensor], int]


def _handed_on(run: SegmentRun, call: Call) -> Carry | None:
    """How a block got the previous block's output: a carry of several tensors (the main input
    among them) when its arguments hold several of the output tuple's tensors, :data:`MAIN_ONLY`
    when its main input is the output's main tensor, ``None`` when neither. A tensor counts as
    got when it is the very tensor, or an alias of it with the same layout and values (FSDP2's
    pre-forward hook hands a block its inputs through an autograd function that returns
    aliases)."""
    handed = run.expected
    if handed is None:
        return None
    pairs = []
    for slot, tensor in slot_values(*call):
        found = [k for k, ref, version in handed.items if _same_tensor(ref, version, tensor)]
        if found:
            pairs.append((slot, found[0]))
    carry = ordered(pairs)
    if len(carry) >= 2 and carry[0][0] == 0:
        return carry
    main = main_tensor(call[0])
    return MAIN_ONLY if _same_tensor(*handed.main, main) else None


def _same_tensor(
    ref: weakref.ref[torch.Tensor], version: int, received: torch.Tensor | None
) -> bool:
    expected = ref()
    if expected is None or received is None:
        return False
    if received is expected:
        return True
    return (
        received._version == version == expected._version
        and storage_key(received) == storage_key(expected)
        and received.storage_offset() == expected.storage_offset()
        and received.shape == expected.shape
        and received.stride() == expected.stride()
        and received.dtype == expected.dtype
        and received.device == expected.device
    )


class SegmentStart:
    """The forward of a top-level segment's first block. A one-block segment runs as one
    checkpoint here; a longer one opens its checkpoint here and runs this block, and the later
    blocks run in their own calls (:class:`Member`)."""

    def __init__(self, executor: Executor, segment: Segment) -> None:
        self.executor = executor
        self.segment = segment

    @eager_around_compiled_blocks
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        executor, segment = self.executor, self.segment
        if segment.stop > segment.start + 1 and not torch.compiler.is_compiling():
            call = executor.call(segment.start, args, kwargs, one_block=False)
            if not torch.is_grad_enabled():  # no backward: every block runs as it is
                return executor.forwards[(segment.start, KEEP)](call[0], *call[1], **call[2])
            return executor.start_segment(segment, call)
        call = executor.call(
            segment.start, args, kwargs, one_block=segment.stop == segment.start + 1
        )
        watch = executor.watched(segment.start, segment.stop, call)
        group = executor.offload_group(segment.start, segment.offload)
        try:
            executor.skips_before(segment.start)
            out = executor.run_segment(segment, *call, group=group)
            executor.skips_after(segment.start, out)
        except BaseException:
            executor.abandon_offload()
            raise
        if watch is not None:
            executor.replay(segment, watch.check())
        executor.item_done(segment.stop, out, group, segment=True)
        if segment.stop == segment.start + 1:  # no later blocks
            return out
        return _traced_head(executor, segment, out, args, kwargs)


def _traced_head(
    executor: Executor, segment: Segment, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """While torch.compile traces a planned model, a multi-block segment runs as one checkpoint
    in its first block (compile turns it into its own), and the later blocks pass its output on
    (:func:`_traced_member`): what compile can trace. Known limit: a model that reads a middle
    block's output then reads the segment's last one."""
    name = executor.name(segment.start)
    main = main_tensor(out)
    if isinstance(out, torch.Tensor):
        tail = None
    elif isinstance(out, tuple | list) and out and out[0] is main:
        tail = out[1:]
    else:
        raise PlanMismatchError(
            f"stage {name!r} returns {type(out).__name__}; blocks joined in one recompute "
            f"segment must return a tensor or a tuple whose first item is the hidden "
            f"state: recompute them one by one"
        )
    assert main is not None  # out is a tensor, or a sequence whose first item is main
    if tail is not None and any(isinstance(item, torch.Tensor) for item in tail):
        raise PlanMismatchError(
            f"stage {name!r} returns tensors besides the hidden state (attention weights, "
            f"caches); under torch.compile the blocks after it in its recompute segment cannot "
            f"return their own: recompute these blocks one by one"
        )
    _, rest, side = split(args, kwargs)
    executor.calls[segment.start] = SegmentCall(
        (rest, side), weakref.ref(main), tail, rng_state(main.device)
    )
    return out


class Member:
    """The forward of a later block of a multi-block top-level segment: runs the block inside
    the segment's open checkpoint, after checking that it gets what a rerun will give it."""

    def __init__(self, executor: Executor, segment: Segment, index: int) -> None:
        self.executor = executor
        self.segment = segment
        self.index = index

    @eager_around_compiled_blocks
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        executor, segment, index = self.executor, self.segment, self.index
        if torch.compiler.is_compiling():
            return _traced_member(executor, segment, index, args, kwargs)
        call = split(*executor.snapshot(args, kwargs, one_block=False))
        if not torch.is_grad_enabled():
            return executor.forwards[(index, KEEP)](call[0], *call[1], **call[2])
        return executor.continue_segment(segment, index, call)


PassThrough = Member  # the name executors pickled before it existed refer to


def _traced_member(
    executor: Executor, segment: Segment, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    x, rest, side = split(args, kwargs)
    call = executor.calls.get(segment.start)
    main = main_tensor(x)
    name = executor.name(index)
    joined = f"{executor.name(segment.start)!r}, which runs it inside one recompute segment"
    if not isinstance(call, SegmentCall) or main is None or call.output() is not main:
        raise PlanMismatchError(
            f"stage {name!r} did not get the output of the block before it from {joined}: "
            f"the model skips blocks or changes the hidden state between them; recompute "
            f"these blocks one by one"
        )
    if not same_side_inputs(call.side_inputs, (rest, side)):
        raise PlanMismatchError(
            f"stage {name!r} got other side inputs (masks, positions...) than {joined}; "
            f"this model cannot join these blocks in a segment (e.g. sliding and full "
            f"attention layers alternate): recompute them one by one"
        )
    if index == segment.stop - 1:
        del executor.calls[segment.start]
    if call.tail is None:
        return x
    return (x, *call.tail) if isinstance(call.tail, tuple) else [x, *call.tail]


class ForwardEnd:
    """A forward hook on the planned model (``always_call``): a forward that ends, or raises,
    with a segment still open closes it, so that no checkpoint's hooks stay behind; ending
    normally with one open is an error (the model skipped a segment's later blocks)."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self.executor.calls or torch.compiler.is_compiling():
            return
        failing = sys.exc_info()[1]
        open_runs = [run for run in self.executor.calls.values() if isinstance(run, SegmentRun)]
        error = failing or PlanMismatchError("the model's forward ended inside a segment")
        for run in open_runs:
            self.executor.drop_run(run.segment.start, error)
        if open_runs and failing is None:
            first = open_runs[0].segment
            raise PlanMismatchError(
                f"the model's forward returned before blocks {self.executor.name(first.start)!r}"
                f" to {self.executor.name(first.stop - 1)!r}, joined in one recompute segment, "
                f"had all run (the model skips or stops early at blocks): recompute these "
                f"blocks one by one"
            )


class TopStage:
    """The forward of a block that is a top-level stage of the plan: its option's wrapper (for a
    kept block, the block itself)."""

    def __init__(self, executor: Executor, stage: Stage) -> None:
        self.executor = executor
        self.stage = stage

    @eager_around_compiled_blocks
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        executor, stage = self.executor, self.stage
        call = executor.call(stage.index, args, kwargs)
        watch = None
        if option_kind(stage.option).recomputes:
            watch = executor.watched(stage.index, stage.index + 1, call)
        group = executor.offload_group(stage.index, stage.option == OFFLOAD)
        try:
            executor.skips_before(stage.index)
            if group is None:
                out = executor.run_stage(stage, *call)
            else:  # parameters (and views of them) stay
                block = executor.chain.block_of_stage(stage.index)
                assert block is not None
                keys = storage_keys(module_tensors(block))
                with executor.offloader.saving(group, keep=lambda t: storage_key(t) in keys):
                    out = executor.run_stage(stage, *call)
            executor.skips_after(stage.index, out)
        except BaseException:
            executor.abandon_offload()
            raise
        if watch is not None:
            executor.replay(stage, watch.check())
        executor.item_done(stage.index + 1, out, group, segment=False)
        return out
