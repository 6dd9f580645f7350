"""Dicts the model passes every block to share keys and values: private copies per planned run.

Gemma 4 hands each decoder layer one ``shared_kv_states`` dict (a transformers
``KVSharingDict``); a layer whose ``kv_sharing_mode`` is ``store`` (the last layer of each
attention type, even with ``num_kv_shared_layers=0``) writes its keys and values into it, and a
``reuse`` layer further on (``is_kv_shared_layer``) reads them instead of computing its own.
Unplanned, the dict dies when the model's forward returns. Under a plan a checkpoint keeps its
arguments to its backward, the dict among them, and with it every first run's keys and values,
then each rerun's: bytes no stage's costs show (at Gemma 4's floor the step measured 6.9% above
its prediction and over its budget).

So, as for KV caches (:mod:`memfit.runtime.caches`), a planned block is called, in a forward
with gradients, with a *snapshot* of the dict in its place (what its checkpoint holds), and
every run of the block (the first and each rerun) writes into a private copy of the snapshot:

* where no block of the model reads the dict (no module with ``is_kv_shared_layer`` set, the
  flag transformers gives a layer that reuses another's keys), the snapshot is empty and what a
  run stores goes nowhere: nothing outlives the block's run, as in a chain, and the blocks of a
  multi-block segment get equal (empty) side inputs;
* where a block reads it, a one-block item's snapshot holds the entries there at the call; after
  the first run, what the block stored goes into the model's dict (the reader gets the first
  run's tensors, as unplanned, and they die with the model's forward) and the snapshot is cut
  down to what the block read (all a rerun needs; a rerun's writes go nowhere). The blocks of a
  multi-block segment run on the model's dict itself (their rerun runs them all with the first
  block's arguments, so a later one must see what an earlier one stored).

The same ops run on the same tensors as unplanned. Known limit (readers only): the stored
entries stay to the end of the model's forward, which the costs count as held by the storing
block's checkpoint to its backward (high); a multi-block segment's checkpoint holds the
model's dict to its backward (low).
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

_SOURCE = "_memfit_source"  # on a snapshot: a weak reference to the model's dict
_READS = "_memfit_reads"  # on a first run's private copy: the keys read


def is_shared_states(value: Any) -> bool:
    """Whether ``value`` is a transformers ``KVSharingDict`` (never importing transformers)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    sharing_type = getattr(cache_utils, "KVSharingDict", None)
    return sharing_type is not None and isinstance(value, sharing_type)


def _replace(
    args: tuple[Any, ...], kwargs: dict[str, Any], make: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with every shared dict ``d`` replaced by ``make(d)`` (the same
    containers when there is none)."""
    if not any(is_shared_states(value) for value in (*args, *kwargs.values())):
        return args, kwargs
    new_args = tuple(make(value) if is_shared_states(value) else value for value in args)
    new_kwargs = {
        name: make(value) if is_shared_states(value) else value for name, value in kwargs.items()
    }
    return new_args, new_kwargs


def _plain_copy(states: Any) -> Any:
    new = copy.copy(states)
    for name in (_SOURCE, _READS):
        new.__dict__.pop(name, None)
    return new


def _snapshot(states: Any, *, entries: bool) -> Any:
    new = _plain_copy(states)
    if entries:
        new.__dict__[_SOURCE] = weakref.ref(states)
    else:
        new.data.clear()
        new.__dict__[_SOURCE] = None
    return new


def snapshot_shared_states(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, read: bool, one_block: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A planned block call's arguments with a snapshot of each shared dict in them, in a
    forward with gradients (what its checkpoint or option wrapper then holds).

    Args:
        read: whether a block of the model reads the dict (:func:`reads_shared_states`).
        one_block: whether the block is an item of its own (not in a multi-block segment).
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or (read and not one_block):
        return args, kwargs
    return _replace(args, kwargs, functools.partial(_snapshot, entries=read))


def reads_shared_states(modules: Iterable[nn.Module]) -> bool:
    """Whether one of ``modules`` reuses keys and values another layer shared (transformers'
    ``is_kv_shared_layer``)."""
    return any(getattr(module, "is_kv_shared_layer", False) is True for module in modules)


_RECORDING: dict[type, type] = {}


def _recording(kind: Any) -> type:
    """A subclass of ``kind`` that notes the keys read (still a ``KVSharingDict``)."""

    def __getitem__(self: Any, key: Any) -> Any:
        self.__dict__.setdefault(_READS, set()).add(key)
        return kind.__getitem__(self, key)

    def __contains__(self: Any, key: Any) -> bool:
        self.__dict__.setdefault(_READS, set()).add(key)
        return kind.__contains__(self, key)

    if kind not in _RECORDING:
        methods = {"__getitem__": __getitem__, "__contains__": __contains__}
        _RECORDING[kind] = type(kind.__name__, (kind,), methods)
    return _RECORDING[kind]


class SharedRuns:
    """The private copies one run of a block got, to settle after its first run."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Any, Any]] = []  # (snapshot, private copy)

    def private(self, states: Any, *, first: bool) -> Any:
        if _SOURCE not in states.__dict__:  # the model's own dict (a multi-block segment)
            return states
        new = _plain_copy(states)
        if first and states.__dict__[_SOURCE] is not None:
            new.__class__ = _recording(type(states))
            self.pairs.append((states, new))
        return new

    def settle(self) -> None:
        """After a first run: hand what it stored to the model's dict, and cut each snapshot
        down to what the block read (all a rerun needs)."""
        for snapshot, private in self.pairs:
            source = snapshot.__dict__[_SOURCE]
            source = source() if source is not None else None
            before, after = snapshot.data, private.data
            if source is not None:
                for key, value in after.items():
                    if key not in before or before[key] is not value:
                        source[key] = value
            reads = private.__dict__.get(_READS, set())
            for key in [key for key in before if key not in reads]:
                del before[key]
        self.pairs.clear()


def private_shared_states(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, first: bool
) -> tuple[tuple[Any, ...], dict[str, Any], SharedRuns]:
    """One run's arguments with a private copy of each snapshot in them; ``first``: the block's
    first run (call :meth:`SharedRuns.settle` after it)."""
    runs = SharedRuns()
    args, kwargs = _replace(args, kwargs, lambda states: runs.private(states, first=first))
    return args, kwargs, runs
