"""Finding the chain of stages in a model.

A chain is ``<pre>`` (everything the forward does before the first block: embeddings, masks),
the blocks in order, and ``<post>`` (everything after the last block: final norm, head, loss).
The blocks come from the user (``blocks=``) or from the model itself: the largest
``nn.ModuleList``/``nn.Sequential`` whose children are each called once, in order, each taking
the previous one's output as its first argument (every Hugging Face encoder/decoder stack).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit.errors import UnsupportedModelError

PRE = "<pre>"
POST = "<post>"

Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # a block call's side inputs: (args, kwargs)


@dataclass(frozen=True, eq=False)
class Chain:
    """The stages of a model: ``<pre>``, the blocks, ``<post>``.

    Attributes:
        container: fqn of the module holding the blocks (``""``: the model itself).
        block_names: fqn of every block, in execution order.
        blocks: the block modules, in the same order.
    """

    container: str
    block_names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return (PRE, *self.block_names, POST)

    def __len__(self) -> int:
        return len(self.block_names) + 2

    def block_of_stage(self, index: int) -> nn.Module | None:
        """The block module of stage ``index`` (``None`` for ``<pre>`` and ``<post>``)."""
        if 1 <= index <= len(self.blocks):
            return self.blocks[index - 1]
        return None


def main_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a block passes on: the value itself, or the first item of a tuple/output."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value:
        return main_tensor(value[0])
    if isinstance(value, dict) and value:
        return main_tensor(next(iter(value.values())))
    return None


def same_side_inputs(expected: Inputs, received: Inputs) -> bool:
    """Whether two calls got the same side inputs: tensors by identity, the rest by equality."""
    (args_a, kwargs_a), (args_b, kwargs_b) = expected, received
    if len(args_a) != len(args_b) or kwargs_a.keys() != kwargs_b.keys():
        return False
    pairs = [*zip(args_a, args_b, strict=True), *((kwargs_a[k], kwargs_b[k]) for k in kwargs_a)]
    for a, b in pairs:
        if a is b:
            continue
        # an equal copy of a tensor may still be another mask; only the same object is safe
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        try:
            if bool(a != b):
                return False
        except Exception:  # objects whose != is not a plain bool (arrays, odd __ne__)
            return False
    return True


MAIN_KEYWORD = "hidden_states"  # how Hugging Face passes a layer its main input by keyword


def split_main(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A block call's main input (the hidden state the chain threads through) and the rest.

    The one rule for chain discovery, measuring and the runtime: the first positional argument,
    else the keyword ``hidden_states``; ``None`` (and everything as the rest) when neither is
    there.
    """
    if args:
        return args[0], args[1:], kwargs
    if MAIN_KEYWORD in kwargs:
        rest = dict(kwargs)
        return rest.pop(MAIN_KEYWORD), (), rest
    return None, (), dict(kwargs)


def side_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Inputs:
    """A block call's arguments other than its main input (see :func:`split_main`)."""
    _main, rest, rest_kwargs = split_main(args, kwargs)
    return rest, rest_kwargs


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) >= 2
    }


def find_chain(
    model: nn.Module, run_forward: Callable[[], Any], blocks: Sequence[str] | str | None = None
) -> Chain:
    """Find the model's chain by watching one forward pass.

    Args:
        model: the model.
        run_forward: runs one forward of the model on the sample (grad mode as in training).
        blocks: the blocks' fqns in order, or the fqn of their container; ``None`` to search.

    Raises:
        UnsupportedModelError: no chain found (and how to name one with ``blocks=``), or the
            named blocks are not called once each, in order, as a chain.
    """
    modules = dict(model.named_modules())
    if blocks is None:
        containers = _candidates(model)
        groups = {
            name: [f"{name}.{child}" if name else child for child, _ in module.named_children()]
            for name, module in containers.items()
        }
    else:
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(
                f"blocks= names {missing} are not submodules of {type(model).__name__}; "
                f"expected fqns such as {list(modules)[1:4]}"
            )
        if len(names) == 1 and isinstance(modules[names[0]], nn.ModuleList | nn.Sequential):
            container = modules[names[0]]
            names = [f"{names[0]}.{child}" for child, _ in container.named_children()]
        groups = {"<blocks=>": names}
    calls: list[tuple[str, int, int | None]] = []  # (block fqn, input id, output id)
    handles = []
    watched = {name for names in groups.values() for name in names}

    def watch(name: str) -> None:
        module = modules[name]

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = main_tensor(split_main(args, kwargs)[0])
            calls.append((name, id(first) if first is not None else -1, None))

        def post_hook(_m: nn.Module, _a: Any, _k: Any, output: Any) -> None:
            out = main_tensor(output)
            index = max(i for i, call in enumerate(calls) if call[0] == name)
            calls[index] = (name, calls[index][1], id(out) if out is not None else -2)

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))

    for name in watched:
        watch(name)
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()

    def is_chain(names: list[str]) -> bool:
        seen = [call for call in calls if call[0] in set(names)]
        if [call[0] for call in seen] != names:
            return False
        return all(seen[k + 1][1] == seen[k][2] for k in range(len(seen) - 1))

    found = {container: names for container, names in groups.items() if is_chain(names)}
    if not found:
        if blocks is not None:
            raise UnsupportedModelError(
                f"blocks={blocks!r} is not a chain: each block must be called once, in the "
                f"given order, taking the previous block's output as its first argument"
            )
        raise UnsupportedModelError(
            f"found no chain of blocks in {type(model).__name__}: no nn.ModuleList or "
            f"nn.Sequential has children called once each, in order, each on the previous "
            f"one's output. Name the blocks with blocks=['layer.0', 'layer.1', ...]"
        )

    def size(item: tuple[str, list[str]]) -> tuple[int, int]:
        params = sum(p.numel() for name in item[1] for p in modules[name].parameters())
        return (len(item[1]), params)

    container, names = max(found.items(), key=size)
    if container == "<blocks=>":
        parents = {name.rpartition(".")[0] for name in names}
        container = parents.pop() if len(parents) == 1 else ""
    return Chain(
        container=container,
        block_names=tuple(names),
        blocks=tuple(modules[name] for name in names),
    )
