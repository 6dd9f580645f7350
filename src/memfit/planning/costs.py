"""The chain's costs as plain numbers: what every solver and the simulator read.

A :class:`ChainCosts` is built from a measured profile (``memfit.measuring``) or written by hand
(tests, synthetic chains). No torch here.

What the simulator (:mod:`memfit.planning.simulate`) charges for each field, stage by stage, is
stated once in ``docs/memory-model.md``; the dataclasses below say what each field measures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

KEEP = "keep"
# A block no gradient reaches, run under one checkpoint (no rerun ever runs): its graph keeps
# the checkpoint's inputs and RNG state instead of its saved tensors (memory-model.md)
CHECKPOINT = "checkpoint"


@dataclass(frozen=True, kw_only=True, slots=True)
class OptionCosts:
    """Costs of running one stage with one option (``keep``, ``selective:<policy>``, ...).

    Attributes:
        forward_s: seconds of the stage's forward with this option.
        backward_s: seconds of its backward (including any op-level recompute it implies).
        saved_bytes: bytes still held after the forward beyond the stage's output (what backward
            needs, net of the input if the stage lets it go).
        forward_peak_bytes: peak above the level at the start of the forward.
        backward_peak_bytes: peak above the level at the start of the backward.
        backward_delta_bytes: level after the backward minus level before it.
        detail: free-form, JSON-serialisable facts about the option (e.g. the ops it saves).
    """

    forward_s: float
    backward_s: float
    saved_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    backward_delta_bytes: int
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("forward_s", "backward_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"OptionCosts.{name} must be >= 0 seconds; got {value!r}")
        for name in ("forward_peak_bytes", "backward_peak_bytes"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"OptionCosts.{name} must be >= 0; got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StageCosts:
    """One stage of the chain.

    Attributes:
        name: the stage's name (a module fqn such as ``transformer.h.3``, or ``embed``/``head``).
        input_bytes: bytes of the stage's main input tensor.
        output_bytes: bytes of its main output tensor (for the last stage: the loss).
        options: option name -> costs; ``keep`` is always present.
        nosave_forward_s: seconds of the forward inside a recompute segment (nothing saved).
        nosave_forward_peak_bytes: its peak above the level at its start.
        checkpointable: whether the stage can be part of a recompute segment.
        joins_previous: whether a recompute segment may span this stage and the one before
            (false where the side inputs change between them).
        tail_bytes: bytes of the tensors the stage returns besides its output (Falcon eager's
            attention scores) when it runs under a checkpoint: its caller holds them until the
            next stage returns. A kept stage's are tensors autograd saves anyway (no extra).
        offload_bytes: bytes of the tensors the stage's forward saves that the ``offload``
            option moves to host memory (activations only: not parameters, tiny or broadcast
            tensors, nor the stage's output, which the next stage holds); 0: not offloadable.
        input_offloadable: whether a segment that starts here may offload its main input:
            false where the input would stay on the device because something else saves it
            too (the block before, when it ends in ``tanh`` or ``ReLU``, saves its output).
        released_input_bytes: bytes of its input that a step with every stage kept frees in
            its forward, no op having saved the input: after frozen layers, an input that needs
            no gradient. A checkpoint starting here (a recompute segment, a ``selective:``
            stage) holds them instead to the end of its backward.
        released_input_at: the stage in whose forward they are freed (its costs are net of
            them); ``None``: this stage's own (the model drops the input when the stage
            returns), else a later one's (the embeddings' output, which the model holds to the
            end of its forward: the last stage's).
        nosave_held_bytes: bytes the stage's no-save forward keeps to its backward although a
            checkpoint saves nothing: tensors autograd keeps without the saved-tensor hooks,
            such as the 8-byte tensor of a Python number multiplied in (``1.702 * x`` in
            CLIP's quick_gelu), measured beyond ``checkpoint_bytes``; part of ``saved_bytes``.
        recompute_peak_bytes: the peak above the level at its start of the stage's rerun when
            it is the last stage of a recompute segment, measured as torch runs it: torch's
            non-reentrant checkpoint stops the rerun once the last tensor backward needs is
            rebuilt (early stop), so the ops after it never run. ``None`` (profiles from
            before it was measured, hand-written chains): the kept forward's peak
            (:meth:`recompute_peak`).
        recompute_lead_bytes: bytes the stage's backward holds when its rerun starts, as the
            last stage of a recompute segment: the gradients of the ops after its last saved
            tensor, which autograd computes before it reads the first saved tensor (and so
            starts the recompute). They stay through the whole recompute of the segment.
    """

    name: str
    input_bytes: int
    output_bytes: int
    options: Mapping[str, OptionCosts]
    nosave_forward_s: float
    nosave_forward_peak_bytes: int
    checkpointable: bool = True
    joins_previous: bool = True
    tail_bytes: int = 0
    offload_bytes: int = 0
    input_offloadable: bool = True
    released_input_bytes: int = 0
    released_input_at: int | None = None
    nosave_held_bytes: int = 0
    recompute_peak_bytes: int | None = None
    recompute_lead_bytes: int = 0

    def recompute_peak(self) -> int:
        """The peak of the stage's rerun as the last stage of a recompute segment (early
        stop), above the level at its start; the kept forward's when not measured."""
        if self.recompute_peak_bytes is None:
            return self.options[KEEP].forward_peak_bytes
        return self.recompute_peak_bytes

    def __post_init__(self) -> None:
        if KEEP not in self.options:
            raise ValueError(
                f"stage {self.name!r}: options must include {KEEP!r}; got {sorted(self.options)}"
            )
        sizes = (
            self.input_bytes,
            self.output_bytes,
            self.tail_bytes,
            self.offload_bytes,
            self.released_input_bytes,
            self.nosave_held_bytes,
            self.recompute_lead_bytes,
        )
        if min(sizes) < 0:
            raise ValueError(f"stage {self.name!r}: tensor sizes must be >= 0")
        if self.recompute_peak_bytes is not None and self.recompute_peak_bytes < 0:
            raise ValueError(
                f"stage {self.name!r}: recompute_peak_bytes must be >= 0 or None; "
                f"got {self.recompute_peak_bytes!r}"
            )


