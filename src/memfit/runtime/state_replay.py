"""Blocks that write their modules' state in forward, rerun from the state their first run saw.

Some blocks assign new values to their modules' attributes in forward: I-BERT's quantisation
statistics (``self.x_min = self.x_min * momentum + ...``, ``self.weight_integer = ...``),
RecurrentGemma's recurrent and convolution states (``self.recurrent_states = ...``), a counter
(``self.calls += 1``). A plain rerun in backward (what torch's checkpoint and Hugging Face's
switch do) reads what the first run wrote: I-BERT's rerun computes its scales from statistics
that already include this batch, so its gradients differ from an unplanned step's, and the
rerun writes the statistics a second time.

memfit replays such writes instead. The first run of a recomputed block is watched
(:class:`~memfit.runtime.guards.Watch`); every attribute, buffer or tensor attribute it
*rebinds* (an assignment, not an in-place write) is a :class:`Write`: the value before the first
run and the value it left. Around each rerun of the block (:func:`replayed`, called by
:class:`~memfit.runtime.replay.BlockForward`):

1. the values the attributes have now are noted, and the values from before the first run are
   put back, so the rerun reads what the first run read and computes the same tensors;
2. after the rerun, every attribute the rerun wrote must hold what the first run wrote (tensors
   bitwise, with their dtype and shape; ``None``, numbers and strings equal): otherwise the
   block does not compute the same thing from the same state, and the rerun raises
   :class:`~memfit.errors.UnsupportedModelError` naming the write;
3. the values noted in 1 are put back: the step leaves the state as an unplanned step does.

What is not replayed, and stays refused by the watch: in-place writes to a module's tensors
(``self.seen.add_(1)``: the value before is gone, and keeping a copy would cost its size),
replaced parameters, and attributes of other types (lists, dicts, modules).

The values from before the first run are held until the plan's last rerun of the block (once
per recompute segment around it), at the latest until the end of that backward (a second
backward through the same forward, ``retain_graph=True``, is then refused), or until the
block's next first run where no backward comes. That is what a replay costs in
memory: the profile's steps run it, so the meter sees the values made in the step (Recurrent
Gemma's states, which the model makes anew in each forward); values made before the step
(I-BERT's quantised weights, left by the previous step) are not counted, as the meter counts
only memory allocated in the step: up to the size of the rebound buffers per recomputed block.

One first run per block is kept: a block run twice before one backward (two forwards, one
backward) reruns from its second run's state. The check in step 2 catches it wherever the
write depends on the input or the state (each of the models above), as a refusal in backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import _StopRecomputationError

from memfit.errors import UnsupportedModelError

ABSENT = object()  # an attribute that did not exist (never stored in a model)

# the types of attribute values a replay compares (tensors bitwise, the others by ==)
PLAIN = (type(None), bool, int, float, str)


@dataclass(frozen=True, slots=True)
class Write:
    """One attribute a block's first run rebound.

    Attributes:
        module: the module whose attribute it is.
        name: its fqn (``model.layers.0.temporal_block.conv1d_state``), for messages.
        key: the attribute's name on ``module``.
        before: its value before the first run (:data:`ABSENT`: it had none).
        after: the value the first run left.
    """

    module: nn.Module
    name: str
    key: str
    before: Any
    after: Any


def replayable(value: Any) -> bool:
    """Whether a rebound attribute's value can be replayed and compared."""
    return value is ABSENT or isinstance(value, (torch.Tensor, *PLAIN))


def read(module: nn.Module, key: str) -> Any:
    """The attribute ``key`` of ``module`` (a buffer or a plain attribute), or :data:`ABSENT`."""
    if key in module._buffers:
        return module._buffers[key]
    return vars(module).get(key, ABSENT)


def put(module: nn.Module, key: str, value: Any) -> None:
    """Set ``key`` on ``module`` where the model keeps it, without ``nn.Module``'s hooks."""
    if value is ABSENT:
        module._buffers.pop(key, None)
        vars(module).pop(key, None)
    elif key in module._buffers:
        module._buffers[key] = value
    else:
        vars(module)[key] = value


