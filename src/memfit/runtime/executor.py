"""Running a plan's schedule items over the blocks: the objects that replace blocks' ``forward``.

A top-level ``Segment(s, t, inner)`` makes block ``s`` (the segment's *head*) run blocks
``s..t-1`` inside one ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, following
``inner``: nested segments are nested checkpoints, i.e. multi-level recompute. Blocks
``s+1..t-1`` then pass their input through, after checking that running them inside the head
was right (see ``guards``). A top-level ``Stage`` runs the block wrapped for its option (a kept
block too: every planned block runs on a private copy of its KV cache in training).

Every override (:class:`Head`, :class:`PassThrough`, :class:`TopStage`) is a plain object
holding the :class:`Executor`, which holds the chain's blocks: ``copy.deepcopy`` (EMA copies,
``AveragedModel``) and ``pickle``/``torch.save`` copy them with the model and rebind them to the
copy's blocks. What one forward leaves for the next blocks (:class:`SegmentCall`, with weak
references) is never copied or pickled.

In a forward with gradients, planned blocks run on private copies of their KV caches
(``caches``, done in ``replay.BlockForward``), and each recomputed item is watched in its first
run for in-place changes of its arguments and writes to its modules' state (``guards.Watch``).

Known limit: forward hooks on blocks ``s+1..t-1`` of a multi-block segment see the pass-through
(input = output = the segment's output), and the head's hooks see the whole segment.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from memfit.errors import PlanMismatchError
from memfit.measuring.chain import MAIN_KEYWORD, Chain, main_tensor, split_main
from memfit.measuring.offload import module_tensors, storage_keys
from memfit.measuring.step import own_fsdp_unit
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
from memfit.runtime.replay import replaying
from memfit.runtime.sharding import enter_block

logger = logging.getLogger(__name__)

Call = tuple[Any, tuple[Any, ...], dict[str, Any]]  # (main input, positional rest, keywords)


@dataclass
class SegmentCall:
    """What a segment's head leaves for its pass-throughs during one forward."""

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
    """

    # class defaults: executors pickled before these existed load with them
    sharded = False  # whether the first block was its own FSDP2 unit when the plan was applied
    resharding_told = False
    offloading = False  # whether the plan offloads anything (set by apply_plan)
    _offloader: Offloader | None = None

    def __init__(
        self,
        chain: Chain,
        forwards: dict[tuple[int, str], Forward],
        modules: Mapping[int, NamedModules],
    ) -> None:
        self.chain = chain
        self.forwards = forwards
        self.modules = modules
        self.calls: dict[int, SegmentCall] = {}  # segment start -> its current forward
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

    def call(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        """Split a planned top-level call."""
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
        return split(args, kwargs)

    def watched(self, start: int, stop: int, call: Call) -> Watch | None:
        """A watch over stages ``start..stop-1`` for their first run, when backward follows."""
        if not torch.is_grad_enabled() or replaying():
            return None
        modules = [named for index in range(start, stop) for named in self.modules[index]]
        return Watch(self.name(start), modules, *call)

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
    ) -> Any:
        """Run ``items`` inside the top-level segment whose first block is ``head``."""
        out: Any = x
        for item in items:
            if isinstance(item, Stage):
                out = self.run_stage(item, x, rest, kwargs, head)
            else:
                out = self.run_segment(item, x, rest, kwargs, head)
            x = main_tensor(out)
        return out

    def run_segment(
        self,
        segment: Segment,
        x: Any,
        rest: tuple[Any, ...],
        kwargs: dict[str, Any],
        head: int | None = None,
        group: Group | None = None,
    ) -> Any:
        """Run ``segment`` under a checkpoint; ``head``: the first block of the top-level
        segment it lies in (``None``: it is that segment); ``group``: offload its input."""
        head = segment.start if head is None else head
        if not torch.is_grad_enabled():
            return self.run_items(segment.inner, x, rest, kwargs, head)
        body = _SegmentBody(self, segment, head)
        if group is None:
            out = checkpoint(body, x, *rest, use_reentrant=False, **kwargs)
        else:  # outside the checkpoint, the hooks see what it keeps: its inputs
            storage = x.untyped_storage()._cdata
            with self.offloader.saving(group, keep=lambda t: t.untyped_storage()._cdata != storage):
                out = checkpoint(body, x, *rest, use_reentrant=False, **kwargs)
        return guard_input(out, x, self.name(segment.start))


class _SegmentBody:
    """The function a segment's checkpoint runs (and reruns in backward)."""

    def __init__(self, executor: Executor, segment: Segment, head: int) -> None:
        self.executor = executor
        self.segment = segment
        self.head = head

    def __call__(self, x: Any, *rest: Any, **kwargs: Any) -> Any:
        return self.executor.run_items(self.segment.inner, x, rest, kwargs, self.head)


class Head:
    """The forward of a top-level segment's first block: runs the whole segment."""

    def __init__(self, executor: Executor, segment: Segment) -> None:
        self.executor = executor
        self.segment = segment

    @eager_around_compiled_blocks
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        executor, segment = self.executor, self.segment
        call = executor.call(segment.start, args, kwargs)
        watch = executor.watched(segment.start, segment.stop, call)
        group = executor.offload_group(segment.start, segment.offload)
        try:
            out = executor.run_segment(segment, *call, group=group)
        except BaseException:
            executor.abandon_offload()
            raise
        if watch is not None:
            watch.check()
        executor.item_done(segment.stop, out, group, segment=True)
        if segment.stop == segment.start + 1:  # no pass-throughs to prepare
            return out
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
                f"caches); the blocks after it in its recompute segment cannot return their "
                f"own: recompute these blocks one by one (or turn off output_attentions / "
                f"use_cache while training)"
            )
        _, rest, side = split(args, kwargs)
        executor.calls[segment.start] = SegmentCall(
            (rest, side), weakref.ref(main), tail, rng_state(main.device)
        )
        return out


class PassThrough:
    """The forward of a later block of a top-level segment: its head ran it already."""

    def __init__(self, executor: Executor, segment: Segment, index: int) -> None:
        self.executor = executor
        self.segment = segment
        self.index = index

    @eager_around_compiled_blocks
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        executor, segment, index = self.executor, self.segment, self.index
        x, rest, side = split(args, kwargs)
        call = executor.calls.get(segment.start)
        main = main_tensor(x)
        name = executor.name(index)
        joined = f"{executor.name(segment.start)!r}, which runs it inside one recompute segment"
        if call is None or main is None or call.output() is not main:
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
        if not same_rng_state(call.rng, rng_state(main.device)):
            raise PlanMismatchError(
                f"the model drew random numbers before stage {name!r} (between blocks, e.g. "
                f"LayerDrop), so running it earlier inside {joined} changes the random "
                f"stream: turn that off or recompute these blocks one by one"
            )
        if index == segment.stop - 1:
            del executor.calls[segment.start]
        if call.tail is None:
            return x
        return (x, *call.tail) if isinstance(call.tail, tuple) else [x, *call.tail]


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
            if group is None:
                out = executor.run_stage(stage, *call)
            else:  # parameters (and views of them) stay
                block = executor.chain.block_of_stage(stage.index)
                assert block is not None
                keys = storage_keys(module_tensors(block))
                with executor.offloader.saving(
                    group, keep=lambda t: t.untyped_storage()._cdata in keys
                ):
                    out = executor.run_stage(stage, *call)
        except BaseException:
            executor.abandon_offload()
            raise
        if watch is not None:
            watch.check()
        executor.item_done(stage.index + 1, out, group, segment=False)
        return out
