"""The per-stage profile: measured costs of every stage under every option, as plain data.

Built from :class:`~memfit.measuring.readings.StageReading` s of whole steps: one with every stage kept,
one with every block recomputed (which gives the no-save forward of each block, and the peak of
each block's rerun in backward as torch runs it, with its early stop), and one per further option
(``selective:*``). Every figure is a difference of levels the meter saw at stage
boundaries, so the simulator replays the all-keep step to the byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from memfit.measuring.chain import Chain
from memfit.measuring.readings import Measurement, StageReading
from memfit.measuring.step import local_tensor, own_fsdp_unit, split_sample
from memfit.planning.costs import CHECKPOINT, KEEP, ChainCosts, OptionCosts, Skip, StageCosts
from memfit.planning.plan import Stage
from memfit.planning.simulate import holds_inputs


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A model's chain with measured costs.

    Attributes:
        costs: the chain's costs (what the planner reads).
        measurement: the plain step (no plan), measured.
        parameter_bytes: per stage, bytes of the parameters it owns.
        recompute_measurement: the step with every block recomputed, when measured.
        compile: the ``torch.compile`` arguments the blocks ran compiled with (``None``:
            eager); plans made from the profile record them (``Plan.compile``).
        notes: what the menu left out and why, and other facts a plan must say
            (``Plan.notes``).
        info: free-form JSON facts; ``info["ops"]``: block name -> its ops that make autograd
            save something (op, calls, seconds, output and saved bytes, what recomputing it
            needs); ``timed_options``, ``wall_per_cpu``, ``ranks``.

    The training loop profiled is the measurement's (``measurement.keep_output``,
    ``measurement.accumulate``). In the JSON, ``compile`` and ``notes`` sit under ``"info"``,
    as they did before they were fields.
    """

    costs: ChainCosts
    measurement: Measurement
    parameter_bytes: tuple[int, ...]
    recompute_measurement: Measurement | None = None
    compile: Mapping[str, Any] | None = None
    notes: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "notes", tuple(self.notes))
        typed = sorted(set(self.info) & {"compile", "notes"})
        if typed:
            raise ValueError(
                f"Profile info {typed}: these are the profile's fields now "
                f"({', '.join(f'Profile.{key}' for key in typed)}); pass them as such"
            )

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.costs.stages)

    @property
    def fingerprint(self) -> str:
        return self.costs.fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {
            "costs": json.loads(self.costs.to_json()),
            "measurement": self.measurement.to_dict(),
            "parameter_bytes": list(self.parameter_bytes),
            "recompute_measurement": (
                None if self.recompute_measurement is None else self.recompute_measurement.to_dict()
            ),
            "info": self._info_data(),
        }

    def _info_data(self) -> dict[str, Any]:
        typed: dict[str, Any] = {}
        if self.compile is not None:
            typed["compile"] = dict(self.compile)
        if self.notes:
            typed["notes"] = list(self.notes)
        return typed | dict(self.info)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        recompute = data.get("recompute_measurement")
        info = dict(data.get("info", {}))
        compile = info.pop("compile", None)
        return cls(
            costs=ChainCosts.from_dict(data["costs"]),
            measurement=Measurement(**data["measurement"]),
            parameter_bytes=tuple(int(b) for b in data["parameter_bytes"]),
            recompute_measurement=None if recompute is None else Measurement(**recompute),
            compile=None if compile is None else dict(compile),
            notes=tuple(info.pop("notes", ())),
            info=info,
        )

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls.from_dict(json.loads(text))


def fingerprint(model: nn.Module, sample: Any, chain: Chain) -> str:
    """``"<model>-<sample>"``: short hashes of what a plan depends on. The model part covers the
    chain and parameter names, shapes and dtypes; the sample part its shapes, dtypes, device."""
    model_digest = hashlib.sha256(repr(chain.stage_names).encode())
    for name, parameter in model.named_parameters():
        model_digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
    return f"{model_digest.hexdigest()[:12]}-{sample_digest(sample)}"


