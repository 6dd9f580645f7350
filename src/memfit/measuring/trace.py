"""Op traces of a training step: the structural proof that a plan computes what the model does.

Two steps that run the same aten ops on the same shapes, strides and dtypes take the same kernels
on any CPU or GPU, and so round the same way. Comparing gradients with ``torch.equal`` on one
machine cannot show that: two layouts may take kernels that happen to agree there and differ on
the next machine. So :func:`trace_step` records every op of a step under a
``TorchDispatchMode``: its name and the shape, stride and dtype of each tensor argument, in the
phase it ran in (``forward``; ``backward``; ``recompute``, a forward op run during backward: a
checkpoint's rerun), and :func:`compare_traces` holds a planned step against the plain one:

* the planned forward runs the plain forward's ops, in order, op for op;
* the planned backward (without its recomputes) runs the plain backward's ops, op for op;
* each recompute (a run of consecutive recompute ops) is a subsequence of the plain forward: a
  rerun may stop early, and selective checkpointing returns the ops it saved without rerunning
  them, but nothing is computed that the plain forward did not compute on the same layouts.

Some options replace ops by design: ``head:lean-loss`` computes the same cross-entropy with other
ops, row chunk by row chunk. Their ops run inside a region marked :func:`by_design` (forward:
around the call; backward: :func:`by_design_backward`, from the replaced computation's output
node until its input's gradient is made), in the planned step where the option runs and in the
plain step around the call it would replace. :func:`compare_traces` cuts those regions out of
both steps, requires the same regions (same labels) at the same places, and compares every
other op as above; :func:`exempt_regions` says what was cut.

Ops that cannot round are left out of the comparison: views and other aliases, copies and
clones, fills and allocations, and ops without a floating-point output (comparisons, indices,
masks). They are what memfit's runtime adds around the model's own ops (moving saved tensors to
the host and back, packing masks, checking versions); every op that computes floating-point
values is compared.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memfit.measuring.ops import out_of_place_twin

FORWARD, BACKWARD, RECOMPUTE = "forward", "backward", "recompute"

# ops that move, alias, allocate or fill memory: exact on every machine
_NEUTRAL = frozenset(
    {
        "aten.detach",
        "aten.alias",
        "aten.lift_fresh",
        "aten.lift_fresh_copy",
        "aten._to_copy",
        "aten.copy_",
        "aten.copy",
        "aten.clone",
        "aten.contiguous",
        "aten.empty",
        "aten.empty_like",
        "aten.empty_strided",
        "aten.new_empty",
        "aten.new_empty_strided",
        "aten.zeros",
        "aten.zeros_like",
        "aten.new_zeros",
        "aten.ones",
        "aten.ones_like",
        "aten.new_ones",
        "aten.full",
        "aten.full_like",
        "aten.new_full",
        "aten.fill_",
        "aten.zero_",
        "aten.set_",
        "aten.resize_",
        "aten._pin_memory",
        "aten.scalar_tensor",
        "aten.arange",
    }
)


class _State(threading.local):
    depth = 0  # rerunning() levels
    run = 0  # reruns so far
    hidden = 0  # bookkeeping() levels
    recording = 0  # tracing() levels
    design: str | None = None  # the by-design region the ops run in


_state = _State()


@contextmanager
def rerunning() -> Iterator[None]:
    """Ops inside are one recompute run (a block's rerun in backward), whatever the grad mode."""
    before = _state.depth
    if not before:
        _state.run += 1
    _state.depth = before + 1
    try:
        yield
    finally:
        _state.depth = before


@contextmanager
def bookkeeping() -> Iterator[None]:
    """Ops inside are memfit's own, exact by construction (probes, packing a mask checked bit for
    bit): not recorded."""
    before = _state.hidden
    _state.hidden = before + 1
    try:
        yield
    finally:
        _state.hidden = before


def recording() -> bool:
    """Whether a :func:`tracing` records this thread's ops (by-design regions need backward
    hooks only then)."""
    return _state.recording > 0


@contextmanager
def by_design(label: str) -> Iterator[None]:
    """Ops inside replace other ops by design (an option's own computation, or in the plain step
    the computation it replaces); ``label`` names the option and the call, the same in both
    steps."""
    before = _state.design
    _state.design = label
    try:
        yield
    finally:
        _state.design = before


class _BackwardRegion:
    """Entered by the output node's pre-hook, left by the input's gradient hook."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.before: str | None = None
        self.inside = False

    def enter(self, *_: Any) -> None:
        if not self.inside:
            self.before, _state.design, self.inside = _state.design, self.label, True

    def leave(self, *_: Any) -> None:
        if self.inside:
            _state.design, self.inside = self.before, False


def by_design_backward(label: str, output: torch.Tensor, source: torch.Tensor) -> None:
    """Mark ``output``'s backward as by design (``label``) until ``source``'s gradient is made:
    the backward of what :func:`by_design` computed from ``source`` in forward. Only while
    recording (the hooks stay on the tensors as long as the graph lives)."""
    if not recording() or output.grad_fn is None or not source.requires_grad:
        return
    region = _BackwardRegion(label)
    output.grad_fn.register_prehook(region.enter)
    source.register_hook(region.leave)


@dataclass(frozen=True, slots=True)
class OpCall:
    """One aten op as a kernel sees it.

    Attributes:
        op: the overload's name (``aten.mm.default``); a pointwise op run in place
            (``aten.mul_.Tensor``) is named as its out-of-place twin (the same kernel, element
            by element, on the same layouts), with ``in_place`` set.
        tensors: ``(shape, stride, dtype)`` of each tensor argument, in argument order.
        phase: ``forward``, ``backward`` or ``recompute``.
        run: which rerun a recompute op belongs to (``None``: not inside :func:`rerunning`).
        in_place: the op ran in place.
        design: the :func:`by_design` region the op ran in (``None``: none, compared).
    """

    op: str
    tensors: tuple[tuple[tuple[int, ...], tuple[int, ...], str], ...]
    phase: str
    run: int | None = None
    in_place: bool = False
    design: str | None = None

    @property
    def key(self) -> tuple[str, tuple[tuple[tuple[int, ...], tuple[int, ...], str], ...]]:
        """What must match between two steps (the op and its layouts)."""
        return self.op, self.tensors

    def __str__(self) -> str:
        layouts = ", ".join(
            f"{dtype.removeprefix('torch.')}{list(shape)} stride {list(stride)}"
            for shape, stride, dtype in self.tensors
        )
        return f"{self.op}{' in place' if self.in_place else ''}({layouts})"


@dataclass
class Trace:
    """The compared ops of one step, in the order they ran."""

    calls: list[OpCall] = field(default_factory=list)

    def phase(self, name: str) -> list[OpCall]:
        return [call for call in self.calls if call.phase == name]

    def recomputes(self) -> list[list[OpCall]]:
        """Each rerun: consecutive recompute ops of one :func:`rerunning` run."""
        runs: list[list[OpCall]] = []
        previous: OpCall | None = None
        for call in self.calls:
            if call.phase == RECOMPUTE:
                if previous is None or previous.phase != RECOMPUTE or previous.run != call.run:
                    runs.append([])
                runs[-1].append(call)
            previous = call
        return runs


@functools.cache
def _recorded_name(op: Any) -> tuple[str, bool] | None:
    """How :class:`_Recorder` names ``op`` (``None``: a neutral op, not recorded): the
    overload's name or its out-of-place twin's, and whether it runs in place. Once per op: the
    recorder sees every op of a step."""
    if _neutral(op):
        return None
    twin = out_of_place_twin(op)
    return (str(op), False) if twin is None else (twin, True)


def _tensors(value: Any, found: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in an aten op's arguments or results, in ``tree_flatten``'s order: aten
    schemas nest at most lists (``Tensor[]``, ``Tensor?[]``) in tuples and the kwargs dict, and
    a walk of those costs a fraction of the general pytree's."""
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, found)
    return found


