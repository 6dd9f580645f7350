"""Guardrails: whatever would make a planned step silently wrong raises, naming the stage."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import MemfitError, PlanMismatchError, UnsupportedModelError
from memfit.measuring.chain import Chain, find_chain
from memfit.planning.plan import Plan, Stage, recompute_one
from memfit.runtime import applied_plan, apply_plan, remove_plan
from tests.helpers.plans import make_plan, one_segment, per_block

WIDTH = 8


class Toy(nn.Module):
    """Blocks of ``block_type`` driven by ``loop(blocks, x) -> x``; loss = sum of squares."""

    def __init__(self, block_type: type[nn.Module], loop: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(block_type() for _ in range(4))
        self.loop = loop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loop(self.blocks, x * 1.0).pow(2).sum()


class Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
        return self.dropout(torch.tanh(self.linear(x))) * scale


class TanhFirst(nn.Module):
    """Saves no tensor of its input's (tanh saves its output), so changing the input in place
    after the forward is legal without a plan."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(x))


class PairOut(Dense):
    """Returns ``(hidden, None)``, as HF layers do without attention weights or caches."""

    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> Any:
        return super().forward(x, scale), None


class WithWeights(Dense):
    """Returns ``(hidden, weights)``, as HF layers do with ``output_attentions=True``."""

    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> Any:
        out = super().forward(x, scale)
        return out, out.detach().mean()


class DictOut(Dense):
    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> Any:
        return {"hidden": super().forward(x, scale)}


