"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and memfit's multi-block recompute segments.

``fully_shard(block)`` registers a forward pre-hook that all-gathers the block's parameters
(unshard) and wraps its inputs so that the reduce-scatter runs after its backward, and a forward
post-hook that frees the gathered parameters (reshard) and hooks the output's gradient to gather
them again for backward. Module hooks run in ``block(...)``, around ``block.forward``.

A segment's head runs the segment's later blocks itself, by their forwards, and those blocks'
own calls pass the head's output through. So for every later block the head runs FSDP2's
pre-hook (:func:`enter_block`) before the block's forward: the parameters are gathered, and the
state is ``FORWARD``. The block's own call (the pass-through) then runs the pre-hook again,
which finds the parameters gathered and the post-backward already registered (no second
all-gather), and the post-hook, which reshards and hooks the segment's output for backward.
In backward every block of the segment is gathered when the segment's output gradient arrives
(the pre-backward hooks of all its blocks sit on that tensor), before torch recomputes it;
there FSDP2's pre-hook returns early (``PRE_BACKWARD``): recompute adds no all-gather.

The cost: a segment's blocks hold their gathered parameters together, from their forward to
the end of the segment's forward, and from the segment's backward to each block's. The
profile therefore ends segments at FSDP2 units (``joins_previous``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from memfit.measuring.step import own_fsdp_unit


def enter_block(
    block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run FSDP2's forward pre-hook of ``block``, which a segment head runs (see the module
    docstring); the arguments as the hook returns them (no-op for other blocks)."""
    if not own_fsdp_unit(block):
        return args, kwargs
    state: Any = block._get_fsdp_state()  # type: ignore[operator]
    return state._pre_forward(block, args, kwargs)