def same(first: Any, second: Any) -> bool:
    """Whether a rerun wrote what the first run wrote (tensors bitwise)."""
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
            return False
        if (first.dtype, first.shape, first.device) != (second.dtype, second.shape, second.device):
            return False
        with _disable_current_modes(), torch.no_grad():
            return bool(torch.equal(first, second))
    return type(first) is type(second) and bool(first == second)


class StateReplay:
    """The writes of one first run of a block, put back around its reruns.

    Args:
        stage: the block's stage name, for messages.
        writes: what the first run rebound.
        reruns: how many times the plan reruns the block in one backward (once, or once per
            nesting level of the segments around it): after the last one, the values from
            before the first run go.
    """

    def __init__(self, stage: str, writes: Sequence[Write], reruns: int = 1) -> None:
        self.stage = stage
        self.writes = tuple(writes)
        self.reruns = reruns
        self.spent = False

    def spend(self) -> None:
        """Let go of the values from before the first run (its backward has ended)."""
        self.spent = True
        self.writes = tuple(
            Write(write.module, write.name, write.key, ABSENT, ABSENT) for write in self.writes
        )

    def rerun(self, forward: Callable[[], Any]) -> Any:
        """Run ``forward`` (the block's rerun) from the state its first run saw."""
        now = [read(write.module, write.key) for write in self.writes]
        for write in self.writes:
            put(write.module, write.key, write.before)
        try:
            try:
                out = forward()
            except _StopRecomputationError:  # torch's early stop: check what the rerun wrote
                self._check()
                raise
            self._check()
            return out
        finally:
            for write, value in zip(self.writes, now, strict=True):
                put(write.module, write.key, value)

    def _check(self) -> None:
        for write in self.writes:
            value = read(write.module, write.key)
            if value is write.before:  # not written (yet): torch stopped the rerun early
                continue
            if not same(value, write.after):
                raise UnsupportedModelError(
                    f"stage {self.stage!r} writes {write.name} in forward, and its rerun in "
                    f"backward, started from the state its first run saw, wrote another value "
                    f"({_shown(value)} where the first run wrote {_shown(write.after)}): the "
                    f"block does not compute the same thing twice (random numbers drawn outside "
                    f"torch, state outside its modules, or a second forward before this "
                    f"backward), so its gradients could differ from an unplanned step's. Keep "
                    f"this stage in the plan (no recompute), and run backward after each forward"
                )


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return "nothing" if value is ABSENT else repr(value)[:60]


_PENDING: weakref.WeakKeyDictionary[nn.Module, StateReplay] = weakref.WeakKeyDictionary()


def remember(block: nn.Module, replay: StateReplay) -> None:
    """Keep ``replay`` for the reruns of ``block``, in place of its previous run's."""
    _PENDING[block] = replay


def replayed(block: nn.Module, forward: Callable[[], Any]) -> Any:
    """Rerun ``block`` through ``forward`` from its first run's state, if it wrote any."""
    replay = _PENDING.get(block)
    if replay is None:
        return forward()
    if replay.spent:
        raise UnsupportedModelError(
            f"stage {replay.stage!r} writes its modules' state in forward "
            f"({', '.join(write.name for write in replay.writes[:3])}) and is recomputed in a "
            f"second backward through the same forward (backward(retain_graph=True)); memfit "
            f"keeps the state its first run saw until the end of the first backward only. Keep "
            f"this stage in the plan (no recompute) for such a loop"
        )
    # it goes after the plan's last rerun of the block, or when this backward ends (torch's
    # early stop may skip a rerun)
    torch.autograd.Variable._execution_engine.queue_callback(replay.spend)
    try:
        return replay.rerun(forward)
    finally:
        replay.reruns -= 1
        if replay.reruns <= 0:
            replay.spend()
