"""Built-in models for the demo, the tests and the benchmarks (random weights, no downloads).

>>> model, sample = build("gpt", layers=2, width=64, seq=16, batch=2)
>>> loss = model(*sample)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (batch, seq, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, seq, width)
        return self.dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 style)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.dropout(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """A GPT-style decoder: token + position embedding, ``blocks``, final norm, tied head, loss.

    ``forward(tokens, targets)`` returns the mean cross-entropy loss.
    """

    def __init__(
        self,
        *,
        layers: int = 12,
        width: int = 256,
        heads: int = 4,
        vocab: int = 1024,
        seq: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(seq, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.token_embedding.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class ResidualMLP(nn.Module):
    """``x + Linear(GELU(Linear(LayerNorm(x))))``."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.down(F.gelu(self.up(self.norm(x)))))


class MLPChain(nn.Module):
    """A deep residual MLP: ``blocks`` is an ``nn.Sequential``; forward returns the MSE loss."""

    def __init__(
        self, *, layers: int = 16, width: int = 256, hidden: int = 1024, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualMLP(width, hidden, dropout) for _ in range(layers)))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.head(self.blocks(x)), target)


def gpt(
    *,
    layers: int = 12,
    width: int = 256,
    heads: int = 4,
    vocab: int = 1024,
    seq: int = 128,
    batch: int = 8,
    dropout: float = 0.1,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A GPT-style model and a sample batch ``(tokens, targets)``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT(layers=layers, width=width, heads=heads, vocab=vocab, seq=seq, dropout=dropout)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    return model, (tokens, targets)


def mlp(
    *,
    layers: int = 16,
    width: int = 256,
    hidden: int = 1024,
    batch: int = 1024,
    dropout: float = 0.1,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A deep residual MLP and a sample batch ``(inputs, targets)``.

    The default batch makes activations, not parameters, the bulk of the step's memory (with
    few activations per parameter, the gradients set the peak and no plan can lower it).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLPChain(layers=layers, width=width, hidden=hidden, dropout=dropout)
    x = torch.randn(batch, width, generator=generator)
    y = torch.randn(batch, width, generator=generator)
    return model, (x, y)


BUILDERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {"gpt": gpt, "mlp": mlp}


def build(name: str, **size: Any) -> tuple[nn.Module, Any]:
    """Build a built-in model and its sample by name (``gpt``, ``mlp``).

    Raises:
        ValueError: unknown name, listing the built-in ones.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](**size)


def describe(model: nn.Module) -> str:
    """``'GPT, 12 blocks, 9.7M parameters'``-style one-liner."""
    parameters = sum(p.numel() for p in model.parameters())
    blocks = getattr(model, "blocks", None)
    count = f", {len(blocks)} blocks" if blocks is not None else ""
    return f"{type(model).__name__}{count}, {parameters / 1e6:.1f}M parameters"


__all__ = ["BUILDERS", "GPT", "MLPChain", "build", "describe", "gpt", "mlp"]
