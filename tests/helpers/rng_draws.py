"""Test helper shared by the Hugging Face tests: random numbers drawn between blocks."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from torch import nn


def draws_between_blocks(model: nn.Module, sample: dict[str, Any], blocks: tuple[str, ...]) -> bool:
    """Whether a training forward draws random numbers between two blocks of one list (BART and
    OPT up to transformers 5.0 draw LayerDrop's number even at LayerDrop 0: ``torch.rand([])``),
    which a segment of several blocks refuses (an encoder's last and a decoder's first block are
    never joined)."""
    states: list[tuple[str, str, torch.Tensor]] = []
    handles = []
    for name in blocks:
        module, group = model.get_submodule(name), name.rpartition(".")[0]
        handles.append(
            module.register_forward_pre_hook(
                lambda *_, group=group: states.append(("in", group, torch.random.get_rng_state()))
            )
        )
        handles.append(
            module.register_forward_hook(
                lambda *_, group=group: states.append(("out", group, torch.random.get_rng_state()))
            )
        )
    try:
        with torch.no_grad():
            model(**sample)
    finally:
        for handle in handles:
            handle.remove()
    return any(
        kind == "out" and later == "in" and group == next_group and not torch.equal(a, b)
        for (kind, group, a), (later, next_group, b) in pairwise(states)
    )
