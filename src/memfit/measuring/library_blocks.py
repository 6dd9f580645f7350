"""The model's real blocks: the modules its own library checkpoints, as a check on the chain.

The chain finder (:func:`~memfit.measuring.chain.find_chain`) takes the largest list of modules
that runs as a chain. On models whose blocks are no such list it can settle for a chain inside
one block (the three modules of one feed-forward's ``net`` in diffusers' Flux and SD3, whose
blocks carry two tensors), and a plan over it cannot go below the rest of the model's
activations: a floor of 92-95% where the library's own switch reaches 27-37% (issue 24).

The libraries say which modules they checkpoint one by one. transformers' and diffusers'
switches (``gradient_checkpointing_enable()``, ``enable_gradient_checkpointing()``) set two
attributes on every module that has a ``gradient_checkpointing`` flag (the flag itself and
``_gradient_checkpointing_func``), and each such module then passes every block it checkpoints
through that function: transformers' ``GradientCheckpointingLayer`` passes itself, a diffusers
model or U-Net block passes each of its transformer blocks, resnets and attentions. memfit
watches one forward with the flags on and a function that only notes the block and calls it,
so what it sees is exactly what the switch would checkpoint, in the order it runs, with no
checkpoint taken (grad mode on, as the switch needs; saved tensors dropped at once).

:func:`find_blocks` is the rule ``profile`` follows when no ``blocks=`` is given:

* the chain found is made of transformers' ``GradientCheckpointingLayer`` classes (layers that
  checkpoint themselves): taken as it is, no second forward;
* the library checkpoints nothing, or only blocks of the chain found: that chain (or the
  finder's refusal);
* the library's blocks run as a chain the finder accepts (one or several groups), with no
  block output read later than by the next block and none called twice: they are the chain,
  with a note naming them;
* otherwise, if the chain found lies inside one library block, or no chain was found:
  ``UnsupportedModelError`` naming what was found and why it is not enough (several tensors
  carried between blocks, skip connections, blocks called twice), the switch that reaches
  further, and what to pass as ``blocks=``;
* otherwise the chain found, with a note that the library's switch checkpoints other blocks
  and that its floor may be lower.

timm's ``set_grad_checkpointing`` checkpoints through ``torch.utils.checkpoint`` directly, not
through a per-module function, so its blocks are not seen here (timm is not among memfit's
test dependencies); the chain finder's own search applies.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memfit.errors import UnsupportedModelError
from memfit.measuring.chain import Chain, find_chain
from memfit.measuring.profile import Profile

FLAG = "gradient_checkpointing"
FUNCTION = "_gradient_checkpointing_func"
_MISSING = object()
SHOWN = 4  # names shown in a message before "..."
LIBRARIES = ("transformers", "diffusers")  # whose loggers the watch quiets


@dataclass(frozen=True)
class LibraryBlocks:
    """What a model's own checkpointing switch checkpoints, seen in one forward.

    Attributes:
        names: fqn of every module the switch checkpoints (the outermost, where checkpoints
            nest), in the order of their first call.
        switch: how the user turns the library's checkpointing on (``model.enable_gradient_
            checkpointing()``).
        carried: (block, next block, tensors) where the next block takes several tensors of
            the block's output: the blocks carry several tensors, not one.
        skipped: (block, its last reader, blocks run in between) where a block's output is
            read after the next block has returned, while blocks still run: a skip
            connection, live past its next block; the longest first.
        repeated: blocks called more than once in the forward.
        joined: (block, next block) of one list where the next block takes none of the
            block's output tensors: the model's code makes its input (a concatenation, new
            tokens). Between two lists such a join is the chain's stage between groups.
    """

    names: tuple[str, ...]
    switch: str
    carried: tuple[tuple[str, str, int], ...] = ()
    skipped: tuple[tuple[str, str, int], ...] = ()
    repeated: tuple[str, ...] = ()
    joined: tuple[tuple[str, str], ...] = ()

    def reasons(self) -> list[str]:
        """Why these blocks are not one chain of single tensors, in words (empty: no reason
        seen)."""
        said = []
        if self.carried:
            block, after, count = self.carried[0]
            said.append(
                f"they carry several tensors: {after} takes {count} tensors of {block}'s output "
                f"({len(self.carried)} such link(s)), which memfit's chain finder did not "
                f"follow here"
            )
        if self.skipped:
            block, reader, later = self.skipped[0]
            said.append(
                f"skip connections: the output of {block} is read again by {reader}, "
                f"{later} blocks later ({len(self.skipped)} such tensor(s)); memfit's chain frees a "
                f"block's output after the next block, and does not plan tensors held from "
                f"their maker to a later reader"
            )
        if self.joined:
            block, after = self.joined[0]
            said.append(
                f"the model's code makes {after}'s input from {block}'s output and other "
                f"tensors ({len(self.joined)} such join(s)), where a chain passes a block's "
                f"output on as it is; memfit plans such joins only between two lists of "
                f"blocks (an encoder and a decoder)"
            )
        if self.repeated:
            said.append(
                f"{_some(self.repeated)} run more than once in one forward; a chain's blocks "
                f"run once each"
            )
        return said


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")


def _flagged(module: nn.Module) -> bool:
    return isinstance(getattr(module, FLAG, None), bool)


def _checkpoints_itself(module: nn.Module) -> bool:
    """Whether the module is one of transformers' ``GradientCheckpointingLayer`` layers, which
    checkpoint themselves (a diffusers block with the flag checkpoints its children instead).
    By class name: transformers is never imported here."""
    return any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)


def _switch(model: nn.Module) -> str:
    for name, module in model.named_modules():
        where = f"model.{name}" if name else "model"
        for method in ("enable_gradient_checkpointing", "gradient_checkpointing_enable"):
            if callable(getattr(module, method, None)):
                return f"{where}.{method}()"
    return "the gradient_checkpointing flags of its modules"


def _module_of(function: Any) -> nn.Module | None:
    """The module a checkpoint function was handed: the module itself, a bound method of it,
    or a ``partial`` over either (transformers passes ``partial(forward, self, **kwargs)``)."""
    if isinstance(function, nn.Module):
        return function
    owner = getattr(function, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    if isinstance(function, partial):
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
        return _module_of(function.func)
    return None


class _Seen:
    """A number per tensor object, held weakly, never reused (``id()`` alone is reused)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def known(self, tensor: torch.Tensor) -> int | None:
        entry = self._seen.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def name(self, tensor: torch.Tensor, number: int) -> None:
        self._seen[id(tensor)] = (weakref.ref(tensor), number)


