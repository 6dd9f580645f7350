"""Offload to host memory, in numbers: the ``offload`` option's costs and its transfers' timing.

Two ways to offload, both only at the top level of a tree (inside a recompute segment the
checkpoint's own saved-tensor hooks are the innermost and the offload hooks would see nothing):

* ``Stage(i, "offload")``: everything stage ``i``'s forward saves (``StageCosts.offload_bytes``)
  is copied to host memory on a side stream and brought back for its backward.
* ``Segment(s, t, inner, offload=True)``: the segment's input (``input_bytes[s]``), the one
  tensor its checkpoint keeps, waits in host memory until the recompute: "checkpoint to CPU".

Memory (the simulator's events, :mod:`memfit.planning.simulate`):

* an offloaded stage's forward is a kept one's (the tensors are made on the device); its copies
  are waited for when the *next* top-level item's forward ends (when that is a block: the
  executor runs it; else at once), so ``offload_bytes`` stay on the device until then;
* an offloaded segment's input leaves the device when its own forward ends (the copy overlaps
  the segment's no-save forward);
* in backward, the bytes come back when the next top-level item's backward *starts* (its
  output's gradient arrives), one item ahead of their use, or just before their own backward
  when the next stage is no block;
* so at most one item's offloaded bytes are in flight beyond what the option's costs say: the
  optimal DP keeps the largest such figure in reserve (:func:`in_flight_bytes`), and the tree it
  returns is simulated exactly.

Time: the copies run on a second stream at ``ChainCosts.host_bytes_per_s``. A transfer costs
what it does not hide behind the compute it overlaps (its *window*): in forward, the next
item's forward (a stage) or the segment's own no-save forward; in backward, the next item's
backward (with its recompute). The simulator uses the tree's actual windows; the option's own
``forward_s``/``backward_s`` (what the DP adds up) use the next stage's kept forward and
backward, a lower bound of any window there, so the DP never under-prices a transfer.

A third, for chains with skip connections (``ChainCosts.skips``):

* ``Segment(s, t, inner, offload_skips=((maker, reader), ...))``: a skip whose maker's next stage runs inside the
  segment (not first) is held by the model alone from that stage's no-save forward to its
  reader's forward (``docs/memory-model.md``, skip connections). It is copied to host memory
  from its maker's forward's end, leaves the device when the next stage's forward ends (the
  copy's window), and comes back in its reader's forward (the fetch's window), before the
  model reads it; the backward never needs it (the recompute makes it anew).

Host memory: every offloaded byte stays in host memory from its forward to its backward, so
the host peak is their sum (:func:`host_bytes`; offloaded skips count as if held all forward,
an upper bound: each is back before its reader's forward ends);
:class:`~memfit.planning.optimal.Planner` keeps it within ``host_budget_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts
from memfit.planning.plan import Item, Segment, Stage

OFFLOAD = "offload"


def exposed_s(transfer_bytes: int, bytes_per_s: float, window_s: float) -> float:
    """Seconds a transfer adds to the step: what overlapping ``window_s`` of compute leaves."""
    if transfer_bytes <= 0 or bytes_per_s <= 0:
        return 0.0
    return max(0.0, transfer_bytes / bytes_per_s - window_s)


def runs_ahead(costs: ChainCosts, stop: int) -> bool:
    """Whether the stage after an offloaded item (at ``stop``) is a block the runtime runs, so
    that its forward's end waits for the copies and its backward's start fetches them back."""
    return stop < len(costs.stages) and costs.stages[stop].checkpointable


def offload_option(costs: ChainCosts, index: int) -> OptionCosts:
    """Stage ``index``'s ``offload`` costs, derived from its ``keep`` and its offload bytes.

    Device bytes: ``offload_bytes`` less saved after the forward, back before the backward (so
    the backward peak and delta are the kept ones relative to the lower level). Time: the kept
    one's plus each transfer's exposure next to the next stage's kept forward and backward.
    """
    stage = costs.stages[index]
    keep, moved = stage.options[KEEP], stage.offload_bytes
    ahead = runs_ahead(costs, index + 1)
    after = costs.stages[index + 1].options[KEEP] if ahead else None
    rate = costs.host_bytes_per_s
    return OptionCosts(
        forward_s=keep.forward_s + exposed_s(moved, rate, after.forward_s if after else 0.0),
        backward_s=keep.backward_s + exposed_s(moved, rate, after.backward_s if after else 0.0),
        saved_bytes=keep.saved_bytes - moved,
        forward_peak_bytes=keep.forward_peak_bytes,
        backward_peak_bytes=keep.backward_peak_bytes + moved,
        backward_delta_bytes=keep.backward_delta_bytes + moved,
        detail={**keep.detail, "offload_bytes": moved},
    )


def with_offload(costs: ChainCosts) -> ChainCosts:
    """``costs`` with ``offload`` in the menu of every stage that has bytes to offload, when
    there is a host to offload to (``host_bytes_per_s > 0``); else unchanged."""
    if costs.host_bytes_per_s <= 0:
        return costs
    stages: list[StageCosts] = []
    for index, stage in enumerate(costs.stages):
        if stage.offload_bytes > 0 and stage.checkpointable and OFFLOAD not in stage.options:
            stage = replace(stage, options={**stage.options, OFFLOAD: offload_option(costs, index)})
        stages.append(stage)
    return replace(costs, stages=stages)


def without_offload(costs: ChainCosts) -> ChainCosts:
    """``costs`` with no ``offload`` option in any menu and no host to offload to."""
    stages = [
        replace(stage, options={k: v for k, v in stage.options.items() if k != OFFLOAD})
        if OFFLOAD in stage.options
        else stage
        for stage in costs.stages
    ]
    return replace(costs, stages=stages, host_bytes_per_s=0.0)


def offloads_input(costs: ChainCosts, index: int) -> bool:
    """Whether a segment starting at stage ``index`` may offload its input (a block whose
    input nothing else keeps on the device)."""
    stage = costs.stages[index]
    return costs.host_bytes_per_s > 0 and stage.checkpointable and stage.input_offloadable


def offloads(costs: ChainCosts) -> bool:
    """Whether any offload is possible on this chain."""
    return costs.host_bytes_per_s > 0 and any(stage.checkpointable for stage in costs.stages)


def segment_skips(costs: ChainCosts, segment: Segment) -> list[tuple[int, int, int]]:
    """``(maker, reader, bytes)`` of the skips a top-level segment's no-save forward leaves
    held by the model alone: those whose maker's next stage runs inside it, not first (what
    ``offload_skips`` moves to host memory). The bytes are that stage's input."""
    found = []
    for skip in costs.skips:
        after = skip.maker + 1
        if not segment.start < after < segment.stop:
            continue
        stage = costs.stages[after]
        at = stage.released_input_at
        if stage.released_input_bytes > 0 and at is not None and at > after:
            continue  # a later stage's kept forward frees it: the model holds it anyway
        found.append((skip.maker, skip.reader, stage.input_bytes))
    return found


