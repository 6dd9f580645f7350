"""Measuring training steps: the whole step (``measure``) and its stages (``measure_stages``).

Stage boundaries are marks dropped by module and tensor hooks: a block's forward pre-hook opens
its forward span; a gradient hook on a stage's output opens that stage's backward span (the
gradient of its output is ready). Memory comes from one step under the :class:`MemoryMeter`;
times from separate steps without the profiler (medians over repeats after a warm-up).
"""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from memfit.measuring.carry import carried_inputs, carried_outputs, uncarried
from memfit.measuring.chain import (
    Chain,
    Inputs,
    main_tensor,
    same_side_inputs,
    split_main,
)
from memfit.measuring.meter import RECOMPUTE_RANGE, MemoryMeter, MemoryReading
from memfit.measuring.state import preserving_state
from memfit.measuring.step import (
    LossFn,
    check_step_arguments,
    compute_loss,
    held_bytes,
    local_tensor,
    preserved_grads,
    reset_grads,
    sample_device,
    split_sample,
    storage_key,
    synchronize,
    tensor_bytes,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Measurement:
    """One training step, measured.

    Attributes:
        peak_bytes: step peak including what was held before the step.
        held_bytes: bytes live before the step (parameters, gradients that exist, buffers,
            the sample, optimizer state when given). On CUDA: the allocator's count.
        gradient_bytes: bytes the step leaves allocated when it ends: the parameter
            gradients it makes (0 when they existed before it: accumulation). No plan can
            remove them, so they count with ``held_bytes`` in a budget's base.
        activation_bytes: ``peak_bytes - held_bytes - gradient_bytes``: the memory a plan
            can work on, the base of a percentage budget (``"40%"`` is ``base_bytes`` plus
            40% of it).
        forward_peak_bytes: peak during forward and loss, above ``held_bytes``.
        backward_peak_bytes: peak during backward, above ``held_bytes``.
        step_s, forward_s, backward_s: medians over the timed repeats.
        peak_op: the op at the peak (CPU).
        accumulate: whether gradients existed before the step (gradient accumulation).
        keep_output: whether the model's output stayed alive through backward (the loop
            ``out = model(**batch); out.loss.backward()``) or only the loss did.
        device: where the step ran.
        repeats: how many timed steps the medians are over.
        reserved_peak_bytes: CUDA: the caching allocator's reserved peak during the metered
            step (from an emptied cache: the step's own), what the device must really have;
            0 on CPU.
    """

    peak_bytes: int
    held_bytes: int
    activation_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    step_s: float
    forward_s: float
    backward_s: float
    peak_op: str
    accumulate: bool
    device: str
    repeats: int
    keep_output: bool = True
    reserved_peak_bytes: int = 0
    gradient_bytes: int = 0

    @property
    def base_bytes(self) -> int:
        """What no plan removes: held before the step, and the gradients it makes."""
        return self.held_bytes + self.gradient_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fragmentation_bytes(self) -> int:
        """CUDA: what the caching allocator reserved beyond the allocated peak during the step
        (rounding, split blocks, streams); 0 on CPU."""
        return max(0, self.reserved_peak_bytes - self.peak_bytes) if self.reserved_peak_bytes else 0


WALL, CPU = "wall", "cpu"  # a CPU clock's whole-step seconds, beside its stage labels


class _Clock:
    """Marks with times (synchronising CUDA so spans hold their own kernels).

    ``cpu=True`` on the CPU: spans are the process's CPU time (every thread's), which other
    processes' load does not enter as it enters wall time, and the durations carry the step's
    wall and CPU seconds under :data:`WALL` and :data:`CPU` (for :func:`wall_scaled`). On
    CUDA the device's work is what counts: wall time, synchronised.
    """

    def __init__(self, device: torch.device, cpu: bool = False) -> None:
        self.device = device
        self.cpu = cpu and device.type == "cpu"
        self.marks: list[tuple[str, float, float]] = []

    def mark(self, label: str) -> None:
        synchronize(self.device)
        self.marks.append((label, time.perf_counter(), time.process_time() if self.cpu else 0.0))

    def durations(self) -> dict[str, float]:
        at = 1 if self.cpu else 0  # after the label: wall, CPU
        spans = {
            label: later[at] - now[at]
            for (label, *now), (_next, *later) in zip(self.marks, self.marks[1:], strict=False)
        }
        if self.cpu and len(self.marks) > 1:
            spans[WALL] = self.marks[-1][1] - self.marks[0][1]
            spans[CPU] = self.marks[-1][2] - self.marks[0][2]
        return spans


def wall_factor(clocks: Mapping[str, Sequence[Mapping[str, float]]]) -> float:
    """The median of the steps' wall / CPU seconds over all ways (1.0 for wall-time clocks)."""
    ratios = [
        step[WALL] / step[CPU]
        for steps in clocks.values()
        for step in steps
        if step.get(CPU, 0.0) > 0.0
    ]
    return statistics.median(ratios) if ratios else 1.0


def profiler_share(metered: Mapping[str, float], plain: Mapping[str, float]) -> float:
    """Plain over metered seconds of one way's step: what a time taken under the meter (the
    profiler records every op and allocation) is multiplied by to stand for a plain step.
    CPU seconds on a CPU clock, else the spans' sum; 1.0 when either clock is empty. At most
    1.0: the profiler only adds work, so a plain step slower than the metered one is the
    machine's noise, which must not make every other way dearer."""
    if CPU in metered and CPU in plain:
        metered_s, plain_s = metered[CPU], plain[CPU]
    else:
        metered_s, plain_s = sum(metered.values()), sum(plain.values())
    return min(1.0, plain_s / metered_s) if metered_s > 0.0 and plain_s > 0.0 else 1.0


def wall_scaled(
    clocks: Mapping[str, Sequence[Mapping[str, float]]],
) -> dict[str, list[dict[str, float]]]:
    """CPU-time clocks (:func:`stage_clock`) in seconds of wall time: every span times one
    factor (:func:`wall_factor`), the median of the steps' wall / CPU seconds over all ways.
    One factor keeps the ways' order as their CPU times have it (a way timed while another
    process ran is not slower for it), and puts predicted step times back in the seconds a
    user waits. Wall-time clocks (CUDA) come back as they are."""
    factor = wall_factor(clocks)
    return {
        way: [
            {label: value * factor for label, value in step.items() if label not in (WALL, CPU)}
            for step in steps
        ]
        for way, steps in clocks.items()
    }


Marker = Callable[[str], None]
Watcher = Callable[[str, torch.Tensor], None]


def _step(
    model: nn.Module, sample: Any, loss_fn: LossFn | None, mark: Marker, keep_output: bool = True
) -> torch.Tensor:
    """Forward, loss, backward. ``keep_output``: the output (logits, caches) stays alive through
    backward, as in ``out = model(**batch); out.loss.backward()``; else only the loss does."""
    args, kwargs = split_sample(sample)
    mark("F:0")
    output = model(*args, **kwargs)
    loss = compute_loss(output, loss_fn)
    if not keep_output:
        del output
    mark("B:loss")
    loss.backward()
    mark("end")
    return loss.detach()


@dataclass
class _Marked:
    """What the stage marks saw: stage index -> bytes of its output; block index -> whether
    it got the same side inputs as the block before it; the largest bytes of side inputs that
    require grad (an encoder output every decoder block reads) that any block got."""

    output_bytes: dict[int, int] = field(default_factory=dict)
    same: dict[int, bool] = field(default_factory=dict)
    side_grad_bytes: int = 0
    # blocks whose output holds tensors besides the hidden state (attention weights): the
    # runtime cannot join them with their neighbours in one recompute segment
    tails: set[int] = field(default_factory=set)
    # block index -> bytes of those tensors (distinct storages that are neither the hidden
    # state's nor the block's inputs'): what the caller holds until the next block returns
    tail_bytes: dict[int, int] = field(default_factory=dict)
    # blocks whose output requires grad: autograd recorded their graph (a frozen block fed an
    # input that needs no gradient records none)
    graphs: set[int] = field(default_factory=set)


def _tail_bytes(output: Any, carried: list[Any], args: Any, kwargs: Any) -> int:
    """Bytes of the tensors a block returns besides its hidden state (the carried tensors),
    counting each storage once and leaving out the carried tensors' and the block's inputs'
    (a position bias passed on)."""
    known = {
        storage_key(leaf)
        for leaf in [*carried, *tree_leaves([args, kwargs])]
        if isinstance(leaf, torch.Tensor)
    }
    tails = [
        leaf
        for leaf in tree_leaves(_uncarried_items(output, carried))
        if isinstance(leaf, torch.Tensor) and storage_key(leaf) not in known
    ]
    return tensor_bytes(*tails)


def _uncarried_items(output: Any, carried: list[Any]) -> list[Any]:
    """The items of a block's output tuple that are not carried to the next block (the items
    after the hidden state, for a block that hands on its main tensor only)."""
    if not isinstance(output, tuple | list):
        return []
    if len(carried) == 1:
        return list(output[1:])
    return [item for item in output if not any(item is tensor for tensor in carried)]


def _carried(values: list[Any]) -> list[torch.Tensor]:
    return [value for value in values if isinstance(value, torch.Tensor)]


def _same_tensors(a: list[Any], b: list[torch.Tensor]) -> bool:
    """Whether two lists hold the very same tensors, in any order."""
    return {id(t) for t in a if t is not None} == {id(t) for t in b} and all(
        any(t is u for u in b) for t in a if t is not None
    )


def _once(hook: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """``hook`` for the first of several tensors' gradients only (a block that carries several
    tensors starts its backward when the first of their gradients is ready)."""
    fired = [False]

    def first(grad: torch.Tensor) -> None:
        if not fired[0]:
            fired[0] = True
            hook(grad)

    return first


@contextmanager
def _stage_marks(chain: Chain, mark: Marker, watch: Watcher | None = None) -> Iterator[_Marked]:
    """Hooks that mark stage boundaries; yields what they saw (:class:`_Marked`). ``watch``
    (:meth:`MemoryMeter.watch`) is given every block's main input, named ``input:<stage>``."""
    marked = _Marked()
    output_bytes = marked.output_bytes
    # only the previous block's side inputs, and only until the next block compares: holding
    # every block's (masks, rotary tables) to the end of the step would change the step measured
    calls: dict[int, Inputs] = {}
    # every hook's handle, the tensors' too: a block's input may be the user's own tensor (a
    # sample or a parameter that requires grad), which must not keep memfit's hooks (they would
    # mark the spans of meters long gone at every later backward)
    handles: list[RemovableHandle] = []
    # block stage -> its output and the labels its gradient marks, latest stage first: a stage
    # between groups that passes the block's output on as it is (nothing between layer1 and
    # layer2 of a ResNet) marks its (empty) backward before the block's, which runs next.
    # Weakly: holding the outputs would change the step measured. Several for a block that
    # carries several tensors on (:mod:`memfit.measuring.carry`).
    outputs: dict[int, tuple[list[weakref.ref[torch.Tensor]], list[str]]] = {}

    def on_grad(label: str) -> Callable[[torch.Tensor], None]:
        return lambda _grad: mark(label)

    def on_grads(labels: list[str]) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            for label in reversed(labels):
                mark(label)

        return hook

    def pre_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mark(f"F:{index}")
            if watch is not None:
                given = main_tensor(split_main(args, kwargs)[0])
                if given is not None:
                    watch(f"input:{index}", local_tensor(given))
            x, rest, side = split_main(args, kwargs)
            carry = chain.carry(index)
            current = uncarried(carry, rest, side)
            previous = calls.pop(index - 1, None)
            if previous is not None:
                marked.same[index] = same_side_inputs(previous, current)
            grads = [
                leaf
                for leaf in tree_leaves(current)
                if isinstance(leaf, torch.Tensor)
                and leaf.requires_grad
                and not isinstance(leaf, nn.Parameter)
            ]
            marked.side_grad_bytes = max(marked.side_grad_bytes, tensor_bytes(*grads))
            if chain.block_of_stage(index + 1) is not None:
                calls[index] = current
            if chain.block_of_stage(index - 1) is None:  # <pre> or a stage between groups
                handed = carried_inputs(carry, x, rest, side)
                firsts = _carried([main_tensor(handed[0]), *handed[1:]])
                if firsts:
                    output_bytes[index - 1] = tensor_bytes(*firsts)
                    before = outputs.get(index - 2)
                    if before is not None and _same_tensors([ref() for ref in before[0]], firsts):
                        before[1].append(f"B:{index - 1}")
                    else:
                        hook = _once(on_grad(f"B:{index - 1}"))
                        for first in firsts:
                            if first.requires_grad:
                                handles.append(first.register_hook(hook))

        return hook

    def post_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            carried = carried_outputs(chain.carry(index), output, main_tensor)
            if any(
                isinstance(leaf, torch.Tensor)
                for leaf in tree_leaves(_uncarried_items(output, carried))
            ):
                marked.tails.add(index)
                marked.tail_bytes[index] = _tail_bytes(output, carried, args, kwargs)
            outs = _carried(carried)
            if outs:
                output_bytes[index] = tensor_bytes(*outs)
                grads = [out for out in outs if out.requires_grad]
                if grads:
                    marked.graphs.add(index)
                    labels = [f"B:{index}"]
                    outputs[index] = ([weakref.ref(out) for out in outs], labels)
                    hook = _once(on_grads(labels))
                    handles.extend(out.register_hook(hook) for out in grads)
            if chain.block_of_stage(index + 1) is None:  # <post> or a stage between groups
                mark(f"F:{index + 1}")

        return hook

    for index in chain.block_stages:
        block = chain.block_of_stage(index)
        assert block is not None
        handles.append(block.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(index), with_kwargs=True))
    try:
        yield marked
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True, slots=True)
class StageReading:
    """Memory spans and median times of every stage of one way of running the model."""

    memory: MemoryReading
    forward_s: dict[int, float]
    backward_s: dict[int, float]
    output_bytes: dict[int, int]
    measurement: Measurement
    same_side_inputs: dict[int, bool]
    side_grad_bytes: int = 0
    tails: frozenset[int] = frozenset()  # blocks returning tensors besides the hidden state
    tail_bytes: Mapping[int, int] = field(default_factory=dict)  # block -> bytes of those
    graphs: frozenset[int] = frozenset()  # blocks whose output requires grad
    # the metered step's own clock (measure_stages(clock_metered=True)): label -> CPU seconds,
    # the profiler's cost included; empty when it was not clocked
    metered_s: Mapping[str, float] = field(default_factory=dict)

    def cut_off(self, blocks: Sequence[int]) -> frozenset[int]:
        """Of ``blocks``, those no gradient reaches although autograd recorded their graph
        (see :func:`stages_without_gradient`)."""
        return frozenset(i for i in blocks if i in self.graphs and not self.has_backward(i))

    def times(self, factor: float) -> StageReading:
        """The same reading with every time multiplied by ``factor`` (CPU-time clocks in
        seconds of wall time, as :func:`wall_scaled` puts them)."""
        m = self.measurement
        return replace(
            self,
            forward_s={i: s * factor for i, s in self.forward_s.items()},
            backward_s={i: s * factor for i, s in self.backward_s.items()},
            measurement=replace(
                m,
                step_s=m.step_s * factor,
                forward_s=m.forward_s * factor,
                backward_s=m.backward_s * factor,
            ),
        )

    def released_input(self, index: int) -> tuple[int, int]:
        """Bytes of block ``index``'s main input freed during the forward, and the stage in
        whose forward span: no op saved the input and its caller let it go (a frozen block's
        input, a trained block's that needs no gradient: in its own span; the embeddings'
        output that the model holds to the end of its forward: in the last stage's span).
        ``(0, index)`` when the input lived into the backward."""
        label, size = self.memory.freed.get(f"input:{index}", ("", 0))
        if not label.startswith("F:"):
            return 0, index
        return size, int(label.removeprefix("F:"))

    def forward_span(self, index: int) -> tuple[int, int, int]:
        """(start, peak, end) level of stage ``index``'s forward."""
        label = "F:0" if index == 0 else f"F:{index}"
        return _span(self.memory, label)

    def recompute_span(self, stage: str) -> tuple[int, int, int] | None:
        """(start, peak, end) level of stage ``stage``'s first rerun in backward (a
        checkpoint's recompute, ended by torch's early stop); ``None`` when it was not rerun."""
        label = f"{RECOMPUTE_RANGE}{stage}"
        for span in self.memory.ranges:
            if span.label == label:
                return span.start_bytes, span.peak_bytes, span.end_bytes
        return None

    def has_backward(self, index: int) -> bool:
        """Whether a gradient flowed into stage ``index``'s output (its backward ran)."""
        return any(span.label == f"B:{index}" for span in self.memory.spans)

    def backward_span(self, index: int, last: int) -> tuple[int, int, int]:
        label = "B:loss" if index == last else f"B:{index}"
        try:
            return _span(self.memory, label)
        except KeyError:  # no gradient flows into this stage (frozen input): no backward
            level = self.memory.span("end").start_bytes
            return level, level, level


