"""Applying a plan's schedule tree to the model, in place, and undoing it.

Mechanism: the *instance* ``forward`` of blocks is overridden (nothing is wrapped or renamed, so
the module tree and ``state_dict()`` keys stay as they are, and the model's own loop over its
blocks is untouched; ``remove_plan`` deletes the overrides). The overrides and how they run the
schedule are in :mod:`memfit.runtime.executor`; they are plain objects, so copies of a planned
model (``copy.deepcopy``, ``pickle``, ``torch.save``) carry the plan and run their own weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from memfit.errors import AlreadyPlannedError, PlanMismatchError
from memfit.measuring.chain import Chain, is_block_stage_name
from memfit.planning.plan import Item, Plan, Segment, Stage
from memfit.runtime.executor import Executor, ForwardEnd, Member, SegmentStart, TopStage
from memfit.runtime.head import HeadInstall, check_head_install, head_option, is_head_option
from memfit.runtime.hf_switches import off_for_the_plan, refuse_layerdrop
from memfit.runtime.options import KEEP, OFFLOAD, Forward, stage_wrapper
from memfit.runtime.replay import BlockForward

_STATE = "_memfit_applied"
SHAPE_PLANS = "_memfit_shape_plans"  # shape plans (runtime/dynamic.py) installed on a model
_UNDO = "_memfit_undo_before_apply"
# LayerDrop refused before anything changes; then Hugging Face's own checkpointing off
_BEFORE_APPLY: list[Callable[[nn.Module], object]] = [refuse_layerdrop, off_for_the_plan]


def register_before_apply(hook: Callable[[nn.Module], object]) -> None:
    """Run ``hook(model)`` in every :func:`apply_plan`, after the plan is checked and before the
    model changes, as the runtime does for Hugging Face's own checkpointing and LayerDrop
    (:mod:`memfit.runtime.hf_switches`): for another library's switches. A hook that changed the model returns a function that undoes
    it: :func:`undo_before_apply` (``memfit.remove``) calls it, and plans taken off and put
    back meanwhile (verify, shape plans switching) leave it waiting. Registering the same hook
    twice has no effect."""
    if hook not in _BEFORE_APPLY:
        _BEFORE_APPLY.append(hook)


def undo_before_apply(model: nn.Module) -> None:
    """Undo what the before-apply hooks changed on ``model`` (Hugging Face's checkpointing
    switched back on), newest first; nothing when they changed nothing."""
    for undo in reversed(model.__dict__.pop(_UNDO, [])):
        undo()


@dataclass
class _Applied:
    plan: Plan
    # block, the instance forward it had before (None: none)
    previous: list[tuple[nn.Module, Any]] = field(default_factory=list)
    head: HeadInstall | None = None  # the <post> option's hooks (memfit.runtime.head)


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan applied to ``model``, or ``None``."""
    state = model.__dict__.get(_STATE)
    return state.plan if state is not None else None


def planned_module(model: nn.Module) -> nn.Module | None:
    """The module of ``model`` that carries a plan: ``model`` itself, or the model inside a
    wrapper made after planning (``DistributedDataParallel(model).module``); ``None``."""
    for module in model.modules():
        if module.__dict__.get(_STATE) is not None:
            return module
    return None


def refuse_planned(model: nn.Module, before: str, *, shape_plans: bool = True) -> None:
    """The one rule of every verb that needs an unplanned model: no plan and no shape plans on
    ``model`` or on a module inside it (the model inside a wrapper made after planning).
    ``shape_plans=False``: shape plans may stay (their switch between plans applies each one).

    Raises:
        AlreadyPlannedError: naming ``memfit.remove`` and what it must come ``before``.
    """
    for module in model.modules():
        keys = (_STATE, SHAPE_PLANS) if shape_plans else (_STATE,)
        if any(module.__dict__.get(key) is not None for key in keys):
            inside = "" if module is model else " (inside this wrapper)"
            raise AlreadyPlannedError(
                f"the model{inside} already carries a memfit plan; call memfit.remove(model) "
                f"before {before}"
            )


def _check(plan: Plan, chain: Chain) -> None:
    if tuple(plan.stage_names) != tuple(chain.stage_names):
        expected, received = list(chain.stage_names), list(plan.stage_names)
        raise PlanMismatchError(
            f"the plan's stages {received[:4]}... ({len(received)}) are not this model's chain "
            f"{expected[:4]}... ({len(expected)}); make the plan for this model"
        )
    last = len(chain.stage_names) - 1
    for item in plan.tree:
        if isinstance(item, Stage) and is_head_option(item.option):
            if item.index != last or not chain.blocks:
                raise PlanMismatchError(
                    f"stage {chain.stage_names[item.index]!r} asks {item.option!r}, an option "
                    f"of the last stage ({chain.stage_names[last]!r}: head and loss) only"
                )
            head_option(item.option)  # ValueError for an unknown one
            continue
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
            nested = [
                inner for inner in _segments(item.inner) if inner.offload or inner.offload_skips
            ]
            if nested:
                raise PlanMismatchError(
                    f"the plan offloads the input or skips of segment [{nested[0].start}, "
                    f"{nested[0].stop}) inside another segment, whose checkpoint's hooks hide "
                    f"it; offload top-level segments only"
                )
            for stage in _stages(item.inner):
                if stage.option != KEEP:
                    # torch needs the same saved tensors in a segment's forward and recompute,
                    # so the option would run in the no-save forward too, and its stash (a dict
                    # the checkpoint never sees) would live until backward: no memory saved.
                    raise PlanMismatchError(
                        f"stage {chain.stage_names[stage.index]!r} runs {stage.option!r} inside "
                        f"a recompute segment; only keep or nested segments can run there"
                    )


