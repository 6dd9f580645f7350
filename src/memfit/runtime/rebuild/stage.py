"""The ``rebuild`` options as stage wrappers, registered with the option registry."""

from __future__ import annotations

import functools
from typing import Any

import torch

from memfit.runtime.options import Forward, OptionKind, StageWrapper, register_option
from memfit.runtime.rebuild.block import rebuilding

REBUILD = "rebuild"
REBUILD_LINEAR = "rebuild+linear"
REBUILD_OPS = "rebuild+ops"


class Rebuilt:
    """A block's forward under ``rebuild`` (``linear``: ``rebuild+linear``); a plain object, so
    planned models pickle."""

    def __init__(self, forward: Forward, linear: bool, ops: bool = False) -> None:
        self.forward = forward
        self.linear = linear
        self.ops = ops

    # Saved-tensor hooks cannot live in a compiled region (torch.compile disables them while it
    # traces, and tracing these hooks recompiled until Dynamo's limit): a model compiled around
    # a plan runs a rebuilt stage eagerly, one graph break at its boundary.
    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        with rebuilding(self.linear, (args, kwargs), getattr(self, "ops", False)) as state:
            out = self.forward(*args, **kwargs)
            state.outputs = out
        return out


def _rebuild(option: str) -> StageWrapper:
    if option not in (REBUILD, REBUILD_LINEAR, REBUILD_OPS):
        raise ValueError(
            f"unknown option {option!r}; expected {REBUILD!r}, {REBUILD_LINEAR!r} or "
            f"{REBUILD_OPS!r}"
        )
    return functools.partial(Rebuilt, linear=option == REBUILD_LINEAR, ops=option == REBUILD_OPS)


for _name in (REBUILD, REBUILD_OPS, REBUILD_LINEAR):
    register_option(
        OptionKind(prefix=_name, form=_name, recomputes=False, wrapper=_rebuild, hooks_inside=True)
    )