def sample_digest(sample: Any) -> str:
    """The sample part of :func:`fingerprint`: a short hash of its shapes, dtypes, devices."""
    digest = hashlib.sha256()
    args, kwargs = split_sample(sample)
    for key, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}:{value.device}".encode())
        else:
            digest.update(f"{key}:{type(value).__name__}".encode())
    return digest.hexdigest()[:8]


def _parameter_bytes(model: nn.Module, chain: Chain) -> tuple[int, ...]:
    """Per stage, bytes of the parameters it owns: ``<pre>`` all but the blocks'."""
    in_blocks = {id(p) for block in chain.blocks for p in block.parameters()}
    rest = sum(
        local_tensor(p).numel() * p.element_size()
        for p in model.parameters()
        if id(p) not in in_blocks
    )
    per_stage = [0] * len(chain)
    per_stage[0] = rest
    for index in chain.block_stages:
        block = chain.block_of_stage(index)
        assert block is not None
        per_stage[index] = sum(
            local_tensor(p).numel() * p.element_size() for p in block.parameters()
        )
    return tuple(per_stage)


def _option_costs(
    reading: StageReading,
    index: int,
    last: int,
    output_bytes: int,
    detail: Mapping[str, Any] | None = None,
) -> OptionCosts:
    f_start, f_peak, f_end = reading.forward_span(index)
    b_start, b_peak, b_end = reading.backward_span(index, last)
    return OptionCosts(
        forward_s=reading.forward_s[index],
        backward_s=reading.backward_s[index],
        saved_bytes=f_end - f_start - output_bytes,
        forward_peak_bytes=f_peak - f_start,
        backward_peak_bytes=b_peak - b_start,
        backward_delta_bytes=b_end - b_start,
        detail=dict(detail or {}),
    )


def _tail_shift(reading: StageReading, chain: Chain, index: int) -> int:
    """What the tails (:attr:`StageCosts.tail_bytes`) add to block ``index``'s forward span in
    a step with every block under a checkpoint: its own tail, less the previous block's, which
    the caller frees when this block returns (after the span's end, the next block's mark,
    unless this block is the last of its list: its span ends in its own forward hook)."""
    tails = reading.tail_bytes
    shift = tails.get(index, 0)
    if chain.block_of_stage(index + 1) is not None:
        shift -= tails.get(index - 1, 0)
    return shift


def _checkpoint_kept(recompute: StageReading, keep: StageReading, chain: Chain) -> dict[int, int]:
    """Per block, what its one-block checkpoint keeps from its forward to its backward besides
    its output. Blocks no gradient flows through (frozen, with an input that needs none) are
    left out: their checkpoint saves no tensor, so torch drops its RNG state at once, while a
    segment holding them and a block that trains keeps it (frozen lower layers made the
    checkpoint's bytes 0 and plans went over budget)."""
    kept = {}
    for index in chain.block_stages:  # the stages between block lists are never recomputed
        if not recompute.has_backward(index):
            continue
        start, _peak, end = recompute.forward_span(index)
        shift = _tail_shift(recompute, chain, index)
        kept[index] = end - start - keep.output_bytes.get(index, 0) - shift
    return kept


def _checkpoint_bytes(kept: Mapping[int, int]) -> int:
    """What every checkpoint keeps (:func:`_checkpoint_kept`): the RNG state torch stashes
    (5,056 bytes on CPU; on CUDA host memory, not the device's). The smallest figure over the
    blocks; what a block keeps beyond it is its own (:attr:`StageCosts.nosave_held_bytes`:
    CLIP's quick_gelu multiplies by the Python number 1.702, whose 8-byte tensor autograd
    keeps without the checkpoint's hooks; measured on LLaVA's vision tower)."""
    return max(0, min(kept.values(), default=0))


