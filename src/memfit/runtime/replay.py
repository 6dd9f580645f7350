"""A block's own forward as the runtime calls it, and what has to hold when it is rerun.

:class:`BlockForward` is what every schedule item finally calls: the block's class ``forward``
(or the instance ``forward`` it had before the plan). It is a plain object holding the block,
not a bound method or a closure, so ``copy.deepcopy`` and ``pickle`` rebind it to the copy's
block (a closure over ``block.forward`` kept computing with the *original* block's weights).

In a forward with gradients (the first run and every recompute) each KV cache it is passed is
replaced by a private structural copy (:mod:`memfit.runtime.caches`): the block runs the same ops
as unplanned and never writes the model's cache, so a rerun starts from the same state. A dict
of shared keys and values (Gemma 4's ``shared_kv_states``) is replaced likewise by a private copy
of the snapshot its item was called with (:mod:`memfit.runtime.shared_states`).

It calls the forward as the model did: the runtime hands the main input on first, and a block
called with keywords only whose keywords name the forward's first parameter (Reformer's
``prev_attn_output``) gets it back as ``hidden_states=``.

It notes the version of every tensor it is given; a rerun whose arguments were written in place
since the first run (xLSTM copies each block's new RNN state into the cache tensors it passed
the block) is refused with :class:`~memfit.errors.UnsupportedModelError` before it runs (torch
only noticed afterwards, as "Recomputed values ... have different metadata", or not at all).

When it runs in backward (a checkpoint's recompute: autograd's graph task is running), it

* restores the running statistics of the block's norm layers afterwards (BatchNorm and the
  other ``_NormBase`` layers with ``track_running_stats`` update them in train mode; the rerun
  would update them a second time): values and version counters as before the rerun, so the
  step leaves them exactly as an unplanned step does. Setting the counters back is safe: only
  the rerun's own BatchNorm saved them since, through the checkpoint's saved-tensor hooks
  (which skip autograd's version check), and in train mode its backward reads the batch
  statistics, not these.
* puts back the attributes the block's first run rebound (I-BERT's statistics, RecurrentGemma's
  states, a counter) as that run found them, and afterwards as they were before the rerun
  (:mod:`memfit.runtime.state_replay`);
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
import inspect
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import _StopRecomputationError

from memfit.errors import MemfitError, UnsupportedModelError
from memfit.measuring.chain import MAIN_KEYWORD
from memfit.measuring.meter import RECOMPUTE_RANGE, metered_range
from memfit.measuring.trace import rerunning
from memfit.runtime.caches import CacheArguments, cache_arguments, private_caches
from memfit.runtime.guards import RUNNING_STATS
from memfit.runtime.shared_states import private_shared_states
from memfit.runtime.state_replay import replayed

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


_UNREAD = object()


class BlockForward:
    """The forward of one block, callable, picklable, and safe to rerun in backward.

    Args:
        block: the block module.
        stage: its stage name (for messages).
        previous: an instance ``forward`` the block had before the plan (``None``: the class's).
    """

    _caches: CacheArguments | None = None  # objects pickled before it existed read it anew
    _first: str | object | None = _UNREAD
    _versions: dict[int, tuple[weakref.ref[torch.Tensor], int]] | None = None

    def __init__(self, block: nn.Module, stage: str, previous: Any = None) -> None:
        self.block = block
        self.stage = stage
        self.previous = previous
        self.norms = norm_layers(block)
        self._caches = cache_arguments(block)
        self._first_parameter()  # read the signature now, not in a forward torch.compile traces

    def _forward(self) -> Any:
        if self.previous is not None:
            return self.previous
        return functools.partial(type(self.block).forward, self.block)

    def _first_parameter(self) -> str | None:
        """The name the block's forward gives its first positional parameter (``None``: it
        has none, or its signature cannot be read)."""
        if self._first is _UNREAD:
            target = self.previous if self.previous is not None else type(self.block).forward
            try:
                parameters = list(inspect.signature(target).parameters.values())
            except (TypeError, ValueError):
                parameters = []
            if self.previous is None:
                parameters = parameters[1:]  # self
            positional = (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            )
            first = parameters[0] if parameters else None
            self._first = first.name if first is not None and first.kind in positional else None
        return self._first if isinstance(self._first, str) else None

    def _as_called(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The arguments in the shape the model passed them. The runtime hands the main input
        on first (:func:`~memfit.measuring.chain.split_main`); a block called with keywords
        only took it as ``hidden_states=``, and when the keywords also name the forward's first
        parameter (Reformer's ``prev_attn_output``), the main input must go back by keyword."""
        if len(args) == 1 and MAIN_KEYWORD not in kwargs:
            first = self._first_parameter()
            if first is not None and first != MAIN_KEYWORD and first in kwargs:
                kwargs[MAIN_KEYWORD] = args[0]
                return ()
        return args

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        state.pop("_versions", None)  # weak references to one step's tensors
        return state

    def _remember_versions(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note the version of every tensor the block is given, to compare at its rerun."""
        if self._versions is None:
            self._versions = {}
        versions = self._versions
        if len(versions) > 256:  # drop the tensors of earlier steps
            for key in [key for key, (ref, _) in versions.items() if ref() is None]:
                del versions[key]
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                versions[id(leaf)] = (weakref.ref(leaf), leaf._version)

    def _refuse_changed_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse a rerun whose arguments were changed in place after the block's first run:
        the rerun would compute from other values (xLSTM copies each block's new RNN state
        into the very cache tensors it passed the block)."""
        versions = self._versions or {}
        for position, leaf in enumerate(tree_leaves((args, kwargs))):
            if not isinstance(leaf, torch.Tensor) or id(leaf) not in versions:
                continue
            ref, version = versions[id(leaf)]
            if ref() is not leaf or leaf._version == version:
                continue
            raise UnsupportedModelError(
                f"stage {self.stage!r} ({type(self.block).__name__}) cannot be recomputed: the "
                f"model changed one of its argument tensors in place after the block ran "
                f"(argument tensor {position}, shape {tuple(leaf.shape)}, written "
                f"{leaf._version - version} time(s) since), so a rerun would compute from other "
                f"values (a recurrent state or cache the model updates in place, as xLSTM's "
                f"with use_cache=True). Pass use_cache=False in training (as Hugging Face's "
                f"own checkpointing does), or keep this stage in the plan (no recompute)"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if replaying():  # the profile meters each recompute: early stop ends it (StageCosts)
            with metered_range(f"{RECOMPUTE_RANGE}{self.stage}"):
                return self._call(args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        forward = self._forward()
        args = self._as_called(args, kwargs)
        if torch.is_grad_enabled():
            if self._caches is None:
                self._caches = cache_arguments(self.block)
            args, kwargs = private_caches(self._caches, args, kwargs)
        if not replaying():
            # not while torch.compile traces the forward around a plan: reading the versions
            # and the signature there changed what the traced forward saved against its
            # recompute (CheckpointError)
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                self._remember_versions(args, kwargs)
                args, kwargs, shared = private_shared_states(args, kwargs, first=True)
                out = forward(*args, **kwargs)
                shared.settle()
                return out
            return forward(*args, **kwargs)
        self._refuse_changed_arguments(args, kwargs)
        args, kwargs, _ = private_shared_states(args, kwargs, first=False)
        saved = _running_stats(self.norms)
        try:
            with rerunning():
                return replayed(self.block, lambda: forward(*args, **kwargs))
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
