"""Stage marks: module and tensor hooks that cut one training step at the chain's stage
boundaries. A block's forward pre-hook opens its forward span; a gradient hook on a stage's
output opens that stage's backward span (the gradient of its output is ready)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from memfit.measuring.carry import carried_inputs, carried_outputs, uncarried
from memfit.measuring.chain import (
    Chain,
    Inputs,
    main_tensor,
    same_side_inputs,
    split_main,
)
from memfit.measuring.step import local_tensor, storage_key, tensor_bytes

Marker = Callable[[str], None]
Watcher = Callable[[str, torch.Tensor], None]


@dataclass
class Marked:
    """What the stage marks saw: stage index -> bytes of its output; block index -> whether
    it got the same side inputs as the block before it; the largest bytes of side inputs that
    require grad (an encoder output every decoder block reads) that any block got."""

    output_bytes: dict[int, int] = field(default_factory=dict)
    same: dict[int, bool] = field(default_factory=dict)
    side_grad_bytes: int = 0
    # blocks whose output holds tensors besides the hidden state (attention weights): the
    # runtime cannot join them with their neighbours in one recompute segment
    tails: set[int] = field(default_factory=set)
    # block index -> bytes of those tensors (distinct storages that are neither the hidden
    # state's nor the block's inputs'): what the caller holds until the next block returns
    tail_bytes: dict[int, int] = field(default_factory=dict)
    # blocks whose output requires grad: autograd recorded their graph (a frozen block fed an
    # input that needs no gradient records none)
    graphs: set[int] = field(default_factory=set)


def _tail_bytes(output: Any, carried: list[Any], args: Any, kwargs: Any) -> int:
    """Bytes of the tensors a block returns besides its hidden state (the carried tensors),
    counting each storage once and leaving out the carried tensors' and the block's inputs'
    (a position bias passed on)."""
    known = {
        storage_key(leaf)
        for leaf in [*carried, *tree_leaves([args, kwargs])]
        if isinstance(leaf, torch.Tensor)
    }
    tails = [
        leaf
        for leaf in tree_leaves(_uncarried_items(output, carried))
        if isinstance(leaf, torch.Tensor) and storage_key(leaf) not in known
    ]
    return tensor_bytes(*tails)


def _uncarried_items(output: Any, carried: list[Any]) -> list[Any]:
    """The items of a block's output tuple that are not carried to the next block (the items
    after the hidden state, for a block that hands on its main tensor only)."""
    if not isinstance(output, tuple | list):
        return []
    if len(carried) == 1:
        return list(output[1:])
    return [item for item in output if not any(item is tensor for tensor in carried)]


def _carried(values: list[Any]) -> list[torch.Tensor]:
    return [value for value in values if isinstance(value, torch.Tensor)]


def _same_tensors(a: list[Any], b: list[torch.Tensor]) -> bool:
    """Whether two lists hold the very same tensors, in any order."""
    return {id(t) for t in a if t is not None} == {id(t) for t in b} and all(
        any(t is u for u in b) for t in a if t is not None
    )


def _once(hook: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """``hook`` for the first of several tensors' gradients only (a block that carries several
    tensors starts its backward when the first of their gradients is ready)."""
    fired = [False]

    def first(grad: torch.Tensor) -> None:
        if not fired[0]:
            fired[0] = True
            hook(grad)

    return first


@contextmanager
def _stage_marks(chain: Chain, mark: Marker, watch: Watcher | None = None) -> Iterator[Marked]:
    """Hooks that mark stage boundaries; yields what they saw (:class:`Marked`). ``watch``
    (:meth:`MemoryMeter.watch`) is given every block's main input, named ``input:<stage>``."""
    marked = Marked()
    output_bytes = marked.output_bytes
    # only the previous block's side inputs, and only until the next block compares: holding
    # every block's (masks, rotary tables) to the end of the step would change the step measured
    calls: dict[int, Inputs] = {}
    # every hook's handle, the tensors' too: a block's input may be the user's own tensor (a
    # sample or a parameter that requires grad), which must not keep memfit's hooks (they would
    # mark the spans of meters long gone at every later backward)
    handles: list[RemovableHandle] = []
    # block stage -> its output and the labels its gradient marks, latest stage first: a stage
    # between groups that passes the block's output on as it is (nothing between layer1 and
    # layer2 of a ResNet) marks its (empty) backward before the block's, which runs next.
    # Weakly: holding the outputs would change the step measured. Several for a block that
    # carries several tensors on (:mod:`memfit.measuring.carry`).
    outputs: dict[int, tuple[list[weakref.ref[torch.Tensor]], list[str]]] = {}

    def on_grad(label: str) -> Callable[[torch.Tensor], None]:
        return lambda _grad: mark(label)

    def on_grads(labels: list[str]) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            for label in reversed(labels):
                mark(label)

        return hook

    def pre_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mark(f"F:{index}")
            if watch is not None:
                given = main_tensor(split_main(args, kwargs)[0])
                if given is not None:
                    watch(f"input:{index}", local_tensor(given))
            x, rest, side = split_main(args, kwargs)
            carry = chain.carry(index)
            current = uncarried(carry, rest, side)
            previous = calls.pop(index - 1, None)
            if previous is not None:
                marked.same[index] = same_side_inputs(previous, current)
            grads = [
                leaf
                for leaf in tree_leaves(current)
                if isinstance(leaf, torch.Tensor)
                and leaf.requires_grad
                and not isinstance(leaf, nn.Parameter)
            ]
            marked.side_grad_bytes = max(marked.side_grad_bytes, tensor_bytes(*grads))
            if chain.block_of_stage(index + 1) is not None:
                calls[index] = current
            if chain.block_of_stage(index - 1) is None:  # <pre> or a stage between groups
                handed = carried_inputs(carry, x, rest, side)
                firsts = _carried([main_tensor(handed[0]), *handed[1:]])
                if firsts:
                    output_bytes[index - 1] = tensor_bytes(*firsts)
                    before = outputs.get(index - 2)
                    if before is not None and _same_tensors([ref() for ref in before[0]], firsts):
                        before[1].append(f"B:{index - 1}")
                    else:
                        hook = _once(on_grad(f"B:{index - 1}"))
                        for first in firsts:
                            if first.requires_grad:
                                handles.append(first.register_hook(hook))

        return hook

    def post_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            carried = carried_outputs(chain.carry(index), output, main_tensor)
            if any(
                isinstance(leaf, torch.Tensor)
                for leaf in tree_leaves(_uncarried_items(output, carried))
            ):
                marked.tails.add(index)
                marked.tail_bytes[index] = _tail_bytes(output, carried, args, kwargs)
            outs = _carried(carried)
            if outs:
                output_bytes[index] = tensor_bytes(*outs)
                grads = [out for out in outs if out.requires_grad]
                if grads:
                    marked.graphs.add(index)
                    labels = [f"B:{index}"]
                    outputs[index] = ([weakref.ref(out) for out in outs], labels)
                    hook = _once(on_grads(labels))
                    handles.extend(out.register_hook(hook) for out in grads)
            if chain.block_of_stage(index + 1) is None:  # <post> or a stage between groups
                mark(f"F:{index + 1}")

        return hook

    for index in chain.block_stages:
        block = chain.block_of_stage(index)
        assert block is not None
        handles.append(block.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(index), with_kwargs=True))
    try:
        yield marked
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def marks(chain: Chain | None, mark: Marker, watch: Watcher | None = None) -> Iterator[Marked]:
    """Stage marks when there is a chain (see :func:`_stage_marks`), else only the step's."""
    if chain is None:
        yield Marked()
    else:
        with _stage_marks(chain, mark, watch) as marked:
            yield marked


def both(first: Marker, second: Marker) -> Marker:
    """One marker calling two: the meter's, then a clock's."""

    def mark(label: str) -> None:
        first(label)
        second(label)

    return mark
