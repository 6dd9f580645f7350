"""Checks that keep a planned step honest: each raises rather than let gradients go silently wrong.

* :func:`same_side_inputs`: a multi-block segment reuses its first block's side inputs (masks,
  rotary tables) for every block, which is only right when every block gets the same ones.
* :func:`guard_input`: recompute reruns a stage from its input, which is only right when nobody
  changed that input in place since the forward.
* :func:`rng_state` / :func:`same_rng_state`: a multi-block segment runs its blocks back to back,
  which keeps the random stream only when the model draws no random numbers between blocks
  (LayerDrop does).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from memfit.errors import MemfitError
from memfit.measuring.chain import Inputs, main_tensor, same_side_inputs

__all__ = ["Inputs", "guard_input", "rng_state", "same_rng_state", "same_side_inputs"]


def guard_input(out: Any, watched: Any, stage: str) -> Any:
    """Make the backward of ``out`` check that ``watched`` (the stage's input) kept its version.

    The check runs when the gradient of the stage's output arrives, just before autograd
    recomputes the stage. torch notices such a change only when the input requires grad;
    with frozen embeddings the first block's input does not, and recompute would silently
    read the changed values.

    Returns:
        ``out``, unchanged.
    """
    main = main_tensor(out)
    if not (isinstance(watched, torch.Tensor) and main is not None and main.requires_grad):
        return out
    version, watched_ref = watched._version, weakref.ref(watched)  # never keep it alive

    def check(grad: torch.Tensor) -> None:
        alive = watched_ref()
        if alive is not None and alive._version != version:
            raise MemfitError(
                f"the input of stage {stage!r} was modified in place after its forward; "
                f"recomputing the stage from it would give wrong gradients. Avoid the in-place "
                f"op on the block's input (write x = x * 2, not x.mul_(2)) or keep this stage"
            )

    main.register_hook(check)
    return out


def rng_state(device: torch.device | None) -> tuple[torch.Tensor, ...]:
    """The random generators' states that blocks on ``device`` draw from (CPU always)."""
    states = [torch.random.get_rng_state()]
    if device is not None and device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return tuple(states)


def same_rng_state(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """Whether two :func:`rng_state` readings are equal."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
