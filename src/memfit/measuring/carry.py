"""Carries of several tensors: blocks that hand the next block more than one tensor.

A dual-stream diffusion transformer's joint block (diffusers' SD3 and Flux) takes
``(hidden_states, encoder_hidden_states, temb, ...)`` and returns ``(encoder_hidden_states,
hidden_states)``: two streams run through the chain, and the order of the output need not be
the order of the arguments. A :data:`Carry` says, for one group of blocks, which argument of a
block call each item of the previous block's output tuple becomes, found by the chain finder
from the call pattern (tensor identity, :func:`find_carry`).

Arguments are named in the split form every part of memfit uses
(:func:`~memfit.measuring.chain.split_main`): slot ``0`` is the main input (the first
positional argument, else ``hidden_states=``), slot ``k >= 1`` the positional argument ``k``
(``rest[k - 1]``), a string the keyword of that name. The empty carry is the usual chain: the
main input is the previous block's main output (:func:`~memfit.measuring.chain.main_tensor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Slot = int | str  # 0: the main input; k >= 1: positional argument k; a name: that keyword
Carry = tuple[tuple[Slot, int], ...]  # (slot of the next call, index in the block's output)
MAIN_ONLY: Carry = ()  # the main input is the previous block's main output


def output_items(output: Any) -> tuple[Any, ...]:
    """A block output's top-level items: a tensor alone, or a tuple's/list's items."""
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, tuple | list):
        return tuple(output)
    return ()


def slot_values(
    x: Any, rest: tuple[Any, ...], side: dict[str, Any]
) -> list[tuple[Slot, torch.Tensor]]:
    """The tensors of a split call, each with its slot (top level only)."""
    slots: list[tuple[Slot, Any]] = [(0, x)]
    slots += [(k + 1, value) for k, value in enumerate(rest)]
    slots += list(side.items())
    return [(slot, value) for slot, value in slots if isinstance(value, torch.Tensor)]


def find_carry(
    output_tokens: dict[int, int], input_tokens: dict[Slot, int], next_tokens: dict[Slot, int]
) -> Carry:
    """The carry from one block call to the next, from tensor tokens (numbers that name a
    tensor object): each output item made by the block (not one of its own inputs passed on,
    as T5's position bias) that the next call gets, with its slot there. Sorted by slot, the
    main input first."""
    own = set(input_tokens.values())
    made = {token: index for index, token in output_tokens.items() if token not in own}
    return ordered([(slot, made[token]) for slot, token in next_tokens.items() if token in made])


def ordered(pairs: list[tuple[Slot, int]]) -> Carry:
    """A carry's pairs in their one order: positions first (the main input first), then
    keywords by name."""
    return tuple(sorted(pairs, key=lambda pair: (isinstance(pair[0], str), str(pair[0]).zfill(4))))


def carried_inputs(carry: Carry, x: Any, rest: tuple[Any, ...], side: dict[str, Any]) -> list[Any]:
    """The carried arguments of a split call, in the carry's order (``[x]`` for the empty
    carry). A slot the call lacks gives ``None``."""
    if not carry:
        return [x]
    return [_get(slot, x, rest, side) for slot, _ in carry]


def carried_outputs(carry: Carry, output: Any, main: Callable[[Any], Any]) -> list[Any]:
    """The carried items of a block's output, in the carry's order (``[main(output)]`` for the
    empty carry); an item the output lacks gives ``None``."""
    if not carry:
        return [main(output)]
    items = output_items(output)
    return [items[index] if index < len(items) else None for _, index in carry]


def hand_on(
    carry: Carry,
    output: Any,
    x: Any,
    rest: tuple[Any, ...],
    side: dict[str, Any],
    main: Callable[[Any], Any],
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The next block's split call: this call with its carried slots replaced by the output's
    items (the empty carry: the main input by the output's main tensor)."""
    if not carry:
        return main(output), rest, side
    items = output_items(output)
    listed, named = list(rest), dict(side)
    for slot, index in carry:
        value = items[index]
        if slot == 0:
            x = value
        elif isinstance(slot, int):
            listed[slot - 1] = value
        else:
            named[slot] = value
    return x, tuple(listed), named


def uncarried(
    carry: Carry, rest: tuple[Any, ...], side: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A split call's side inputs without its carried slots (which change from block to
    block); a carried positional argument is left as ``None`` to keep the positions."""
    if not carry:
        return rest, side
    slots = {slot for slot, _ in carry}
    listed = tuple(None if k + 1 in slots else value for k, value in enumerate(rest))
    return listed, {name: value for name, value in side.items() if name not in slots}


def _get(slot: Slot, x: Any, rest: tuple[Any, ...], side: dict[str, Any]) -> Any:
    if slot == 0:
        return x
    if isinstance(slot, int):
        return rest[slot - 1] if slot - 1 < len(rest) else None
    return side.get(slot)
