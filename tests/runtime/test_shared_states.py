"""Blocks that store their keys and values in a dict the model passes every block (Gemma 4's
``shared_kv_states``, a transformers ``KVSharingDict``): planned runs write into private copies,
so a checkpoint keeps no first run's keys alive to its backward, and a later block that reads
an entry (KV sharing) still gets the first run's keys.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import InfeasibleBudgetError
from memfit.planning.plan import Segment

cache_utils = pytest.importorskip("transformers.cache_utils")
if not hasattr(cache_utils, "KVSharingDict"):  # transformers before Gemma 4
    pytest.skip("this transformers has no KVSharingDict", allow_module_level=True)

WIDTH, SEQ, BATCH = 16, 12, 4


class Attention(nn.Module):
    """A causal single-head attention block; ``store``: the key it stores its keys and values
    under; ``reuse``: the key it reads them from instead of computing its own (Gemma 4's
    ``store`` and ``reuse`` layers)."""

    def __init__(self, store: str | None, reuse: str | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.out = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.1)
        self.store, self.reuse = store, reuse
        self.is_kv_shared_layer = reuse is not None  # transformers' mark of a reader

    def forward(self, hidden: torch.Tensor, shared_kv_states: Any, mask: torch.Tensor) -> Any:
        query = self.q(hidden)
        if self.reuse is not None:
            keys, values = shared_kv_states[self.reuse]
        else:
            keys, values = torch.tanh(self.k(hidden)), self.v(hidden)
        if self.store is not None:
            shared_kv_states[self.store] = keys, values
        scores = (query @ keys.transpose(1, 2)).masked_fill(mask, -1e4).softmax(-1)
        return hidden + self.drop(self.out(torch.relu(scores @ values)))


class SharingModel(nn.Module):
    """Embedding, attention blocks called with one shared dict, a head with its loss."""

    def __init__(self, stores: list[str | None], reuses: list[str | None]) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, WIDTH)
        self.layers = nn.ModuleList(Attention(s, r) for s, r in zip(stores, reuses, strict=True))
        self.head = nn.Linear(WIDTH, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        shared = cache_utils.KVSharingDict()
        for layer in self.layers:
            hidden = layer(hidden, shared_kv_states=shared, mask=mask)
        return nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), ids.flatten())


def _sample() -> tuple[torch.Tensor]:
    return (torch.randint(0, 32, (BATCH, SEQ)),)


def _at_floor(model: nn.Module, sample: tuple[torch.Tensor]) -> tuple[Any, Any]:
    profile = memfit.profile(model, sample, options=(), repeats=1)
    with pytest.raises(InfeasibleBudgetError) as raised:
        memfit.plan(profile, budget="1%")
    plan = memfit.plan(profile, budget=raised.value.min_feasible_bytes)
    assert any(isinstance(item, Segment) for item in plan.tree)
    memfit.apply(model, plan)
    report = memfit.verify(model, sample, repeats=1, trace=True)
    return plan, report


def test_stored_keys_are_not_held_by_checkpoints() -> None:
    """Every block stores its keys (as Gemma 4's do with no KV sharing): at the floor the step
    stays within the budget and the prediction, same gradients, same ops."""
    torch.manual_seed(0)
    stores = ["a", "b", "a", "b", "c", "d"]
    model, sample = SharingModel(stores, [None] * len(stores)), _sample()
    plan, report = _at_floor(model, sample)
    assert report.loss_equal and report.gradients_equal, report.mismatched
    assert report.trace_difference == ""
    assert plan.budget_bytes is not None and report.measured_peak_bytes <= plan.budget_bytes
    assert abs(report.prediction_error) <= 0.02


def test_later_blocks_read_the_first_runs_keys() -> None:
    """Blocks 4 and 5 reuse what blocks 1 and 3 stored (KV sharing): the stored entries reach
    them when blocks 1 and 3 are recomputed, with the same gradients and ops (the prediction
    is high there: the entries held to the end of the forward are charged to the storing
    block's backward)."""
    torch.manual_seed(0)
    stores: list[str | None] = [None, "a", None, "b", None, None]
    reuses: list[str | None] = [None, None, None, None, "a", "b"]
    model, sample = SharingModel(stores, reuses), _sample()
    _plan, report = _at_floor(model, sample)
    assert report.loss_equal and report.gradients_equal, report.mismatched
    assert report.trace_difference == ""
