"""Op traces: by-design regions are cut out of both steps, every other op is compared."""

import torch
import torch.nn.functional as F

from memfit.measuring.trace import (
    BACKWARD,
    FORWARD,
    OpCall,
    Trace,
    by_design,
    by_design_backward,
    compare_traces,
    exempt_regions,
    recording,
    tracing,
)

ROW = (((4, 8), (8, 1), "torch.float32"),)
STRIDED = (((4, 8), (1, 4), "torch.float32"),)
HEAD = "head:lean-loss: cross_entropy over 4 x 8 logits"


def call(op: str, phase: str = FORWARD, design: str | None = None, tensors=ROW) -> OpCall:
    return OpCall(op, tensors, phase, design=design)


def step(*middle: OpCall, after: tuple[OpCall, ...] = ()) -> Trace:
    """A block's ops, then ``middle`` (the head), then the block's backward and ``after``."""
    block = [call("aten.mm.default"), call("aten.gelu.default")]
    backward = [call("aten.mm.default", BACKWARD), call("aten.gelu_backward.default", BACKWARD)]
    return Trace([*block, *middle, *backward, *after])


PLAIN_HEAD = (
    call("aten._log_softmax.default", design=HEAD),
    call("aten.nll_loss_forward.default", design=HEAD),
    call("aten.nll_loss_backward.default", BACKWARD, HEAD),
    call("aten._log_softmax_backward_data.default", BACKWARD, HEAD),
)
LEAN_HEAD = (
    call("aten._log_softmax.default", design=HEAD),
    call("aten.gather.default", design=HEAD),
    call("aten.nll_loss_forward.default", design=HEAD),
    call("aten.nll_loss_backward.default", BACKWARD, HEAD),
    call("aten._log_softmax.default", BACKWARD, HEAD),
    call("aten._log_softmax_backward_data.out", BACKWARD, HEAD),
)


def test_a_region_marked_in_both_steps_is_cut_out_and_named() -> None:
    plain, planned = step(*PLAIN_HEAD), step(*LEAN_HEAD)
    assert compare_traces(plain, planned) is None
    forward, backward = exempt_regions(plain, planned)
    assert forward == (
        f"{HEAD} (forward): the plain step's aten._log_softmax.default, "
        "aten.nll_loss_forward.default replaced by aten._log_softmax.default, "
        "aten.gather.default, aten.nll_loss_forward.default"
    )
    assert backward.startswith(f"{HEAD} (backward): the plain step's aten.nll_loss_backward")
    # unmarked, the same steps differ at the head
    unmarked = Trace([OpCall(c.op, c.tensors, c.phase) for c in step(*LEAN_HEAD).calls])
    difference = compare_traces(step(*PLAIN_HEAD), unmarked)
    assert difference is not None and difference.where == FORWARD and difference.index == 2


def test_a_difference_outside_the_region_is_still_reported() -> None:
    # after the region, in backward: a block op on another layout
    late = (call("aten.mm.default", BACKWARD, tensors=STRIDED),)
    plain = step(*PLAIN_HEAD, after=(call("aten.mm.default", BACKWARD),))
    difference = compare_traces(plain, step(*LEAN_HEAD, after=late))
    assert difference is not None
    assert (difference.where, difference.index) == (BACKWARD, 2)  # the region is not counted
    assert difference.planned is not None and difference.planned.tensors == STRIDED[0:1]
    assert "stride [1, 4]" in str(difference) and "by design" not in str(difference)
    # before the region, in forward
    planned = step(*LEAN_HEAD)
    planned.calls[1] = call("aten.tanh.default")
    difference = compare_traces(step(*PLAIN_HEAD), planned)
    assert difference is not None and (difference.where, difference.index) == (FORWARD, 1)
    # an extra op just after the region
    planned = step(*LEAN_HEAD)
    planned.calls.insert(5, call("aten.add.Tensor"))
    difference = compare_traces(step(*PLAIN_HEAD), planned)
    assert difference is not None and (difference.where, difference.index) == (FORWARD, 2)
    assert difference.planned is not None and difference.planned.op == "aten.add.Tensor"