def _segments(items: Sequence[Item]) -> list[Segment]:
    out: list[Segment] = []
    for item in items:
        if isinstance(item, Segment):
            out += [item, *_segments(item.inner)]
    return out


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
            ``<post>``, or a ``head:`` option of a stage other than ``<post>``.
        ValueError: the plan names an unknown stage option, or ``head:chunked`` on a model
            whose head and loss it does not know. Nothing changes on any error.

    Example:
        >>> apply_plan(model, chain, plan); model(*sample).backward(); remove_plan(model)
    """
    refuse_planned(model, "applying another", shape_plans=False)
    _check(plan, chain)
    names = chain.stage_names
    originals = {
        index: BlockForward(block, names[index], block.__dict__.get("forward"))
        for index in chain.block_stages
        if (block := chain.block_of_stage(index)) is not None
    }
    forwards: dict[tuple[int, str], Forward] = {(i, KEEP): f for i, f in originals.items()}
    for stage in _stages(plan.tree):  # unknown options fail here, before anything changes
        if stage.index in originals and (stage.index, stage.option) not in forwards:
            wrap = stage_wrapper(stage.option)
            forwards[(stage.index, stage.option)] = wrap(originals[stage.index])
    blocks = {index: chain.block_of_stage(index) for index in chain.block_stages}
    modules = {
        index: tuple(
            (f"{names[index]}.{sub}" if sub else names[index], module)
            for sub, module in block.named_modules()
        )
        for index, block in blocks.items()
        if block is not None
    }
    places = {}
    for index, block in blocks.items():
        parent_name, _, key = names[index].rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:  # a chain named from another root: nothing to check against
            continue
        if block is not None and parent._modules.get(key) is block:
            places[index] = (parent, key)
    executor = Executor(chain, forwards, modules, places)
    executor.offloading = any(
        (isinstance(item, Segment) and (item.offload or bool(item.offload_skips)))
        or (isinstance(item, Stage) and item.option == OFFLOAD)
        for item in plan.tree
    )
    executor.skip_readers = {
        maker: reader
        for item in plan.tree
        if isinstance(item, Segment)
        for maker, reader in item.offload_skips
    }
    overrides: dict[int, Forward] = {}
    for item in plan.tree:
        if isinstance(item, Stage):
            # kept blocks too: a planned model runs every block on a private copy of its KV
            # cache in training, so that a block costs the same kept or inside a segment, and
            # the profile's figures hold
            if chain.block_of_stage(item.index) is not None:
                overrides[item.index] = TopStage(executor, item)
        else:
            overrides[item.start] = SegmentStart(executor, item)
            for index in range(item.start + 1, item.stop):
                overrides[index] = Member(executor, item, index)
    head_options = [
        item.option for item in plan.tree if isinstance(item, Stage) and is_head_option(item.option)
    ]
    for option in head_options:  # ValueError (a head it cannot run on) before any change
        check_head_install(model, option)
    for hook in _BEFORE_APPLY:
        undo = hook(model)
        if callable(undo):
            model.__dict__.setdefault(_UNDO, []).append(undo)
    state = _Applied(plan=plan)
    if head_options:
        state.head = HeadInstall(model, chain.blocks[-1], head_options[0])
    for index, forward in overrides.items():
        block = chain.block_of_stage(index)
        assert block is not None  # _check: only blocks are overridden
        state.previous.append((block, block.__dict__.get("forward")))
        block.forward = forward
    if any(isinstance(item, Segment) and item.stop > item.start + 1 for item in plan.tree):
        model.register_forward_hook(ForwardEnd(executor), always_call=True)
    model.__dict__[_STATE] = state


def remove_plan(model: nn.Module) -> bool:
    """Undo :func:`apply_plan`, restoring any instance ``forward`` that blocks had before.

    Returns:
        Whether there was a plan to remove.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return False
    for key, hook in list(model._forward_hooks.items()):
        if isinstance(hook, ForwardEnd):
            del model._forward_hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    for block, previous in state.previous:
        del block.forward
        if previous is not None:
            block.forward = previous
    if state.head is not None:
        state.head.remove()
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
