"""Finding the chain of stages in a model.

A chain is ``<pre>`` (everything the forward does before the first block: embeddings, masks),
the blocks in order, and ``<post>`` (everything after the last block: final norm, head, loss).
The blocks come from the user (``blocks=``) or from the model itself: the largest
``nn.ModuleList``/``nn.Sequential`` whose children are each called once, in order, each taking
the previous one's output as its first argument (every Hugging Face encoder/decoder stack).

Models with several block lists run one after the other (an encoder-decoder: T5, BART, Whisper)
get all of them: the lists are *groups* of one chain, and what runs between two groups (the
encoder's final norm, the decoder's embeddings) is a stage of its own, ``<after encoder.block>``,
which is always kept and never joins a recompute segment. Its output is the next group's first
input; what it makes besides (the encoder output every decoder block reads) stays live until
its backward, after the last decoder block's.

The same forward notes where the model draws random numbers between two blocks of a group
(LayerDrop's ``torch.rand([])``, drawn by BART and OPT up to transformers 5.0 even at LayerDrop
0): a recompute segment reruns its blocks back to back, without those draws, so the planner
never joins blocks across them (:attr:`Chain.draws_before`).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memfit.errors import UnsupportedModelError
from memfit.measuring.carry import MAIN_ONLY, Carry, Slot, find_carry, output_items, slot_values

PRE = "<pre>"
POST = "<post>"

Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # a block call's side inputs: (args, kwargs)


@dataclass(frozen=True, eq=False)
class Chain:
    """The stages of a model: ``<pre>``, the blocks (in one or more groups), ``<post>``.

    Attributes:
        container: fqn of the module holding the blocks (``""``: the model itself; several
            groups: their containers joined by ``,``).
        block_names: fqn of every block, in execution order.
        blocks: the block modules, in the same order.
        groups: where each group of blocks starts, as positions in ``blocks`` (``(0,)`` for a
            single list). Before every group but the first sits a between stage.
        draws_before: positions in ``blocks`` of the blocks before which the model drew random
            numbers after the previous block of their group returned (LayerDrop): a recompute
            segment must not join such a block with the one before it.
        carries: per group, how a block's output becomes the next block's arguments
            (:mod:`memfit.measuring.carry`); empty: every group hands on its main tensor.
        joins: positions in ``blocks`` of the blocks whose main input the model's own code
            makes from the previous block's output (a U-Net's up blocks: ``cat(output,
            skip)``): no recompute segment joins such a block with the one before.
        skips: ``(maker, reader)`` positions in ``blocks`` of block outputs the model reads
            again after the next block returned (U-Net skip connections), ``reader`` the block
            after whose call the last read happens (``len(blocks)``: after the last block, in
            ``<post>``); ``maker`` -1 is ``<pre>``'s output.
    """

    container: str
    block_names: tuple[str, ...]
    blocks: tuple[nn.Module, ...]
    groups: tuple[int, ...] = (0,)
    draws_before: frozenset[int] = frozenset()
    carries: tuple[Carry, ...] = ()
    joins: frozenset[int] = frozenset()
    skips: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        starts = self.groups
        if not starts or starts[0] != 0 or list(starts) != sorted(set(starts)):
            raise ValueError(f"Chain.groups must start at 0 and increase; got {starts}")
        if self.carries and len(self.carries) != len(starts):
            raise ValueError(f"Chain.carries {self.carries} must give one carry per group {starts}")
        if starts[-1] >= max(len(self.blocks), 1):
            raise ValueError(f"Chain.groups {starts} point past the {len(self.blocks)} blocks")
        positions: list[int | None] = [None]  # <pre>
        names = [PRE]
        for k, name in enumerate(self.block_names):
            if k and k in starts:
                positions.append(None)
                names.append(f"<after {self.block_names[k - 1].rpartition('.')[0]}>")
            positions.append(k)
            names.append(name)
        positions.append(None)
        names.append(POST)
        object.__setattr__(self, "_positions", tuple(positions))
        object.__setattr__(self, "_names", tuple(names))

    @property
    def stage_names(self) -> tuple[str, ...]:
        return self._names  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.stage_names)

    def block_position(self, index: int) -> int | None:
        """Position in ``blocks`` of stage ``index``'s block (``None``: not a block stage)."""
        positions: tuple[int | None, ...] = self._positions  # type: ignore[attr-defined]
        return positions[index] if 0 <= index < len(positions) else None

    def block_of_stage(self, index: int) -> nn.Module | None:
        """The block module of stage ``index`` (``None`` for ``<pre>``, ``<post>`` and the
        stages between groups)."""
        position = self.block_position(index)
        return None if position is None else self.blocks[position]

    def carry(self, index: int) -> Carry:
        """The carry of stage ``index``'s group (:data:`MAIN_ONLY` for a stage that is no
        block, and for every stage of a chain without carries)."""
        position = self.block_position(index)
        if position is None or not self.carries:
            return MAIN_ONLY
        group = max(k for k, start in enumerate(self.groups) if start <= position)
        return self.carries[group]

    @property
    def block_stages(self) -> tuple[int, ...]:
        """The stage index of every block, in order."""
        positions: tuple[int | None, ...] = self._positions  # type: ignore[attr-defined]
        return tuple(i for i, position in enumerate(positions) if position is not None)


