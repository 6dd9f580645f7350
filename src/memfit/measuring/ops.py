"""Per-op profile of the blocks: which ops save tensors for backward, how many bytes, how long.

One forward of the model runs with a ``TorchDispatchMode`` that times every aten op of every
block and records the storages it outputs, and with ``saved_tensors_hooks`` that record which
storages autograd saves for backward. Ops are priced by measured time, not FLOPs: on a CPU a
GELU or a LayerNorm is far from free.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memfit.measuring.chain import Chain
from memfit.measuring.step import split_sample, storage_key

# Ops whose outputs are worth keeping because they are expensive to recompute: what
# ``selective:matmul`` saves. memfit keeps its own list rather than building it from torch's:
# the nearest torch has, ``compute_intensive_ops`` in
# ``torch._functorch.partitioners.get_default_op_list``, is private (no stability promise) and
# is a compiler's list, not a forward policy's: it names backward kernels
# (``convolution_backward``), the kernels SDPA calls inside itself (``_flash_attention_forward``),
# interpolation (``upsample_bilinear2d``) and fp8 ``_scaled_mm``, and lacks the CPU flash, cuDNN
# attention and ``baddbmm`` that blocks run. tests/measuring/test_ops.py holds the two lists
# side by side, and checks that every name here is an op of the installed torch (a renamed op
# would make the policy silently save nothing).
MATMUL_OPS = frozenset(
    {
        "aten.mm.default",
        "aten.addmm.default",
        "aten.bmm.default",
        "aten.baddbmm.default",
        "aten.convolution.default",
        "aten._scaled_dot_product_flash_attention_for_cpu.default",
        "aten._scaled_dot_product_flash_attention.default",
        "aten._scaled_dot_product_efficient_attention.default",
        "aten._scaled_dot_product_cudnn_attention.default",
    }
)


def _overload(op: Any) -> Any:
    """The ``OpOverload`` behind ``op`` (itself, or a name such as ``aten.mm.default``);
    ``None`` for a name torch does not know."""
    if not isinstance(op, str):
        return op
    return _overload_by_name(op)


@functools.cache
def _overload_by_name(name: str) -> Any:
    namespace, _, rest = name.partition(".")
    packet, _, overload = rest.partition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload or "default")
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _dropout_position(op: Any) -> int | None:
    """Position of the op's ``dropout_p`` argument (attention kernels), else ``None``."""
    for position, argument in enumerate(op._schema.arguments):
        if argument.name == "dropout_p":
            return position
    return None