def plain(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def grads_of(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def check_same_gradients(model: nn.Module, x: torch.Tensor, plan: Callable[[Chain], Plan]) -> None:
    reference = grads_of(model, x)
    chain = find_chain(model, lambda: model(x))
    apply_plan(model, chain, plan(chain))
    try:
        loss, grads = grads_of(model, x)
    finally:
        remove_plan(model)
    assert torch.equal(loss, reference[0])
    assert all(torch.equal(a, b) for a, b in zip(grads, reference[1], strict=True))


def raises_when_planned(
    model: nn.Module, x: torch.Tensor, chain: Chain, plan: Plan, error: type, match: str
) -> None:
    apply_plan(model, chain, plan)
    try:
        with pytest.raises(error, match=match):
            model(x).backward()
    finally:
        remove_plan(model)


def mutate_inputs(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        out = block(h)
        h.mul_(2.0)
        h = out
    return h


@pytest.mark.parametrize("requires_grad", [True, False], ids=["input grad", "frozen input"])
@pytest.mark.parametrize("option", ["segment", "selective:matmul"])
def test_in_place_change_of_a_recomputed_input(option: str, requires_grad: bool) -> None:
    model = Toy(TanhFirst, mutate_inputs)
    x = torch.randn(4, WIDTH, requires_grad=requires_grad)
    model(x).backward()  # fine without a plan
    # the loop writes each block's output while the next block runs: the finder leaves such a
    # list out and says why; named, the blocks are planned and the runtime refuses the plan
    with pytest.raises(UnsupportedModelError, match="reads a block's output besides"):
        find_chain(model, lambda: model(x))
    chain = find_chain(model, lambda: model(x), blocks="blocks")
    first = recompute_one(1) if option == "segment" else Stage(1, option)
    plan = make_plan(chain, (Stage(0), first, *map(Stage, range(2, 6))))
    raises_when_planned(model, x, chain, plan, MemfitError, r"input of stage 'blocks\.0'.*in place")


def alternating_side_inputs(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    scales = [torch.tensor(1.0), torch.tensor(0.5)]  # like sliding/full attention masks
    for i, block in enumerate(blocks):
        x = block(x, scale=scales[i % 2])
    return x


def test_side_inputs_that_differ_between_blocks() -> None:
    """Each block of a segment keeps its own side inputs for the rerun
    (tests/runtime/test_segment_sides.py has the runtime's own cases)."""
    model, x = Toy(Dense, alternating_side_inputs), torch.randn(4, WIDTH)
    check_same_gradients(model, x, one_segment)
    check_same_gradients(model, x, per_block)


class KeywordDense(Dense):
    """Called with ``hidden_states=`` as a keyword, as some HF stacks do."""

    def forward(self, hidden_states: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
        return super().forward(hidden_states, scale)


def shared_side_inputs(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    scale = torch.tensor(0.5)
    for block in blocks:
        x = block(hidden_states=x, scale=scale)
    return x


def test_shared_side_inputs_join_a_segment() -> None:
    check_same_gradients(Toy(KeywordDense, shared_side_inputs), torch.randn(4, WIDTH), one_segment)


def layer_drop(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        if torch.rand([]) < 1.0:  # draws, never drops: only the random stream moves
            x = block(x)
    return x


def test_random_numbers_drawn_between_blocks() -> None:
    model, x = Toy(Dense, layer_drop), torch.randn(4, WIDTH)
    chain = find_chain(model, lambda: model(x))
    raises_when_planned(
        model, x, chain, one_segment(chain), PlanMismatchError, r"random.*'blocks\.1'"
    )
    check_same_gradients(model, x, per_block)


def rescaled_between_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
        x = x * 0.5
    return x


def test_hidden_state_changed_between_blocks() -> None:
    model, x = Toy(Dense, rescaled_between_blocks), torch.randn(4, WIDTH)
    blocks = tuple(model.blocks)  # find_chain refuses this model; a hand-made chain does not
    chain = Chain("blocks", tuple(f"blocks.{i}" for i in range(4)), blocks)
    plan = one_segment(chain)
    raises_when_planned(
        model, x, chain, plan, PlanMismatchError, r"'blocks\.1' did not get the output"
    )


def first_item(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)[0]
    return x


def test_tuple_outputs_pass_through_a_segment() -> None:
    check_same_gradients(Toy(PairOut, first_item), torch.randn(4, WIDTH), one_segment)


def weights_summed(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(())
    for block in blocks:
        x, weights = block(x)
        total = total + weights  # each block's own, as unplanned
    return x + total


def test_blocks_returning_more_tensors_join_a_segment() -> None:
    # every block of a segment runs in its own call and returns its own extra tensors
    model, x = Toy(WithWeights, weights_summed), torch.randn(4, WIDTH)
    check_same_gradients(model, x, one_segment)
    check_same_gradients(model, x, per_block)


def dict_item(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)["hidden"]
    return x


def test_dict_outputs_join_a_segment() -> None:
    # the next block gets the dict's tensor itself: the segment's rerun hands on the same one
    model, x = Toy(DictOut, dict_item), torch.randn(4, WIDTH)
    check_same_gradients(model, x, one_segment)
    check_same_gradients(model, x, per_block)


class NoTensorOut(Dense):
    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> Any:
        return [("hidden", super().forward(x, scale))]


def pair_item(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)[0][1]
    return x


def test_outputs_without_a_hidden_state_cannot_join_a_segment() -> None:
    model, x = Toy(NoTensorOut, pair_item), torch.randn(4, WIDTH)
    chain = Chain("blocks", tuple(f"blocks.{i}" for i in range(4)), tuple(model.blocks))
    plan = one_segment(chain)
    raises_when_planned(model, x, chain, plan, PlanMismatchError, r"'blocks\.0' returns list")


class EditsItsMask(nn.Module):
    """Adds its mask (add saves neither operand, so the edit after it is legal unplanned),
    then changes the mask in place for the next block."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.linear(x) + mask)
        mask.sub_(1.0)
        return out


def with_mask(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(WIDTH)
    for block in blocks:
        x = block(x, mask)
    return x


class EditsMaskInTuple(EditsItsMask):
    """The same in a tuple, as HF passes rotary tables: torch's checkpoint saves top-level
    tensor arguments with their versions (and fails in backward), not tensors in containers;
    without memfit's check the recompute would silently read the edited mask."""

    def forward(self, x: torch.Tensor, masks: tuple[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, masks[0])


def with_masks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    masks = (torch.zeros(WIDTH),)
    for block in blocks:
        x = block(x, masks)
    return x


class CountsInBuffer(Dense):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
        self.seen.add_(1)
        return super().forward(x, scale)


def recompute_first(chain: Chain) -> Plan:
    return make_plan(chain, (Stage(0), recompute_one(1), *map(Stage, range(2, 6))))


def selective_first(chain: Chain) -> Plan:
    return make_plan(chain, (Stage(0), Stage(1, "selective:matmul"), *map(Stage, range(2, 6))))


def rebuild_all(chain: Chain) -> Plan:
    return make_plan(chain, (Stage(0), *(Stage(i, "rebuild") for i in range(1, 5)), Stage(5)))


RECOMPUTING = [one_segment, per_block, recompute_first, selective_first]

BAD_BLOCKS = {
    "mask edited in place": (
        EditsItsMask,
        with_mask,
        r"'blocks\.0' changes its positional argument 1 in place",
    ),
    "mask in a tuple": (
        EditsMaskInTuple,
        with_masks,
        r"'blocks\.0' changes its positional argument 1 in place",
    ),
    # rebound attributes (a counter, a tensor attribute) are replayed: tests/runtime/
    # test_state_replay.py
    "buffer in place": (
        CountsInBuffer,
        plain,
        r"'blocks\.0' writes to its modules' state.*blocks\.0\.seen.*cannot replay",
    ),
}


@pytest.mark.parametrize("plan", RECOMPUTING, ids=lambda f: f.__name__)
@pytest.mark.parametrize("label", list(BAD_BLOCKS))
def test_recomputed_blocks_may_not_write_state_or_arguments(label: str, plan: Callable) -> None:
    block_type, loop, match = BAD_BLOCKS[label]
    model, x = Toy(block_type, loop), torch.randn(4, WIDTH)
    model(x).backward()  # fine without a plan
    chain = find_chain(model, lambda: model(x))
    apply_plan(model, chain, plan(chain))
    try:
        with pytest.raises(UnsupportedModelError, match=match):
            model(x)  # raised in the forward, before any backward
    finally:
        remove_plan(model)


@pytest.mark.parametrize("label", list(BAD_BLOCKS))
def test_blocks_that_run_once_may_write_state(label: str) -> None:
    block_type, loop, _ = BAD_BLOCKS[label]
    model, x = Toy(block_type, loop), torch.randn(4, WIDTH)
    check_same_gradients(model, x, rebuild_all)  # rebuild reruns single ops, never the block


@pytest.mark.parametrize("label", list(BAD_BLOCKS))
def test_auto_raises_and_leaves_nothing_applied(label: str) -> None:
    block_type, loop, match = BAD_BLOCKS[label]
    model, x = Toy(block_type, loop), torch.randn(4, WIDTH)
    with pytest.raises(UnsupportedModelError, match=match):
        memfit.auto(model, (x,), budget=None, strategy="all", repeats=1, options=())
    assert applied_plan(model) is None
    assert all("forward" not in vars(block) for block in model.blocks)


class Remembers(nn.Module):
    """Keeps its keys in a list it is given (a KV cache under a name memfit does not know)."""

    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, memory: list[torch.Tensor]) -> torch.Tensor:
        memory.append(self.key(x))
        keys = torch.cat(memory)
        weights = (x @ keys.T).view(len(x), len(x)).softmax(-1)  # one batch of keys only
        return torch.tanh(weights @ keys[-len(x) :])


def remembering(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x, [])
    return x


def test_a_block_that_cannot_be_replayed_names_its_stage() -> None:
    # (under selective:matmul this block replays consistently: its matmuls come from the cache)
    model, x = Toy(Remembers, remembering), torch.randn(4, WIDTH)
    model(x).backward()  # fine without a plan
    chain = find_chain(model, lambda: model(x))
    match = r"stage 'blocks\.0' \(Remembers\) ran in the forward but failed when memfit recomputed"
    raises_when_planned(model, x, chain, recompute_first(chain), UnsupportedModelError, match)
