"""Plan JSON is data, read by type field by field: nothing is reinterpreted, every error names
its field, nesting is bounded (no RecursionError, no stack overflow in training)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from memfit.errors import MemfitError, PlanFormatError
from memfit.planning import Plan, Segment, Stage
from memfit.planning.plan import MAX_NESTING

NAMES = ("<pre>", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "<post>")


def _plan() -> Plan:
    tree = (
        Stage(0),
        Segment(1, 3, (Stage(1), Segment(2, 3, (Stage(2),))), offload=True),
        Stage(3, "selective:mm"),
        Stage(4),
        Stage(5),
    )
    return Plan(
        stage_names=NAMES,
        tree=tree,
        strategy="optimal",
        predicted_peak_bytes=1234,
        predicted_step_s=0.5,
        budget_bytes=2000,
        fingerprint="abc-def",
        notes=("a note",),
        info={"timed": [{"ratio": 1.0, "chosen": True, "error": None}]},
    )


def _data() -> dict[str, Any]:
    return copy.deepcopy(_plan().to_dict())


def test_valid_plans_round_trip() -> None:
    plan = _plan()
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_dict(plan.to_dict()) == plan


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change of ``data`` at ``path`` ("tree.1.offload"); ``value`` DELETE removes it."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        index: Any = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[index]
        else:
            node[index] = value

    return change


DELETE = object()

# (change, the field the error must name)
BAD_FIELDS = [
    # silently reinterpreted before: "false" read as True, 0.7 as 0, a string as six names
    (_set("tree.1.offload", "false"), "tree[1].offload"),
    (_set("tree.1.offload", 1), "tree[1].offload"),
    (_set("tree.0.stage", 0.7), "tree[0].stage"),
    (_set("tree.0.stage", "0"), "tree[0].stage"),
    (_set("tree.0.stage", True), "tree[0].stage"),
    (_set("stage_names", "abcdef"), "stage_names"),
    (_set("stage_names", ["<pre>", "b", "b", "c", "d", "<post>"]), "stage_names"),
    (_set("stage_names", [0, 1, 2, 3, 4, 5]), "stage_names[0]"),
    (_set("tree.1.segment", [1.0, 3]), "tree[1].segment"),
    (_set("tree.1.segment", "13"), "tree[1].segment"),
    (_set("tree.1.segment", [1, 2, 3]), "tree[1].segment"),
    (_set("tree.1.inner.1.segment", [2, True]), "tree[1].inner[1].segment"),
    (_set("tree.2.option", 3), "tree[2].option"),
    (_set("tree.2.option", ""), "tree[2].option"),
    (_set("tree.1.inner", "abc"), "tree[1].inner"),
    (_set("tree.1.inner", DELETE), "tree[1].inner"),
    (_set("tree.1.extra", 1), "tree[1].extra"),
    (_set("tree.2", "keep"), "tree[2]"),
    (_set("tree", {"stage": 0}), "tree"),
    (_set("format", True), "format"),
    (_set("format", "1"), "format"),
    (_set("strategy", 5), "strategy"),
    (_set("budget_bytes", "2000"), "budget_bytes"),
    (_set("budget_bytes", 1999.5), "budget_bytes"),
    (_set("budget_bytes", -1), "budget_bytes"),
    (_set("predicted_peak_bytes", "1234"), "predicted_peak_bytes"),
    (_set("predicted_peak_bytes", False), "predicted_peak_bytes"),
    (_set("predicted_step_s", "0.5"), "predicted_step_s"),
    (_set("predicted_step_s", -1.0), "predicted_step_s"),
    (_set("fingerprint", 3), "fingerprint"),
    (_set("step", [True]), "step"),
    (_set("step.keep_output", "false"), "step.keep_output"),
    (_set("step.accumulate", 0), "step.accumulate"),
    (_set("step.loop", True), "step.loop"),
    (_set("info", ["compile"]), "info"),
    (_set("info.notes", {1, 2}), "info.notes"),
    (_set("surprise", 1), "surprise"),
]


@pytest.mark.parametrize(
    ("change", "field"), BAD_FIELDS, ids=[f"{field}-{i}" for i, (_, field) in enumerate(BAD_FIELDS)]
)
def test_each_bad_field_is_refused_by_name(
    change: Callable[[dict[str, Any]], None], field: str
) -> None:
    data = _data()
    change(data)
    with pytest.raises(PlanFormatError) as caught:
        Plan.from_dict(data)
    assert f'"{field}"' in str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, MemfitError)


def test_offload_false_as_a_string_is_not_read_as_true() -> None:
    data = _data()
    data["tree"][1]["offload"] = "false"
    with pytest.raises(PlanFormatError, match=r'"tree\[1\].offload": expected true or false'):
        Plan.from_json(json.dumps(data))


def _nested(depth: int) -> tuple[Stage | Segment, ...]:
    inner: tuple[Stage | Segment, ...] = (Stage(1),)
    for _ in range(depth):
        inner = (Segment(1, 2, inner),)
    return inner


def _nested_plan_data(depth: int) -> dict[str, Any]:
    """A plan over 3 stages whose stage 1 is ``depth`` segments deep (built without
    recursion, as a file would hold it)."""
    node: list[Any] = [{"stage": 1, "option": "keep"}]
    for _ in range(depth):
        node = [{"segment": [1, 2], "inner": node}]
    return {
        "format": 1,
        "stage_names": ["<pre>", "blocks.0", "<post>"],
        "tree": [{"stage": 0, "option": "keep"}, *node, {"stage": 2, "option": "keep"}],
        "strategy": "by hand",
    }


def _staircase(depth: int) -> Plan:
    """A plan over ``depth + 1`` stages with ``depth`` segments, each inside the last:
    ``[0, n)`` holds stage 0 and ``[1, n)``, which holds stage 1 and ``[2, n)``..."""
    stop = depth + 1
    tree: tuple[Stage | Segment, ...] = (Stage(depth),)
    for start in range(depth - 1, -1, -1):
        tree = (Segment(start, stop, (Stage(start), *tree)),)
    return Plan.from_tree([f"s{i}" for i in range(stop)], tree, "by hand")


def test_deep_nesting_is_refused_before_training() -> None:
    # 400 copies of one segment passed validation and overflowed the stack in the first step
    with pytest.raises(PlanFormatError, match=f"nested deeper than {MAX_NESTING}"):
        Plan.from_dict(_nested_plan_data(400))
    with pytest.raises(ValueError, match="the same as its parent"):
        Plan.from_tree(NAMES[:3], (Stage(0), *_nested(400), Stage(2)), "by hand")
    # distinct segments: as deep as allowed is fine, one level more is refused
    plan = _staircase(MAX_NESTING)
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanFormatError, match=f"nested deeper than {MAX_NESTING}"):
        _staircase(MAX_NESTING + 1)
    too_deep = plan.to_dict()
    too_deep["stage_names"].append("extra")
    too_deep["tree"] = [{"segment": [0, MAX_NESTING + 2], "inner": too_deep["tree"]}]
    too_deep["tree"][0]["inner"].append({"stage": MAX_NESTING + 1, "option": "keep"})
    with pytest.raises(
        PlanFormatError, match=rf'"tree\[0\]": segments nested deeper than {MAX_NESTING}'
    ):
        Plan.from_dict(too_deep)


def test_a_segment_identical_to_its_parent_is_refused() -> None:
    with pytest.raises(ValueError, match=r"segment \[1, 2\) .*the same as its parent"):
        Plan.from_tree(NAMES[:3], (Stage(0), *_nested(2), Stage(2)), "by hand")
    with pytest.raises(PlanFormatError, match=r"segment \[1, 2\) .*the same as its parent"):
        Plan.from_dict(_nested_plan_data(2))
    # a segment within a longer parent is fine
    tree = (Segment(0, 2, (Stage(0), Segment(1, 2, (Stage(1),)))), Stage(2))
    plan = Plan.from_tree(NAMES[:3], tree, "by hand")
    assert Plan.from_dict(plan.to_dict()) == plan


def test_absurd_json_nesting_is_a_clear_value_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    text = f'{{"format": 1, "stage_names": ["a"], "strategy": "x", "tree": {deep}}}'
    with pytest.raises(PlanFormatError, match="nested too deeply"):
        Plan.from_json(text)
    info = f'{{"format": 1, "stage_names": ["a"], "strategy": "x", "tree": [], "info": {deep}}}'
    with pytest.raises(PlanFormatError, match="nested too deeply"):
        Plan.from_json(info)
    # the same depth made in Python, no JSON reader involved
    with pytest.raises(PlanFormatError, match=f"nested deeper than {MAX_NESTING}"):
        Plan.from_dict(_nested_plan_data(100_000))
    deep_info: Any = []
    for _ in range(100_000):
        deep_info = [deep_info]
    data = {**_data(), "info": {"notes": deep_info}}
    with pytest.raises(PlanFormatError, match=r'"info.notes".*nested deeper'):
        Plan.from_dict(data)


def test_not_json_at_all() -> None:
    with pytest.raises(PlanFormatError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanFormatError, match="a plan is a JSON object"):
        Plan.from_json("[1]")
    with pytest.raises(PlanFormatError, match=r"lacks \['tree'\]"):
        Plan.from_json('{"format": 1, "stage_names": [], "strategy": "x"}')


def test_for_loop_stamps_only_the_loop_and_it_round_trips() -> None:
    plan = _plan()
    stamped = plan.for_loop(keep_output=False, accumulate=True)
    assert (stamped.keep_output, stamped.accumulate) == (False, True)
    assert stamped.loop == "only the loss kept, gradient accumulation"
    unchanged = ("tree", "strategy", "predicted_peak_bytes", "fingerprint", "info")
    assert all(getattr(stamped, name) == getattr(plan, name) for name in unchanged)
    assert (plan.keep_output, plan.accumulate) == (True, False)  # frozen: a new plan
    assert Plan.from_json(stamped.to_json()) == stamped


def test_the_typed_fields_round_trip_under_info() -> None:
    plan = replace(
        _plan(),
        compile={"backend": "aot_eager", "dynamic": None},
        inexact={"c": "head:chunked: exact to rounding, not bit for bit"},
    )
    data = plan.to_dict()
    # where plan files before the fields kept them, before the free-form facts written later
    assert list(data["info"]) == ["inexact", "compile", "notes", "timed"]
    assert data["info"]["compile"] == {"backend": "aot_eager", "dynamic": None}
    again = Plan.from_json(plan.to_json())
    assert again == plan and not again.exact
    assert again.notes == ("a note",) and set(again.info) == {"timed"}


def test_typed_info_keys_are_refused_in_info() -> None:
    with pytest.raises(ValueError, match=r"Plan.compile"):
        replace(_plan(), info={"compile": {"backend": "eager"}})
    with pytest.raises(ValueError, match=r"Plan.notes"):
        replace(_plan(), info={"notes": ["a note"]})


@pytest.mark.parametrize(
    ("info", "field"),
    [
        ({"notes": "a note"}, "info.notes"),
        ({"notes": [3]}, "info.notes[0]"),
        ({"inexact": ["<post>"]}, "info.inexact"),
        ({"inexact": {"<post>": False}}, "info.inexact"),
    ],
)
def test_malformed_typed_info_is_refused_by_name(info: dict[str, Any], field: str) -> None:
    with pytest.raises(PlanFormatError, match=f'"{re.escape(field)}"'):
        Plan.from_dict({**_data(), "info": info})
