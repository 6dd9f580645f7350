"""Running training steps under the meter and the clocks: the whole step (``measure``), its
stages (``measure_stages``) and timed steps of one way of running the model (``stage_clock``,
``step_clock``).

Stage boundaries are the marks of :mod:`memfit.measuring.marks`. Memory comes from one step
under the :class:`~memfit.measuring.meter.MemoryMeter`; times from the same step's clock or from
separate steps without the profiler (medians over repeats after a warm-up).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from memfit.measuring.chain import Chain
from memfit.measuring.clock import CPU, WALL, Clock
from memfit.measuring.loop import TrainingLoop
from memfit.measuring.marks import Marker, both, marks
from memfit.measuring.meter import MemoryMeter
from memfit.measuring.readings import Measurement, StageReading
from memfit.measuring.state import preserving_state
from memfit.measuring.step import (
    LossFn,
    compute_loss,
    held_bytes,
    preserved_grads,
    reset_grads,
    sample_device,
    split_sample,
    synchronize,
    tensor_bytes,
)

USUAL = TrainingLoop()


def _step(model: nn.Module, sample: Any, loop: TrainingLoop, mark: Marker) -> torch.Tensor:
    """Forward, loss, backward, as ``loop`` runs them (``loop.keep_output``: the output, logits
    and caches, stays alive through backward, as in ``out = model(**batch);
    out.loss.backward()``; else only the loss does)."""
    args, kwargs = split_sample(sample)
    mark("F:0")
    output = model(*args, **kwargs)
    loss = compute_loss(output, loop.loss_fn)
    if not loop.keep_output:
        del output
    mark("B:loss")
    loss.backward()
    mark("end")
    return loss.detach()


def _warm_up(model: nn.Module, sample: Any, loop: TrainingLoop, steps: int) -> None:
    """``steps`` untimed, unmarked steps, each from the gradients' steady state."""
    for _ in range(steps):
        reset_grads(model, loop.accumulate, sample)
        _step(model, sample, loop, lambda _label: None)


def _timed_step(
    model: nn.Module, sample: Any, chain: Chain | None, loop: TrainingLoop, cpu: bool = False
) -> dict[str, float]:
    reset_grads(model, loop.accumulate, sample)
    clock = Clock(sample_device(model, sample), cpu)
    with marks(chain, clock.mark):
        _step(model, sample, loop, clock.mark)
    return clock.durations()