@dataclass(frozen=True, slots=True)
class Skip:
    """A skip connection: stage ``maker``'s output, which the model reads again in stage
    ``reader``'s forward, besides the next stage (a U-Net's down-block outputs, read by the up
    blocks; DenseNet-style concatenations).

    It is the next stage's input (``stages[maker + 1].input_bytes``). Wherever the chain would
    free it before ``reader`` (in the step's no-save forward of a recompute segment that holds
    both ``maker`` and ``maker + 1``), the model still holds it, until ``reader``'s forward has
    read it (``docs/memory-model.md``, "Skip connections").

    Attributes:
        maker: the stage whose output it is.
        reader: the last stage whose forward reads it (after ``maker + 1``).
    """

    maker: int
    reader: int

    def __post_init__(self) -> None:
        if not (self.maker >= 0 and self.reader > self.maker + 1):
            raise ValueError(
                f"Skip(maker={self.maker}, reader={self.reader}): expected 0 <= maker and "
                f"reader > maker + 1 (the next stage's read is the chain's own)"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ChainCosts:
    """The whole chain: stages in execution order plus what is held before the step.

    Attributes:
        stages: the stages, first to last (the last one ends in the loss).
        held_bytes: bytes live before the step starts.
        gradient_bytes: bytes the step leaves when it ends (the parameter gradients it makes),
            measured. No plan removes them: with ``held_bytes`` they are the base of a
            percentage budget (:func:`memfit.planning.simulate.budget_base`); the simulator
            does not read them (the stages' backward deltas allocate the gradients).
        fingerprint: identifies the model and sample the costs were measured on.
        checkpoint_bytes: bytes each recompute segment's checkpoint keeps from its forward to
            its backward besides the tensors (the RNG state: 5,056 bytes on CPU, none of the
            device's memory on CUDA), measured.
        side_input_bytes: bytes of the blocks' side inputs (masks, position tables) that a
            kept step frees when the forward ends but that checkpoints hold as their inputs:
            with any top-level segment or selective stage they stay live from the last stage's
            forward to the backward of the first such item (measured: the last stages' saved
            bytes with every block recomputed, less those with every block kept).
        side_grad_bytes: bytes of the largest side input that requires grad (an encoder
            output every decoder block reads). Its gradient accumulates at other times when
            the blocks are recomputed, which the stage costs (measured with every block kept)
            do not show; the optimal planner keeps this much in reserve under the budget for
            plans that recompute.
        gathered_bytes: bytes of the largest block's parameters as FSDP2 gathers them (0
            without FSDP2 units). Collectives finish on the process group's own thread, so
            in some steps one block's gathered buffer is freed later than in others (measured
            on 2 gloo ranks: about one step in eight); the optimal planner keeps this much in
            reserve under the budget, and predictions are the usual steps' peaks.
        fragmentation_bytes: CUDA: what the caching allocator reserved beyond the allocated peak
            in the plain step (measured from an emptied cache); the optimal planner keeps this
            much in reserve under the budget, so that a plan's *reserved* memory fits too.
        host_bytes_per_s: the device-host copy bandwidth (the slower direction, pinned memory,
            measured); 0 where there is no device to offload from (a CPU model): then nothing
            is offloaded (:mod:`memfit.planning.offload`).
        skips: stage outputs the model reads again stages later (:class:`Skip`); empty for a
            plain chain.
    """

    stages: Sequence[StageCosts]
    held_bytes: int = 0
    fingerprint: str = ""
    gradient_bytes: int = 0
    checkpoint_bytes: int = 0
    side_input_bytes: int = 0
    side_grad_bytes: int = 0
    gathered_bytes: int = 0
    host_bytes_per_s: float = 0.0
    fragmentation_bytes: int = 0
    skips: Sequence[Skip] = ()

    def __post_init__(self) -> None:
        if not self.host_bytes_per_s >= 0:
            raise ValueError(f"host_bytes_per_s must be >= 0; got {self.host_bytes_per_s!r}")
        if not self.stages:
            raise ValueError("ChainCosts needs at least one stage")
        for name in (
            "gradient_bytes",
            "checkpoint_bytes",
            "side_input_bytes",
            "side_grad_bytes",
            "gathered_bytes",
            "fragmentation_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        object.__setattr__(self, "stages", tuple(self.stages))
        skips = tuple(sorted(set(self.skips), key=lambda skip: (skip.maker, skip.reader)))
        for skip in skips:
            if skip.reader >= len(self.stages):
                raise ValueError(
                    f"{skip} reads past the last of the {len(self.stages)} stages; expected a "
                    f"reader below {len(self.stages)}"
                )
        if len({skip.maker for skip in skips}) < len(skips):
            raise ValueError(f"skips {skips}: one skip per maker (its last reader)")
        object.__setattr__(self, "skips", skips)

    def __len__(self) -> int:
        return len(self.stages)

    def keep_only(self) -> ChainCosts:
        """The same chain with ``keep`` as every stage's only option (recompute segments stay
        possible): the menu of plain checkpointing, without selective options."""
        stages = [replace(stage, options={KEEP: stage.options[KEEP]}) for stage in self.stages]
        return replace(self, stages=stages)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChainCosts:
        stages = []
        for stage in data["stages"]:
            options = {name: OptionCosts(**option) for name, option in stage["options"].items()}
            stages.append(StageCosts(**{**stage, "options": options}))
        return cls(
            stages=stages,
            held_bytes=int(data.get("held_bytes", 0)),
            fingerprint=str(data.get("fingerprint", "")),
            gradient_bytes=int(data.get("gradient_bytes", 0)),
            checkpoint_bytes=int(data.get("checkpoint_bytes", 0)),
            side_input_bytes=int(data.get("side_input_bytes", 0)),
            side_grad_bytes=int(data.get("side_grad_bytes", 0)),
            gathered_bytes=int(data.get("gathered_bytes", 0)),
            host_bytes_per_s=float(data.get("host_bytes_per_s", 0.0)),
            fragmentation_bytes=int(data.get("fragmentation_bytes", 0)),
            skips=tuple(Skip(**skip) for skip in data.get("skips", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> ChainCosts:
        return cls.from_dict(json.loads(text))


def uniform_chain(
    n: int,
    *,
    activation_bytes: int = 1 << 20,
    saved_bytes: int = 4 << 20,
    forward_s: float = 1.0,
    backward_s: float = 2.0,
    held_bytes: int = 0,
) -> ChainCosts:
    """A synthetic chain of ``n`` identical stages (tests, benchmarks, docs)."""
    stages = [
        StageCosts(
            name=f"stage{i}",
            input_bytes=activation_bytes,
            output_bytes=activation_bytes,
            options={
                KEEP: OptionCosts(
                    forward_s=forward_s,
                    backward_s=backward_s,
                    saved_bytes=saved_bytes,
                    forward_peak_bytes=saved_bytes + activation_bytes,
                    backward_peak_bytes=saved_bytes + activation_bytes,
                    backward_delta_bytes=-(saved_bytes + activation_bytes),
                )
            },
            nosave_forward_s=forward_s,
            nosave_forward_peak_bytes=saved_bytes + activation_bytes,
        )
        for i in range(n)
    ]
    return ChainCosts(stages=stages, held_bytes=held_bytes, fingerprint=f"uniform{n}")
