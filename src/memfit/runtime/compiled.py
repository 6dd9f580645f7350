"""Compiled blocks beneath memfit's runtime: each block's own forward through ``torch.compile``,
memfit's checkpoints around it.

torchtitan's order (checkpoint each block, then compile each block) puts the checkpoint inside
the compiled region, where compile's partitioner decides what the recompute saves, and where
every block's checkpoint wrapper is traced again (memfit's wrappers differ per block: a graph
per block). Here the order is the other way round: the block's class ``forward`` is compiled
(one compiled function per block class and options, shared by every block of that class:
``inline_inbuilt_nn_modules`` passes each block's parameters as inputs, so one graph serves
them all), and memfit's non-reentrant checkpoint wraps the compiled call from outside. So

* a recompute reruns the same compiled code on the same inputs: gradients bit for bit those of
  the compiled model without memfit (dropout too: the checkpoint restores the RNG state the
  compiled forward draws its seeds from);
* what a block saves is what its compiled forward saves, and memfit's profile measures exactly
  that (the stage marks are forward pre-hooks and gradient hooks outside the compiled code);
* options made of saved-tensor hooks or dispatch modes (``rebuild``, ``selective:*``) cannot
  see inside a compiled function: plans for compiled blocks leave them out (see
  :func:`memfit.profile`'s ``compile``). In their place, ``compile-budget:<fraction>`` compiles
  the block once more with compile's own ``activation_memory_budget``, so that its partitioner
  recomputes cheap ops inside the block: the op-level choice, made by compile, measured and
  mixed per block by memfit's planner (gradients then within compile's tolerance, not bit for
  bit: the partitioner's recomputed ops run in other kernels).

Mechanism: :func:`compile_blocks` gives each block an instance ``forward``, a
:class:`CompiledForward` (a plain object: ``copy.deepcopy`` and ``pickle`` rebind it), which a
plan applied afterwards calls as the block's own forward; :func:`uncompile_blocks` removes it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._dynamo.comptime import comptime

from memfit.errors import PlanMismatchError
from memfit.runtime.options import OptionKind, register_option

__all__ = [
    "COMPILE_BUDGET",
    "COMPILE_BUDGETS",
    "COMPILE_KEYS",
    "TRACED_PLAN_WARNING",
    "CompileBudget",
    "CompiledForward",
    "arm_traced_plan_warning",
    "blocks_compiled",
    "compile_blocks",
    "compile_budget",
    "compile_options",
    "compiled_blocks",
    "eager_around_compiled_blocks",
    "is_compile_budget",
    "plan_compile_options",
    "refuse_compiled_model",
    "runs_compiled_blocks",
    "uncompile_blocks",
]

# torch.compile's arguments a plan may record (JSON: strings, booleans, a dict of options)
COMPILE_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")
# what a plan file may name by itself: a choice among torch's own compilers, never a compiler's
# options (a C++ compiler to run, folders to write traces into); those come from compile=
PLAN_BACKENDS = ("inductor", "eager", "aot_eager", "aot_eager_decomp_partition")
_COMPILED: dict[tuple[Any, str], Any] = {}  # (class forward, options as JSON) -> compiled


def compile_options(compile: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments from the user's ``compile=`` (``None``: no compile).

    Raises:
        TypeError: neither a bool nor a dict.
        ValueError: a key ``torch.compile`` takes that a plan cannot record.
    """
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, Mapping):
        raise TypeError(
            f"compile must be True, False or a dict of torch.compile arguments such as "
            f'{{"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}}; got '
            f"{type(compile).__name__}"
        )
    unknown = sorted(set(compile) - set(COMPILE_KEYS))
    if unknown:
        raise ValueError(
            f"compile={dict(compile)!r}: keys {unknown} are not recorded in plans; expected "
            f"some of {list(COMPILE_KEYS)}"
        )
    return dict(compile)


