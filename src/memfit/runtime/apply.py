"""Executing a plan's schedule tree on the model, in place, and undoing it.

Mechanism: the *instance* ``forward`` of blocks is overridden (nothing is wrapped or renamed, so
the module tree and ``state_dict()`` keys stay as they are; ``remove_plan`` deletes the
overrides). A top-level ``Segment(s, t, inner)`` makes block ``s`` run blocks ``s..t-1`` inside one
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, following ``inner`` (nested segments
are nested checkpoints: multi-level recompute). Blocks ``s+1..t-1`` then pass their input through,
after checking that they got the same side inputs (masks, rotary tables) as block ``s``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.errors import AlreadyPlannedError, MemfitError, PlanMismatchError
from memfit.measure.chain import Chain, main_tensor
from memfit.plan.plan import Item, Plan, Segment, Stage
from memfit.runtime.options import KEEP, run_with_option, saved_ops

_STATE = "_memfit_applied"
_MISSING = object()


@dataclass
class _Applied:
    plan: Plan
    chain: Chain
    previous: dict[int, Any] = field(default_factory=dict)  # id(block) -> its old instance forward
    blocks: list[nn.Module] = field(default_factory=list)


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan applied to ``model``, or ``None``."""
    state = model.__dict__.get(_STATE)
    return state.plan if state is not None else None