def _span(reading: MemoryReading, label: str) -> tuple[int, int, int]:
    span = reading.span(label)
    return span.start_bytes, span.peak_bytes, span.end_bytes


def _timed_step(
    model: nn.Module,
    sample: Any,
    chain: Chain | None,
    loss_fn: LossFn | None,
    accumulate: bool,
    keep_output: bool = True,
    cpu: bool = False,
) -> dict[str, float]:
    reset_grads(model, accumulate, sample)
    clock = _Clock(sample_device(model, sample), cpu)
    with _marks(chain, clock.mark):
        _step(model, sample, loss_fn, clock.mark, keep_output)
    return clock.durations()


@contextmanager
def _marks(chain: Chain | None, mark: Marker, watch: Watcher | None = None) -> Iterator[_Marked]:
    """Stage marks when there is a chain (see :func:`_stage_marks`), else only the step's."""
    if chain is None:
        yield _Marked()
    else:
        with _stage_marks(chain, mark, watch) as marked:
            yield marked


def stage_clock(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    *,
    loss_fn: LossFn | None = None,
    accumulate: bool = False,
    warmup: int = 1,
    keep_output: bool = True,
) -> dict[str, float]:
    """One timed step of ``model`` as it is now, cut at the stage marks: label -> seconds of
    the process's CPU time on the CPU (plus the step's wall and CPU seconds, under
    :data:`WALL` and :data:`CPU`; :func:`wall_scaled` turns them into wall seconds), of wall
    time on CUDA.

    For :func:`measure_stages`'s ``clocks``: callers time several ways of running the model in
    turns (A, B, C, A, B, C...), so that the machine's drift reaches them all alike. ``warmup``
    untimed steps come first: right after another way of running, the allocator's state (pages
    returned to the system by a leaner plan) would be charged to this one (measured: +17% to
    +46% on the keep step of the built-in GPT right after a recompute step).
    """
    with preserved_grads(model, sample):
        for _ in range(warmup):
            reset_grads(model, accumulate, sample)
            _step(model, sample, loss_fn, lambda _label: None, keep_output)
        return _timed_step(model, sample, chain, loss_fn, accumulate, keep_output, cpu=True)