def plan_compile_options(
    plan: Any, compile: bool | Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The ``torch.compile`` arguments to run ``plan``'s blocks with (``None``: not compiled).

    A plan is data that may come from a file: its ``compile`` settings are taken only when every
    setting is on the allow-list (``backend`` one of :data:`PLAN_BACKENDS`, ``mode`` one of
    torch's modes for inductor, ``fullgraph`` a bool, ``dynamic`` a bool or null; nothing
    else, no ``options``). The caller's own ``compile=`` (True or a dict of ``torch.compile``
    arguments, ``options`` included) is taken instead, unchecked by the list: the caller's
    choice, not the file's. Every place that compiles blocks for a plan asks here.

    Raises:
        PlanMismatchError: a setting off the list (named, with the fix: pass ``compile=``), or
            ``compile=`` given for a plan made without compiled blocks (or ``compile=False``
            for one made with them).
        TypeError, ValueError: a malformed ``compile=`` (see :func:`compile_options`).
    """
    recorded = plan.compile
    if compile is None:
        return None if recorded is None else _plan_settings(recorded)
    chosen = compile_options(compile)
    if recorded is None and chosen is not None:
        raise PlanMismatchError(
            f"compile={compile!r}, but the plan was made with uncompiled blocks: its memory "
            f"predictions are for eager blocks. Plan again with compile= (or apply without it)"
        )
    if recorded is not None and chosen is None:
        raise PlanMismatchError(
            f"compile={compile!r}, but the plan was made with compiled blocks "
            f"(plan.compile); pass compile=True or a dict of torch.compile arguments"
        )
    return chosen


def _plan_settings(recorded: Any) -> dict[str, Any]:
    """``plan.compile`` checked against the allow-list (see
    :func:`plan_compile_options`)."""
    fix = (
        "a plan file may only choose among torch's own compilers; if you trust these settings, "
        "pass them yourself: memfit.apply(model, plan, compile={...})"
    )
    if not isinstance(recorded, Mapping):
        raise PlanMismatchError(
            f"plan.compile is {recorded!r}; expected an object such as "
            f'{{"backend": "inductor"}}; {fix}'
        )
    allowed = ("backend", "mode", "fullgraph", "dynamic")
    for key in recorded:
        if key not in allowed:
            raise PlanMismatchError(
                f"plan.compile names {key!r}, which a plan may not set (only "
                f"{list(allowed)}); {fix}"
            )
    backend = recorded.get("backend", "inductor")
    if not isinstance(backend, str) or backend not in PLAN_BACKENDS:
        raise PlanMismatchError(
            f"plan.compile names 'backend' {backend!r}; expected one of "
            f"{list(PLAN_BACKENDS)}; {fix}"
        )
    mode = recorded.get("mode")
    if mode is not None:
        modes = ["default"]
        if backend == "inductor":
            import torch._inductor

            modes += [m for m in torch._inductor.list_mode_options() if m not in modes]
        if not isinstance(mode, str) or mode not in modes:
            raise PlanMismatchError(
                f"plan.compile names 'mode' {mode!r}; with backend {backend!r} "
                f"expected null or one of {modes}; {fix}"
            )
    fullgraph = recorded.get("fullgraph", False)
    if not isinstance(fullgraph, bool):
        raise PlanMismatchError(
            f"plan.compile names 'fullgraph' {fullgraph!r}; expected true or false"
        )
    dynamic = recorded.get("dynamic")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise PlanMismatchError(
            f"plan.compile names 'dynamic' {dynamic!r}; expected true, false or null"
        )
    return dict(recorded)


class CompiledForward:
    """A block's class ``forward``, compiled, as the block's instance ``forward``.

    Args:
        block: the block.
        options: ``torch.compile`` keyword arguments (see :data:`COMPILE_KEYS`).
    """

    def __init__(self, block: nn.Module, options: Mapping[str, Any]) -> None:
        self.block = block
        self.options = dict(options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _compiled(type(self.block).forward, self.options)(self.block, *args, **kwargs)


def _compiled(forward: Any, options: dict[str, Any], budget: float | None = None) -> Any:
    key = (forward, repr((sorted(options.items()), budget)))
    compiled = _COMPILED.get(key)
    if compiled is None:
        if budget is None:
            compiled = torch.compile(forward, **options)
        else:
            rest = {k: v for k, v in options.items() if k in ("fullgraph", "dynamic")}
            compiled = torch.compile(forward, backend=WithActivationBudget(options, budget), **rest)
        _COMPILED[key] = compiled
    return compiled


class WithActivationBudget:
    """A ``torch.compile`` backend: the user's (``options``: backend, mode, inductor options)
    with ``torch._functorch.config.activation_memory_budget`` set while it compiles, when the
    partitioner reads it. An object per budget, so Dynamo never hands one budget's graph to
    another (its cache entries match their backend)."""

    def __init__(self, options: Mapping[str, Any], budget: float) -> None:
        self.backend = options.get("backend", "inductor")
        self.budget = budget
        self.inductor: dict[str, Any] = {}
        if self.backend == "inductor":
            mode = options.get("mode")
            if mode is not None:
                self.inductor |= torch._inductor.list_mode_options(mode)
            self.inductor |= dict(options.get("options") or {})

    def __call__(self, graph: Any, example_inputs: Any) -> Any:
        import torch._functorch.config
        import torch._inductor.config

        compiler = torch._dynamo.lookup_backend(self.backend)
        # no AOT cache: a graph partitioned under another budget must not come back
        with (
            torch._functorch.config.patch(
                activation_memory_budget=self.budget, enable_autograd_cache=False
            ),
            torch._inductor.config.patch(self.inductor),
        ):
            return compiler(graph, example_inputs)


COMPILE_BUDGET = "compile-budget:"
COMPILE_BUDGETS = ("compile-budget:0.5", "compile-budget:0.1")  # the menu with options="auto"


class CompileBudget:
    """A compiled block's forward compiled again with compile's own
    ``activation_memory_budget`` (the ``compile-budget:<fraction>`` option): inside the block,
    compile's partitioner saves less and recomputes cheap ops in its backward graph, an op-level
    choice memfit cannot make inside compiled code. A plain object, so planned models pickle.

    Raises:
        PlanMismatchError: (when called) the block was not compiled by memfit.
    """

    def __init__(self, forward: Any, budget: float) -> None:
        self.forward = forward
        self.budget = budget

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        compiled = getattr(self.forward, "previous", None)
        if not isinstance(compiled, CompiledForward):
            raise PlanMismatchError(
                f"option {COMPILE_BUDGET}{self.budget:g} runs only on blocks memfit compiled; "
                f"profile and plan with compile=True"
            )
        block = compiled.block
        call = _compiled(type(block).forward, compiled.options, self.budget)
        return call(block, *args, **kwargs)


def compile_budget(option: str) -> float:
    """The fraction of a ``compile-budget:<fraction>`` option.

    Raises:
        ValueError: not such an option, or the fraction is not in [0, 1].
    """
    text = option.removeprefix(COMPILE_BUDGET)
    try:
        budget = float(text)
    except ValueError:
        budget = -1.0
    if not option.startswith(COMPILE_BUDGET) or not 0.0 <= budget <= 1.0:
        raise ValueError(
            f"option {option!r}: expected {COMPILE_BUDGET}<fraction in [0, 1]>, such as "
            f"{COMPILE_BUDGETS[0]!r} (torch.compile's activation_memory_budget for the block)"
        )
    return budget


def is_compile_budget(option: str) -> bool:
    """Whether ``option`` is a ``compile-budget:<fraction>`` option."""
    return option.startswith(COMPILE_BUDGET)


def _compile_budget_wrapper(option: str) -> Any:
    budget = compile_budget(option)
    return functools.partial(CompileBudget, budget=budget)


register_option(
    OptionKind(
        prefix=COMPILE_BUDGET,
        form=f"{COMPILE_BUDGET}<fraction>",
        recomputes=False,
        wrapper=_compile_budget_wrapper,
    )
)


def compile_blocks(blocks: Iterable[nn.Module], options: Mapping[str, Any]) -> None:
    """Compile each block's own forward (in place; :func:`uncompile_blocks` undoes it).

    Call before a plan is applied: the plan's runtime then runs the compiled forward, inside
    its checkpoints.

    Raises:
        ValueError: a block has an instance ``forward`` already (a plan, or another wrapper).
    """
    blocks = list(blocks)
    for block in blocks:
        current = block.__dict__.get("forward")
        if current is not None and not isinstance(current, CompiledForward):
            raise ValueError(
                f"block {type(block).__name__} has an instance forward already "
                f"({type(current).__name__}); compile blocks before applying a plan "
                f"(memfit.remove(model) first)"
            )
    for block in blocks:
        block.forward = CompiledForward(block, options)


def compiled_blocks(blocks: Iterable[nn.Module]) -> dict[str, Any] | None:
    """The compile options of the blocks when all of them are compiled by memfit, else None."""
    forwards = [block.__dict__.get("forward") for block in blocks]
    if forwards and all(isinstance(f, CompiledForward) for f in forwards):
        return dict(forwards[0].options)  # type: ignore[union-attr]
    return None


def uncompile_blocks(blocks: Iterable[nn.Module]) -> None:
    """Remove what :func:`compile_blocks` did (blocks without it are left alone)."""
    for block in blocks:
        if isinstance(block.__dict__.get("forward"), CompiledForward):
            del block.forward


@contextmanager
def blocks_compiled(
    blocks: Iterable[nn.Module], options: Mapping[str, Any] | None, *, keep: bool = False
) -> Iterator[bool]:
    """The blocks compiled with ``options`` inside the ``with`` (yields whether this call
    compiled them): the one way :func:`memfit.apply`, :func:`memfit.profile` and
    :func:`memfit.verbs.timing.fastest` compile a planned model's blocks.

    ``options=None``, or blocks memfit compiled already, are left as they are (and as they
    are afterwards). Blocks compiled here run their own forward again on leaving; with
    ``keep=True`` only when the ``with`` raises: ``apply`` keeps them compiled for the plan's
    lifetime (:func:`memfit.remove` uncompiles them), while ``profile`` and ``fastest`` measure
    the blocks compiled and leave the model as they found it.
    """
    blocks = list(blocks)
    if options is None or compiled_blocks(blocks) is not None:
        yield False
        return
    compile_blocks(blocks, options)
    try:
        yield True
    except BaseException:
        uncompile_blocks(blocks)
        raise
    if not keep:
        uncompile_blocks(blocks)


def runs_compiled_blocks(override: Any) -> bool:
    """Whether a planned block's override (``block.forward`` after a plan) runs blocks that
    :func:`compile_blocks` compiled."""
    # one look at the executor the override belongs to (the same for every block of a model,
    # so a trace of it does not specialise on the block); all of a chain's blocks are compiled
    # by compile_blocks or none
    forwards = override.executor.forwards
    first = next(iter(forwards.values()), None)
    return isinstance(getattr(first, "previous", None), CompiledForward)


def eager_around_compiled_blocks(call: Any) -> Any:
    """Decorate an override's ``__call__`` (runtime/executor.py): when ``torch.compile`` traces
    a planned model whose blocks memfit compiled (a whole-model ``torch.compile(model)`` or a
    ``block.compile()`` after the plan), the override runs eagerly, one graph break per block,
    so that memfit's checkpoints stay outside compiled code around the compiled blocks, as the
    profile measured them. Overrides of plans on uncompiled blocks are traced as any code is,
    and the first such trace warns once (:data:`TRACED_PLAN_WARNING`): compile's partitioner
    then decides what the checkpoints save, and the plan's budget no longer holds."""
    eager = torch.compiler.disable(call)

    @functools.wraps(call)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            if runs_compiled_blocks(self):
                return eager(self, *args, **kwargs)
            # runs while Dynamo traces, not in the compiled graph: no graph break, no guard
            comptime(_warn_traced_plan)
        return call(self, *args, **kwargs)

    return wrapper


