"""Executing a plan's schedule tree on the model, in place, and undoing it.

Mechanism: the *instance* ``forward`` of blocks is overridden (nothing is wrapped or renamed, so
the module tree and ``state_dict()`` keys stay as they are, and the model's own loop over its
blocks is untouched; ``remove_plan`` deletes the overrides). A top-level ``Segment(s, t, inner)``
makes block ``s`` (the segment's *head*) run blocks ``s..t-1`` inside one
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, following ``inner``: nested segments
are nested checkpoints, i.e. multi-level recompute. Blocks ``s+1..t-1`` then pass their input
through, after checking that running them inside the head was right (see ``guards``).

Known limit: forward hooks on blocks ``s+1..t-1`` of a multi-block segment see the pass-through
(input = output = the segment's output), and the head's hooks see the whole segment.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.errors import AlreadyPlannedError, PlanMismatchError
from memfit.measuring.chain import (
    MAIN_KEYWORD,
    Chain,
    is_block_stage_name,
    main_tensor,
    split_main,
)
from memfit.planning.plan import Item, Plan, Segment, Stage
from memfit.runtime.guards import Inputs, guard_input, rng_state, same_rng_state, same_side_inputs
from memfit.runtime.options import KEEP, Forward, option_kind, stage_wrapper

_STATE = "_memfit_applied"
_MISSING = object()
_BEFORE_APPLY: list[Callable[[nn.Module], object]] = []


def register_before_apply(hook: Callable[[nn.Module], object]) -> None:
    """Run ``hook(model)`` in every :func:`apply_plan`, after the plan is checked and before the
    model changes: integrations turn off a model family's own checkpointing this way (the
    runtime cannot import them). Registering the same hook twice has no effect."""
    if hook not in _BEFORE_APPLY:
        _BEFORE_APPLY.append(hook)


@dataclass
class _Applied:
    plan: Plan
    previous: list[tuple[nn.Module, Any]] = field(default_factory=list)  # block, old forward


@dataclass
class _SegmentCall:
    """What a segment's head leaves for its pass-throughs during one forward."""

    side_inputs: Inputs
    output: weakref.ref[torch.Tensor]  # weak: never keep an activation alive past its use
    tail: tuple[Any, ...] | list[Any] | None  # the head output's items after the hidden state
    rng: tuple[torch.Tensor, ...]


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan applied to ``model``, or ``None``."""
    state = model.__dict__.get(_STATE)
    return state.plan if state is not None else None


def _split(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    main, rest, side = split_main(args, kwargs)
    if main is None:
        raise PlanMismatchError(
            f"a planned block was called without its main input: expected the hidden state as "
            f"the first positional argument or as {MAIN_KEYWORD}=...; got only the keywords "
            f"{sorted(kwargs)}. Call the blocks that way, or memfit.remove(model)"
        )
    return main, rest, side


class _Executor:
    """Runs schedule items over the blocks of one chain."""

    def __init__(self, chain: Chain, forwards: dict[tuple[int, str], Forward]) -> None:
        self.chain = chain
        self.forwards = forwards  # (stage, option) -> the block's forward wrapped for the option
        self.calls: dict[int, _SegmentCall] = {}  # segment start -> its current forward

    def name(self, index: int) -> str:
        return self.chain.stage_names[index]

    def run_stage(self, stage: Stage, x: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not torch.is_grad_enabled():  # no backward: nothing to save or recompute
            return self.forwards[(stage.index, KEEP)](x, *rest, **kwargs)
        out = self.forwards[(stage.index, stage.option)](x, *rest, **kwargs)
        if option_kind(stage.option).recomputes:
            guard_input(out, x, self.name(stage.index))
        return out

    def run_items(
        self, items: Sequence[Item], x: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        out: Any = x
        for item in items:
            if isinstance(item, Stage):
                out = self.run_stage(item, x, rest, kwargs)
            else:
                out = self.run_segment(item, x, rest, kwargs)
            x = main_tensor(out)
        return out

    def run_segment(
        self, segment: Segment, x: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not torch.is_grad_enabled():
            return self.run_items(segment.inner, x, rest, kwargs)

        def body(x_: Any, *rest_: Any, **kwargs_: Any) -> Any:
            return self.run_items(segment.inner, x_, rest_, kwargs_)

        out = checkpoint(body, x, *rest, use_reentrant=False, **kwargs)
        return guard_input(out, x, self.name(segment.start))

    def head(self, segment: Segment) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            x, rest, side = _split(args, kwargs)
            out = self.run_segment(segment, x, rest, side)
            if segment.stop == segment.start + 1:  # no pass-throughs to prepare
                return out
            main = main_tensor(out)
            if isinstance(out, torch.Tensor):
                tail = None
            elif isinstance(out, tuple | list) and out and out[0] is main:
                tail = out[1:]
            else:
                raise PlanMismatchError(
                    f"stage {self.name(segment.start)!r} returns {type(out).__name__}; blocks "
                    f"joined in one recompute segment must return a tensor or a tuple whose "
                    f"first item is the hidden state: recompute them one by one"
                )
            assert main is not None  # out is a tensor, or a sequence whose first item is main
            if tail is not None and any(isinstance(item, torch.Tensor) for item in tail):
                raise PlanMismatchError(
                    f"stage {self.name(segment.start)!r} returns tensors besides the hidden "
                    f"state (attention weights, caches); the blocks after it in its recompute "
                    f"segment cannot return their own: recompute these blocks one by one (or "
                    f"turn off output_attentions / use_cache while training)"
                )
            self.calls[segment.start] = _SegmentCall(
                (rest, side), weakref.ref(main), tail, rng_state(main.device)
            )
            return out

        return forward

    def pass_through(self, segment: Segment, index: int) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            x, rest, side = _split(args, kwargs)
            call = self.calls.get(segment.start)
            main = main_tensor(x)
            joined = f"{self.name(segment.start)!r}, which runs it inside one recompute segment"
            if call is None or main is None or call.output() is not main:
                raise PlanMismatchError(
                    f"stage {self.name(index)!r} did not get the output of the block before "
                    f"it from {joined}: the model skips blocks or changes the hidden state "
                    f"between them; recompute these blocks one by one"
                )
            if not same_side_inputs(call.side_inputs, (rest, side)):
                raise PlanMismatchError(
                    f"stage {self.name(index)!r} got other side inputs (masks, positions...) "
                    f"than {joined}; this model cannot join these blocks in a segment (e.g. "
                    f"sliding and full attention layers alternate): recompute them one by one"
                )
            if not same_rng_state(call.rng, rng_state(main.device)):
                raise PlanMismatchError(
                    f"the model drew random numbers before stage {self.name(index)!r} (between "
                    f"blocks, e.g. LayerDrop), so running it earlier inside {joined} changes "
                    f"the random stream: turn that off or recompute these blocks one by one"
                )
            if index == segment.stop - 1:
                del self.calls[segment.start]
            if call.tail is None:
                return x
            return (x, *call.tail) if isinstance(call.tail, tuple) else [x, *call.tail]

        return forward


def _check(plan: Plan, chain: Chain) -> None:
    if tuple(plan.stage_names) != tuple(chain.stage_names):
        expected, received = list(chain.stage_names), list(plan.stage_names)
        raise PlanMismatchError(
            f"the plan's stages {received[:4]}... ({len(received)}) are not this model's chain "
            f"{expected[:4]}... ({len(expected)}); make the plan for this model"
        )
    for item in plan.tree:
        if (
            isinstance(item, Stage)
            and chain.block_of_stage(item.index) is None
            and item.option != KEEP
        ):
            raise PlanMismatchError(
                f"stage {chain.stage_names[item.index]!r} can only be kept; the plan asks "
                f"{item.option!r}"
            )
        if isinstance(item, Segment):
            outside = [
                chain.stage_names[i]
                for i in range(item.start, item.stop)
                if chain.block_of_stage(i) is None
            ]
            if outside:
                raise PlanMismatchError(
                    f"the plan recomputes {chain.stage_names[item.start]!r}..."
                    f"{chain.stage_names[item.stop - 1]!r}, but {outside[0]!r} is not a block: "
                    f"<pre>, <post> and the stages between block lists cannot be recomputed"
                )
        if isinstance(item, Segment):
            for stage in _stages(item.inner):
                if stage.option != KEEP:
                    # torch needs the same saved tensors in a segment's forward and recompute,
                    # so the option would run in the no-save forward too, and its stash (a dict
                    # the checkpoint never sees) would live until backward: no memory saved.
                    raise PlanMismatchError(
                        f"stage {chain.stage_names[stage.index]!r} runs {stage.option!r} inside "
                        f"a recompute segment; only keep or nested segments can run there"
                    )


def _stages(items: Sequence[Item]) -> list[Stage]:
    out: list[Stage] = []
    for item in items:
        out.extend([item] if isinstance(item, Stage) else _stages(item.inner))
    return out


def apply_plan(model: nn.Module, chain: Chain, plan: Plan) -> None:
    """Run ``model``'s blocks as ``plan`` says, from now on (in place).

    The model keeps its module tree, ``state_dict()`` and forward loop; gradients stay bitwise
    equal to the unplanned model's (non-reentrant checkpoints that preserve RNG and autocast
    state). Turns off a model family's own checkpointing first (Hugging Face: with a warning).

    Args:
        model: the model.
        chain: the model's chain (``plan.stage_names`` must equal ``chain.stage_names``).
        plan: the plan.

    Raises:
        AlreadyPlannedError: the model carries a plan already (never double wrapping).
        PlanMismatchError: the plan does not fit this chain, or asks to recompute ``<pre>`` or
            ``<post>``.
        ValueError: the plan names an unknown stage option. Nothing changes on any error.

    Example:
        >>> apply_plan(model, chain, plan); model(*sample).backward(); remove_plan(model)
    """
    if model.__dict__.get(_STATE) is not None:
        raise AlreadyPlannedError(
            "the model already carries a memfit plan; call memfit.remove(model) first"
        )
    _check(plan, chain)
    originals = {
        index: block.forward
        for index in chain.block_stages
        if (block := chain.block_of_stage(index)) is not None
    }
    forwards: dict[tuple[int, str], Forward] = {(i, KEEP): f for i, f in originals.items()}
    for stage in _stages(plan.tree):  # unknown options fail here, before anything changes
        if stage.index in originals and (stage.index, stage.option) not in forwards:
            wrap = stage_wrapper(stage.option)
            forwards[(stage.index, stage.option)] = wrap(originals[stage.index])
    executor = _Executor(chain, forwards)
    overrides: dict[int, Forward] = {}
    for item in plan.tree:
        if isinstance(item, Stage):
            if item.option != KEEP:
                overrides[item.index] = _top_stage(executor, item)
        else:
            overrides[item.start] = executor.head(item)
            for index in range(item.start + 1, item.stop):
                overrides[index] = executor.pass_through(item, index)
    for hook in _BEFORE_APPLY:
        hook(model)
    state = _Applied(plan=plan)
    for index, forward in overrides.items():
        block = chain.block_of_stage(index)
        assert block is not None  # _check: only blocks are overridden
        state.previous.append((block, block.__dict__.get("forward", _MISSING)))
        block.forward = forward
    model.__dict__[_STATE] = state


def _top_stage(executor: _Executor, stage: Stage) -> Forward:
    def forward(*args: Any, **kwargs: Any) -> Any:
        x, rest, side = _split(args, kwargs)
        return executor.run_stage(stage, x, rest, side)

    return forward


def remove_plan(model: nn.Module) -> bool:
    """Undo :func:`apply_plan`, restoring any instance ``forward`` that blocks had before.

    Returns:
        Whether there was a plan to remove.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return False
    for block, previous in state.previous:
        del block.forward
        if previous is not _MISSING:
            block.forward = previous
    return True


