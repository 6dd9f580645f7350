"""Tiny diffusion transformers built from diffusers' own model classes (random weights, no
downloads), with a sample and a training loss.

Sizes follow diffusers' own model tests (``tests/models/transformers/test_models_transformer_
sd3.py`` and ``..._flux.py``: head width 8-16, width 32), with the block counts of issue 24: SD3
with 4 joint blocks, Flux with 2 dual-stream and 4 single-stream blocks. Every other setting is
the library's default. The loss is a diffusion training step's: the mean squared error of the
model's prediction against a fixed target (the noise or velocity the step regresses on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LossFn = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class Built:
    model: nn.Module
    sample: dict[str, Any]
    loss_fn: LossFn


def _mse_to(target: torch.Tensor) -> LossFn:
    def loss_fn(output: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(output.sample, target)

    return loss_fn


def sd3(batch: int = 2, size: int = 16, text: int = 24, layers: int = 4) -> Built:
    """``SD3Transformer2DModel`` with ``layers`` joint blocks (the last one context-pre-only,
    as in the library) on ``batch`` latents of ``size`` x ``size`` and ``text`` prompt tokens."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=size,
        patch_size=1,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    sample = {
        "hidden_states": torch.randn(batch, 4, size, size),
        "encoder_hidden_states": torch.randn(batch, text, 32),
        "pooled_projections": torch.randn(batch, 64),
        "timestep": torch.randint(0, 1000, (batch,)),
    }
    return Built(model.train(), sample, _mse_to(torch.randn(batch, 4, size, size)))


def flux(batch: int = 2, size: int = 8, text: int = 24, dual: int = 2, single: int = 4) -> Built:
    """``FluxTransformer2DModel`` with ``dual`` dual-stream and ``single`` single-stream blocks
    on ``batch`` packed latents of ``size`` x ``size`` tokens and ``text`` prompt tokens."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=dual,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    tokens = size * size
    sample = {
        "hidden_states": torch.randn(batch, tokens, 4),
        "encoder_hidden_states": torch.randn(batch, text, 32),
        "pooled_projections": torch.randn(batch, 32),
        "timestep": torch.rand(batch),
        "img_ids": torch.randn(tokens, 3),
        "txt_ids": torch.randn(text, 3),
    }
    return Built(model.train(), sample, _mse_to(torch.randn(batch, tokens, 4)))