TRACED_PLAN_WARNING = (
    "memfit: torch.compile is tracing a model planned without compile=: compile turns memfit's "
    "checkpoints into its own and its partitioner decides what they save, so the plan's memory "
    "budget does not hold (measured +9.8% on a 4-block GPT). Fix: plan with memfit compiling "
    "the blocks beneath its checkpoints instead:\n"
    "    memfit.remove(model)\n"
    "    memfit.auto(model, sample, budget=..., compile=True)  # and train model as it is\n"
    "(a torch.compile around such a plan is fine: its checkpoints stay outside compiled code). "
    "Warned once per plan applied"
)
_TRACED_PLAN = {"armed": True}


def arm_traced_plan_warning() -> None:
    """Let the next trace of a plan on uncompiled blocks warn again (a new plan applied)."""
    _TRACED_PLAN["armed"] = True


def _warn_traced_plan(_context: Any) -> None:
    if _TRACED_PLAN["armed"]:
        _TRACED_PLAN["armed"] = False
        warnings.warn(TRACED_PLAN_WARNING, UserWarning, stacklevel=2)


def refuse_compiled_model(model: nn.Module, call: str) -> None:
    """Refuse a model that is, or holds, a ``torch.compile`` wrapper (``OptimizedModule``).

    memfit plans and runs the eager model, and compiles its blocks itself beneath its
    checkpoints (``compile=``); measuring a compiled wrapper measures eager code (Dynamo is
    bypassed by memfit's hooks), takes minutes of compiling, and the plan would not hold.

    Args:
        model: the model given to ``call``.
        call: the public function, for the message (``"auto"``, ``"plan"``, ...).

    Raises:
        TypeError: naming the wrapper and the two-line fix.
    """
    compiled = torch._dynamo.eval_frame.OptimizedModule
    found = next(
        ((name, module) for name, module in model.named_modules() if isinstance(module, compiled)),
        None,
    )
    if found is None:
        return
    name, _ = found
    if call == "apply":
        fix = (
            "    plan = memfit.plan(model._orig_mod, sample, budget=..., compile=True)\n"
            "    memfit.apply(model._orig_mod, plan); model = model._orig_mod  # train this one"
        )
    else:
        arguments = {
            "auto": "sample, budget=..., compile=True",
            "plan": "sample, budget=..., compile=True",
            "profile": "sample, compile=True",
        }.get(call, "sample, compile=True")
        fix = (
            f"    model = model._orig_mod  # the model torch.compile wrapped\n"
            f"    memfit.{call}(model, {arguments})  # memfit compiles its blocks; train model"
        )
    if name:
        fix = (
            f"    model.{name} = model.{name}._orig_mod  # the module torch.compile wrapped\n"
            f"    memfit.{call}(model, ..., compile=True)  # memfit compiles the blocks itself"
        )
    where = "the model is" if not name else f"model.{name} is"
    raise TypeError(
        f"memfit.{call}: {where} a torch.compile wrapper (OptimizedModule). memfit plans the "
        f"eager model and compiles its blocks itself, beneath its checkpoints, so that the "
        f"plan's budget holds; planning the wrapper would measure eager code and the plan "
        f"would not hold compiled. Plan the module inside with compile=:\n{fix}"
    )
