"""Saved outputs that a selective stage's forward later changes in place.

torch's selective checkpoint caches the outputs of the ops its policy saves and hands them back
in the recompute. When the forward then writes into such an output in place (Falcon's eager
attention: ``scores = q @ k.T; scores /= sqrt(d)``), the cache holds the written value, the
recompute applies the write a second time, and gradients come out wrong. torch 2.13's own
check ("Tensor cached during selective activation checkpoint has been mutated") does not fire:
the cache holds a detached alias with a version counter of its own.

:class:`SavedWrites` runs beneath torch's caching mode during a selective stage's first forward
(never in the recompute) and sees every op before its kernel runs. It records the storages of
the outputs the policy saves; when an op is about to write into one of them (an argument its
schema marks as written: ``self`` of ``div_``, ``out=``), it replaces the cached value by a
copy taken just before the write. The recompute then starts from the value the forward had and
reapplies the writes itself, so gradients stay bit-identical; the price is one copy of that
output. Where no copy can stand in for the cached value (the saved op returns a view, or
torch's cache no longer looks as this module expects), it raises
:class:`~memfit.errors.UnsupportedModelError` naming the stage, the saved op and the writer.

Known gap: writes after the stage's forward (a block that returns a saved output, which the
next block changes in place) are not seen.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memfit.errors import UnsupportedModelError
from memfit.measuring.ops import written_arguments, written_tensors
from memfit.measuring.step import storage_key


@functools.cache
def _returns_alias(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    return schema is not None and any(ret.alias_info is not None for ret in schema.returns)


class SavedWrites(TorchDispatchMode):
    """Keeps torch's selective-checkpoint cache apart from in-place writes in the forward.

    Args:
        saves: ``(op, args, kwargs) -> bool``: whether the policy saves this call's output.
        storage: the cache of torch's caching mode (``key -> {call index: entry}``), shared
            with the recompute's cached mode.
        stage: the stage's name, for messages.
        option: the stage's option, for messages.
    """

    def __init__(self, saves: Any, storage: Any, stage: str, option: str) -> None:
        super().__init__()
        self.saves = saves
        self.storage = storage
        self.stage = stage
        self.option = option
        self.saved: dict[int, Any] = {}  # storage key of a saved output -> its op

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # as torch's own selective-checkpoint modes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.saved and written_arguments(func):
            for tensor in written_tensors(func, args, kwargs):
                op = self.saved.pop(storage_key(tensor), None)
                if op is not None:
                    self._copy_cached(op, storage_key(tensor), func)
        out = func(*args, **kwargs)
        if self.saves(func, args, kwargs):
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                    self.saved[storage_key(leaf)] = func
        return out

    def _copy_cached(self, op: Any, storage: int, writer: Any) -> None:
        """Replace the cached outputs of ``op`` that live in ``storage`` by copies, now, before
        ``writer`` changes them."""
        copied = False
        if not _returns_alias(op):
            entries = self.storage.get(op, ())
            # torch 2.13: {call index: entry}; torch 2.4 to 2.12: a list of entries
            for entry in list(entries.values() if isinstance(entries, dict) else entries):
                for wrapper in tree_leaves(entry):
                    value = getattr(wrapper, "val", None)
                    if not isinstance(value, torch.Tensor) or storage_key(value) != storage:
                        continue
                    if not hasattr(wrapper, "version"):
                        break
                    wrapper.val = value.clone()  # beneath every mode: torch's cache sees nothing
                    wrapper.version = wrapper.val._version
                    copied = True
        if not copied:
            raise UnsupportedModelError(
                f"stage {self.stage!r} under {self.option!r}: the output of {op}, which the "
                f"option saves, is changed in place later in the forward by {writer}, and memfit "
                f"cannot keep a copy of it apart (the recompute would apply {writer} twice and "
                f"give wrong gradients); plan this stage with an option that does not save "
                f"{op} (e.g. 'selective:save=<other ops>', 'rebuild' or 'keep'), or let "
                f"memfit.auto choose: memfit.profile leaves such options out"
            )
