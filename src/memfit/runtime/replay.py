"""A block's own forward as the runtime calls it, and what has to hold when it is rerun.

:class:`BlockForward` is what every schedule item finally calls: the block's class ``forward``
(or the instance ``forward`` it had before the plan). It is a plain object holding the block,
not a bound method or a closure, so ``copy.deepcopy`` and ``pickle`` rebind it to the copy's
block (a closure over ``block.forward`` kept computing with the *original* block's weights).

In a forward with gradients (the first run and every recompute) each KV cache it is passed is
replaced by a private structural copy (:mod:`memfit.runtime.caches`): the block runs the same ops
as unplanned and never writes the model's cache, so a rerun starts from the same state.

When it runs in backward (a checkpoint's recompute: autograd's graph task is running), it

* restores the running statistics of the block's norm layers afterwards (BatchNorm and the
  other ``_NormBase`` layers with ``track_running_stats`` update them in train mode; the rerun
  would update them a second time): values and version counters as before the rerun, so the
  step leaves them exactly as an unplanned step does. Setting the counters back is safe: only
  the rerun's own BatchNorm saved them since, through the checkpoint's saved-tensor hooks
  (which skip autograd's version check), and in train mode its backward reads the batch
  statistics, not these.
* turns an error into :class:`~memfit.errors.UnsupportedModelError` naming the stage: the same
  block ran in the forward, so failing now means it cannot be replayed (a cache, a counter or
  other state its forward changed). Memory errors and memfit's own errors pass unchanged, and so
  does torch's early-stop signal (``_StopRecomputationError``). A second backward through a
  ``selective:*`` stage (``retain_graph=True``, gradient penalties) is torch's own limit, and
  its error says so instead.

Known gap: torch compares the tensors a rerun saves with the forward's only after the rerun
(``CheckpointError``: other count or shapes); that error is torch's own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import _StopRecomputationError

from memfit.errors import MemfitError, UnsupportedModelError
from memfit.measuring.trace import rerunning
from memfit.runtime.caches import CacheArguments, cache_arguments, private_caches
from memfit.runtime.guards import RUNNING_STATS

# torch's selective checkpoint (torch/utils/checkpoint.py) when a second backward reaches a
# region it already recomputed for
_SECOND_BACKWARD = "Trying to backward an extra time"


def replaying() -> bool:
    """Whether the forward running now is a recompute in backward (never while torch.compile
    traces: a checkpoint in a compiled region is recomputed by the compiled backward, which
    runs no Python)."""
    if torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1


def norm_layers(block: nn.Module) -> tuple[_NormBase, ...]:
    """The norm layers of ``block`` that keep running statistics."""
    return tuple(m for m in block.modules() if isinstance(m, _NormBase) and m.track_running_stats)


Saved = list[tuple[torch.Tensor, torch.Tensor, int]]  # tensor, its value and version before


def _running_stats(norms: tuple[_NormBase, ...]) -> Saved:
    tensors = [
        tensor
        for norm in norms
        if norm.training  # in eval mode they are only read
        for tensor in (getattr(norm, name, None) for name in RUNNING_STATS)
        if isinstance(tensor, torch.Tensor)
    ]
    if not tensors:
        return []
    # outside the recompute's dispatch modes: a selective checkpoint would take the copies for
    # ops of the block and find them missing from its forward
    with _disable_current_modes(), torch.no_grad():
        return [(tensor, tensor.clone(), tensor._version) for tensor in tensors]


def _restore(saved: Saved) -> None:
    """Values and version counters as before the rerun: the rerun leaves no trace."""
    if not saved:
        return
    with _disable_current_modes(), torch.no_grad():
        for tensor, value, _ in saved:
            tensor.copy_(value)
    tensors = tuple(tensor for tensor, _, _ in saved)
    torch._C._autograd._unsafe_set_version_counter(tensors, tuple(v for _, _, v in saved))


class BlockForward:
    """The forward of one block, callable, picklable, and safe to rerun in backward.

    Args:
        block: the block module.
        stage: its stage name (for messages).
        previous: an instance ``forward`` the block had before the plan (``None``: the class's).
    """

    _caches: CacheArguments | None = None  # objects pickled before it existed read it anew

    def __init__(self, block: nn.Module, stage: str, previous: Any = None) -> None:
        self.block = block
        self.stage = stage
        self.previous = previous
        self.norms = norm_layers(block)
        self._caches = cache_arguments(block)

    def _forward(self) -> Any:
        if self.previous is not None:
            return self.previous
        return functools.partial(type(self.block).forward, self.block)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self._forward()
        if torch.is_grad_enabled():
            if self._caches is None:
                self._caches = cache_arguments(self.block)
            args, kwargs = private_caches(self._caches, args, kwargs)
        if not replaying():
            return forward(*args, **kwargs)
        saved = _running_stats(self.norms)
        try:
            with rerunning():
                return forward(*args, **kwargs)
        except (_StopRecomputationError, MemfitError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as error:
            if _SECOND_BACKWARD in str(error):
                raise MemfitError(
                    f"stage {self.stage!r} ({type(self.block).__name__}) was recomputed for a "
                    f"second backward through the same forward (backward(retain_graph=True) "
                    f"and another backward, or a gradient penalty through "
                    f"autograd.grad(..., create_graph=True)), and it runs a selective:* option: "
                    f"torch's selective activation checkpoint allows one backward per forward "
                    f"(torch: {str(error)[:200]}). This is torch's limit, not the model's: for "
                    f"such a loop plan without selective:* options (memfit.profile(..., "
                    f"options=()) or a list without them; keep and recompute allow a second "
                    f"backward)"
                ) from error
            raise UnsupportedModelError(
                f"stage {self.stage!r} ({type(self.block).__name__}) ran in the forward but "
                f"failed when memfit recomputed it in backward ({type(error).__name__}: "
                f"{str(error)[:300]}). The block does not compute the same thing twice: it "
                f"reads state that its first run changed (a cache under an argument name memfit "
                f"does not know, a counter, a global flag). Pass such state explicitly and "
                f"unchanged, or keep this stage in the plan (no recompute)"
            ) from error
        finally:
            _restore(saved)