def is_block_stage_name(name: str) -> bool:
    """Whether a stage name (from a plan or profile) names a block rather than a stage of the
    chain's own (``<pre>``, ``<post>``, ``<after ...>``)."""
    return not name.startswith("<")


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


def rng_state(device: torch.device | None) -> tuple[torch.Tensor, ...]:
    """The random generators' states that blocks on ``device`` draw from (CPU always); none
    while torch.compile traces (a compiled region cannot read them without a graph break)."""
    if torch.compiler.is_compiling():
        return ()
    states = [torch.random.get_rng_state()]
    if device is not None and device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return tuple(states)


def same_rng_state(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """Whether two :func:`rng_state` readings are equal."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class _Draws:
    """Numbers the random stream at each block call and return: a new number whenever the
    generators' state moved since the last call or return seen (compared as bytes, so that
    no op reaches the chain finder's dispatch mode; only the last state is held)."""

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.last: bytes | None = None
        self.epoch = 0

    def now(self, tensor: torch.Tensor | None) -> int:
        if self.device is None and tensor is not None:
            self.device = tensor.device
        state = b"".join(t.numpy().tobytes() for t in rng_state(self.device))
        if self.last is not None and state != self.last:
            self.epoch += 1
        self.last = state
        return self.epoch


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

    Without ``blocks``, the chain is the largest list of blocks that runs as a chain (lists
    inside a block of another such list do not count), plus every
    other such list that runs wholly before or after it, is not inside it or around it, and
    holds blocks of one class with at least a quarter of its blocks' parameters each (the
    encoder of an encoder-decoder; not a small ``Sequential`` in the head).

    Args:
        model: the model.
        run_forward: runs one forward of the model on the sample (grad mode as in training).
        blocks: the blocks' fqns in order, the fqn of their container, or the fqns of several
            containers (an encoder's and a decoder's, in any order); ``None`` to search.

    Raises:
        UnsupportedModelError: no chain found (and how to name one with ``blocks=``), or the
            named blocks are not called once each, in order, as a chain.
    """
    modules = dict(model.named_modules())  # a module registered under several names: its first
    every = dict(model.named_modules(remove_duplicate=False))
    lists = (nn.ModuleList, nn.Sequential)
    given: list[str] = []  # blocks named one by one from several lists
    if blocks is None:
        containers = _candidates(model)
        groups = {name: _children(name, module) for name, module in containers.items()}
        # a list of modules registered elsewhere too (HGNetV2's classifier: a ModuleList of its
        # avg_pool and flatten) is not a stack of blocks of its own
        groups = {
            container: names
            for container, names in groups.items()
            if all(name in modules for name in names)
        }
    else:
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        missing = [name for name in names if name not in every]
        if missing:
            raise ValueError(
                f"blocks= names {missing} are not submodules of {type(model).__name__}; "
                f"expected fqns such as {list(modules)[1:4]}"
            )
        if names and all(isinstance(every[name], lists) for name in names):
            groups = {name: _children(name, every[name]) for name in names}
        elif len({name.rpartition(".")[0] for name in names}) > 1:  # blocks of several lists
            given = names
            groups = {}
            for name in names:
                groups.setdefault(name.rpartition(".")[0], []).append(name)
        else:
            groups = {"<blocks=>": names}
        _refuse_second_names(groups, modules, every)
    calls: list[tuple[str, int, int | None]] = []  # (block fqn, input token, output token)
    # per call: the tokens of its tensor arguments by slot, and of its output's tensor items
    arguments: list[dict[Slot, int]] = []
    results: list[dict[int, int]] = []
    draws = _Draws()
    streams: list[list[int]] = []  # per call: the random stream's number at its call, return
    handles = []
    watched = list(dict.fromkeys(name for names in groups.values() for name in names))
    tokens = _Tokens()
    running: list[str] = []  # the watched blocks running now, outermost first
    readers = _Readers(tokens, running)

    def watch(name: str) -> None:
        module = modules[name]

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = main_tensor(split_main(args, kwargs)[0])
            if given and name == given[0] and first is not None and not calls:
                readers.produced(tokens.of(first), PRE, returned=False)
            calls.append((name, tokens.of(first) if first is not None else -1, None))
            arguments.append({s: tokens.of(t) for s, t in slot_values(*split_main(args, kwargs))})
            results.append({})
            streams.append([draws.now(first), -1])
            running.append(name)

        def post_hook(_m: nn.Module, _a: Any, _k: Any, output: Any) -> None:
            out = main_tensor(output)
            index = max(i for i, call in enumerate(calls) if call[0] == name)
            calls[index] = (name, calls[index][1], tokens.of(out) if out is not None else -2)
            results[index] = {
                k: tokens.of(item)
                for k, item in enumerate(output_items(output))
                if isinstance(item, torch.Tensor)
            }
            streams[index][1] = draws.now(out)
            if running and running[-1] == name:
                running.pop()
            if out is not None:
                readers.produced(calls[index][2], name)

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))

    for name in watched:
        watch(name)
    try:
        with torch.no_grad(), readers:
            run_forward()
    finally:
        for handle in handles:
            handle.remove()

    def link(names: list[str]) -> Carry | None:
        """How the blocks hand on: a carry of several tensors when every block hands the next
        the same slots (the main input among them), else the main tensor
        (:data:`MAIN_ONLY`); ``None``: not a chain."""
        seen = [k for k, call in enumerate(calls) if call[0] in set(names)]
        if [calls[k][0] for k in seen] != names:
            return None
        pairs = list(itertools.pairwise(seen))
        found = {find_carry(results[a], arguments[a], arguments[b]) for a, b in pairs}
        if len(found) == 1:
            carry = found.pop()
            # no block, the last included, returns one of its own inputs where the carry hands
            # on (T5's position bias, made by the first layer and passed on by every other)
            passes_on = any(
                results[k].get(index) in arguments[k].values() for k in seen for _, index in carry
            )
            if len(carry) >= 2 and carry[0][0] == 0 and not passes_on:
                return carry
        if all(calls[b][1] == calls[a][2] for a, b in pairs):
            return MAIN_ONLY
        return None

    links = {container: link(names) for container, names in groups.items()}
    joins: frozenset[int] = frozenset()
    skips: tuple[tuple[int, int], ...] = ()
    if given and any(carry is None for carry in links.values()):
        joined = _joined(given, calls, readers)
        if joined is not None:  # one sequence through several lists, joined by the model
            groups, links = {"<blocks=>": list(given)}, {"<blocks=>": MAIN_ONLY}
            joins, skips = joined

    def read_aside(names: list[str]) -> bool:
        """Whether the model reads a block's output besides the next block while the chain
        runs (FocalNet's modulation sums its focal layers' outputs as they come): such blocks
        are steps of one computation, whose outputs live on, not a chain of layers."""
        inside = set(names)
        for block, context, returned in readers.reads:
            if block not in inside or block == names[-1] or names[-1] in returned:
                continue
            following = names[names.index(block) + 1]
            if context is None or not (context == following or context.startswith(following + ".")):
                return True
        return False

    found = {
        container: names for container, names in groups.items() if links[container] is not None
    }
    aside: list[str] = []
    if blocks is None:
        aside = [container for container, names in found.items() if read_aside(names)]
        found = {container: names for container, names in found.items() if container not in aside}
    if blocks is not None and len(found) < len(groups):
        raise UnsupportedModelError(
            f"blocks={blocks!r} is not a chain: each block must be called once, in the given "
            f"order, taking the previous block's output as its first argument (or, for blocks "
            f"that carry several tensors, the tensors of the previous block's output tuple as "
            f"its main input and other arguments, in the same places for every block)"
        )
    if not found:
        why = (
            f" ({', '.join(aside)}: the model reads a block's output besides the next block "
            f"while they run, so memfit takes them for steps of one computation, not layers; "
            f"name them with blocks= to plan them anyway)"
            if aside
            else ""
        )
        raise UnsupportedModelError(
            f"found no chain of blocks in {type(model).__name__}: no nn.ModuleList or "
            f"nn.Sequential has children called once each, in order, each on the previous "
            f"one's output{why}. Name the blocks with blocks=['layer.0', 'layer.1', ...]"
        )
    order = {call[0]: i for i, call in reversed(list(enumerate(calls)))}  # first call of each

    def span(names: list[str]) -> tuple[int, int]:
        return order[names[0]], order[names[-1]]

    def block_params(name: str) -> int:
        return sum(p.numel() for p in modules[name].parameters())

    def size(item: tuple[str, list[str]]) -> tuple[int, int]:
        return (len(item[1]), sum(block_params(name) for name in item[1]))

    def uniform(names: list[str]) -> bool:
        """Blocks of one class, each with parameters: a stack of layers, not a pipeline of
        different modules (an MLP's ``Sequential``, T5's sublayers)."""
        return len({type(modules[n]) for n in names}) == 1 and all(map(block_params, names))

    def inside(container: str, names: list[str]) -> bool:
        return any(container.startswith(block + ".") for block in names)

    if blocks is None:
        nested = {
            container
            for container in found
            if any(inside(container, group) for other, group in found.items() if other != container)
        }
        # a list inside one block of another chain (T5's sublayers in a block) is that block's
        # business, unless it is a stack of layers; a chain each of whose blocks holds such a
        # stack (ConvNeXt's and Swin's stages) gives way to the stacks, as groups
        refined = {
            container
            for container, group in found.items()
            if all(
                any(inside(inner, [block]) and uniform(found[inner]) for inner in nested)
                for block in group
            )
        }
        found = {
            container: names
            for container, names in found.items()
            if container not in refined and (container not in nested or uniform(names))
        }

    if blocks is not None:
        chosen = list(found.items())
    else:
        primary = max(found.items(), key=size)
        chosen = [primary]
        floor = size(primary)[1] / len(primary[1]) / 4
        kind = type(modules[primary[1][0]])
        for container, names in sorted(found.items(), key=size, reverse=True):
            first, last = span(names)
            if (
                all(_apart(container, other) for other, _ in chosen)
                and all(last < span(o)[0] or first > span(o)[1] for _, o in chosen)
                and uniform(names)
                and (
                    type(modules[names[0]]) is kind  # the same layers (ConvNeXt's stages)
                    or all(block_params(name) >= floor for name in names)
                )
            ):
                chosen.append((container, names))
    chosen.sort(key=lambda item: span(item[1])[0])
    names = [name for _, group in chosen for name in group]
    starts = [0]
    for _, group in chosen[:-1]:
        starts.append(starts[-1] + len(group))
    draws_before = frozenset(
        position
        for position in range(1, len(names))
        if position not in starts
        and streams[order[names[position]]][0] != streams[order[names[position - 1]]][1]
    )
    if chosen[0][0] == "<blocks=>":
        parents = {name.rpartition(".")[0] for name in names}
        container = parents.pop() if len(parents) == 1 else ""
    else:
        container = ",".join(name for name, _ in chosen)
    carries = tuple(links[name] or MAIN_ONLY for name, _ in chosen)
    return Chain(
        container=container,
        block_names=tuple(names),
        blocks=tuple(modules[name] for name in names),
        groups=tuple(starts),
        draws_before=draws_before,
        carries=carries if any(carries) else (),
        joins=joins,
        skips=skips,
    )


def _joined(
    names: list[str],
    calls: list[tuple[str, int, int | None]],
    readers: _Readers,
) -> tuple[frozenset[int], tuple[tuple[int, int], ...]] | None:
    """Blocks named one by one from several lists (a U-Net's resnets, attentions, down- and
    upsamplers), as one sequence: each block called once, in order, on the previous block's
    output or on a tensor the model's code made after it returned from that output (a
    *join*: ``cat(output, skip)``). Returns the joins and the skips (outputs read after the
    next block returned; see :attr:`Chain.skips`), or ``None`` when they run otherwise."""
    seen = [k for k, call in enumerate(calls) if call[0] in set(names)]
    if [calls[k][0] for k in seen] != names:
        return None
    outputs = {calls[k][2] for k in seen}
    joined_reads = {
        block for block, context, returned in readers.reads if context is None and block in returned
    }
    joins = set()
    for position, (a, b) in enumerate(itertools.pairwise(seen), start=1):
        if calls[b][1] == calls[a][2]:
            continue
        made_after = (calls[a][2] or 0) < calls[b][1] and calls[b][1] not in outputs
        if not made_after or names[position - 1] not in joined_reads:
            return None
        joins.add(position)
    where = {name: position for position, name in enumerate(names)}
    last: dict[int, int] = {}
    for block, context, returned in readers.reads:
        maker = -1 if block == PRE else where.get(block)
        if maker is None or maker + 1 >= len(names) or names[maker + 1] not in returned:
            continue
        if context is not None and context in where:
            reader = where[context]
        else:
            done = max(where[name] for name in returned if name in where)
            reader = len(names) if done == len(names) - 1 else done
        if reader > maker + 1:
            last[maker] = max(reader, last.get(maker, reader))
    return frozenset(joins), tuple(sorted(last.items()))


class _Readers(TorchDispatchMode):
    """Which ops read a watched block's output, and from where: ``reads`` holds (the block
    that made the tensor, the innermost watched block running when an op read it or ``None``
    in the model's own code, and the blocks that had returned by then)."""

    def __init__(self, tokens: _Tokens, running: list[str]) -> None:
        super().__init__()
        self.tokens = tokens
        self.running = running
        self.made: dict[int, str] = {}  # output token -> the block that returned it
        self.returned: set[str] = set()
        self.reads: list[tuple[str, str | None, frozenset[str]]] = []

    def produced(self, token: int | None, block: str, returned: bool = True) -> None:
        if token is not None and token >= 0:
            self.made[token] = block
        if returned:
            self.returned.add(block)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.made:
            for leaf in tree_leaves((args, kwargs or {})):
                if not isinstance(leaf, torch.Tensor):
                    continue
                block = self.made.get(self.tokens.known(leaf) or 0)
                if block is not None:
                    context = self.running[-1] if self.running else None
                    self.reads.append((block, context, frozenset(self.returned)))
        return func(*args, **(kwargs or {}))


