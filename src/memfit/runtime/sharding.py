"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and memfit's multi-block recompute segments.

``fully_shard(block)`` registers a forward pre-hook that all-gathers the block's parameters
(unshard) and wraps its inputs so that the reduce-scatter runs after its backward, and a forward
post-hook that frees the gathered parameters (reshard) and hooks the output's gradient to gather
them again for backward. Module hooks run in ``block(...)``, around ``block.forward``.

In the forward every block of a multi-block segment runs in its own call, so its own FSDP2
hooks gather and reshard it as unplanned. In backward the segment is recomputed as a whole when
its last block's saved tensors are first needed, before the gradients of the earlier blocks'
outputs arrive: so when the segment's last block returns, the pre-backward hooks of its earlier
blocks are registered on the segment's output as well (:func:`gather_for_backward`), and every
block of the segment is gathered when that output's gradient arrives, before torch recomputes
it. The recompute runs the later blocks by their forwards and calls their FSDP2 pre-hook first
(:func:`enter_block`), which returns early in backward (``PRE_BACKWARD``): recompute adds no
all-gather, and each block's own pre-backward hook later finds it gathered.

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


def gather_for_backward(blocks: list[nn.Module], output: Any) -> None:
    """Register the FSDP2 pre-backward hooks of ``blocks`` (those that are their own units) on
    ``output``, a multi-block segment's last output (see the module docstring)."""
    for block in blocks:
        if own_fsdp_unit(block):
            state: Any = block._get_fsdp_state()  # type: ignore[operator]
            state._register_pre_backward_hook(output)