class _Watch(TorchDispatchMode):
    """The library's block calls in one forward, and who reads their outputs when."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.calls: list[str] = []  # block fqn per call, in order
        self.returned = 0  # calls returned so far (they return in order: none nest)
        self.running = False
        self.taken: list[list[int]] = []  # per call: the earlier calls whose outputs it took
        self.first: list[int | None] = []  # per call: the call that made its first tensor
        self.late: dict[int, tuple[str, int]] = {}  # call -> (last late reader, calls returned)
        self.seen = _Seen()

    def record(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        module = _module_of(function)
        name = self.names.get(id(module)) if module is not None else None
        if name is None or self.running:  # nested in a block the switch checkpoints already
            return function(*args, **kwargs)
        index = len(self.calls)
        self.calls.append(name)
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        self.first.append(self.seen.known(tensors[0]) if tensors else None)
        taken = [self.seen.known(t) for t in tensors]
        self.taken.append([made for made in taken if made is not None])
        for made in self.taken[-1]:
            self._read(made, name)
        self.running = True
        try:
            output = function(*args, **kwargs)
        finally:
            self.running = False
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and self.seen.known(tensor) is None:
                self.seen.name(tensor, index)
        self.returned += 1
        return output

    def _read(self, made: int, reader: str) -> None:
        """A read of call ``made``'s output: late when the call after it has returned."""
        if self.returned > made + 1 and self.returned >= self.late.get(made, ("", 0))[1]:
            self.late[made] = (reader, self.returned)  # the latest read

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.running:  # the model's own code between blocks
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, torch.Tensor):
                    made = self.seen.known(leaf)
                    if made is not None:
                        self._read(made, "")  # named once the next call is known
        return func(*args, **(kwargs or {}))


