"""A block's own forward as the runtime calls it, and what has to hold when it is rerun.

:class:`BlockForward` is what every schedule item finally calls: the block's class ``forward``
(or the instance ``forward`` it had before the plan). It is a plain object holding the block,
not a bound method or a closure, so ``copy.deepcopy`` and ``pickle`` rebind it to the copy's
block (a closure over ``block.forward`` kept computing with the *original* block's weights).

When it runs in backward (a checkpoint's recompute: autograd's graph task is running), it

* restores the running statistics of the block's norm layers afterwards (BatchNorm and the
  other ``_NormBase`` layers with ``track_running_stats`` update them in train mode; the rerun
  would update them a second time). The values are copied back without bumping the version
  counters, which autograd checks when the recomputed BatchNorm's backward unpacks them; in
  train mode that backward uses the batch statistics only.
* turns an error into :class:`~memfit.errors.UnsupportedModelError` naming the stage: the same
  block ran in the forward, so failing now means it cannot be replayed (a cache, a counter or
  other state its forward changed). Memory errors and memfit's own errors pass unchanged, and so
  does torch's early-stop signal (``_StopRecomputationError``).

Known gap: torch compares the tensors a rerun saves with the forward's only after the rerun
(``CheckpointError``: other count or shapes); that error is torch's own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import _StopRecomputationError

from memfit.errors import MemfitError, UnsupportedModelError
from memfit.runtime.guards import RUNNING_STATS


def replaying() -> bool:
    """Whether the forward running now is a recompute in backward."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1


def norm_layers(block: nn.Module) -> tuple[_NormBase, ...]:
    """The norm layers of ``block`` that keep running statistics."""
    return tuple(m for m in block.modules() if isinstance(m, _NormBase) and m.track_running_stats)


def _running_stats(norms: tuple[_NormBase, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    saved = []
    for norm in norms:
        if norm.training:  # in eval mode they are only read
            for name in RUNNING_STATS:
                tensor = getattr(norm, name, None)
                if isinstance(tensor, torch.Tensor):
                    saved.append((tensor, tensor.detach().clone()))
    return saved


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if not saved:
        return
    tensors = tuple(tensor for tensor, _ in saved)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tensors):
        for tensor, value in saved:
            tensor.copy_(value)


class BlockForward:
    """The forward of one block, callable, picklable, and safe to rerun in backward.

    Args:
        block: the block module.
        stage: its stage name (for messages).
        previous: an instance ``forward`` the block had before the plan (``None``: the class's).
    """

    def __init__(self, block: nn.Module, stage: str, previous: Any = None) -> None:
        self.block = block
        self.stage = stage
        self.previous = previous
        self.norms = norm_layers(block)

    def _forward(self) -> Any:
        if self.previous is not None:
            return self.previous
        return functools.partial(type(self.block).forward, self.block)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self._forward()
        if not replaying():
            return forward(*args, **kwargs)
        saved = _running_stats(self.norms)
        try:
            return forward(*args, **kwargs)
        except (_StopRecomputationError, MemfitError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            raise UnsupportedModelError(
                f"stage {self.stage!r} ({type(self.block).__name__}) ran in the forward but "
                f"failed when memfit recomputed it in backward ({type(error).__name__}: "
                f"{str(error)[:300]}). The block does not compute the same thing twice: it "
                f"reads state that its first run changed (a cache under an argument name memfit "
                f"does not know, a counter, a global flag). Pass such state explicitly and "
                f"unchanged, or plan this stage as keep"
            ) from error
        finally:
            _restore(saved)