def _side_input_bytes(recompute: StageReading, keep: StageReading, chain: Chain) -> int:
    """Side inputs (masks, position tables) that the kept step frees when the forward ends
    and the checkpoints of recomputed blocks hold until their backward: what the stages after
    the blocks keep more with every block recomputed than with every block kept. The tails of
    the last two blocks before such a stage (:attr:`StageCosts.tail_bytes`) are freed in its
    span with every block recomputed, not with every block kept: they are added back. So are
    block inputs that the kept step frees in such a stage's span (the last block's, when no
    op of it saves its input): the simulator holds them as the block's own
    (:attr:`StageCosts.released_input_at`), where a checkpoint starts there."""
    last = len(chain) - 1
    extra = 0
    tails = recompute.tail_bytes
    for index in range(1, last + 1):
        if chain.block_of_stage(index) is None:
            kept, recomputed = keep.forward_span(index), recompute.forward_span(index)
            freed = tails.get(index - 1, 0)
            if chain.block_of_stage(index - 2) is not None:
                freed += tails.get(index - 2, 0)
            for block in chain.block_stages:
                size, at = keep.released_input(block)
                if at == index != block and recompute.has_backward(block):
                    freed -= size
            extra += max(0, (recomputed[2] - recomputed[0]) + freed - (kept[2] - kept[0]))
    return extra


def no_gradient(chain: Chain, keep: StageReading) -> frozenset[int]:
    """The block stages cut off from the loss in the plain step: autograd recorded their graph
    but no gradient reached it (an argmin, a detach after them; encodec's quantizer). Their
    saved tensors go when the model drops the graph, in the forward, whatever option runs
    them, and a checkpoint's recompute never runs: checkpointing them saves nothing, so the
    profile offers them ``keep`` only (not checkpointable). Frozen blocks fed an input that
    needs no gradient record no graph and stay checkpointable: a segment starting at one
    spares the next blocks' inputs."""
    return keep.cut_off(chain.block_stages)


def _recompute_costs(
    recompute: StageReading, index: int, last: int, name: str, checkpoint: int
) -> tuple[int | None, int]:
    """Block ``index``'s rerun in the step with every block its own segment, as torch runs it
    (early stop): its peak above the level where the rerun starts, and what its backward made
    before that (:attr:`StageCosts.recompute_lead_bytes`: the level then, above the start of
    its backward and the checkpoint's RNG state that torch saves around the rerun).
    ``(None, 0)`` when it was not rerun (no gradient reached it)."""
    span = recompute.recompute_span(name)
    if span is None or not recompute.has_backward(index):
        return None, 0
    start, peak, _end = span
    backward_start = recompute.backward_span(index, last)[0]
    return peak - start, max(0, start - backward_start - checkpoint)


def _gathered_bytes(chain: Chain) -> int:
    """Bytes of the largest FSDP2 unit block's parameters, gathered (``numel`` of a sharded
    parameter is the whole one's)."""
    return max(
        (
            sum(p.numel() * p.element_size() for p in block.parameters())
            for block in chain.blocks
            if own_fsdp_unit(block)
        ),
        default=0,
    )


def _own_units(chain: Chain, *indices: int) -> bool:
    blocks = [chain.block_of_stage(index) for index in indices]
    return any(block is not None and own_fsdp_unit(block) for block in blocks)


