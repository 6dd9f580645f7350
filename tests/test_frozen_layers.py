"""Frozen layers (issue 22, finding 4): a frozen block through which no gradient flows saves
nothing, not even its checkpoint's RNG state, and the first trained block after it lets its
input go (nothing saves an input that needs no gradient), which a recompute segment starting
there holds instead. Plans must still hold their budget, with predictions within 2%."""

import pytest
import torch
from torch import nn

import memfit
from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts
from memfit.planning.plan import Segment, Stage
from memfit.planning.simulate import simulate

WIDTH, BATCH, BLOCKS = 16, 64, 6
RNG_STATE = 5056  # torch's CPU generator state, which every checkpoint stashes


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).square().mean()


def assert_holds(model: nn.Module, sample: object, plan: memfit.Plan) -> None:
    memfit.apply(model, plan)
    try:
        result = memfit.verify(model, sample, repeats=1)
    finally:
        memfit.remove(model)
    assert result.gradients_equal and result.loss_equal
    assert result.budget_bytes is not None
    assert result.measured_peak_bytes <= result.budget_bytes, (plan.options, result)
    assert abs(result.prediction_error) <= 0.02, (plan.options, result.prediction_error)


@pytest.fixture(scope="module")
def toy() -> tuple[Toy, tuple[torch.Tensor], memfit.Profile]:
    torch.manual_seed(0)
    model = Toy().train()
    model.blocks[0].requires_grad_(False)
    sample = (torch.randn(BATCH, WIDTH),)
    return model, sample, memfit.profile(model, sample, repeats=1)


def test_frozen_first_block_does_not_zero_the_checkpoint(toy: tuple) -> None:
    assert toy[2].costs.checkpoint_bytes == RNG_STATE


@pytest.mark.parametrize("budget", ["90%", "80%"])
def test_toy_with_a_frozen_first_block_holds_its_budget(toy: tuple, budget: str) -> None:
    model, sample, profile = toy
    assert_holds(model, sample, memfit.plan(profile, budget=budget))


def test_toy_floor_holds(toy: tuple) -> None:
    model, sample, profile = toy
    with pytest.raises(memfit.InfeasibleBudgetError) as error:
        memfit.plan(profile, budget="1%")
    assert_holds(model, sample, memfit.plan(profile, budget=error.value.min_feasible_bytes))


def test_a_segment_holds_the_input_its_first_stage_lets_go() -> None:
    """Simulated: the recompute of a segment starting at a stage whose kept forward frees its
    input keeps that input to the end of the segment's backward."""

    def stage(name: str, released: int) -> StageCosts:
        keep = OptionCosts(
            forward_s=1.0,
            backward_s=1.0,
            saved_bytes=10 - released,
            forward_peak_bytes=20,
            backward_peak_bytes=30,
            backward_delta_bytes=-20 + released,
        )
        return StageCosts(
            name=name,
            input_bytes=10,
            output_bytes=10,
            options={KEEP: keep},
            nosave_forward_s=1.0,
            nosave_forward_peak_bytes=20,
            released_input_bytes=released,
        )

    held = ChainCosts(stages=[stage("a", 0), stage("b", 0)])
    released = ChainCosts(stages=[stage("a", 0), stage("b", 10)])
    tree = (Stage(0), Segment(1, 2, (Stage(1),)))
    # the kept step frees the input: 10 less while stage b's forward leaves its saved tensors
    assert (
        simulate(released, (Stage(0), Stage(1))).peak_bytes
        < simulate(held, (Stage(0), Stage(1))).peak_bytes
    )
    # under a checkpoint the input stays: the same peak as a stage that saves it
    assert simulate(released, tree).peak_bytes == simulate(held, tree).peak_bytes
    # and frees it when the segment's backward ends
    ends = [simulate(costs, tree, timeline=True).timeline[-1][1] for costs in (held, released)]
    assert ends[0] == ends[1]


LAYERS, VOCAB, SEQ = 8, 128, 128


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, dict[str, torch.Tensor], memfit.Profile]:
    """A small Llama with its embeddings and lower half of layers frozen (fine-tuning)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=LAYERS,
        hidden_size=32,
        intermediate_size=88,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    model.model.embed_tokens.requires_grad_(False)
    for layer in model.model.layers[: LAYERS // 2]:
        layer.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    sample = {"input_ids": ids, "labels": ids.clone()}
    return model, sample, memfit.profile(model, sample, repeats=1)


@pytest.mark.filterwarnings("ignore::UserWarning:transformers")
def test_llama_with_frozen_lower_layers_holds_40_percent(llama: tuple) -> None:
    model, sample, profile = llama
    first_trained = profile.costs.stages[1 + LAYERS // 2]
    assert first_trained.released_input_bytes == 2 * SEQ * 32 * 4  # its input: no gradient
    assert_holds(model, sample, memfit.plan(profile, budget="40%"))


@pytest.mark.filterwarnings("ignore::UserWarning:transformers")
def test_llama_with_frozen_lower_layers_holds_its_floor(llama: tuple) -> None:
    model, sample, profile = llama
    with pytest.raises(memfit.InfeasibleBudgetError) as error:
        memfit.plan(profile, budget="1%")
    assert_holds(model, sample, memfit.plan(profile, budget=error.value.min_feasible_bytes))