class _Tokens:
    """A number per tensor object, never reused: two tokens are equal only when the hooks saw
    the very same tensor. ``id()`` is no such name: a tensor freed during the forward (a block's
    output, once concatenated with a skip tensor) leaves its id to the next tensor made, and
    unlinked blocks would look linked. The tensors are held weakly, so the forward's memory is
    what it would be without the finder."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._count = 0

    def known(self, tensor: torch.Tensor) -> int | None:
        """The tensor's token if the hooks saw it, else ``None`` (nothing recorded)."""
        known = self._seen.get(id(tensor))
        return known[1] if known is not None and known[0]() is tensor else None

    def of(self, tensor: torch.Tensor) -> int:
        known = self._seen.get(id(tensor))
        if known is not None and known[0]() is tensor:
            return known[1]
        self._count += 1
        self._seen[id(tensor)] = (weakref.ref(tensor), self._count)
        return self._count


def _refuse_second_names(
    groups: dict[str, list[str]], modules: dict[str, nn.Module], every: dict[str, nn.Module]
) -> None:
    """Refuse blocks named by a second name of a module registered twice: a plan names every
    block by its first name (the one ``named_modules`` gives)."""
    first = {id(module): name for name, module in modules.items()}
    second = {
        name: first[id(every[name])]
        for names in groups.values()
        for name in names
        if name not in modules
    }
    if second:
        raise ValueError(
            "blocks= names modules registered under two names by their second names: "
            + ", ".join(f"{name!r} (first {earlier!r})" for name, earlier in second.items())
            + "; name each block by its first name, or pass the blocks one by one"
        )


def _children(name: str, module: nn.Module) -> list[str]:
    return [f"{name}.{child}" if name else child for child, _ in module.named_children()]


def _apart(a: str, b: str) -> bool:
    """Whether neither module fqn is inside the other (``""`` is the root, around all)."""
    if a == b or a == "" or b == "":
        return False
    return not (a.startswith(b + ".") or b.startswith(a + "."))