def is_random_op(op: Any) -> bool:
    """Whether ``op`` (an ``OpOverload`` or its name) may draw random numbers.

    torch tags every such aten op ``nondeterministic_seeded`` (``rand``, ``randn``, ``normal``,
    ``randint``, ``multinomial``, ``bernoulli_``, dropout, and the fused attention kernels, which
    draw only when their ``dropout_p`` is above 0: see :func:`draws_random`). A name torch does
    not know is not random.
    """
    overload = _overload(op)
    tags = getattr(overload, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def draws_random(op: Any, args: Any = (), kwargs: Any = None) -> bool:
    """Whether this call of ``op`` draws random numbers.

    Ops with a ``dropout_p`` argument (``_scaled_dot_product_flash_attention``,
    ``_efficient_attention``, ``..._for_cpu``...) draw only when it is above 0: with dropout
    off they are deterministic matmuls worth saving. Any other random-tagged op always draws.
    """
    if not is_random_op(op):
        return False
    overload = _overload(op)
    position = _dropout_position(overload)
    if position is None:
        return True
    if kwargs and "dropout_p" in kwargs:
        dropout = kwargs["dropout_p"]
    elif position < len(args):
        dropout = args[position]
    else:
        dropout = overload._schema.arguments[position].default_value
    return bool(dropout)


def decides_per_call(op: Any) -> bool:
    """Whether ``op`` is random only for some calls (an attention kernel: its ``dropout_p``)."""
    overload = _overload(op)
    return is_random_op(overload) and _dropout_position(overload) is not None


@dataclass(slots=True)
class OpStats:
    """One op type inside a block.

    Attributes:
        op: the aten overload (``aten.mm.default``).
        calls: how many times the block calls it.
        seconds: total measured forward time of those calls.
        output_bytes: bytes of the storages it outputs.
        saved_bytes: of those, the bytes autograd saves for backward.
        needs: what recomputing it takes: the ops of the block whose outputs it reads (short
            names), ``parameters``, ``block input`` for anything made before the block, and
            ``random numbers`` when it draws them (or a random op fills its output in place).
        random: whether some call of it drew random numbers (never saved by a policy).
        written_later: whether a later op of the block wrote into its output in place
            (``scores /= sqrt(d)`` after a ``bmm``): a policy saving it needs a copy.
    """

    op: str
    calls: int = 0
    seconds: float = 0.0
    output_bytes: int = 0
    saved_bytes: int = 0
    needs: set[str] = field(default_factory=set)
    random: bool = False
    written_later: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: short op names, ``needs`` sorted."""
        return {
            "op": short_op_name(self.op),
            "calls": self.calls,
            "seconds": self.seconds,
            "output_bytes": self.output_bytes,
            "saved_bytes": self.saved_bytes,
            "needs": sorted(self.needs),
        }


@dataclass(slots=True)
class BlockOps:
    """The op profile of one block: op name -> stats, in first-call order."""

    name: str
    ops: dict[str, OpStats] = field(default_factory=dict)
    producers: dict[int, str] = field(default_factory=dict)  # live storage ptr -> op
    saved: set[int] = field(default_factory=set)  # storage ptrs already counted as saved
    parameters: set[int] = field(default_factory=set)  # storage ptrs of the block's parameters

    def to_rows(self) -> list[dict[str, Any]]:
        """The ops that make autograd save something, JSON-ready, in first-call order."""
        return [stats.to_dict() for stats in self.ops.values() if stats.saved_bytes > 0]

    @property
    def seconds(self) -> float:
        return sum(stats.seconds for stats in self.ops.values())

    @property
    def saved_bytes(self) -> int:
        return sum(stats.saved_bytes for stats in self.ops.values())


class _Recorder(TorchDispatchMode):
    def __init__(self, block: BlockOps) -> None:
        super().__init__()
        self.block = block

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = str(func)
        stats = self.block.ops.setdefault(name, OpStats(name))
        stats.calls += 1
        stats.seconds += elapsed
        random = draws_random(func, args, kwargs)
        if random:
            stats.random = True
            stats.needs.add("random numbers")
        inputs = {
            storage_key(leaf)
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta"
        }
        for ptr in _written_storages(func, args, kwargs):
            producer = self.block.producers.get(ptr)
            if producer is not None and producer != name:
                self.block.ops[producer].written_later = True
        for ptr in inputs:
            producer = self.block.producers.get(ptr)
            if producer is not None:
                stats.needs.add(short_op_name(producer))
            else:
                known = ptr in self.block.parameters
                stats.needs.add("parameters" if known else "block input")
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                ptr = storage_key(leaf)
                if ptr in inputs:  # a view or an in-place op: the storage is its input's
                    if random and ptr in self.block.producers:
                        # filled with random numbers in place (dropout's mask on CPU)
                        self.block.ops[self.block.producers[ptr]].needs.add("random numbers")
                    continue
                if self.block.producers.get(ptr) != name or ptr in self.block.saved:
                    # a new storage (or a freed one reused): attribute it to this op
                    self.block.producers[ptr] = name
                    self.block.saved.discard(ptr)
                    stats.output_bytes += leaf.untyped_storage().nbytes()
        return out


@functools.cache
def written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments ``func``'s schema marks as written in place
    (``Tensor(a!)``: ``self`` of ``div_``, ``out=``); none for an op without a schema."""
    schema = getattr(func, "_schema", None)
    if schema is None:  # a higher-order op: no schema to read
        return ()
    return tuple(
        (position, argument.name)
        for position, argument in enumerate(schema.arguments)
        if argument.alias_info is not None and argument.alias_info.is_write
    )


def writes_in_place(op: Any) -> bool:
    """Whether ``op`` (an ``OpOverload`` or a name such as ``aten.mul_.Tensor``) writes one of
    its arguments, read from its schema (:func:`written_arguments`), not from a trailing
    underscore in its name: ``__lshift__`` writes nothing, while ``mm.out`` writes ``out`` and
    ``_batch_norm_with_update`` writes the running statistics. ``False`` for a name torch does
    not know."""
    func = _overload(op)
    return func is not None and bool(written_arguments(func))


@functools.cache
def in_place_twin(func: Any) -> Any:
    """The in-place overload of the pointwise aten op ``func`` (``mul.Tensor`` ->
    ``mul_.Tensor``): same kernel, same values, written into ``self``. ``None`` when ``func``
    is not pointwise or has no twin whose schema writes ``self`` alone."""
    if torch.Tag.pointwise not in getattr(func, "tags", ()) or written_arguments(func):
        return None
    twin = _overload_by_name(
        f"{func.namespace}.{func.overloadpacket.__name__}_.{func._overloadname}"
    )
    return twin if twin is not None and written_arguments(twin) == ((0, "self"),) else None


@functools.cache
def out_of_place_twin(func: Any) -> str | None:
    """The name of the out-of-place overload of the in-place pointwise aten op ``func``
    (``aten.mul_.Tensor`` -> ``aten.mul.Tensor``; ``aten.__ilshift__.Tensor`` ->
    ``aten.__lshift__.Tensor``), or ``None`` when ``func`` does not write ``self`` alone or
    has no such twin."""
    if torch.Tag.pointwise not in getattr(func, "tags", ()):
        return None
    if written_arguments(func) != ((0, "self"),):
        return None
    packet = func.overloadpacket.__name__
    dunder = packet.startswith("__i") and packet.endswith("__")
    base = f"__{packet[3:]}" if dunder else packet.removesuffix("_")
    name = f"{func.namespace}.{base}.{func._overloadname}"
    twin = _overload_by_name(name)
    return name if twin is not None and not written_arguments(twin) else None


def written_tensors(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors a call of ``func`` writes in place (see :func:`written_arguments`)."""
    written = []
    for position, name in written_arguments(func):
        value = (kwargs or {}).get(name, args[position] if position < len(args) else None)
        written += [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]
    return written


def _written_storages(func: Any, args: Any, kwargs: Any) -> set[int]:
    """Storage keys of the tensors a call of ``func`` writes in place."""
    return {
        storage_key(tensor)
        for tensor in written_tensors(func, args, kwargs)
        if tensor.device.type != "meta"
    }


def profile_ops(model: nn.Module, sample: Any, chain: Chain) -> list[BlockOps]:
    """Run one forward (and drop it) recording the op profile of every block of ``chain``."""
    blocks = [
        BlockOps(name, parameters=set())
        for name, block in zip(chain.block_names, chain.blocks, strict=True)
    ]
    handles = []
    stack = ExitStack()

    def pack(index: int) -> Any:
        block = blocks[index]

        def hook(tensor: torch.Tensor) -> torch.Tensor:
            # Resolved now, while the storage is alive and its pointer still names it.
            ptr = storage_key(tensor)
            op = block.producers.get(ptr)
            if op is not None and ptr not in block.saved:
                block.saved.add(ptr)
                block.ops[op].saved_bytes += tensor.untyped_storage().nbytes()
            # Not the tensor itself: a node that saves its own output (softmax, layer norm's
            # mean) would then hold a tensor whose grad_fn is that node, a cycle through C++
            # that Python's collector cannot see. This forward never runs backward, so the
            # graph would never free it: every profile would leak the whole forward.
            return tensor.detach()

        return hook

    def pre_hook(index: int) -> Any:
        def hook(module: nn.Module, _args: Any) -> None:
            # read in the forward: FSDP2's pre-hook (which runs first) has swapped the
            # sharded parameters for the gathered ones the ops see
            blocks[index].parameters = {storage_key(p) for p in module.parameters()}
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack(index), _identity))
            stack.enter_context(_Recorder(blocks[index]))

        return hook

    def post_hook(_module: nn.Module, _args: Any, _output: Any) -> None:
        stack.close()

    for index, block in enumerate(chain.blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(index)))
        handles.append(block.register_forward_hook(post_hook))
    args, kwargs = split_sample(sample)
    try:
        with _fork_rng():
            model(*args, **kwargs)
    finally:
        stack.close()
        for handle in handles:
            handle.remove()
    return blocks


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextmanager
def _fork_rng() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        yield


_NEVER_SAVED_PREFIXES = ("aten.empty", "aten.zeros", "aten.ones", "aten.full", "aten.new_")


def short_op_name(op: str) -> str:
    """``aten.addmm.default`` -> ``addmm``; ``aten.add.Tensor`` -> ``add.Tensor``."""
    return op.removeprefix("aten.").removesuffix(".default")


def full_op_name(short: str) -> str:
    """The inverse of :func:`short_op_name`."""
    return f"aten.{short}" if "." in short else f"aten.{short}.default"


def saveable(op: str) -> bool:
    """Whether a selective policy may name the op: not random (recomputing every random op in
    order keeps the RNG stream; a saved one would be skipped and shift every draw after it), not
    in place (its schema writes an argument: :func:`writes_in_place`), not a factory whose
    output is filled later.

    Attention kernels are random only with dropout on: they may be named, and the policy
    recomputes the calls that draw (:func:`draws_random`)."""
    return (
        (not is_random_op(op) or decides_per_call(op))
        and not writes_in_place(op)
        and not op.startswith(_NEVER_SAVED_PREFIXES)
    )


def selective_detail(block: BlockOps, saved: frozenset[str]) -> dict[str, list[str]]:
    """Which of ``block``'s ops a selective policy saving ``saved`` keeps and which it reruns in
    backward (short op names, in the block's order): the plan's per-stage explanation."""
    saves = [
        op
        for op, stats in block.ops.items()
        if op in saved and stats.saved_bytes > 0 and not stats.random
    ]
    reruns = [
        op
        for op, stats in block.ops.items()
        if (op not in saved or stats.random) and (stats.output_bytes > 0 or stats.random)
    ]
    return {
        "saves": [short_op_name(op) for op in saves],
        "recomputes": [short_op_name(op) for op in reruns],
    }


def candidate_policies(
    blocks: list[BlockOps], coverages: tuple[float, ...] = (0.8, 0.95)
) -> list[str]:
    """A few Pareto-useful ``selective:`` options for these blocks, from their op profile.

    Ops are ranked by measured forward seconds per byte they make autograd save (what recompute
    costs against what saving costs). Each option saves the smallest prefix of that ranking whose
    ops cover ``coverage`` of the block's recomputable forward time; ``selective:matmul``
    (the matmul/attention outputs, the usual hand-made policy) joins them when those ops exist.
    Options that save the same ops are given once. An op whose output a later op of its block
    writes in place is never proposed (saving it costs the runtime a copy; see
    :mod:`memfit.runtime.saved_writes`): then the matmuls that remain are proposed as
    ``selective:save=...`` in place of ``selective:matmul``.

    The prefixes follow measured times, so another profile of the same model may propose
    others (:func:`timed_policies` names them); the matmul option depends on the ops alone.
    """
    fixed, timed = _policies(blocks, coverages)
    return [*fixed, *timed]


def timed_policies(blocks: list[BlockOps], coverages: tuple[float, ...] = (0.8, 0.95)) -> list[str]:
    """The options of :func:`candidate_policies` chosen by measured op times (the coverage
    prefixes): a profile on a busier moment may propose others, and planning must not rely on
    them for a floor that a later profile has to reach again."""
    return _policies(blocks, coverages)[1]


def _policies(blocks: list[BlockOps], coverages: tuple[float, ...]) -> tuple[list[str], list[str]]:
    """(options chosen from the ops alone, options chosen from their measured times)."""
    seconds: dict[str, float] = {}
    saved: dict[str, int] = {}
    written = {stats.op for block in blocks for stats in block.ops.values() if stats.written_later}
    for block in blocks:
        for stats in block.ops.values():
            if stats.saved_bytes > 0 and saveable(stats.op) and not stats.random:
                seconds[stats.op] = seconds.get(stats.op, 0.0) + stats.seconds
                saved[stats.op] = saved.get(stats.op, 0) + stats.saved_bytes
    ranked = sorted(
        (op for op in seconds if op not in written),
        key=lambda op: seconds[op] / saved[op],
        reverse=True,
    )
    total = sum(seconds[op] for op in ranked)
    fixed: list[str] = []
    timed: list[str] = []
    matmuls = frozenset(op for op in ranked if op in MATMUL_OPS)
    if matmuls and not written & MATMUL_OPS:
        fixed.append("selective:matmul")
    elif matmuls:
        fixed.append("selective:save=" + "+".join(short_op_name(op) for op in sorted(matmuls)))
    chosen_sets: list[frozenset[str]] = [matmuls]
    for coverage in coverages:
        covered, prefix = 0.0, []
        for op in ranked:
            if covered >= coverage * total:
                break
            prefix.append(op)
            covered += seconds[op]
        if prefix and frozenset(prefix) not in chosen_sets:
            chosen_sets.append(frozenset(prefix))
            timed.append("selective:save=" + "+".join(short_op_name(op) for op in prefix))
    return fixed, timed
