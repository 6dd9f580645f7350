"""The Plan: how every stage of the chain runs, as plain data (JSON in, JSON out, no pickle).

A plan is a *schedule tree* over the chain ``[0, n)``: a list of items that partition it, in order.
Each item is either

* ``Stage(index, option)``: stage ``index`` runs with ``option`` (``keep``, ``selective:<policy>``,
  ``offload``...), or
* ``Segment(start, stop, inner)``: stages ``start..stop-1`` run once without saving anything but
  ``start``'s input, and are recomputed in backward following ``inner``, itself a schedule tree
  over ``[start, stop)``. One recomputed block is ``Segment(i, i + 1, (Stage(i, "keep"),))``;
  nesting gives the multi-level schedules of the Rotor dynamic program. A top-level segment
  with ``offload=True`` also moves that input to host memory until its recompute (DeepSpeed's
  and Megatron's "checkpoint to CPU"); ``offload_skips`` names skip connections (``(maker,
  reader)`` stages, ``ChainCosts.skips``) that its no-save forward would leave on the device
  and that wait in host memory until their readers' forwards instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

from memfit.errors import PlanFormatError
from memfit.planning.fields import array, boolean, fail, integer, json_data, number, record, text

PLAN_FORMAT_VERSION = 1
MAX_NESTING = 64  # segments within segments; the runtime recurses once per level


@dataclass(frozen=True, slots=True)
class Stage:
    """Run stage ``index`` with ``option``."""

    index: int
    option: str = "keep"


@dataclass(frozen=True, slots=True)
class Segment:
    """Recompute stages ``start..stop-1`` in backward, following the inner schedule."""

    start: int
    stop: int
    inner: tuple[Item, ...]
    offload: bool = False  # the segment's input waits in host memory (top level only)
    # the skips the model holds past its no-save forward wait in host memory (top level only)
    offload_skips: tuple[tuple[int, int], ...] = ()


Item = Union[Stage, Segment]  # noqa: UP007 (used at runtime by isinstance-free code paths)
Tree = tuple[Item, ...]


def keep_tree(start: int, stop: int) -> Tree:
    """Every stage of ``[start, stop)`` kept."""
    return tuple(Stage(i) for i in range(start, stop))


def recompute_one(index: int) -> Segment:
    """Stage ``index`` recomputed as a whole in backward (torch's plain checkpoint)."""
    return Segment(index, index + 1, (Stage(index),))


def validate_tree(tree: Sequence[Item], start: int, stop: int, where: str = "plan") -> None:
    """Check that ``tree`` partitions ``[start, stop)`` in order, recursively, with segments
    nested at most :data:`MAX_NESTING` deep and none the same as the segment it is in.

    Raises:
        PlanFormatError: naming the first item that breaks the rule (a ``ValueError``).
    """
    _validate(tree, start, stop, where, parent=None, depth=0)


def _validate(
    tree: Sequence[Item],
    start: int,
    stop: int,
    where: str,
    *,
    parent: tuple[int, int] | None,
    depth: int,
) -> None:
    position = start
    for item in tree:
        if isinstance(item, Stage):
            if item.index != position:
                raise PlanFormatError(
                    f"{where}: expected stage {position}, found stage {item.index}"
                )
            if not isinstance(item.option, str) or not item.option:
                raise PlanFormatError(f"{where}: stage {item.index} has no option name")
            position += 1
        elif isinstance(item, Segment):
            if item.start != position or not item.start < item.stop <= stop:
                raise PlanFormatError(
                    f"{where}: expected a segment starting at {position} and ending by {stop}, "
                    f"found [{item.start}, {item.stop})"
                )
            if parent == (item.start, item.stop):
                raise PlanFormatError(
                    f"{where}: segment [{item.start}, {item.stop}) is the same as its parent; "
                    f"a segment holds shorter segments only (put its inner items in its place)"
                )
            if depth >= MAX_NESTING:
                raise PlanFormatError(
                    f"{where}: segments nested deeper than {MAX_NESTING} levels (each level "
                    f"recomputes within a recompute; memfit's solvers nest a few)"
                )
            inner_where = f"{where} > segment {item.start}" if depth < 4 else where
            _validate(
                item.inner,
                item.start,
                item.stop,
                inner_where,
                parent=(item.start, item.stop),
                depth=depth + 1,
            )
            position = item.stop
        else:
            raise PlanFormatError(f"{where}: items are Stage or Segment; found {item!r}")
    if position != stop:
        raise PlanFormatError(
            f"{where}: covers [{start}, {position}) but must cover [{start}, {stop})"
        )


def tree_to_data(tree: Sequence[Item]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in tree:
        if isinstance(item, Stage):
            out.append({"stage": item.index, "option": item.option})
        else:
            entry: dict[str, Any] = {"segment": [item.start, item.stop]}
            if item.offload:
                entry["offload"] = True
            if item.offload_skips:
                entry["offload_skips"] = [list(pair) for pair in item.offload_skips]
            entry["inner"] = tree_to_data(item.inner)
            out.append(entry)
    return out


_PLAN_KEYS = (
    "format",
    "stage_names",
    "tree",
    "strategy",
    "budget_bytes",
    "predicted_peak_bytes",
    "predicted_step_s",
    "fingerprint",
    "step",
    "info",
)
_STAGE_KEYS = ("stage", "option")
# the Plan's typed fields that the JSON keeps under "info" (format 1), and the free-form keys
# written after them there
TYPED_INFO = ("compile", "inexact", "notes", "max_error")
_LATER_INFO = ("setup_steps", "timed", "chosen_by", "shape", "margin")
_SEGMENT_KEYS = ("segment", "inner", "offload", "offload_skips")


def tree_from_data(data: Any, field: str = "tree", depth: int = 0) -> Tree:
    """The schedule tree of a plan's JSON ``tree``, read by type (see :mod:`.fields`).

    Raises:
        PlanFormatError: naming the field, such as ``tree[1].inner[0].segment``.
    """
    items: list[Item] = []
    for position, entry in enumerate(array(data, field)):
        where = f"{field}[{position}]"
        if isinstance(entry, Mapping) and "segment" in entry:
            record(entry, where, _SEGMENT_KEYS, required=("segment", "inner"))
            bounds = array(entry["segment"], f"{where}.segment")
            if len(bounds) != 2:
                raise fail(f"{where}.segment", "[start, stop]", bounds)
            start, stop = (integer(b, f"{where}.segment") for b in bounds)
            if depth >= MAX_NESTING:  # before reading deeper: no recursion without limit
                top = where.partition(".")[0]
                raise PlanFormatError(
                    f'plan field "{top}": segments nested deeper than {MAX_NESTING} levels'
                )
            inner = tree_from_data(entry["inner"], f"{where}.inner", depth + 1)
            offload = boolean(entry.get("offload", False), f"{where}.offload")
            skips = _skip_pairs(entry.get("offload_skips", []), f"{where}.offload_skips")
            items.append(Segment(start, stop, inner, offload, skips))
        elif isinstance(entry, Mapping) and "stage" in entry:
            record(entry, where, _STAGE_KEYS)
            index = integer(entry["stage"], f"{where}.stage")
            option = text(entry.get("option", "keep"), f"{where}.option", empty=False)
            items.append(Stage(index, option))
        else:
            raise fail(
                where,
                '{"stage": i, "option": name} or {"segment": [start, stop], "inner": [...]}',
                entry,
            )
    return tuple(items)


def _skip_pairs(data: Any, field: str) -> tuple[tuple[int, int], ...]:
    """A segment's ``offload_skips``: a list of ``[maker, reader]`` stage pairs."""
    pairs = []
    for position, pair in enumerate(array(data, field)):
        where = f"{field}[{position}]"
        values = array(pair, where)
        if len(values) != 2:
            raise fail(where, "[maker, reader]", values)
        maker, reader = (integer(value, where) for value in values)
        pairs.append((maker, reader))
    return tuple(pairs)


def _info_object(data: Any) -> Mapping[str, Any]:
    """A plan's JSON ``info``: an object of free-form JSON data (see :func:`.fields.json_data`)."""
    info = json_data(data, "info")
    if not isinstance(info, Mapping):
        raise fail("info", "a JSON object", info)
    return info


def stage_options(tree: Sequence[Item]) -> dict[int, str]:
    """Stage index -> how it runs at the top level: its option, or ``recompute``."""
    out: dict[int, str] = {}
    for item in tree:
        if isinstance(item, Stage):
            out[item.index] = item.option
        else:
            for index in range(item.start, item.stop):
                out[index] = "recompute"
            if item.offload:
                out[item.start] = "recompute+offload"
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """A schedule for the chain plus what it is predicted to cost.

    Attributes:
        stage_names: the chain's stage names, in order (checked against the model on apply).
        tree: the schedule tree over ``[0, len(stage_names))``.
        strategy: the solver that made it (``optimal``, ``sqrt``, ``every:2``, ...).
        budget_bytes: the budget it was made for (``None``: no budget).
        predicted_peak_bytes: the simulator's step peak.
        predicted_step_s: the simulator's step time.
        fingerprint: the profile's fingerprint (model structure, shapes, dtypes).
        keep_output: the training loop it was made for: ``True`` when the model's output
            stays alive through backward (``out = model(**b); out.loss.backward()``), ``False``
            when only the loss does. ``verify`` measures the same loop.
        accumulate: made for the gradient-accumulation steady state (gradients exist before
            the step).
        compile: the ``torch.compile`` arguments the blocks were profiled with (``None``:
            eager blocks); :func:`memfit.apply` compiles the blocks with them, when they pass
            its allow-list (:func:`~memfit.runtime.compiled.plan_compile_options`: a plan
            file never configures the compiler).
        inexact: stage name -> why its option is exact to rounding only (``head:chunked``,
            from a profile made with ``exact=False``); empty for a plan bit-identical to the
            unplanned model (see :attr:`exact`).
        notes: what the profile left out of the menu, and why (offload on CPU, ``rebuild``
            on compiled blocks...).
        max_error: the error budget the plan was made under (``plan(..., max_error=...)``):
            the largest relative gradient error of any parameter group that a lossy option
            may bring, as :func:`memfit.verify` measures it; ``None``: none given.
        info: free-form JSON facts for people and tables (solver details, what each option
            saves, solve and setup seconds, the plans timed); no behaviour reads it.

    In the JSON (:meth:`to_dict`), ``compile``, ``inexact`` and ``notes`` sit under ``"info"``
    as they did before they were fields (format 1), so that plan files and the tools reading
    them keep working both ways.
    """

    stage_names: tuple[str, ...]
    tree: Tree
    strategy: str
    predicted_peak_bytes: int
    predicted_step_s: float
    budget_bytes: int | None = None
    fingerprint: str = ""
    keep_output: bool = True
    accumulate: bool = False
    compile: Any = None
    inexact: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    max_error: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_names", tuple(self.stage_names))
        object.__setattr__(self, "tree", tuple(self.tree))
        object.__setattr__(self, "inexact", dict(self.inexact))
        object.__setattr__(self, "notes", tuple(self.notes))
        typed = sorted(set(self.info) & set(TYPED_INFO))
        if typed:
            raise ValueError(
                f"Plan info {typed}: these are the plan's fields now "
                f"({', '.join(f'Plan.{key}' for key in typed)}); pass them as such"
            )
        validate_tree(self.tree, 0, len(self.stage_names))

    @classmethod
    def from_tree(cls, stage_names: Sequence[str], tree: Sequence[Item], strategy: str) -> Plan:
        """A plan written by hand (or by a baseline) with no predictions attached."""
        return cls(
            stage_names=tuple(stage_names),
            tree=tuple(tree),
            strategy=strategy,
            predicted_peak_bytes=0,
            predicted_step_s=0.0,
        )

    @property
    def options(self) -> dict[str, str]:
        """Stage name -> ``keep``/``recompute``/``selective:...``, at the top level."""
        by_index = stage_options(self.tree)
        return {name: by_index[i] for i, name in enumerate(self.stage_names)}

    @property
    def summary(self) -> str:
        """How the blocks run, counted, and the ``<...>`` stages that do not just keep:
        ``"1 keep, 6 rebuild+ops, 1 recompute; <post> head:lean-loss"``."""
        counts: dict[str, int] = {}
        ends = []
        for name, option in self.options.items():
            if name.startswith("<"):
                if option != "keep":
                    ends.append(f"; {name} {option}")
            else:
                counts[option] = counts.get(option, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + "".join(ends)

    @property
    def exact(self) -> bool:
        """Whether every option of the plan keeps gradients and loss bit-identical to the
        unplanned model's; ``False`` when one is exact to rounding only (:attr:`inexact`:
        stage name -> which, e.g. ``head:chunked``, chosen from a profile made with
        ``exact=False``)."""
        return not self.inexact

    def for_loop(self, *, keep_output: bool, accumulate: bool) -> Plan:
        """This plan stamped with the training loop it is for (the loop the profile
        measured): ``verify`` measures that loop again and :attr:`loop` names it."""
        return replace(self, keep_output=keep_output, accumulate=accumulate)

    @property
    def loop(self) -> str:
        """The training loop the plan was made for, in words (tables, summaries)."""
        kept = "output kept through backward" if self.keep_output else "only the loss kept"
        return kept + (", gradient accumulation" if self.accumulate else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT_VERSION,
            "stage_names": list(self.stage_names),
            "tree": tree_to_data(self.tree),
            "strategy": self.strategy,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_step_s": self.predicted_step_s,
            "fingerprint": self.fingerprint,
            "step": {"keep_output": self.keep_output, "accumulate": self.accumulate},
            "info": self._info_data(),
        }

    def _info_data(self) -> dict[str, Any]:
        """``info`` as the JSON holds it: the typed fields under their keys of format 1, in
        the place they had there (after the solver's facts, before setup and timing)."""
        typed: dict[str, Any] = {}
        if self.inexact:
            typed["inexact"] = dict(self.inexact)
        if self.compile is not None:
            typed["compile"] = self.compile
        if self.notes:
            typed["notes"] = list(self.notes)
        if self.max_error is not None:
            typed["max_error"] = self.max_error
        out: dict[str, Any] = {}
        for key, value in self.info.items():
            if key in _LATER_INFO:
                out |= typed
                typed = {}
            out[key] = value
        return out | typed

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The plan of :meth:`to_dict`'s data, read by type field by field (nothing converted:
        ``"false"`` is not false, ``0.7`` is not a stage).

        Raises:
            PlanFormatError: a ``ValueError`` naming the field, what came and what was expected.
        """
        if not isinstance(data, Mapping):
            raise PlanFormatError(f"a plan is a JSON object; got {type(data).__name__}")
        version = data.get("format")
        if isinstance(version, bool) or version != PLAN_FORMAT_VERSION:
            raise PlanFormatError(
                f'plan field "format": {version!r} is not supported; expected '
                f"{PLAN_FORMAT_VERSION} (re-create the plan with `memfit plan`)"
            )
        missing = [key for key in ("stage_names", "tree", "strategy") if key not in data]
        if missing:
            raise PlanFormatError(f"plan JSON lacks {missing}; re-create it with `memfit plan`")
        record(data, "", _PLAN_KEYS)
        names = tuple(
            text(name, f"stage_names[{i}]", empty=False)
            for i, name in enumerate(array(data["stage_names"], "stage_names"))
        )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise fail("stage_names", f"distinct names ({repeated} repeat)", list(names))
        budget = data.get("budget_bytes")
        step = record(data.get("step", {}), "step", ("keep_output", "accumulate"))
        info = dict(_info_object(data.get("info", {})))
        compile = info.pop("compile", None)
        inexact = info.pop("inexact", {})
        if not isinstance(inexact, Mapping) or not all(
            isinstance(why, str) for why in inexact.values()
        ):
            raise fail("info.inexact", "an object of stage names and strings", inexact)
        notes = tuple(
            text(note, f"info.notes[{i}]")
            for i, note in enumerate(array(info.pop("notes", []), "info.notes"))
        )
        max_error = info.pop("max_error", None)
        return cls(
            stage_names=names,
            tree=tree_from_data(data["tree"]),
            strategy=text(data["strategy"], "strategy"),
            budget_bytes=None if budget is None else integer(budget, "budget_bytes"),
            predicted_peak_bytes=integer(
                data.get("predicted_peak_bytes", 0), "predicted_peak_bytes"
            ),
            predicted_step_s=number(data.get("predicted_step_s", 0.0), "predicted_step_s"),
            fingerprint=text(data.get("fingerprint", ""), "fingerprint"),
            keep_output=boolean(step.get("keep_output", True), "step.keep_output"),
            accumulate=boolean(step.get("accumulate", False), "step.accumulate"),
            compile=compile,
            inexact=inexact,
            notes=notes,
            max_error=None if max_error is None else number(max_error, "info.max_error"),
            info=info,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan of :meth:`to_json`'s text (see :meth:`from_dict`).

        Raises:
            PlanFormatError: not JSON, nested too deeply for Python's JSON reader, or a field
                of the wrong type (named).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlanFormatError(f"plan is not valid JSON: {error}") from None
        except RecursionError:
            raise PlanFormatError(
                f"plan JSON is nested too deeply to read (a plan nests at most {MAX_NESTING} "
                f"segments); it was not made by memfit"
            ) from None
        return cls.from_dict(data)