def chain_of_plan(model: nn.Module, plan: Plan) -> Chain:
    """The chain a plan names, looked up in ``model`` (PlanMismatchError if it lacks a block)."""
    modules = dict(model.named_modules())
    names: list[str] = []
    starts = [0]
    for name in plan.stage_names[1:-1]:
        if is_block_stage_name(name):
            names.append(name)
        elif names:  # a stage between two block lists: a new group starts after it
            starts.append(len(names))
    missing = [name for name in names if name not in modules]
    if missing:
        raise PlanMismatchError(
            f"the plan names blocks {missing[:3]} that {type(model).__name__} does not have; "
            f"it was made for another model (plan stages: {list(plan.stage_names[:4])}...)"
        )
    containers = dict.fromkeys(name.rpartition(".")[0] for name in names)
    return Chain(
        ",".join(containers),
        tuple(names),
        tuple(modules[name] for name in names),
        tuple(starts) if names else (0,),
    )


@contextmanager
def planned(model: nn.Module, chain: Chain | None, plan: Plan | None) -> Iterator[None]:
    """``model`` runs ``plan`` inside the ``with`` statement (as it is when ``None``)."""
    if plan is None:
        yield
        return
    assert chain is not None
    apply_plan(model, chain, plan)
    try:
        yield
    finally:
        remove_plan(model)