def build_profile(
    model: nn.Module,
    sample: Any,
    chain: Chain,
    keep: StageReading,
    *,
    recompute: StageReading | None = None,
    options: Mapping[str, StageReading] | None = None,
    details: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    info: Mapping[str, Any] | None = None,
    post_options: Mapping[str, StageReading] | None = None,
    post_details: Mapping[str, Mapping[str, Any]] | None = None,
    compile: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Profile:
    """Assemble a :class:`Profile` from stage readings of the same model and sample.

    Args:
        keep: the plain step.
        recompute: the step with every block recomputed (each block its own segment); without
            it, blocks cannot be recomputed by the planner.
        options: option name -> the step with every block run with that option.
        details: option name -> per block (in chain order), what the option saves and reruns,
            for plans to show (``{"saves": [...], "recomputes": [...]}``, say).
        info: JSON-ready facts kept with the profile (``ops``: each block's op profile).
        post_options: option name -> the step with every block kept and the last stage
            (``<post>``: head and loss) run with that option (``head:*``).
        post_details: option name -> what it does, for plans to show (``exact``, ``does``).
        compile: the blocks' ``torch.compile`` arguments (``None``: eager).
        notes: what the menu left out and why; a note on the blocks no gradient reaches is
            added.
    """
    last = len(chain) - 1
    kept = {} if recompute is None else _checkpoint_kept(recompute, keep, chain)
    checkpoint = _checkpoint_bytes(kept)
    dead = no_gradient(chain, keep)
    options = dict(options or {})
    dead_checkpointed = _dead_checkpointed(chain, keep, options.pop(CHECKPOINT, None), dead)
    stages = []
    for index, name in enumerate(chain.stage_names):
        output = keep.output_bytes.get(index, 0)
        input_bytes = keep.output_bytes.get(index - 1, 0) if index > 0 else 0
        menu = {KEEP: _option_costs(keep, index, last, output)}
        position = chain.block_position(index)
        is_block = position is not None
        trains = index not in dead
        if index in dead_checkpointed:
            menu[CHECKPOINT] = dead_checkpointed[index]
        if position is not None and trains:
            for option, reading in options.items():
                per_block = (details or {}).get(option)
                detail = per_block[position] if per_block and len(per_block) > position else None
                measured = _option_costs(reading, index, last, output, detail)
                if holds_inputs(Stage(index, option)):
                    # measured with every block under a checkpoint: the tails' shift is not
                    # this stage's (the simulator holds the tails)
                    shift = _tail_shift(reading, chain, index)
                    measured = replace(measured, saved_bytes=measured.saved_bytes - shift)
                menu[option] = measured
        if index == last:
            for option, reading in (post_options or {}).items():
                detail = (post_details or {}).get(option)
                menu[option] = _option_costs(reading, index, last, output, detail)
        released = keep.released_input(index) if is_block else (0, index)
        rerun, lead = None, 0  # not rerun: as the kept forward (StageCosts.recompute_peak)
        if is_block and trains and recompute is not None:  # a cut-off block ran kept there
            start, peak, _end = recompute.forward_span(index)
            # the checkpoint's own RNG state is the segment's (ChainCosts.checkpoint_bytes)
            nosave_s = recompute.forward_s[index]
            nosave_peak = max(0, peak - start - checkpoint)
            rerun, lead = _recompute_costs(recompute, index, last, name, checkpoint)
        else:
            nosave_s, nosave_peak = menu[KEEP].forward_s, menu[KEEP].forward_peak_bytes
        stages.append(
            StageCosts(
                name=name,
                input_bytes=input_bytes,
                output_bytes=output,
                options=menu,
                nosave_forward_s=nosave_s,
                nosave_forward_peak_bytes=nosave_peak,
                checkpointable=is_block and trains and recompute is not None,
                tail_bytes=0 if recompute is None else recompute.tail_bytes.get(index, 0),
                released_input_bytes=released[0],
                released_input_at=None if released[1] == index else released[1],
                nosave_held_bytes=max(0, kept.get(index, checkpoint) - checkpoint),
                recompute_peak_bytes=rerun,
                recompute_lead_bytes=lead,
                joins_previous=(
                    is_block
                    and chain.block_of_stage(index - 1) is not None
                    # called right after the block before (a reading); a segment's rerun hands
                    # each block its own side inputs, but compiled blocks are traced as one
                    # call that hands on the first block's
                    and index in keep.same_side_inputs
                    and (compile is None or keep.same_side_inputs[index])
                    # a segment's blocks pass on one output: no attention weights of their own
                    and not {index - 1, index} & keep.tails
                    # FSDP2 units: a segment across them would hold all its blocks' gathered
                    # parameters at once through its recompute (memfit.runtime.sharding)
                    and not _own_units(chain, index - 1, index)
                    # random numbers drawn before it (LayerDrop): a rerun would not draw them
                    and position not in chain.draws_before
                    # the model's code makes its input (cat(output, skip)): a rerun would not
                    and position not in chain.joins
                ),
            )
        )
    costs = ChainCosts(
        stages=stages,
        held_bytes=keep.measurement.held_bytes,
        gradient_bytes=keep.measurement.gradient_bytes,
        fingerprint=fingerprint(model, sample, chain),
        checkpoint_bytes=checkpoint,
        side_input_bytes=0 if recompute is None else _side_input_bytes(recompute, keep, chain),
        side_grad_bytes=keep.side_grad_bytes,
        gathered_bytes=_gathered_bytes(chain),
        fragmentation_bytes=keep.measurement.fragmentation_bytes,
        skips=stage_skips(chain),
    )
    return Profile(
        costs=costs,
        measurement=keep.measurement,
        parameter_bytes=_parameter_bytes(model, chain),
        recompute_measurement=None if recompute is None else recompute.measurement,
        compile=compile,
        notes=_with_dead_note(tuple(notes), chain, dead - dead_checkpointed.keys()),
        info=dict(info or {}),
    )


def _dead_checkpointed(
    chain: Chain, keep: StageReading, reading: StageReading | None, dead: frozenset[int]
) -> dict[int, OptionCosts]:
    """The ``checkpoint`` option's costs for the blocks no gradient reaches (``dead``), from
    ``reading``: the step with those blocks under a checkpoint and every other stage kept.

    Such a block's saved tensors live as long as its graph, which the model may hold past the
    forward (LLaVA returns its vision tower's output, whose graph holds the last vision layer:
    with the usual loop, to the end of the step); under a checkpoint the graph holds the
    checkpoint's inputs and RNG state instead, and no rerun ever runs. Where the model drops
    that graph inside the step, the stage that drops it frees less than the kept step shows,
    which no cost of the block itself can say: the option is offered only where every other
    stage's figures in ``reading`` are the kept step's, byte for byte (the graph lives to the
    end of the step), so the block's own figures are all that changes."""
    if reading is None or not dead:
        return {}
    last = len(chain) - 1

    def figures(costs: OptionCosts) -> tuple[int, ...]:
        return (
            costs.saved_bytes,
            costs.forward_peak_bytes,
            costs.backward_peak_bytes,
            costs.backward_delta_bytes,
        )

    for index in range(len(chain)):
        if index in dead:
            continue
        output = keep.output_bytes.get(index, 0)
        kept = _option_costs(keep, index, last, output)
        if figures(_option_costs(reading, index, last, output)) != figures(kept):
            return {}
    return {
        index: _option_costs(reading, index, last, keep.output_bytes.get(index, 0))
        for index in sorted(dead)
    }


def stage_skips(chain: Chain) -> tuple[Skip, ...]:
    """The chain's skip connections (:attr:`Chain.skips`, block positions) as stages."""
    stages = chain.block_stages
    last = len(chain) - 1

    def stage(position: int) -> int:
        return 0 if position < 0 else last if position >= len(stages) else stages[position]

    return tuple(
        Skip(stage(maker), stage(reader))
        for maker, reader in chain.skips
        if stage(reader) > stage(maker) + 1
    )


def _with_dead_note(notes: tuple[str, ...], chain: Chain, dead: frozenset[int]) -> tuple[str, ...]:
    """``notes`` and a note naming the blocks no gradient reaches (kept by every plan)."""
    if not dead:
        return notes
    names = [chain.stage_names[index] for index in sorted(dead)]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    note = (
        f"no gradient reaches {shown}: kept, since their saved tensors go with their graph in "
        "the forward, so checkpointing them would save nothing"
    )
    return (*notes, note)