def _split(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if args:
        return args[0], args[1:], kwargs
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest
    raise PlanMismatchError("a planned block was called without its main input")


def _same_inputs(
    a: tuple[tuple[Any, ...], dict[str, Any]], b: tuple[tuple[Any, ...], dict[str, Any]]
) -> bool:
    (args_a, kwargs_a), (args_b, kwargs_b) = a, b
    if len(args_a) != len(args_b) or kwargs_a.keys() != kwargs_b.keys():
        return False
    pairs = [*zip(args_a, args_b, strict=True), *((kwargs_a[k], kwargs_b[k]) for k in kwargs_a)]
    for x, y in pairs:
        if x is y:
            continue
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return False
        try:
            if bool(x != y):
                return False
        except Exception:
            return False
    return True


def _guard_output(out: Any, watched: Any, name: str) -> Any:
    """Check, when the gradient of a segment's output arrives (just before the segment is
    recomputed), that nobody changed the segment's input in place since its forward."""
    main = main_tensor(out)
    if not (isinstance(watched, torch.Tensor) and main is not None and main.requires_grad):
        return out
    version, watched_ref = watched._version, weakref.ref(watched)  # never keep it alive

    def check(grad: torch.Tensor) -> None:
        alive = watched_ref()
        if alive is not None and alive._version != version:
            raise MemfitError(
                f"the input of stage {name!r} was modified in place after its forward; "
                f"recomputing the stage from it would give wrong gradients. Avoid the in-place "
                f"op on the block's input (write x = x * 2, not x.mul_(2)) or keep this stage"
            )

    main.register_hook(check)
    return out


class _Executor:
    """Runs schedule items over the blocks of one chain."""

    def __init__(self, chain: Chain, originals: dict[int, Callable[..., Any]]) -> None:
        self.chain = chain
        self.originals = originals  # stage index -> the block's own forward
        self.side_inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        # the tail of a head's tuple output (never the hidden state: holding it would keep
        # a whole activation alive for the step)
        self.tails: dict[int, tuple[Any, ...] | None] = {}

    def name(self, index: int) -> str:
        return self.chain.stage_names[index]

    def run_items(
        self, items: Sequence[Item], x: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        out: Any = x
        for item in items:
            if isinstance(item, Stage):
                forward = run_with_option(item.option, self.originals[item.index])
                out = forward(x, *rest, **kwargs)
            else:
                out = self.run_segment(item, x, rest, kwargs)
            x = main_tensor(out)
        return out

    def run_segment(
        self, segment: Segment, x: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        def body(x_: Any, *rest_: Any, **kwargs_: Any) -> Any:
            return self.run_items(segment.inner, x_, rest_, kwargs_)

        out = checkpoint(body, x, *rest, use_reentrant=False, **kwargs)
        return _guard_output(out, x, self.name(segment.start))

    def head(self, segment: Segment) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            x, rest, side = _split(args, kwargs)
            self.side_inputs[segment.start] = (rest, side)
            out = self.run_segment(segment, x, rest, side)
            self.tails[segment.start] = tuple(out[1:]) if isinstance(out, tuple) else None
            return out

        return forward

    def pass_through(self, segment: Segment, index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            x, rest, side = _split(args, kwargs)
            expected = self.side_inputs.get(segment.start)
            if expected is None or not _same_inputs(expected, (rest, side)):
                raise PlanMismatchError(
                    f"stage {self.name(index)!r} got other side inputs (masks, positions...) "
                    f"than {self.name(segment.start)!r}, which runs it inside one recompute "
                    f"segment; this model cannot join these blocks in a segment: plan again "
                    f"(the profile marks where side inputs change) or use per-block recompute"
                )
            tail = self.tails[segment.start]
            return x if tail is None else (x, *tail)

        return forward


def _check(plan: Plan, chain: Chain) -> None:
    if tuple(plan.stage_names) != tuple(chain.stage_names):
        raise PlanMismatchError(
            f"the plan's stages {list(plan.stage_names)[:4]}... are not this model's chain "
            f"{list(chain.stage_names)[:4]}...; make the plan for this model"
        )
    last = len(chain) - 1
    for item in plan.tree:
        if isinstance(item, Stage):
            if item.index in (0, last) and item.option != KEEP:
                raise PlanMismatchError(
                    f"stage {chain.stage_names[item.index]!r} can only be kept; the plan asks "
                    f"{item.option!r}"
                )
            saved_ops(item.option)  # unknown options fail here, before anything changes
        elif item.start == 0 or item.stop > last:
            raise PlanMismatchError(
                f"the plan recomputes {chain.stage_names[item.start]!r}..."
                f"{chain.stage_names[item.stop - 1]!r}, but <pre> and <post> cannot be recomputed"
            )


def apply_plan(model: nn.Module, chain: Chain, plan: Plan) -> None:
    """Run ``model``'s blocks as ``plan`` says, from now on.

    Args:
        model: the model; it keeps its module tree and ``state_dict()``.
        chain: the model's chain (``plan.stage_names`` must equal ``chain.stage_names``).
        plan: the plan.

    Raises:
        AlreadyPlannedError: the model carries a plan already (never double wrapping).
        PlanMismatchError: the plan does not fit this chain.
    """
    if model.__dict__.get(_STATE) is not None:
        raise AlreadyPlannedError("the model already carries a memfit plan; remove it first")
    _check(plan, chain)
    originals = {i + 1: block.forward for i, block in enumerate(chain.blocks)}
    executor = _Executor(chain, originals)
    overrides: dict[int, Callable[..., Any]] = {}
    for item in plan.tree:
        if isinstance(item, Stage):
            if item.option != KEEP:
                overrides[item.index] = run_with_option(item.option, originals[item.index])
        else:
            overrides[item.start] = executor.head(item)
            for index in range(item.start + 1, item.stop):
                overrides[index] = executor.pass_through(item, index)
    state = _Applied(plan=plan, chain=chain)
    for index, forward in overrides.items():
        block = chain.blocks[index - 1]
        state.previous[id(block)] = block.__dict__.get("forward", _MISSING)
        state.blocks.append(block)
        block.forward = forward
    model.__dict__[_STATE] = state


def remove_plan(model: nn.Module) -> bool:
    """Undo :func:`apply_plan`; returns whether there was a plan to remove."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return False
    for block in state.blocks:
        previous = state.previous[id(block)]
        del block.forward
        if previous is not _MISSING:
            block.forward = previous
    return True