@functools.cache
def _neutral(op: Any) -> bool:
    name = str(op)
    packet = name.rpartition(".")[0]
    if packet in _NEUTRAL or packet.startswith("prim") or not name.startswith("aten."):
        return True
    schema = op._schema
    # a view: every result aliases an argument without writing it
    return bool(schema.returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
    )


@functools.cache
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)


def _describe(value: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    if value.layout != torch.strided:
        return tuple(value.shape), (), _dtype_name(value.dtype)
    return tuple(value.shape), tuple(value.stride()), _dtype_name(value.dtype)


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        named = None if _state.hidden else _recorded_name(func)
        if named is None:
            return out
        outputs = _tensors(out, [])
        if not any(o.is_floating_point() or o.is_complex() for o in outputs):
            return out  # integers and booleans: exact everywhere
        inputs = _tensors(kwargs, _tensors(args, []))
        run = _state.run if _state.depth else None
        if torch._C._current_graph_task_id() == -1:
            phase = FORWARD
        elif torch.is_grad_enabled() or run is not None:
            phase = RECOMPUTE
        else:
            phase = BACKWARD
        layouts = tuple(_describe(a) for a in inputs)
        call = OpCall(named[0], layouts, phase, run, named[1], _state.design)
        self.trace.calls.append(call)
        return out


@contextmanager
def tracing() -> Iterator[Trace]:
    """Record the compared ops run inside (this thread)."""
    trace = Trace()
    design = _state.design
    _state.recording += 1
    try:
        with _Recorder(trace):
            yield trace
    finally:
        _state.recording -= 1
        _state.design = design  # a backward that failed inside a region never left it


@dataclass(frozen=True, slots=True)
class TraceDifference:
    """The first place where a planned step computes something the plain step does not.

    Attributes:
        where: ``forward``, ``backward`` or ``recompute <k>``.
        index: position of the op in that part (compared ops only).
        planned: the planned step's op there (``None``: the planned part ended early).
        plain: the plain step's op there (``None``: it has no such op).
        note: what else is known (a by-design region in one step only, or other ones).
    """

    where: str
    index: int
    planned: OpCall | None
    plain: OpCall | None
    note: str = ""

    def __str__(self) -> str:
        return (
            f"{self.where}, compared op {self.index}: the planned step runs "
            f"{self.planned or 'nothing more'}, the plain step "
            f"{self.plain or 'nothing more'}{f' ({self.note})' if self.note else ''}"
        )


@dataclass(frozen=True, slots=True)
class _Cut:
    """Consecutive ops of one by-design region: exempt from the comparison as a whole."""

    label: str
    calls: list[OpCall]


def _parts(calls: Sequence[OpCall]) -> list[OpCall | _Cut]:
    parts: list[OpCall | _Cut] = []
    for call in calls:
        if call.design is None:
            parts.append(call)
        elif parts and isinstance(parts[-1], _Cut) and parts[-1].label == call.design:
            parts[-1].calls.append(call)
        else:
            parts.append(_Cut(call.design, [call]))
    return parts


def _cut_note(planned: OpCall | _Cut | None, plain: OpCall | _Cut | None) -> str:
    if isinstance(planned, _Cut) and isinstance(plain, _Cut):
        return f"by design: {planned.label!r} in the planned step, {plain.label!r} in the plain"
    if isinstance(planned, _Cut):
        return f"by design in the planned step only: {planned.label}"
    assert isinstance(plain, _Cut)
    return f"by design in the plain step only: {plain.label}"


def _first_difference(
    where: str, planned: Sequence[OpCall], plain: Sequence[OpCall]
) -> TraceDifference | None:
    planned_parts, plain_parts = _parts(planned), _parts(plain)
    compared = 0
    for index in range(max(len(planned_parts), len(plain_parts))):
        a = planned_parts[index] if index < len(planned_parts) else None
        b = plain_parts[index] if index < len(plain_parts) else None
        if isinstance(a, _Cut) or isinstance(b, _Cut):
            if isinstance(a, _Cut) and isinstance(b, _Cut) and a.label == b.label:
                continue  # the same region in both: its ops differ by design
            return TraceDifference(
                where,
                compared,
                a.calls[0] if isinstance(a, _Cut) else a,
                b.calls[0] if isinstance(b, _Cut) else b,
                _cut_note(a, b),
            )
        if a is None or b is None or a.key != b.key:
            return TraceDifference(where, compared, a, b)
        compared += 1
    return None


def compare_traces(plain: Trace, planned: Trace) -> TraceDifference | None:
    """The first difference between a plain step's trace and a planned step's (``None``: the
    planned step computes exactly what the plain step does, on the same layouts).

    By-design regions (:func:`by_design`) are cut out of both forwards and both backwards: the
    same regions must stand at the same places (same labels, in order), and every op outside
    them is compared op for op."""
    plain_forward = plain.phase(FORWARD)
    difference = _first_difference(FORWARD, planned.phase(FORWARD), plain_forward)
    if difference is None:
        difference = _first_difference(BACKWARD, planned.phase(BACKWARD), plain.phase(BACKWARD))
    if difference is not None:
        return difference
    keys = [call.key for call in plain_forward if call.design is None]
    for number, run in enumerate(planned.recomputes()):
        position = 0  # greedy: a subsequence of the plain forward, in order
        for index, call in enumerate(c for c in run if c.design is None):
            while position < len(keys) and keys[position] != call.key:
                position += 1
            if position == len(keys):
                same = next((c for c in plain_forward if c.key == call.key), None)
                if same is not None:  # the op is the plain forward's, its place is not
                    note = "the plain forward runs it only before the ops matched so far"
                else:
                    same = next((c for c in plain_forward if c.op == call.op), None)
                    note = "" if same is None else "no op of the plain forward on these layouts"
                return TraceDifference(f"recompute {number}", index, call, same, note)
            position += 1
    return None


def _ops(calls: Sequence[OpCall]) -> str:
    counts: dict[str, int] = {}
    for call in calls:
        counts[call.op] = counts.get(call.op, 0) + 1
    return ", ".join(op if n == 1 else f"{op} x{n}" for op, n in counts.items())


def exempt_regions(plain: Trace, planned: Trace) -> tuple[str, ...]:
    """What :func:`compare_traces` cut out by design, region by region (forward, then
    backward): its label and the ops of each step there."""
    lines: list[str] = []
    for phase in (FORWARD, BACKWARD):
        plain_cuts = [p for p in _parts(plain.phase(phase)) if isinstance(p, _Cut)]
        planned_cuts = [p for p in _parts(planned.phase(phase)) if isinstance(p, _Cut)]
        for a, b in zip(planned_cuts, plain_cuts, strict=False):
            lines.append(
                f"{a.label} ({phase}): the plain step's {_ops(b.calls)} replaced by {_ops(a.calls)}"
            )
    return tuple(lines)