def _drop(_tensor: torch.Tensor) -> None:
    return None


def _never(_packed: None) -> torch.Tensor:
    raise RuntimeError("memfit's library-block watch keeps no saved tensors")


@contextmanager
def _switched_on(modules: Sequence[nn.Module], function: Callable[..., Any]) -> Iterator[None]:
    before = [
        (m, name, m.__dict__.get(name, _MISSING)) for m in modules for name in (FLAG, FUNCTION)
    ]
    try:
        for module in modules:
            module.__dict__[FLAG] = True
            module.__dict__[FUNCTION] = function
        yield
    finally:
        for module, name, value in before:
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


@contextmanager
def _quiet() -> Iterator[None]:
    """The libraries' own log lines off while memfit watches (transformers logs "use_cache=True
    is incompatible with gradient checkpointing" when its switch is on): the user turned no
    switch on."""
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def library_blocks(model: nn.Module, run_forward: Callable[[], Any]) -> LibraryBlocks | None:
    """The blocks the model's own checkpointing switch checkpoints, seen in one forward with
    the switch on (no checkpoint taken, nothing saved for backward); ``None`` when the model
    has no switch or it checkpoints nothing here. The model's flags are left as they were."""
    flagged = [module for module in model.modules() if _flagged(module)]
    if not flagged:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    watch = _Watch(names)
    dropped = torch.autograd.graph.saved_tensors_hooks(_drop, _never)
    with _switched_on(flagged, watch.record), torch.enable_grad(), dropped, watch, _quiet():
        output = run_forward()
    del output
    if not watch.calls:
        return None
    order = list(dict.fromkeys(watch.calls))
    repeated = tuple(name for name in order if watch.calls.count(name) > 1)
    carried = []
    joined = tuple(
        (watch.calls[index - 1], watch.calls[index])
        for index in range(1, len(watch.calls))
        if watch.first[index] != index - 1
        and (index - 1) not in watch.taken[index]
        and _parent(watch.calls[index - 1]) == _parent(watch.calls[index])  # not two lists
    )
    for index in range(1, len(watch.calls)):
        from_previous = watch.taken[index].count(index - 1)
        if from_previous >= 2:
            carried.append((watch.calls[index - 1], watch.calls[index], from_previous))
    # the last block of a list may be read by a later list (an encoder's output, read by every
    # decoder block): the chain's stage between the two groups holds it
    last_of_list = {_parent(name): index for index, name in enumerate(watch.calls)}
    late = [
        (returned - made - 1, made, reader or f"the model's code before {watch.calls[returned]}")
        for made, (reader, returned) in watch.late.items()
        if returned < len(watch.calls)  # reads once every block ran are the head's (LLaVA's)
        and last_of_list[_parent(watch.calls[made])] != made
    ]
    skipped = tuple(
        (watch.calls[made], reader, later) for later, made, reader in sorted(late, reverse=True)
    )
    return LibraryBlocks(
        names=tuple(order),
        switch=_switch(model),
        carried=tuple(carried),
        skipped=skipped,
        repeated=repeated,
        joined=joined,
    )


def _without_library(model: nn.Module, run_forward: Callable[[], Any]) -> list[str]:
    """Why a model with no chain and no checkpointing switch has none, where it shows:
    layers spread over parallel lists (XLM's and Flaubert's ``attentions[i]``, ``ffns[i]``),
    or a list whose blocks the model runs by calling ``.forward`` itself (SqueezeBERT), which
    module hooks (the finder's, FSDP2's) never see."""
    said = []
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) >= 2
    ]
    by_parent: dict[tuple[str, int], list[str]] = {}
    for name, module in lists:
        by_parent.setdefault((name.rpartition(".")[0], len(module)), []).append(name)
    parallel = next((names for names in by_parent.values() if len(names) >= 2), None)
    if parallel is not None:
        said.append(
            f"its layers are spread over parallel lists ({_some(parallel)}: the i-th layer is "
            f"the i-th module of each), so no module holds one layer to plan as a block; memfit "
            f"would need blocks made of several modules"
        )
    called: dict[int, int] = {}
    ran: dict[int, int] = {}
    handles = []
    children = [child for _, module in lists for child in module]
    for child in children:
        handles.append(child.register_forward_pre_hook(lambda m, _a: _count(called, m)))
        child.__dict__["forward"] = _counting(child, ran)
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
        for child in children:
            child.__dict__.pop("forward", None)
    direct = [
        name
        for name, module in lists
        if all(ran.get(id(c), 0) > called.get(id(c), 0) for c in module)
    ]
    if direct:
        said.append(
            f"the model runs the blocks of {_some(direct)} by calling their .forward itself, "
            f"which module hooks never see; memfit would need the model to call the blocks"
        )
    return said


