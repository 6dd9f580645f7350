"""KV caches in planned blocks: dropped in training forwards, as Hugging Face's checkpointing does.

A transformers decoder built with its defaults (``use_cache=True``) hands every layer a cache
that the layer *appends to* in the forward. Recomputing the layer in backward would then run it
with the forward's keys already in the cache: a selective checkpoint fails (``aten.slice ...
not found in storage``), eager attention fails on the shapes, SDPA silently attends over twice
the keys. Hugging Face's own ``GradientCheckpointingLayer`` therefore drops the cache arguments
and sets ``use_cache=False`` in a checkpointed training forward; memfit does the same in every
planned block of a forward with gradients (in eval mode too: the plan still recomputes there).
A forward without gradients (generation) keeps the cache. The step is bit-identical to the
unplanned one: the cache only records keys and values, and the returned cache lacks the planned
layers' entries (nobody reads it in training).

The cache is found by argument name (``cache``, ``past_key_value``, ``past_key_values``,
``layer_past``, bound to the block's forward signature, since GPT-2 passes it *positionally*)
and by type (a ``transformers`` ``Cache`` object in any argument). Layers that only *read* the
cache declare ``_can_checkpoint_with_cache = True`` (as for HF) and keep it.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values", "layer_past")
USE_CACHE = "use_cache"


@dataclass(frozen=True, slots=True)
class CacheArguments:
    """Where a block's forward takes a cache: positions and names from its signature.

    Attributes:
        positions: argument name -> its position in a call (0: the hidden state), for the cache
            arguments and ``use_cache`` that can be passed positionally.
        keeps_cache: the layer only reads its cache (``_can_checkpoint_with_cache``).
        use_cache_default: ``use_cache``'s default in the signature (``None``: no such argument).
    """

    positions: tuple[tuple[str, int], ...]
    keeps_cache: bool
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
    default = defaults.get(USE_CACHE)
    keeps = bool(getattr(block, "_can_checkpoint_with_cache", False))
    return CacheArguments(positions, keeps, default)


def _is_cache(value: Any) -> bool:
    # transformers is never imported for this: a Cache object means it is imported already
    cache_utils = sys.modules.get("transformers.cache_utils")
    cache_type = getattr(cache_utils, "Cache", None)
    return cache_type is not None and isinstance(value, cache_type)


def drop_caches(
    where: CacheArguments, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """A block call's arguments without its cache and with ``use_cache=False``.

    Returns:
        ``(args, kwargs, changed)``: the new arguments (the originals are not modified) and the
        names of those that changed (empty: the call is returned as it is).
    """
    new_args, new_kwargs, changed = list(args), dict(kwargs), []
    names = () if where.keeps_cache else CACHE_ARGUMENTS
    for name in names:
        index = where.position(name)
        if name in new_kwargs and new_kwargs[name] is not None:
            new_kwargs[name] = None
            changed.append(name)
        elif index is not None and 0 < index < len(new_args) and new_args[index] is not None:
            new_args[index] = None
            changed.append(name)
    if not where.keeps_cache:
        for index in range(1, len(new_args)):
            if _is_cache(new_args[index]):
                new_args[index] = None
                changed.append(f"argument {index}")
        for name, value in kwargs.items():
            if new_kwargs[name] is not None and _is_cache(value):
                new_kwargs[name] = None
                changed.append(name)
    index = where.position(USE_CACHE)
    if new_kwargs.get(USE_CACHE):
        new_kwargs[USE_CACHE] = False
        changed.append(USE_CACHE)
    elif index is not None and 0 < index < len(new_args):
        if new_args[index]:
            new_args[index] = False
            changed.append(USE_CACHE)
    elif USE_CACHE not in new_kwargs and where.use_cache_default:
        new_kwargs[USE_CACHE] = False  # a layer whose own default fills a cache
        changed.append(USE_CACHE)
    if not changed:
        return args, kwargs, []
    return tuple(new_args), new_kwargs, changed
