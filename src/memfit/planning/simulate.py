"""The simulator: a schedule tree replayed over the chain's costs, giving its peak and step time.

It is the executable definition of the memory semantics stated in ``docs/memory-model.md``
(the level, each item's forward, recompute and backward, early stop, ``nosave_held_bytes``,
``recompute_lead_bytes``, checkpoint states, released inputs, side inputs, tails, and the step
time); :mod:`memfit.planning.costs` holds the numbers it reads. Every solver's tree is judged
by it: :func:`simulate` gives a plan's predicted peak and step time, :func:`check_tree` refuses
a tree the chain cannot run, :func:`budget_base` is a percentage budget's base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memfit.planning.costs import KEEP, ChainCosts, StageCosts
from memfit.planning.offload import (
    OFFLOAD,
    exposed_s,
    host_bytes,
    moved_bytes,
    runs_ahead,
    segment_skips,
)
from memfit.planning.plan import Item, Segment, Stage, keep_tree, validate_tree

FORWARD, RECOMPUTE, BACKWARD = "forward", "recompute", "backward"


@dataclass(frozen=True, kw_only=True, slots=True)
class Simulation:
    """What a schedule costs.

    Attributes:
        peak_bytes: the highest level reached during the step, ``held_bytes`` included.
        step_s: predicted seconds of forward plus backward.
        peak_where: the event that reaches the peak, e.g. ``"backward of stage 7 (h.6) inside
            segment [4, 8)"``.
        peak_phase: ``"forward"``, ``"recompute"`` (a segment's replay in backward) or
            ``"backward"``; ``"start"`` when nothing exceeds the held bytes.
        timeline: ``(event, level_bytes after it)`` for every event, when asked for.
        host_peak_bytes: host memory the plan's offloads hold at the end of the forward.
    """

    peak_bytes: int
    step_s: float
    peak_where: str
    peak_phase: str
    timeline: tuple[tuple[str, int], ...] = ()
    host_peak_bytes: int = 0


def check_tree(costs: ChainCosts, tree: Sequence[Item]) -> None:
    """Check that ``tree`` is a valid schedule for ``costs``.

    Args:
        costs: the chain.
        tree: a schedule tree over ``[0, len(costs))``.

    Raises:
        ValueError: the tree does not partition the chain, a stage runs an option its menu lacks,
            or a segment holds a stage that is not checkpointable or does not join the one before.
    """
    validate_tree(tree, 0, len(costs.stages))
    _check_items(costs.stages, tree)
    offloaded = [item for item in tree if isinstance(item, Segment) and item.offload]
    if offloaded and costs.host_bytes_per_s <= 0:
        item = offloaded[0]
        raise ValueError(
            f"segment [{item.start}, {item.stop}) offloads its input, but these costs have no "
            f"host to offload to (host_bytes_per_s is 0: a model on the CPU); drop offload"
        )
    for hosting in tree:
        if isinstance(hosting, Segment) and hosting.offload_skips:
            if costs.host_bytes_per_s <= 0:
                raise ValueError(
                    f"segment [{hosting.start}, {hosting.stop}) offloads its skips, but these costs "
                    f"have no host to offload to (host_bytes_per_s is 0: a model on the CPU); "
                    f"drop offload_skips"
                )
            held = [(maker, reader) for maker, reader, _ in segment_skips(costs, hosting)]
            wrong = [pair for pair in hosting.offload_skips if pair not in held]
            if wrong:
                raise ValueError(
                    f"segment [{hosting.start}, {hosting.stop}) offloads skip {wrong[0]} (maker, "
                    f"reader), but its no-save forward leaves only {held} on the device (a skip "
                    f"made by a stage before its last whose next stage runs inside it); drop it "
                    f"from offload_skips"
                )
    for item in offloaded:
        if not costs.stages[item.start].input_offloadable:
            raise ValueError(
                f"segment [{item.start}, {item.stop}) offloads its input, but the stage before "
                f"saves it too, so it stays on the device (and its copy back would add to it); "
                f"drop offload there"
            )


def _check_items(
    stages: Sequence[StageCosts], items: Sequence[Item], in_segment: bool = False
) -> None:
    for item in items:
        if isinstance(item, Stage):
            stage = stages[item.index]
            if item.option not in stage.options:
                raise ValueError(
                    f"stage {item.index} ({stage.name!r}) has no option {item.option!r}; "
                    f"its options are {sorted(stage.options)}"
                )
            if in_segment and item.option != KEEP:
                # torch needs the same saved tensors in a segment's forward and its recompute,
                # so an option runs in both; a selective stash made in the no-save forward is
                # then held until backward, and the option saves nothing there.
                raise ValueError(
                    f"stage {item.index} ({stage.name!r}) runs {item.option!r} inside a "
                    f"recompute segment; only keep (or a nested segment) can run there"
                )
            continue
        for index in range(item.start, item.stop):
            stage = stages[index]
            if not stage.checkpointable:
                raise ValueError(
                    f"segment [{item.start}, {item.stop}) holds stage {index} ({stage.name!r}), "
                    "which is not checkpointable"
                )
            if index > item.start and not stage.joins_previous:
                raise ValueError(
                    f"segment [{item.start}, {item.stop}) spans stage {index} ({stage.name!r}), "
                    "which does not join the stage before it; end the segment before it"
                )
        if in_segment and item.offload_skips:
            raise ValueError(
                f"segment [{item.start}, {item.stop}) offloads its skips inside another "
                "segment, whose no-save forward already holds none; offload_skips is for "
                "top-level segments only"
            )
        if in_segment and item.offload:
            raise ValueError(
                f"segment [{item.start}, {item.stop}) offloads its input inside another "
                "segment, where the outer checkpoint's hooks hide it; offload top-level "
                "segments only"
            )
        _check_items(stages, item.inner, in_segment=True)


class _Replay:
    """One pass over a tree: the level, the peak so far and where it happened."""

    def __init__(self, costs: ChainCosts, record: bool) -> None:
        self.costs = costs
        self.stages = costs.stages
        self.checkpoint_bytes = costs.checkpoint_bytes
        self.level = costs.held_bytes
        self.peak = costs.held_bytes
        self.where = "start of the step (held bytes)"
        self.phase = "start"
        self.step_s = 0.0
        self.record = record
        self.timeline: list[tuple[str, int]] = []
        self.lead = 0  # the recompute running now: its last stage's backward's bytes before it
        self.skips = {skip.maker: skip.reader for skip in costs.skips}
        self.held: dict[int, int] = {}  # reader -> skip bytes the model holds until it reads
        self.hosted: dict[int, int] = {}  # reader -> offloaded skip bytes waiting in host memory

    def fetch_skips(self, index: int, window_s: float, context: str) -> None:
        """Before stage ``index``'s forward in the step: the offloaded skips it reads come
        back (the copy overlaps that forward, which ends waiting for it)."""
        hosted = self.hosted.pop(index, 0)
        if hosted:
            self.step_s += exposed_s(hosted, self.costs.host_bytes_per_s, window_s)
            label = f"forward: skips for {self.name(index)} fetched from host{context}"
            self.event(label, FORWARD, 0, hosted)
            self.held[index] = self.held.get(index, 0) + hosted

    def read_skips(self, index: int, context: str) -> None:
        """After stage ``index``'s forward in the step: the skips it read last are freed."""
        held = self.held.pop(index, 0)
        if held:
            label = f"forward: skips read by {self.name(index)} freed{context}"
            self.event(label, FORWARD, 0, -held)

    def event(self, label: str, phase: str, peak_above: int, delta: int) -> None:
        top = self.level + max(peak_above, delta) + (self.lead if phase == RECOMPUTE else 0)
        if top > self.peak:
            self.peak, self.where, self.phase = top, label, phase
        self.level += delta
        if self.record:
            self.timeline.append((label, self.level))

    def rng_event(self, label: str, phase: str, peak_above: int, delta: int) -> None:
        """An event of the checkpoints' RNG states: none at all where they take no memory."""
        if self.checkpoint_bytes:
            self.event(label, phase, peak_above, delta)

    def name(self, index: int) -> str:
        return f"stage {index} ({self.stages[index].name})"

    def forward(
        self, items: Sequence[Item], phase: str, context: str, holds: int = -1, stops: int = -1
    ) -> None:
        """``holds``: the stage whose input a recompute's checkpoint holds (its first);
        ``stops``: the stage at which torch's early stop ends the recompute (its last)."""
        for item in items:
            if isinstance(item, Stage):
                stage = self.stages[item.index]
                option = stage.options[item.option]
                peak = stage.recompute_peak() if item.index == stops else option.forward_peak_bytes
                delta = option.saved_bytes + stage.output_bytes
                if phase == RECOMPUTE:  # kept already by the step's no-save forward
                    delta -= stage.nosave_held_bytes
                if item.option == OFFLOAD:  # made on the device; the top level moves them
                    delta += stage.offload_bytes
                    self.step_s += sum(_kept_times(self.costs, item))
                else:
                    self.step_s += option.forward_s + option.backward_s
                if phase == FORWARD:
                    self.fetch_skips(item.index, option.forward_s, context)
                label = f"{phase} of {self.name(item.index)}{context}"
                self.event(label, phase, peak, delta)
                if item.index == holds and _releases_own_input(stage):
                    label = f"recompute: input of {self.name(item.index)} held{context}"
                    self.event(label, phase, 0, stage.released_input_bytes)
                if phase == FORWARD:
                    self.read_skips(item.index, context)
                continue
            inside = _inside(item, context)
            states = self.checkpoint_bytes * (1 + _nested(item.inner))
            self.rng_event(f"{phase}: checkpoint RNG states{inside}", phase, 0, states)
            for index in range(item.start, item.stop):
                stage = self.stages[index]
                self.step_s += stage.nosave_forward_s
                # an input the model holds past this stage (released_input_at: a later
                # stage's kept forward frees it) is not freed here either
                frees = index > item.start and not _released_later(stage, index)
                reader = self.skips.get(index - 1, -1) if phase == FORWARD else -1
                hosts = frees and reader > index and (index - 1, reader) in item.offload_skips
                if frees and reader > index and not hosts:  # the model holds it for its reader
                    self.held[reader] = self.held.get(reader, 0) + stage.input_bytes
                frees = frees and reader <= index
                delta = stage.output_bytes - (stage.input_bytes if frees else 0)
                if phase == FORWARD:  # the step's graph keeps them to the stage's backward
                    delta += stage.nosave_held_bytes
                    self.fetch_skips(index, stage.nosave_forward_s, inside)
                label = f"{phase} (no save) of {self.name(index)}{inside}"
                self.event(label, phase, stage.nosave_forward_peak_bytes, delta)
                if hosts:  # copied since its maker's forward ended, waited for here
                    size = stage.input_bytes
                    self.step_s += exposed_s(
                        size, self.costs.host_bytes_per_s, stage.nosave_forward_s
                    )
                    label = f"forward: skip of {self.name(index - 1)} to host{inside}"
                    self.event(label, FORWARD, 0, -size)
                    self.hosted[reader] = self.hosted.get(reader, 0) + size
                if phase == FORWARD:
                    self.read_skips(index, inside)
            if item.stop - item.start > 1:
                label = f"{phase}: RNG check between the blocks{inside}"
                self.rng_event(label, phase, 2 * self.checkpoint_bytes, 0)

    def backward(self, items: Sequence[Item], context: str) -> None:
        for item in reversed(items):
            if isinstance(item, Stage):
                stage = self.stages[item.index]
                option = stage.options[item.option]
                peak, delta = option.backward_peak_bytes, option.backward_delta_bytes
                if item.option == OFFLOAD:  # its bytes are back on the device already
                    peak, delta = peak - stage.offload_bytes, delta - stage.offload_bytes
                label = f"backward of {self.name(item.index)}{context}"
                self.event(label, BACKWARD, peak, delta)
                continue
            inside = _inside(item, context)
            self.rng_event(
                f"recompute: RNG state saved{inside}", RECOMPUTE, 0, self.checkpoint_bytes
            )
            last = item.inner[-1]
            stops = last.index if isinstance(last, Stage) else -1
            outer, self.lead = self.lead, self.stages[item.stop - 1].recompute_lead_bytes
            self.forward(item.inner, RECOMPUTE, inside, holds=item.start, stops=stops)
            self.lead = outer
            self.rng_event(
                f"recompute: RNG state restored{inside}", RECOMPUTE, 0, -self.checkpoint_bytes
            )
            dropped = self.stages[item.stop - 1].output_bytes
            self.event(
                f"drop recomputed output of {self.name(item.stop - 1)}", BACKWARD, 0, -dropped
            )
            self.backward(item.inner, inside)
            first = self.stages[item.start]
            if isinstance(item.inner[0], Stage) and _releases_own_input(first):
                label = f"backward: input of {self.name(item.start)} freed{inside}"
                self.event(label, BACKWARD, 0, -first.released_input_bytes)
            states = self.checkpoint_bytes * (1 + _nested(item.inner))
            self.rng_event(f"backward: checkpoint RNG states freed{inside}", BACKWARD, 0, -states)


SIDE_HELD = "forward: side inputs held by the checkpoints"
SIDE_FREED = "backward: side inputs freed with the first checkpoint"


def _releases_own_input(stage: StageCosts) -> bool:
    return stage.released_input_bytes > 0 and stage.released_input_at is None


def _released_later(stage: StageCosts, index: int) -> bool:
    at = stage.released_input_at
    return stage.released_input_bytes > 0 and at is not None and at > index


def _late_releases(costs: ChainCosts, tree: Sequence[Item]) -> dict[int, tuple[int, int]]:
    """Top-level items whose checkpoint holds an input that a later stage's kept forward
    frees: position -> (that stage, bytes)."""
    late = {}
    for position, item in enumerate(tree):
        stage = costs.stages[_first(item)]
        if holds_inputs(item) and stage.released_input_at is not None:
            late[position] = (stage.released_input_at, stage.released_input_bytes)
    return late


def holds_inputs(item: Item) -> bool:
    """Whether a top-level item runs under a checkpoint, which holds the block's inputs."""
    return isinstance(item, Segment) or item.option.startswith("selective:")


def _nested(items: Sequence[Item]) -> int:
    """Segments inside ``items``, at any depth."""
    return sum(1 + _nested(item.inner) for item in items if isinstance(item, Segment))


def _inside(segment: Segment, context: str) -> str:
    here = f" inside segment [{segment.start}, {segment.stop})"
    return here + (f" of{context.removeprefix(' inside')}" if context else "")


def simulate(costs: ChainCosts, tree: Sequence[Item], *, timeline: bool = False) -> Simulation:
    """Replay ``tree`` over ``costs``: the step's peak bytes and seconds.

    Args:
        costs: the chain's costs.
        tree: a schedule tree over ``[0, len(costs))`` (``Plan.tree``).
        timeline: also return every event with the level after it.

    Returns:
        The :class:`Simulation`.

    Raises:
        ValueError: the tree is not a valid schedule for ``costs`` (see :func:`check_tree`).

    Example:
        >>> from memfit.planning import keep_tree, uniform_chain
        >>> costs = uniform_chain(2, activation_bytes=1, saved_bytes=4)
        >>> simulate(costs, keep_tree(0, 2)).peak_bytes
        15
    """
    check_tree(costs, tree)
    replay = _Replay(costs, timeline)
    holders = [i for i, item in enumerate(tree) if holds_inputs(item)]
    side = costs.side_input_bytes if holders else 0
    rate = costs.host_bytes_per_s
    # the checkpoints hold the blocks' side inputs that a kept step frees when the forward
    # ends: from the last stage's forward to the first holder's backward
    tail, last = 0, 0  # the previous top-level item's tail (its caller holds it), last stage
    copying = 0  # an offloaded stage's bytes whose copies the current item's forward ends
    releases = _late_releases(costs, tree)
    for position, item in enumerate(tree):
        if side and position == len(tree) - 1:
            replay.event(SIDE_HELD, FORWARD, 0, side)
        replay.forward([item], FORWARD, "")
        for holder, (at, size) in releases.items():
            if holder < position and isinstance(item, Stage) and item.index == at:
                label = f"forward: input of {replay.name(_first(tree[holder]))} held"
                replay.event(label, FORWARD, 0, size)
        if copying:
            window = _forward_s(costs, item)
            replay.step_s += exposed_s(copying, rate, window)
            replay.event(
                f"forward: copies to host before {replay.name(_first(item))} done",
                FORWARD,
                0,
                -copying,
            )
            copying = 0
        moved = moved_bytes(costs, item)
        if isinstance(item, Segment) and moved:
            replay.step_s += exposed_s(moved, rate, _forward_s(costs, item))
            replay.event(f"forward: input of {replay.name(item.start)} to host", FORWARD, 0, -moved)
        elif moved and runs_ahead(costs, _stop(item)):
            copying = moved  # waited for when the next item's forward ends
        elif moved:
            replay.step_s += exposed_s(moved, rate, 0.0)
            replay.event(f"forward: {replay.name(_first(item))} to host", FORWARD, 0, -moved)
        if tail:
            replay.event(f"forward: tail of {replay.name(last)} freed", FORWARD, 0, -tail)
        last = item.stop - 1 if isinstance(item, Segment) else item.index
        tail = costs.stages[last].tail_bytes if holds_inputs(item) else 0
        if position == len(tree) - 1:
            tail = 0  # the step's forward ends here
        if tail:
            replay.event(f"forward: tail of {replay.name(last)} held", FORWARD, 0, tail)
    first = holders[0] if side else len(tree)
    for position in range(len(tree) - 1, -1, -1):
        item = tree[position]
        before = tree[position - 1] if position else None
        ahead = 0  # the item before this one fetched during this one's backward
        if before is not None and runs_ahead(costs, _first(item)):
            ahead = moved_bytes(costs, before)
        if ahead:
            label = f"backward: {replay.name(_first(before))} fetched from host"  # type: ignore[arg-type]
            replay.event(label, BACKWARD, 0, ahead)
        moved = moved_bytes(costs, item)
        late = moved and not runs_ahead(costs, _stop(item))
        if late:  # no item after it runs the fetch ahead: at its own backward's start
            replay.step_s += exposed_s(moved, rate, 0.0)
            replay.event(
                f"backward: {replay.name(_first(item))} fetched from host", BACKWARD, 0, moved
            )
        started = replay.step_s
        replay.backward([item], "")
        if ahead:
            replay.step_s += exposed_s(
                ahead, rate, replay.step_s - started + _backward_s(costs, item)
            )
        if side and position == first:
            replay.event(SIDE_FREED, BACKWARD, 0, -side)
        if position in releases:
            label = f"backward: input of {replay.name(_first(item))} freed"
            replay.event(label, BACKWARD, 0, -releases[position][1])
    return Simulation(
        peak_bytes=replay.peak,
        step_s=replay.step_s,
        peak_where=replay.where,
        peak_phase=replay.phase,
        timeline=tuple(replay.timeline),
        host_peak_bytes=host_bytes(costs, tree),
    )


@dataclass(frozen=True, slots=True)
class SkipForward:
    """What skips change in a top-level item's forward in the step (:func:`skip_forward`).

    Attributes:
        extra_bytes: the peak it reaches above the same forward without skips.
        extra_s: seconds its skips' copies to and from host memory leave exposed.
        held: the skips the model holds on the device after it (reader -> bytes).
        hosted: the offloaded skips waiting in host memory after it (reader -> bytes).
    """

    extra_bytes: int
    extra_s: float
    held: dict[int, int]
    hosted: dict[int, int]


def skip_forward(
    costs: ChainCosts, item: Item, held: dict[int, int], hosted: dict[int, int] | None = None
) -> SkipForward:
    """What skips change in a top-level item's forward, with ``held`` (reader -> bytes) on the
    device and ``hosted`` in host memory when it starts (the optimal DP's sweep over chains with
    skips reads it: the simulator itself, once per item and state).

    Example:
        >>> from memfit.planning.costs import Skip, uniform_chain
        >>> from dataclasses import replace
        >>> costs = replace(uniform_chain(4, activation_bytes=1, saved_bytes=4), skips=(Skip(0, 3),))
        >>> skip_forward(costs, Segment(0, 2, (Stage(0), Stage(1))), {})
        SkipForward(extra_bytes=0, extra_s=0.0, held={3: 1}, hosted={})
    """
    with_skips, without = _Replay(costs, False), _Replay(costs, False)
    without.skips = {}
    with_skips.held, with_skips.hosted = dict(held), dict(hosted or {})
    without.level = without.peak = 0
    with_skips.level = with_skips.peak = sum(held.values())
    with_skips.forward([item], FORWARD, "")
    without.forward([item], FORWARD, "")
    return SkipForward(
        extra_bytes=with_skips.peak - without.peak,
        extra_s=with_skips.step_s - without.step_s,
        held=with_skips.held,
        hosted=with_skips.hosted,
    )


def _first(item: Item) -> int:
    return item.start if isinstance(item, Segment) else item.index


def _stop(item: Item) -> int:
    return item.stop if isinstance(item, Segment) else item.index + 1


def _forward_s(costs: ChainCosts, item: Item) -> float:
    """Seconds of a top-level item's forward (a segment's: its no-save forward)."""
    if isinstance(item, Segment):
        return sum(costs.stages[i].nosave_forward_s for i in range(item.start, item.stop))
    return _kept_times(costs, item)[0]


def _backward_s(costs: ChainCosts, item: Item) -> float:
    """Seconds of a stage's backward that the replay books at its forward (a stage's time is
    booked whole there); a segment's recompute and backward are booked in its backward."""
    return 0.0 if isinstance(item, Segment) else _kept_times(costs, item)[1]


def _kept_times(costs: ChainCosts, stage: Stage) -> tuple[float, float]:
    """A stage's forward and backward seconds; an offloaded one's without its transfers (the
    simulator adds them from the tree's actual windows)."""
    menu = costs.stages[stage.index].options
    option = menu[KEEP] if stage.option == OFFLOAD else menu[stage.option]
    return option.forward_s, option.backward_s


def budget_base(costs: ChainCosts) -> tuple[int, int]:
    """A percentage budget's base and its activation memory, for these costs: ``(base,
    activation)``, where ``base`` is what no plan removes (``held_bytes`` and the gradients the
    step makes) and ``activation`` the rest of the plain step's simulated peak; ``"40%"`` is
    ``base + 0.4 * activation`` (:meth:`memfit.units.Budget.resolve`).

    Example:
        >>> from memfit.planning.costs import uniform_chain
        >>> budget_base(uniform_chain(2, activation_bytes=1, saved_bytes=4, held_bytes=7))
        (7, 15)
    """
    base = costs.held_bytes + costs.gradient_bytes
    plain = simulate(costs, keep_tree(0, len(costs.stages))).peak_bytes
    return base, max(0, plain - base)