def test_a_region_in_one_step_only_or_under_another_label_is_a_difference() -> None:
    bare = step(call("aten._log_softmax.default"), call("aten.nll_loss_forward.default"))
    difference = compare_traces(bare, step(*LEAN_HEAD))
    assert difference is not None and difference.where == FORWARD
    assert f"by design in the planned step only: {HEAD}" in str(difference)
    other = "head:lean-loss: cross_entropy over 2 x 8 logits"
    relabelled = step(*(OpCall(c.op, c.tensors, c.phase, design=other) for c in PLAIN_HEAD))
    difference = compare_traces(relabelled, step(*LEAN_HEAD))
    assert difference is not None and "by design:" in str(difference)


def test_recomputes_skip_the_regions_ops() -> None:
    plain = step(*PLAIN_HEAD)
    rerun = OpCall("aten.mm.default", ROW, "recompute", run=1)
    planned = step(*LEAN_HEAD, after=(rerun, call("aten.gelu.default", "recompute")))
    assert compare_traces(plain, planned) is None
    planned.calls.append(OpCall("aten.gather.default", ROW, "recompute", run=1))
    difference = compare_traces(plain, planned)
    assert difference is not None and difference.where.startswith("recompute")


def test_a_recompute_out_of_order_names_the_order_not_another_op() -> None:
    """A recompute op the plain forward runs, but only before the ops matched ahead of it, is
    reported as an order difference (shown beside a plain op of the same name, with other
    layouts, it read as an op the plain step does not run)."""
    plain = step()
    planned = step(
        after=(
            OpCall("aten.gelu.default", ROW, "recompute", run=1),
            OpCall("aten.mm.default", ROW, "recompute", run=1),
        )
    )
    difference = compare_traces(plain, planned)
    assert difference is not None and difference.where == "recompute 0"
    assert difference.plain is not None and difference.planned is not None
    assert difference.plain.key == difference.planned.key  # the same op, elsewhere
    assert "only before the ops matched so far" in str(difference)
    planned.calls[-1] = OpCall("aten.mm.default", STRIDED, "recompute", run=1)
    assert "no op of the plain forward on these layouts" in str(compare_traces(plain, planned))


def test_real_steps_mark_forward_and_backward_regions() -> None:
    logits = torch.randn(4, 8, requires_grad=True)
    target = torch.tensor([1, 2, 3, 0])
    assert not recording()
    with tracing() as trace:
        assert recording()
        scores = logits * 2.0
        with by_design("loss"):
            loss = F.cross_entropy(scores, target)
        by_design_backward("loss", loss, scores)
        (loss * 3.0).backward()
    assert not recording()
    marked = [(c.op, c.phase) for c in trace.calls if c.design == "loss"]
    assert marked == [
        ("aten._log_softmax.default", FORWARD),
        ("aten.nll_loss_forward.default", FORWARD),
        ("aten.nll_loss_backward.default", BACKWARD),
        ("aten._log_softmax_backward_data.default", BACKWARD),
    ]
    # the ops around it are not: the two scalings in forward, and in backward the loss's
    # gradient (before the region) and the logits' (after it)
    unmarked = [(c.op, c.phase) for c in trace.calls if c.design is None]
    assert unmarked == [("aten.mul.Tensor", FORWARD)] * 2 + [("aten.mul.Tensor", BACKWARD)] * 2


def test_backward_regions_are_hooked_only_while_recording() -> None:
    logits = torch.randn(4, 8, requires_grad=True)
    with by_design("loss"):
        loss = F.cross_entropy(logits, torch.tensor([1, 2, 3, 0]))
    by_design_backward("loss", loss, logits)  # no trace records: no hooks on the user's graph
    with tracing() as trace:
        loss.backward()
    assert trace.calls and all(call.design is None for call in trace.calls)