def skip_pairs(costs: ChainCosts, segment: Segment) -> tuple[tuple[int, int], ...]:
    """``(maker, reader)`` of every skip :func:`segment_skips` finds (what the optimal
    planner's offloading segments name in ``offload_skips``)."""
    return tuple((maker, reader) for maker, reader, _ in segment_skips(costs, segment))


def offloads_skips(costs: ChainCosts, segment: Segment) -> bool:
    """Whether a top-level segment may offload skips: a host to move them to and at least
    one skip its no-save forward leaves held."""
    return costs.host_bytes_per_s > 0 and bool(segment_skips(costs, segment))


def moved_bytes(costs: ChainCosts, item: Item) -> int:
    """Bytes a top-level item moves to host memory (0 if it offloads nothing)."""
    if isinstance(item, Segment):
        return costs.stages[item.start].input_bytes if item.offload else 0
    return costs.stages[item.index].offload_bytes if item.option == OFFLOAD else 0


def host_bytes(costs: ChainCosts, tree: Sequence[Item]) -> int:
    """A tree's host-memory peak: every offloaded byte, all held at the end of the forward
    (offloaded skips, back by then, counted too: an upper bound)."""
    skips = sum(
        size
        for item in tree
        if isinstance(item, Segment) and item.offload_skips
        for maker, reader, size in segment_skips(costs, item)
        if (maker, reader) in item.offload_skips
    )
    return skips + sum(moved_bytes(costs, item) for item in tree)


def in_flight_bytes(costs: ChainCosts) -> int:
    """The most bytes one item can have in flight beyond its option's costs (a stage's copies
    before the next forward ends, a segment input fetched during the next backward)."""
    if not offloads(costs):
        return 0
    largest = 0
    for index, stage in enumerate(costs.stages):
        if offloads_input(costs, index):
            largest = max(largest, stage.input_bytes)
        if OFFLOAD in stage.options:
            largest = max(largest, stage.offload_bytes)
    return largest


def is_offload(item: Item) -> bool:
    return (isinstance(item, Segment) and item.offload) or (
        isinstance(item, Stage) and item.option == OFFLOAD
    )
