"""Blocks called with keywords only, whose forward's first parameter is not the main input
(Reformer's layers: ``forward(self, prev_attn_output, hidden_states, ...)``, called as
``layer(prev_attn_output=a, hidden_states=h, ...)``)."""

import pytest
import torch
from torch import nn

from memfit.errors import UnsupportedModelError
from memfit.measuring.chain import find_chain
from memfit.planning.plan import Plan, Stage, recompute_one
from memfit.runtime import apply_plan, remove_plan
from tests.helpers.plans import per_block

WIDTH = 8


class TwoStream(nn.Module):
    """A reversible-style layer: two streams in, two out, the main one first."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(WIDTH, WIDTH)
        self.g = nn.Linear(WIDTH, WIDTH)
        self.dropout = nn.Dropout(0.2)

    def forward(
        self, prev_attn_output: torch.Tensor, hidden_states: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = prev_attn_output + self.dropout(torch.tanh(self.f(hidden_states)))
        return hidden_states + torch.tanh(self.g(attn)) * scale, attn


class Streams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoStream() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, attn = x, x * 0.5
        for layer in self.layers:
            hidden, attn = layer(prev_attn_output=attn, hidden_states=hidden, scale=0.5)
        return (hidden + attn).pow(2).sum()


def _gradients(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    loss = model(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_keyword_only_calls_keep_their_keywords_under_a_plan() -> None:
    torch.manual_seed(1)
    model, x = Streams(), torch.randn(4, WIDTH)
    reference = _gradients(model, x)
    chain = find_chain(model, lambda: model(x))
    assert chain.block_names == tuple(f"layers.{i}" for i in range(4))
    apply_plan(model, chain, per_block(chain))
    try:
        planned = _gradients(model, x)
    finally:
        remove_plan(model)
    assert torch.equal(planned[0], reference[0])
    assert all(torch.equal(a, b) for a, b in zip(planned[1], reference[1], strict=True))


def test_reformer_runs_under_a_plan() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ReformerConfig(
        vocab_size=99,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=32,
        attn_layers=["local", "lsh"],
        axial_pos_shape=[4, 8],
        axial_pos_embds_dim=[16, 16],
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=4,
        max_position_embeddings=32,
        is_decoder=True,
        num_buckets=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(config).train()
    ids = torch.randint(1, 99, (2, 32))
    chain = find_chain(model, lambda: model(input_ids=ids, labels=ids))
    assert chain.block_names == ("reformer.encoder.layers.0", "reformer.encoder.layers.1")
    tree = tuple(
        recompute_one(i) if chain.block_of_stage(i) is not None else Stage(i)
        for i in range(len(chain))
    )
    apply_plan(model, chain, Plan.from_tree(chain.stage_names, tree, "all"))
    try:
        # was: TypeError: ReformerLayer.forward() got multiple values for 'prev_attn_output'
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        remove_plan(model)
    assert all(p.grad is not None for p in model.reformer.encoder.layers.parameters())


def test_xlstm_with_its_cache_is_refused_clearly() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.xLSTMConfig(
        vocab_size=99,
        hidden_size=64,
        num_heads=8,
        num_blocks=2,
        qk_dim_factor=1.0,
        v_dim_factor=1.0,
        chunk_size=8,
    )
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(config).train()
    ids = torch.randint(1, 99, (2, 7))
    chain = find_chain(model, lambda: model(input_ids=ids, labels=ids))
    apply_plan(model, chain, per_block(chain))
    try:
        # was: torch's CheckpointError "Recomputed values ... have different metadata"
        with pytest.raises(UnsupportedModelError, match="use_cache=False"):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        remove_plan(model)