def stage_clock(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    *,
    loop: TrainingLoop = USUAL,
    warmup: int = 1,
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
        _warm_up(model, sample, loop, warmup)
        return _timed_step(model, sample, chain, loop, cpu=True)


def step_clock(
    model: nn.Module,
    sample: Any,
    *,
    loop: TrainingLoop = USUAL,
    warmup: int = 1,
) -> tuple[float, float]:
    """Wall and CPU seconds of one training step of ``model`` as it is now, without stage
    marks (on CUDA both are the synchronised wall time), after ``warmup`` untimed steps.

    The marks' hooks cost time of their own, which :func:`stage_clock`'s spans include:
    measured 0.5-0.7 ms on a 10 ms step of a 4-layer Llama config (about 14 marks). Shape fits
    scale the stage times to this clock's step (:func:`memfit.verbs.shape_profiles.profile_shapes`).
    """
    with preserved_grads(model, sample):
        _warm_up(model, sample, loop, warmup)
        durations = _timed_step(model, sample, None, loop, cpu=True)
    if CPU in durations:
        return durations[WALL], durations[CPU]
    total = sum(durations.values())
    return total, total


def stages_without_gradient(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    *,
    loop: TrainingLoop = USUAL,
) -> frozenset[int]:
    """The block stages cut off from the loss in one step of ``model`` as it is now: autograd
    records their graph (their output requires grad) but no gradient reaches it (an argmin, a
    detach after them), so their backward never runs. Their saved tensors go when the model
    drops the graph, in the forward, whatever option runs them, and a checkpoint's recompute
    never runs. (A frozen block fed an input that needs no gradient records no graph: it is
    not among them, and a segment starting there still spares the next blocks' inputs.)"""
    labels: list[str] = []
    with preserved_grads(model, sample):
        reset_grads(model, loop.accumulate, sample)
        with marks(chain, labels.append) as marked:
            _step(model, sample, loop, labels.append)
    seen = set(labels)
    return frozenset(i for i in chain.block_stages if i in marked.graphs and f"B:{i}" not in seen)


def measure_stages(
    model: nn.Module,
    sample: Any,
    chain: Chain | None,
    *,
    loop: TrainingLoop = USUAL,
    repeats: int = 3,
    warmup: int = 1,
    clocks: Sequence[Mapping[str, float]]
    | Callable[[], Sequence[Mapping[str, float]]]
    | None = None,
    clock_metered: bool = False,
    peak_op: bool = False,
) -> StageReading:
    """Measure one step of ``model`` as it is now (plain or planned), cut into stages.

    With ``chain=None`` only the whole step is measured (``measure``). ``clocks``: stage
    durations timed already (:func:`stage_clock`, interleaved with other ways of running the
    model); then only the memory is measured here. A callable instead times them right after
    the metered step, which is then their warm-up. ``clock_metered``: the metered step's marks
    also run a CPU clock (:func:`stage_clock`'s), whose durations, the profiler's own cost
    included, are the reading's :attr:`StageReading.metered_s`, and its times when ``clocks``
    is ``None`` (the setup's fast path: one step per way, both metered and timed).
    ``loop``: how the user's loop runs the step (see :func:`measure`). ``peak_op``: name the op at the peak
    (:attr:`Measurement.peak_op`; the profiler then records every op, which costs it about four
    times as long after the step); else it is ``""``.
    """
    if clocks is not None and not callable(clocks) and not clocks:
        raise ValueError("clocks, when given, must hold at least one timed step")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got {repeats}, {warmup}")
    device = sample_device(model, sample)
    last = len(chain) - 1 if chain is not None else 0

    with preserved_grads(model, sample):
        _warm_up(model, sample, loop, warmup)
        if clocks is None and not clock_metered:
            clocks = [_timed_step(model, sample, chain, loop) for _ in range(repeats)]
        reset_grads(model, loop.accumulate, sample)
        held = held_bytes(model, sample, loop.optimizer)
        meter = MemoryMeter(device, ops=peak_op)
        reserved = 0
        if device.type == "cuda":  # the step's own reserved peak: from an empty cache
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        metered_clock = Clock(device, cpu=True) if clock_metered else None
        mark = meter.mark if metered_clock is None else both(meter.mark, metered_clock.mark)
        with marks(chain, mark, meter.watch) as marked, meter:
            loss = _step(model, sample, loop, mark)
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
        accumulate=loop.accumulate,
        device=str(device),
        repeats=len(clocks),
        keep_output=loop.keep_output,
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
    loop = TrainingLoop(
        loss_fn=loss_fn, optimizer=optimizer, keep_output=keep_output, accumulate=accumulate
    )
    return measure_loop(model, sample, loop, repeats=repeats, warmup=warmup)


@preserving_state
def measure_loop(
    model: nn.Module, sample: Any, loop: TrainingLoop = USUAL, *, repeats: int = 5, warmup: int = 1
) -> Measurement:
    """:func:`measure` with the loop as one value (the model and RNG states left as found)."""
    loop.check(model, sample)
    return measure_stages(
        model, sample, None, loop=loop, repeats=repeats, warmup=warmup, peak_op=True
    ).measurement


def time_step(model: nn.Module, sample: Any, *, loop: TrainingLoop = USUAL) -> float:
    """Seconds of one training step as ``loop`` runs it (gradients reset to its steady state
    first)."""
    device = sample_device(model, sample)
    reset_grads(model, loop.accumulate, sample)
    synchronize(device)
    gc.collect()  # as timeit does: no collector pause inside the timed step
    enabled = gc.isenabled()  # and as timeit does, leave it as found (off stays off)
    gc.disable()
    try:
        start = time.perf_counter()
        _step(model, sample, loop, lambda _label: None)
        synchronize(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