def step_clock(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    accumulate: bool = False,
    warmup: int = 1,
    keep_output: bool = True,
) -> tuple[float, float]:
    """Wall and CPU seconds of one training step of ``model`` as it is now, without stage
    marks (on CUDA both are the synchronised wall time), after ``warmup`` untimed steps.

    The marks' hooks cost time of their own, which :func:`stage_clock`'s spans include:
    measured 0.5-0.7 ms on a 10 ms step of a 4-layer Llama config (about 14 marks). Shape fits
    scale the stage times to this clock's step (:func:`memfit.shape_profiles.profile_shapes`).
    """
    with preserved_grads(model, sample):
        for _ in range(warmup):
            reset_grads(model, accumulate, sample)
            _step(model, sample, loss_fn, lambda _label: None, keep_output)
        durations = _timed_step(model, sample, None, loss_fn, accumulate, keep_output, cpu=True)
    if CPU in durations:
        return durations[WALL], durations[CPU]
    total = sum(durations.values())
    return total, total


def stages_without_gradient(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    *,
    loss_fn: LossFn | None = None,
    accumulate: bool = False,
    keep_output: bool = True,
) -> frozenset[int]:
    """The block stages cut off from the loss in one step of ``model`` as it is now: autograd
    records their graph (their output requires grad) but no gradient reaches it (an argmin, a
    detach after them), so their backward never runs. Their saved tensors go when the model
    drops the graph, in the forward, whatever option runs them, and a checkpoint's recompute
    never runs. (A frozen block fed an input that needs no gradient records no graph: it is
    not among them, and a segment starting there still spares the next blocks' inputs.)"""
    labels: list[str] = []
    with preserved_grads(model, sample):
        reset_grads(model, accumulate, sample)
        with _marks(chain, labels.append) as marked:
            _step(model, sample, loss_fn, labels.append, keep_output)
    seen = set(labels)
    return frozenset(i for i in chain.block_stages if i in marked.graphs and f"B:{i}" not in seen)


