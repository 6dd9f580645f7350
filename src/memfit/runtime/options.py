"""How a stage option runs: ``keep`` as is, ``selective:*`` under torch's selective checkpoint.

Option names are self-describing, so a plan's JSON is all ``apply`` needs:

* ``keep``: the block runs untouched; autograd saves what it always saves.
* ``selective:matmul``: save the outputs of matmuls, convolutions and attention kernels,
  recompute everything else in backward.
* ``selective:save=<op>+<op>...``: save the outputs of exactly these aten ops (short names as
  :func:`memfit.measure.ops.short_op_name` writes them, e.g. ``addmm+gelu``).

Random ops are never saved, so recompute replays all of them in order and dropout masks come
out bit-identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from memfit.measure.ops import MATMUL_OPS, full_op_name, saveable

KEEP = "keep"
SELECTIVE = "selective:"


def saved_ops(option: str) -> frozenset[str] | None:
    """The aten ops a ``selective:`` option saves (``None`` for ``keep``).

    Raises:
        ValueError: an option name memfit does not know, listing the forms it takes.
    """
    if option == KEEP:
        return None
    if option == "selective:matmul":
        return MATMUL_OPS
    if option.startswith("selective:save="):
        names = [name for name in option.removeprefix("selective:save=").split("+") if name]
        ops = frozenset(full_op_name(name) for name in names)
        unsafe = sorted(op for op in ops if not saveable(op))
        if unsafe:
            raise ValueError(
                f"option {option!r} saves {unsafe}: random or in-place ops cannot be saved"
            )
        if ops:
            return ops
    raise ValueError(
        f"unknown stage option {option!r}; expected 'keep', 'selective:matmul' or "
        f"'selective:save=<op>+<op>' (aten op names such as addmm+gelu)"
    )


def _policy(ops: frozenset[str]) -> Callable[..., CheckpointPolicy]:
    def policy(_ctx: Any, op: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if str(op) in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def run_with_option(option: str, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` wrapped so that it runs with ``option``."""
    ops = saved_ops(option)
    if ops is None:
        return forward
    context_fn = functools.partial(create_selective_checkpoint_contexts, _policy(ops))

    def selective(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return selective
