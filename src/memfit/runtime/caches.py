"""KV caches in planned blocks: every run of a block writes into a private copy of its cache.

A transformers decoder built with its defaults (``use_cache=True``) hands every layer a cache
that the layer *writes to* in the forward (``cache.update(keys, values, layer_idx)``). Recomputing
the layer in backward with that cache would run it with the forward's keys already there: a
selective checkpoint fails (``aten.slice ... not found in storage``), eager attention fails on
the shapes, SDPA silently attends over twice the keys. Dropping the cache (what Hugging Face's
own checkpointing does) changes the computation instead: ``update`` returns keys and values
concatenated into fresh contiguous tensors, and without it the attention gets strided views,
which other kernels take on some CPUs and GPUs, rounding differently.

So in a forward with gradients every planned block call gets, in each of its runs (the forward
and every recompute), a *structural copy* of each cache it is passed: the cache object, its
layers and their containers are new, the tensors in them are the original's (shared, never
copied). The block calls ``update`` on the copy exactly as it would on the original, the same ops
run on the same shapes, strides and dtypes, and the original is never written: a recompute
starts from the state the forward started from, which makes it right for caches that already
hold keys too (prefix tuning). A planned block's keys and values are therefore not in the cache
the model returns from a training forward (nobody reads it in training; Hugging Face's
checkpointing returns none at all). A forward without gradients (generation) gets the original.

Caches are found by type (a ``transformers`` ``Cache`` in any argument) and by argument name
(``cache``, ``past_key_value``, ``past_key_values``, ``layer_past``, bound to the block's forward
signature, since GPT-2 passes it *positionally*). Tensors and tuples under those names are legacy
caches, which layers never write: they are passed as they are. A layer called with no cache
object but ``use_cache`` on (a legacy layer that would return its keys as ``present``) gets
``use_cache=False``, which changes what it returns, not what it computes.
"""

from __future__ import annotations

import copy
import copyreg
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values", "layer_past")
USE_CACHE = "use_cache"
# how deep a cache's objects are copied (cache -> layers list -> layer -> its containers)
_COPY_DEPTH = 6


@dataclass(frozen=True, slots=True)
class CacheArguments:
    """Where a block's forward takes a cache: positions and names from its signature.

    Attributes:
        positions: argument name -> its position in a call (0: the hidden state), for the cache
            arguments and ``use_cache`` that can be passed positionally.
        use_cache_default: ``use_cache``'s default in the signature (``None``: no such argument).
    """

    positions: tuple[tuple[str, int], ...]
    use_cache_default: Any

    def position(self, name: str) -> int | None:
        return next((index for key, index in self.positions if key == name), None)