def measure_stages(
    model: nn.Module,
    sample: Any,
    chain: Chain | None,
    *,
    loss_fn: LossFn | None = None,
    accumulate: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    optimizer: Any = None,
    clocks: Sequence[Mapping[str, float]]
    | Callable[[], Sequence[Mapping[str, float]]]
    | None = None,
    keep_output: bool = True,
    clock_metered: bool = False,
) -> StageReading:
    """Measure one step of ``model`` as it is now (plain or planned), cut into stages.

    With ``chain=None`` only the whole step is measured (``measure``). ``clocks``: stage
    durations timed already (:func:`stage_clock`, interleaved with other ways of running the
    model); then only the memory is measured here. A callable instead times them right after
    the metered step, which is then their warm-up. ``clock_metered``: the metered step's marks
    also run a CPU clock (:func:`stage_clock`'s), whose durations, the profiler's own cost
    included, are the reading's :attr:`StageReading.metered_s`, and its times when ``clocks``
    is ``None`` (the setup's fast path: one step per way, both metered and timed).
    ``keep_output``: see :func:`measure`.
    """
    if clocks is not None and not callable(clocks) and not clocks:
        raise ValueError("clocks, when given, must hold at least one timed step")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got {repeats}, {warmup}")
    device = sample_device(model, sample)
    last = len(chain) - 1 if chain is not None else 0

    with preserved_grads(model, sample):
        for _ in range(warmup):
            reset_grads(model, accumulate, sample)
            _step(model, sample, loss_fn, lambda _label: None, keep_output)
        if clocks is None and not clock_metered:
            clocks = [
                _timed_step(model, sample, chain, loss_fn, accumulate, keep_output)
                for _ in range(repeats)
            ]
        reset_grads(model, accumulate, sample)
        held = held_bytes(model, sample, optimizer)
        meter = MemoryMeter(device)
        reserved = 0
        if device.type == "cuda":  # the step's own reserved peak: from an empty cache
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        metered_clock = _Clock(device, cpu=True) if clock_metered else None
        mark = meter.mark if metered_clock is None else _both(meter.mark, metered_clock.mark)
        with _marks(chain, mark, meter.watch) as marked, meter:
            loss = _step(model, sample, loss_fn, mark, keep_output)
        metered_s = {} if metered_clock is None else metered_clock.durations()
        if device.type == "cuda":
            held = torch.cuda.memory_allocated(device) - meter.reading.end_bytes
            reserved = torch.cuda.max_memory_reserved(device)
        if callable(clocks):
            clocks = clocks()
            if not clocks:
                raise ValueError("clocks, when given, must hold at least one timed step")
        elif clocks is None:
            clocks = [metered_s]
    reading = meter.reading
    marked.output_bytes[last] = tensor_bytes(loss)
    # what the step leaves (its gradients; the returned loss is a few bytes), never above its peak
    gradients = min(max(0, reading.end_bytes), reading.peak_bytes)

    def median(label: str) -> float:
        return statistics.median(durations.get(label, 0.0) for durations in clocks)

    def total(labels: list[str]) -> float:
        return statistics.median(sum(d.get(label, 0.0) for label in labels) for d in clocks)

    forward_labels = [label for label in clocks[0] if label.startswith("F:")]
    backward_labels = [label for label in clocks[0] if label.startswith("B:")]
    measurement = Measurement(
        peak_bytes=held + reading.peak_bytes,
        held_bytes=held,
        activation_bytes=reading.peak_bytes - gradients,
        gradient_bytes=gradients,
        forward_peak_bytes=max(
            span.peak_bytes for span in reading.spans if span.label.startswith("F:")
        ),
        backward_peak_bytes=max(
            span.peak_bytes
            for span in reading.spans
            if span.label.startswith("B:") or span.label == "end"
        ),
        step_s=total(forward_labels + backward_labels),
        forward_s=total(forward_labels),
        backward_s=total(backward_labels),
        peak_op=reading.peak_op,
        accumulate=accumulate,
        device=str(device),
        repeats=len(clocks),
        keep_output=keep_output,
        reserved_peak_bytes=reserved,
    )
    forward_s = {i: median("F:0" if i == 0 else f"F:{i}") for i in range(last + 1)}
    backward_s = {i: median("B:loss" if i == last else f"B:{i}") for i in range(last + 1)}
    return StageReading(
        reading,
        forward_s,
        backward_s,
        marked.output_bytes,
        measurement,
        marked.same,
        marked.side_grad_bytes,
        frozenset(marked.tails),
        dict(marked.tail_bytes),
        frozenset(marked.graphs),
        metered_s,
    )


