"""Recipes that rerun one known function: an autograd node's op on the input it saved, or a
pure (``rebuild+linear``: linear) module's forward on its call's arguments."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils.parametrize
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from memfit.runtime.rebuild.handles import _Handle, _ptr, _Recipe, _Source

# autograd node type -> the op that made the node's output, rebuilt from the node's saved input
NODE_RECIPES: dict[str, Callable[[Any], torch.Tensor]] = {
    "GeluBackward0": lambda node: torch.ops.aten.gelu.default(
        node._saved_self, approximate=node._saved_approximate
    ),
    "SiluBackward0": lambda node: torch.ops.aten.silu.default(node._saved_self),
    "MishBackward0": lambda node: torch.ops.aten.mish.default(node._saved_self),
}

PURE_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)
# Hugging Face norm and activation classes: deterministic functions of input and parameters.
_HF_PURE_SUFFIXES = ("LayerNorm", "RMSNorm", "GELUActivation", "SiLUActivation", "GELUTanh")


def pure_module(module: nn.Module) -> bool:
    """Whether ``rebuild`` may rerun ``module`` to rebuild its output (deterministic, no RNG,
    no side effects)."""
    cls = type(module)
    return cls in PURE_MODULES or (
        cls.__module__.startswith("transformers.") and cls.__name__.endswith(_HF_PURE_SUFFIXES)
    )


def linear_module(module: nn.Module) -> bool:
    """Whether ``rebuild+linear`` may rerun ``module``: ``nn.Linear`` and Hugging Face's
    ``Conv1D`` (GPT-2's linear layers: one ``addmm``), exactly these classes."""
    cls = type(module)
    return cls is nn.Linear or (
        cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"
    )


def _rerunnable(module: nn.Module, linear: bool) -> bool:
    """Whether rerunning ``module.forward`` gives its output again: a pure module of a known
    class (exactly, not a subclass), without hooks or parametrizations whose effects a bare
    ``forward`` would skip or repeat."""
    if not (pure_module(module) or (linear and linear_module(module))):
        return False
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or torch.nn.utils.parametrize.is_parametrized(module)
    )


@dataclass(slots=True)
class _Call:
    """A pure module's call seen during the block's forward (its output is alive meanwhile)."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    version: int  # of the output when the module returned it
    state: tuple[tuple[torch.Tensor, int], ...]  # the module's parameters and buffers, versions
    autocast: tuple[str, bool, torch.dtype]


def node_recipe(base: torch.Tensor, first_node: int) -> _Recipe | None:
    """How to rebuild ``base`` with the op its autograd node recorded, or ``None``: only for a
    node with a recipe made in this block (sequence number ``first_node`` or later), since
    reading an older node's input would unpack (and maybe rebuild) a tensor saved by an earlier
    block."""
    node = base.grad_fn
    recipe = NODE_RECIPES.get(type(node).__name__) if node is not None else None
    if recipe is None or node._sequence_nr() < first_node:  # type: ignore[union-attr]
        return None
    device = base.device.type
    # the aten op the node recorded, on the input it received: no autocast around it
    off = (device, False, torch.get_autocast_dtype(device))
    make = functools.partial(recipe, node)
    # the node's input is unpacked through its own handle: kept, or rebuilt in turn
    return _Recipe(
        label=type(node).__name__.removesuffix("Backward0").lower(),
        inputs=[node._saved_self],  # type: ignore[union-attr]
        shaped=base,
        state=(),
        made=lambda _sources: (make, off),
    )


def module_recipe(call: _Call) -> _Recipe:
    """How to rebuild the output of ``call`` by rerunning the module on its arguments."""

    def made(sources: dict[int, _Source]) -> tuple[Callable[[], torch.Tensor], Any]:
        def ref(leaf: Any) -> Any:
            if isinstance(leaf, torch.Tensor):
                return _Handle(leaf, sources.get(_ptr(leaf)))
            return leaf

        args, kwargs = tree_map(ref, (call.args, call.kwargs))
        return functools.partial(_rerun, call.module, args, kwargs), call.autocast

    return _Recipe(
        label=type(call.module).__name__,
        inputs=[t for t in tree_leaves((call.args, call.kwargs)) if isinstance(t, torch.Tensor)],
        shaped=call.output,
        state=call.state,
        made=made,
    )


def _rerun(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The module's output again, from its arguments (``_Handle`` leaves resolved now)."""

    def resolve(leaf: Any) -> Any:
        return leaf.unpack() if isinstance(leaf, _Handle) else leaf

    resolved_args, resolved_kwargs = tree_map(resolve, (args, kwargs))
    # .forward, not __call__: the user's hooks saw this call once already
    out = module.forward(*resolved_args, **resolved_kwargs)
    assert isinstance(out, torch.Tensor)
    return out