def _count(counts: dict[int, int], module: nn.Module) -> None:
    counts[id(module)] = counts.get(id(module), 0) + 1


def _counting(module: nn.Module, counts: dict[int, int]) -> Callable[..., Any]:
    forward = type(module).forward

    def run(*args: Any, **kwargs: Any) -> Any:
        _count(counts, module)
        return forward(module, *args, **kwargs)

    return run


def _groups(chain: Chain) -> list[tuple[str, ...]]:
    ends = [*chain.groups[1:], len(chain.block_names)]
    return [chain.block_names[start:end] for start, end in zip(chain.groups, ends, strict=True)]


def _holds_all(chain: Chain, library: LibraryBlocks) -> bool:
    """Whether every library block is a block of the chain (the chain may have more: Mimi's
    convolution layers besides the transformer layers its switch checkpoints)."""
    return set(library.names) <= set(chain.block_names)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _inside(name: str, other: str) -> bool:
    return name == other or name.startswith(other + ".")


def find_blocks(model: nn.Module, run_forward: Callable[[], Any]) -> tuple[Chain, list[str]]:
    """The chain ``profile`` plans when no ``blocks=`` is given, and notes for the profile
    (the rule is the module docstring's).

    Raises:
        UnsupportedModelError: no chain found, or one inside a single block of the library's,
            and the library's blocks are no chain either: the message names both, why, the
            library's switch and what ``blocks=`` would take.
    """
    chain: Chain | None
    try:
        chain, failure = find_chain(model, run_forward), None
    except UnsupportedModelError as error:
        chain, failure = None, error
    if chain is not None and all(map(_checkpoints_itself, chain.blocks)):
        return chain, []  # the library's own layers
    library = library_blocks(model, run_forward)
    if library is None:
        if chain is None:
            assert failure is not None
            why = _without_library(model, run_forward)
            if why:
                raise UnsupportedModelError(f"{failure} ({'; '.join(why)})") from None
            raise failure
        return chain, []
    makers = {maker for maker, _, _ in library.skipped}
    held = chain is not None and any(block in makers for block in chain.block_names)
    if chain is not None and not held and _holds_all(chain, library):
        return chain, []
    reasons = library.reasons()
    theirs: Chain | None = None
    if not library.skipped and not library.repeated:  # the finder may follow carries, joins
        try:
            theirs = find_chain(model, run_forward, library.names)
        except UnsupportedModelError as error:
            reasons = [*reasons, f"memfit's chain finder refused them: {error}"]
    model_name = type(model).__name__
    children = _children_sequence(model, run_forward, library) if library.skipped else None
    if children is not None and not library.repeated:
        return children, [
            f"blocks: the {len(children.blocks)} modules of the blocks {library.switch} "
            f"checkpoints through ({_some(children.block_names)}), one sequence with "
            f"{len(children.skips)} skip connection(s) held from maker to reader and "
            f"{len(children.joins)} input(s) the model's code makes (cat(output, skip))"
        ]
    if theirs is not None:
        found = "none" if chain is None else _some(chain.block_names)
        return theirs, [
            f"blocks: the {len(theirs.blocks)} modules {library.switch} checkpoints "
            f"({_some(theirs.block_names)}), in place of the chain found by watching lists "
            f"({found})"
        ]
    inside = chain is not None and any(
        all(_inside(block, unit) for block in group)
        for group in _groups(chain)
        for unit in library.names
    )
    if chain is None or inside or held:
        if chain is None:
            what = "found no chain of blocks"
        elif inside:
            what = (
                f"found the chain {_some(chain.block_names)}, with blocks inside one of the "
                f"blocks {library.switch} checkpoints,"
            )
        else:
            what = (
                f"found the chain {_some(chain.block_names)}, but the model reads some of its "
                f"blocks' outputs again after later blocks ran (a plan over it would free them "
                f"too early, and its peak would run over the prediction),"
            )
        raise UnsupportedModelError(
            f"memfit {what} in {model_name}. The model's own checkpointing switch "
            f"checkpoints {len(library.names)} blocks ({_some(library.names)}), and they are "
            f"not a chain memfit can plan: {'; '.join(reasons)}. A plan over other blocks "
            f"would not reach the switch's memory, so memfit refuses rather than offer a "
            f"worse floor. Use {library.switch}, or name a chain with blocks=[...] (each block "
            f"called once, in order, on the previous block's output, and read by no later one)"
        )
    return chain, [
        f"{library.switch} checkpoints other blocks ({_some(library.names)}), which are not a "
        f"chain memfit can plan ({'; '.join(reasons)}): memfit plans the chain it found "
        f"({_some(chain.block_names)}), whose floor may be above that switch's"
    ]