def _both(first: Marker, second: Marker) -> Marker:
    """One marker calling two: the meter's, then a clock's."""

    def mark(label: str) -> None:
        first(label)
        second(label)

    return mark


@preserving_state
def measure(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    accumulate: bool = False,
    repeats: int = 5,
    warmup: int = 1,
    optimizer: Any = None,
    keep_output: bool = True,
) -> Measurement:
    """Measure one training step: peak memory (to the byte on CPU) and median time.

    Args:
        model: the model, in the mode the user trains it (``model.train()``).
        sample: a tuple of positional or a dict of keyword arguments for ``model(...)``.
        loss_fn: maps the output to the scalar loss when it is neither a scalar nor has ``.loss``.
        accumulate: measure the gradient-accumulation steady state (gradients exist before
            the step) instead of ``zero_grad(set_to_none=True)``.
        repeats: timed steps (the time is their median), after ``warmup`` untimed ones.
        optimizer: its state counts as held before the step.
        keep_output: ``True`` (default): the model's output stays alive through backward, as
            in the usual loop ``out = model(**batch); out.loss.backward()`` (logits, caches:
            gigabytes with a large vocabulary); ``False`` for loops that keep only the loss
            (``loss = model(**batch).loss; loss.backward()``).

    Returns:
        A :class:`Measurement`. The model (gradients, buffers, modes) and the RNG states are
        left as they were.

    Example:
        >>> m = memfit.measure(model, (x, y))
        >>> m.peak_bytes, m.activation_bytes, m.step_s
    """
    check_step_arguments(model, sample, loss_fn, optimizer)
    return measure_stages(
        model,
        sample,
        None,
        loss_fn=loss_fn,
        accumulate=accumulate,
        repeats=repeats,
        warmup=warmup,
        optimizer=optimizer,
        keep_output=keep_output,
    ).measurement


def time_step(
    model: nn.Module,
    sample: Any,
    *,
    loss_fn: LossFn | None = None,
    accumulate: bool = False,
    keep_output: bool = True,
) -> float:
    """Seconds of one training step (gradients reset to the steady state first)."""
    device = sample_device(model, sample)
    reset_grads(model, accumulate, sample)
    synchronize(device)
    gc.collect()  # as timeit does: no collector pause inside the timed step
    enabled = gc.isenabled()  # and as timeit does, leave it as found (off stays off)
    gc.disable()
    try:
        start = time.perf_counter()
        _step(model, sample, loss_fn, lambda _label: None, keep_output)
        synchronize(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
