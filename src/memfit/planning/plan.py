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
  and Megatron's "checkpoint to CPU").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

PLAN_FORMAT_VERSION = 1


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


Item = Union[Stage, Segment]  # noqa: UP007 (used at runtime by isinstance-free code paths)
Tree = tuple[Item, ...]


def keep_tree(start: int, stop: int) -> Tree:
    """Every stage of ``[start, stop)`` kept."""
    return tuple(Stage(i) for i in range(start, stop))


def recompute_one(index: int) -> Segment:
    """Stage ``index`` recomputed as a whole in backward (torch's plain checkpoint)."""
    return Segment(index, index + 1, (Stage(index),))


def validate_tree(tree: Sequence[Item], start: int, stop: int, where: str = "plan") -> None:
    """Check that ``tree`` partitions ``[start, stop)`` in order, recursively.

    Raises:
        ValueError: naming the first item that breaks the rule.
    """
    position = start
    for item in tree:
        if isinstance(item, Stage):
            if item.index != position:
                raise ValueError(f"{where}: expected stage {position}, found stage {item.index}")
            if not isinstance(item.option, str) or not item.option:
                raise ValueError(f"{where}: stage {item.index} has no option name")
            position += 1
        elif isinstance(item, Segment):
            if item.start != position or not item.start < item.stop <= stop:
                raise ValueError(
                    f"{where}: expected a segment starting at {position} and ending by {stop}, "
                    f"found [{item.start}, {item.stop})"
                )
            validate_tree(item.inner, item.start, item.stop, f"{where} > segment {item.start}")
            position = item.stop
        else:
            raise ValueError(f"{where}: items are Stage or Segment; found {item!r}")
    if position != stop:
        raise ValueError(f"{where}: covers [{start}, {position}) but must cover [{start}, {stop})")


def tree_to_data(tree: Sequence[Item]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in tree:
        if isinstance(item, Stage):
            out.append({"stage": item.index, "option": item.option})
        else:
            entry: dict[str, Any] = {"segment": [item.start, item.stop]}
            if item.offload:
                entry["offload"] = True
            entry["inner"] = tree_to_data(item.inner)
            out.append(entry)
    return out


def tree_from_data(data: Any) -> Tree:
    if not isinstance(data, list):
        raise ValueError(f"plan tree must be a JSON list; got {type(data).__name__}")
    items: list[Item] = []
    for entry in data:
        if isinstance(entry, dict) and "stage" in entry:
            items.append(Stage(int(entry["stage"]), str(entry.get("option", "keep"))))
        elif isinstance(entry, dict) and "segment" in entry:
            start, stop = entry["segment"]
            inner = tree_from_data(entry.get("inner", []))
            items.append(Segment(int(start), int(stop), inner, bool(entry.get("offload", False))))
        else:
            raise ValueError(
                f'plan tree items are {{"stage": i, "option": name}} or '
                f'{{"segment": [start, stop], "inner": [...]}}; got {entry!r}'
            )
    return tuple(items)


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
        info: JSON-ready facts (solver details, what each option saves; ``inexact``: the
            stages whose option is exact to rounding only, see :attr:`exact`).
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
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_names", tuple(self.stage_names))
        object.__setattr__(self, "tree", tuple(self.tree))
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
        unplanned model's; ``False`` when one is exact to rounding only (``info["inexact"]``:
        stage name -> which, e.g. ``head:chunked``, chosen from a profile made with
        ``exact=False``)."""
        return not self.info.get("inexact")

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
            "info": dict(self.info),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise ValueError(f"a plan is a JSON object; got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"plan format {data.get('format')!r} is not supported; "
                f"expected {PLAN_FORMAT_VERSION} (re-run `memfit plan`)"
            )
        missing = [key for key in ("stage_names", "tree", "strategy") if key not in data]
        if missing:
            raise ValueError(f"plan JSON lacks {missing}; re-create it with `memfit plan`")
        budget = data.get("budget_bytes")
        step = data.get("step", {})
        if not isinstance(step, Mapping):
            raise ValueError(
                f'plan "step" is an object such as {{"keep_output": true}}; got {step!r}'
            )
        return cls(
            stage_names=tuple(str(name) for name in data["stage_names"]),
            tree=tree_from_data(data["tree"]),
            strategy=str(data["strategy"]),
            budget_bytes=None if budget is None else int(budget),
            predicted_peak_bytes=int(data.get("predicted_peak_bytes", 0)),
            predicted_step_s=float(data.get("predicted_step_s", 0.0)),
            fingerprint=str(data.get("fingerprint", "")),
            keep_output=bool(step.get("keep_output", True)),
            accumulate=bool(step.get("accumulate", False)),
            info=dict(data.get("info", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"plan is not valid JSON: {error}") from None
        return cls.from_dict(data)