def cache_arguments(block: nn.Module) -> CacheArguments:
    """Read ``block``'s forward signature once, when a plan is applied."""
    try:
        parameters = list(inspect.signature(type(block).forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a forward without a signature: names and types only
        parameters = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positions = tuple(
        (parameter.name, index)
        for index, parameter in enumerate(parameters)
        if parameter.kind in positional and parameter.name in (*CACHE_ARGUMENTS, USE_CACHE)
    )
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return CacheArguments(positions, defaults.get(USE_CACHE))


def _is_cache_type(kind: type) -> bool:
    # transformers is never imported for this: a Cache type means it is imported already
    cache_utils = sys.modules.get("transformers.cache_utils")
    cache_type = getattr(cache_utils, "Cache", None)
    return cache_type is not None and issubclass(kind, cache_type)


def _is_config_type(kind: type) -> bool:
    configuration_utils = sys.modules.get("transformers.configuration_utils")
    config_type = getattr(configuration_utils, "PreTrainedConfig", None) or getattr(
        configuration_utils, "PretrainedConfig", None
    )
    return config_type is not None and issubclass(kind, config_type)


def _is_cache_object_type(kind: type) -> bool:
    """Whether objects of type ``kind`` that have a ``__dict__`` are objects a cache argument
    may hold and a layer may write to: not tensors, modules, types, callables or model
    configs (those are shared by the copy)."""
    return (
        not issubclass(kind, torch.Tensor | nn.Module | type)
        and not any("__call__" in vars(base) for base in kind.__mro__)  # callable(value)
        and not _is_config_type(kind)
    )


_COPY_HOOKS = ("__copy__", "__setstate__", "__getnewargs__", "__getnewargs_ex__")


def _plain_copy(kind: type) -> bool:
    """Whether ``copy.copy`` of a ``kind`` is ``kind.__new__(kind)`` with the original's
    ``__dict__``: no ``__reduce__``, ``__reduce_ex__``, ``__getstate__``, slots (``abc.ABC``'s
    empty ``__slots__`` make none) or :data:`_COPY_HOOKS` of its own, and not a type ``copy`` dispatches on. Such objects are
    copied that way, without ``copy``'s generic path, which a block call pays for every
    object of its cache."""
    return (
        kind not in copy._copy_dispatch  # type: ignore[attr-defined]
        and kind not in copyreg.dispatch_table
        and all(getattr(kind, name, None) is None for name in _COPY_HOOKS)
        and kind.__reduce_ex__ is object.__reduce_ex__
        and kind.__reduce__ is object.__reduce__
        and kind.__getstate__ is object.__getstate__
        and not any(vars(base).get("__slots__") for base in kind.__mro__[:-1])
    )


# the facts above depend on the type alone (a Cache or config type exists only once
# transformers' module defining it is imported), so they are read once a type
_KINDS: dict[type, tuple[bool, bool, bool]] = {}


def _kind(value: Any) -> tuple[bool, bool, bool]:
    """(a transformers Cache, an object a cache argument may hold when it has a ``__dict__``,
    copied plainly)."""
    kind = type(value)
    facts = _KINDS.get(kind)
    if facts is None:
        facts = _KINDS[kind] = (
            _is_cache_type(kind),
            _is_cache_object_type(kind),
            _plain_copy(kind),
        )
    return facts


def _is_cache(value: Any) -> bool:
    return _kind(value)[0]


def _is_cache_object(value: Any) -> bool:
    """An object a cache argument may hold and a layer may write to: a transformers Cache, or
    an object with a ``__dict__`` that is no tensor, module, type, callable or model config
    (those, and plain values, are shared by the copy)."""
    cache, cache_object, _ = _kind(value)
    return cache or (cache_object and hasattr(value, "__dict__"))


def structural_copy(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` whose containers and objects are new and whose tensors (and every
    other leaf: dtypes, devices, configs) are the original's."""
    if depth > _COPY_DEPTH or isinstance(value, torch.Tensor):
        return value
    if type(value) in (list, tuple, set):
        return type(value)(structural_copy(item, depth + 1) for item in value)
    if isinstance(value, dict):
        new = copy.copy(value)
        for key, item in value.items():
            new[key] = structural_copy(item, depth + 1)
        return new
    if not _is_cache_object(value):
        return value
    if _kind(value)[2]:
        kind: Any = type(value)
        new = kind.__new__(kind)
    else:
        new = copy.copy(value)
    new.__dict__.update(
        (name, structural_copy(item, depth + 1)) for name, item in vars(value).items()
    )
    return new


def private_caches(
    where: CacheArguments, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block call's arguments with a structural copy of every cache in them (and, for a
    legacy layer called with ``use_cache`` on and no cache object, ``use_cache=False``).

    Returns:
        ``(args, kwargs)``: new containers where something changed (the originals are not
        modified), the very same objects otherwise.
    """
    # no assignment expression here: torch.compile traces this and breaks the graph on one
    named: set[int | None] = {where.position(name) for name in CACHE_ARGUMENTS} - {None}
    new_args, new_kwargs, copied, changed = list(args), dict(kwargs), False, False
    for index in range(1, len(new_args)):
        value = new_args[index]
        if _is_cache(value) or (index in named and _is_cache_object(value)):
            new_args[index] = structural_copy(value)
            copied = changed = True
    for name, value in kwargs.items():
        if _is_cache(value) or (name in CACHE_ARGUMENTS and _is_cache_object(value)):
            new_kwargs[name] = structural_copy(value)
            copied = changed = True
    if not copied:
        position = where.position(USE_CACHE)
        if new_kwargs.get(USE_CACHE):
            new_kwargs[USE_CACHE] = False
            changed = True
        elif position is not None and 0 < position < len(new_args):
            if new_args[position]:
                new_args[position] = False
                changed = True
        elif USE_CACHE not in new_kwargs and where.use_cache_default:
            new_kwargs[USE_CACHE] = False  # a legacy layer whose own default returns presents
            changed = True
    if not changed:
        return args, kwargs
    return tuple(new_args), new_kwargs
