"""What measuring a step gives: the whole step (:class:`Measurement`) and its stages
(:class:`StageReading`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from memfit.measuring.meter import RECOMPUTE_RANGE, MemoryReading


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
        peak_op: the op at the peak (CPU; ``measure`` names it, a profile's readings leave it
            ``""``).
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
        (see :func:`~memfit.measuring.run.stages_without_gradient`)."""
        return frozenset(i for i in blocks if i in self.graphs and not self.has_backward(i))

    def times(self, factor: float) -> StageReading:
        """The same reading with every time multiplied by ``factor`` (CPU-time clocks in
        seconds of wall time, as :func:`~memfit.measuring.clock.wall_scaled` puts them)."""
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
