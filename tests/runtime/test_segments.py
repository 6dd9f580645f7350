"""Multi-block recompute segments inside the model's own loop: every block returns its own output.

A model may read any block's output (``output_hidden_states``, LLaVA's ``hidden_states[-2]``,
sums of block outputs, layer-wise losses computed between blocks): under any plan it reads the
same tensors as unplanned, and the step runs the same ops on the same layouts.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import PlanMismatchError
from memfit.measuring.chain import Chain, find_chain
from memfit.measuring.trace import compare_traces, tracing
from memfit.planning.plan import Segment, Stage, recompute_one
from memfit.runtime import apply_plan, remove_plan
from tests.helpers.plans import make_plan
from tests.helpers.trees import TREES

WIDTH = 8

# segment shapes over 4 blocks beyond trees.TREES: nested, and a segment ending at the last block
SHAPES = {
    **TREES,
    "nested": (
        Stage(0),
        Segment(1, 5, (recompute_one(1), Segment(2, 4, (Stage(2), Stage(3))), Stage(4))),
        Stage(5),
    ),
    "two segments": (
        Stage(0),
        Segment(1, 3, (Stage(1), Stage(2))),
        Segment(3, 5, (Stage(3), Stage(4))),
        Stage(5),
    ),
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(torch.tanh(self.linear(x)))


class Reader(nn.Module):
    """Blocks driven by ``loop(blocks, x) -> loss``."""

    def __init__(self, loop: Callable[[nn.ModuleList, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.loop = loop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loop(self.blocks, x * 1.0)


def hidden_states(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    states = [x]
    for block in blocks:
        x = block(x)
        states.append(x)
    return states[-2].pow(2).sum() + states[2].sum() + x.mean()  # LLaVA reads [-2]


def layer_losses(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    loss = torch.zeros(())
    for block in blocks:
        x = block(x)
        loss = loss + torch.sigmoid(x).pow(2).mean()  # autograd between blocks
    return loss


def pyramid(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    outputs = []
    for block in blocks:
        x = block(x)
        outputs.append(x)
    return torch.cat(outputs, dim=-1).pow(2).sum()  # every block's output, as focalnet sums


LOOPS = {"hidden states": hidden_states, "layer losses": layer_losses, "pyramid": pyramid}


def seeded(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(0)
    loss = model(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def chain_of(model: Reader) -> Chain:
    return Chain("blocks", tuple(f"blocks.{i}" for i in range(4)), tuple(model.blocks))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_models_read_every_blocks_own_output(loop: str, shape: str) -> None:
    torch.manual_seed(0)
    model, x = Reader(LOOPS[loop]), torch.randn(4, WIDTH, requires_grad=True)
    with tracing() as reference_trace:
        reference = seeded(model, x)
    apply_plan(model, chain_of(model), make_plan(chain_of(model), SHAPES[shape]))
    try:
        with tracing() as trace:
            loss, grads = seeded(model, x)
    finally:
        remove_plan(model)
    assert compare_traces(reference_trace, trace) is None
    assert torch.equal(loss, reference[0])
    assert len(grads) == len(reference[1])
    assert all(torch.equal(a, b) for a, b in zip(grads, reference[1], strict=True))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_hooks_on_later_blocks_see_their_own_input_and_output() -> None:
    model, x = Reader(hidden_states), torch.randn(4, WIDTH)
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}

    def hook(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            seen[index].append((args[0].detach().clone(), output.detach().clone()))

        return record

    handles = [block.register_forward_hook(hook(1)) for block in model.blocks]
    with torch.no_grad():
        torch.manual_seed(0)
        model(x)
    seen[0], seen[1] = seen[1], []
    apply_plan(model, chain_of(model), make_plan(chain_of(model), SHAPES["one segment"]))
    try:
        torch.manual_seed(0)
        model(x).backward()
    finally:
        remove_plan(model)
        for handle in handles:
            handle.remove()
    assert len(seen[1]) == 4  # in the forward; recomputes run the blocks' forwards, not hooks
    for (a_in, a_out), (b_in, b_out) in zip(seen[0], seen[1], strict=True):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)


def test_a_block_replaced_after_apply_is_refused_before_the_step() -> None:
    model, x = Reader(hidden_states), torch.randn(4, WIDTH)
    apply_plan(model, chain_of(model), make_plan(chain_of(model), SHAPES["one segment"]))
    calls = []
    replacement = Block()
    replacement.register_forward_hook(lambda *_: calls.append(1))
    model.blocks[2] = replacement
    with pytest.raises(PlanMismatchError, match=r"'blocks\.2' is not the module the plan"):
        model(x)
    assert not calls  # nothing of the segment ran
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    remove_plan(model)


def raises_between(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for index, block in enumerate(blocks):
        x = block(x)
        if index == 1 and getattr(blocks, "fail", False):
            raise KeyError("the model's own error between blocks")
    return x.sum()


def test_an_error_between_blocks_leaves_no_checkpoint_open() -> None:
    model, x = Reader(raises_between), torch.randn(4, WIDTH)
    reference = seeded(model, x)
    apply_plan(model, chain_of(model), make_plan(chain_of(model), SHAPES["nested"]))
    try:
        model.blocks.fail = True
        with pytest.raises(KeyError, match="own error"):
            model(x)
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        model.blocks.fail = False
        loss, grads = seeded(model, x)  # the next step runs as planned
    finally:
        remove_plan(model)
    assert torch.equal(loss, reference[0])
    assert all(torch.equal(a, b) for a, b in zip(grads, reference[1], strict=True))


def early_exit(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for index, block in enumerate(blocks):
        x = block(x)
        if index == 1 and getattr(blocks, "stop", False):
            break
    return x.sum()


def test_a_forward_that_stops_inside_a_segment_is_an_error() -> None:
    model, x = Reader(early_exit), torch.randn(4, WIDTH)
    apply_plan(model, chain_of(model), make_plan(chain_of(model), SHAPES["one segment"]))
    model.blocks.stop = True
    try:
        with pytest.raises(PlanMismatchError, match=r"returned before blocks 'blocks\.0'"):
            model(x)
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    finally:
        remove_plan(model)


def test_hugging_face_hidden_states_under_the_tightest_plan() -> None:
    """A Llama trained with ``output_hidden_states=True`` and a loss on a middle layer (as LLaVA
    reads its vision tower's ``hidden_states[-2]``), under multi-block segments."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 16))
    sample = {"input_ids": ids, "labels": ids, "output_hidden_states": True}

    def loss_fn(out: Any) -> torch.Tensor:
        return out.loss + out.hidden_states[-2].pow(2).mean()

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(**sample))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with tracing() as reference_trace:
        reference = step()
    chain = find_chain(model, lambda: model(**sample))
    for shape in ("one segment", "nested"):
        apply_plan(model, chain, make_plan(chain, SHAPES[shape]))
        try:
            with tracing() as trace:
                loss, grads = step()
        finally:
            remove_plan(model)
        assert compare_traces(reference_trace, trace) is None
        assert torch.equal(loss, reference[0])
        assert all(torch.equal(grads[n], g) for n, g in reference[1].items())
    # Chen's sqrt(n) segments: two blocks each
    plan = memfit.auto(model, sample, budget=None, strategy="sqrt", loss_fn=loss_fn, repeats=1)
    assert any(isinstance(i, Segment) and i.stop > i.start + 1 for i in plan.tree), plan.tree
    try:
        report = memfit.verify(model, sample, loss_fn=loss_fn, repeats=1, trace=True)
    finally:
        memfit.remove(model)
    assert report.trace_difference == ""
    assert report.gradients_equal and report.loss_equal, plan.tree
