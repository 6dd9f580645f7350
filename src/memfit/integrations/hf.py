"""Hugging Face transformers: small random-weight models from configs, and HF's own gradient
checkpointing (turned off in favour of a memfit plan, never stacked with it).

transformers is optional: it is imported only here, and only when used. memfit finds the layer
stack of every HF encoder/decoder with its generic chain search (each layer is called once, in
order, on the previous layer's hidden states), so no per-architecture table is needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "Hugging Face targets need transformers: pip install 'memfit[hf]'"
        ) from None
    return transformers


def _gpt2(t: Any, layers: int, hidden: int, heads: int, seq: int, vocab: int) -> Any:
    config = t.GPT2Config(
        n_layer=layers,
        n_embd=hidden,
        n_head=heads,
        n_positions=seq,
        vocab_size=vocab,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        use_cache=False,
    )
    return t.GPT2LMHeadModel(config)


def _llama(t: Any, layers: int, hidden: int, heads: int, seq: int, vocab: int) -> Any:
    config = t.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=seq,
        vocab_size=vocab,
        attention_dropout=0.1,
        use_cache=False,
    )
    return t.LlamaForCausalLM(config)


def _bert(t: Any, layers: int, hidden: int, heads: int, seq: int, vocab: int) -> Any:
    config = t.BertConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=heads,
        max_position_embeddings=seq,
        vocab_size=vocab,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return t.BertForMaskedLM(config)


ARCHITECTURES: dict[str, Callable[..., Any]] = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}


def build_hf(
    arch: str,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    seq: int = 32,
    batch: int = 2,
    vocab: int = 256,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small Hugging Face model with random weights (no download) and a sample batch.

    The sample is a dict with ``input_ids``, ``labels`` (and for BERT an ``attention_mask``
    with padding), so that ``model(**sample).loss`` is the loss. Dropout is on (train mode).

    Raises:
        ValueError: unknown architecture, listing the ones available.
        ImportError: transformers is not installed.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown Hugging Face architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    transformers = _require_transformers()
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch](transformers, layers, hidden, heads, seq, vocab)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    sample: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": input_ids.clone()}
    if arch == "bert":
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - seq // 4 :] = 0  # some padding, so the mask matters
        sample["attention_mask"] = mask
        labels = input_ids.clone()
        labels[mask == 0] = -100
        sample["labels"] = labels
    return model, sample


def disable_hf_checkpointing(model: nn.Module) -> bool:
    """Turn off Hugging Face's own gradient checkpointing if the user enabled it.

    A memfit plan replaces it; stacking both would recompute twice. Warns when it acts.

    Returns:
        Whether HF checkpointing was on.
    """
    # transformers 5 renamed it "activation checkpointing"; 4.x knows only the old names
    renamed = hasattr(model, "is_activation_checkpointing")
    enabled = getattr(
        model, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing", False
    )
    if not enabled:
        return False
    warnings.warn(
        "Hugging Face gradient checkpointing was enabled on this model; memfit turned it off "
        "because its plan decides what to recompute (both at once would recompute twice)",
        UserWarning,
        stacklevel=3,
    )
    disable = "activation_checkpointing_disable" if renamed else "gradient_checkpointing_disable"
    getattr(model, disable)()
    return True