def _children_sequence(
    model: nn.Module, run_forward: Callable[[], Any], library: LibraryBlocks
) -> Chain | None:
    """The children of the containers whose switch checkpoints the library's blocks (a U-Net
    down, mid or up block's resnets, attentions, down- and upsamplers), as one sequence in
    the order the forward calls them, with its joins and skips; ``None`` when they are no
    such sequence. Diffusers' U-Net blocks checkpoint each resnet and each attention's
    transformer blocks, whose residuals and projections run between the checkpoints (late
    reads of every resnet output): their children, each called once on the previous one's
    output or on a concatenation the model makes, are the stages."""
    modules = dict(model.named_modules())
    lists = (nn.ModuleList, nn.Sequential)
    containers = {
        name
        for name, module in modules.items()
        if _flagged(module) and name and any(isinstance(c, lists) for c in module.children())
    }
    if not containers:
        return None
    owners = set()
    for block in library.names:
        around = [c for c in containers if block.startswith(c + ".")]
        if not around:
            return None
        owners.add(min(around, key=lambda c: c.count(".")))  # the outermost below the model
    candidates = [
        f"{owner}.{list_name}.{child}"
        for owner in owners
        for list_name, children in modules[owner].named_children()
        if isinstance(children, lists)
        for child, _ in children.named_children()
    ]
    order: list[str] = []
    handles = [
        modules[name].register_forward_pre_hook(lambda *_a, name=name: order.append(name))
        for name in candidates
    ]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    called = list(dict.fromkeys(order))
    if len(called) != len(order) or len(called) < 2:
        return None
    try:
        chain = find_chain(model, run_forward, called)
    except UnsupportedModelError:
        return None
    return chain if chain.skips and len(chain.groups) == 1 else None


SMALL_SHARE = 0.5  # blocks holding less of the activation memory than this get a note


def coverage_note(profile: Profile, chain: Chain) -> str | None:
    """A note when the chain's blocks save less than half of the plain step's activation
    memory: no plan over them goes below the rest (``<pre>``, ``<post>``, what runs between
    groups), so the floor stays high; ``None`` otherwise."""
    activation = profile.measurement.activation_bytes
    if activation <= 0:
        return None
    saved = sum(
        profile.costs.stages[index].options["keep"].saved_bytes for index in chain.block_stages
    )
    share = saved / activation
    if share >= SMALL_SHARE:
        return None
    return (
        f"the chain's {len(chain.blocks)} blocks ({_some(chain.block_names)}) save "
        f"{share:.0%} of the step's activation memory: no plan over them goes below the rest "
        f"(<pre>, <post>, stages between groups); if the model has larger blocks, name them "
        f"with blocks=[...]"
    )
