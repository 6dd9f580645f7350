"""Small Hugging Face models from configs (random weights, no downloads), built as users get them.

Only sizes are made small. ``use_cache``, the attention implementation, dropout and tied
embeddings stay as transformers sets them, because memfit must work on the model a user builds
(a causal LM with its default ``use_cache=True`` fills a KV cache even in a training forward).
Besides sizes a builder sets only what a small size forces: special token ids that would lie
outside a small vocabulary, key/value head counts and head sizes that must divide a small width,
position tables that must cover the sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Sample = dict[str, torch.Tensor]
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
IMAGE_SIZE = 32  # vision models: 3x32x32 images, 10 classes
IMAGE_CLASSES = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    """The sizes every builder reads.

    Attributes:
        layers: transformer layers (per stack for encoder-decoders, per stage for ConvNeXt).
        hidden: model width (ConvNeXt: the last stage's width).
        heads: attention heads.
        seq: tokens per sample (and the position tables' length).
        vocab: vocabulary size.
    """

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_heads(self) -> int:
        # the defaults (8, 16, 32 key/value heads) do not divide 4 heads; keep them grouped
        return max(1, self.heads // 2)

    def last_token(self) -> int:
        return self.vocab - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Family:
    """One architecture: its config and model classes, the config's sizes, its sample's kind.

    Attributes:
        config: the transformers config class name.
        model: the transformers model class name (with a head that returns ``.loss``).
        sizes: maps :class:`Sizes` to the config's keyword arguments.
        sample: ``tokens`` (ids, labels), ``masked`` (ids, padding mask, labels), ``pixels``
            (images, class labels) or ``seq2seq`` (ids, labels; the model shifts the labels
            into decoder inputs).
        since: the first transformers release with the model class (memfit allows older
            releases, in which such a family is missing).
    """

    config: str
    model: str
    sizes: Callable[[Sizes], dict[str, Any]]
    sample: str = "tokens"
    since: str = "4.53"

    def available(self, transformers: Any) -> bool:
        """Whether the installed transformers has the family's config and model classes."""
        return hasattr(transformers, self.config) and hasattr(transformers, self.model)

    def supports(self, transformers: Any, attn_implementation: str) -> bool:
        """Whether the model class runs with ``attn_implementation`` (``eager`` always).

        ``False`` for a family the installed transformers does not have (see :meth:`available`).
        """
        if not self.available(transformers):
            return False
        model_class = getattr(transformers, self.model)
        return attn_implementation == "eager" or bool(
            getattr(model_class, f"_supports_{attn_implementation}", False)
        )


def _decoder(s: Sizes, **extra: Any) -> dict[str, Any]:
    """The sizes of a Llama-style decoder (Llama, Mistral, Qwen3, Phi-3, Gemma 2, Mixtral)."""
    return {
        "num_hidden_layers": s.layers,
        "hidden_size": s.hidden,
        "intermediate_size": s.hidden * 2,
        "num_attention_heads": s.heads,
        "max_position_embeddings": s.seq,
        "vocab_size": s.vocab,
        **extra,
    }


def _encoder(s: Sizes, **extra: Any) -> dict[str, Any]:
    """The sizes of a BERT-style encoder (BERT, RoBERTa, ViT)."""
    return {
        "num_hidden_layers": s.layers,
        "hidden_size": s.hidden,
        "intermediate_size": s.hidden * 4,
        "num_attention_heads": s.heads,
        **extra,
    }


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        config="GPT2Config",
        model="GPT2LMHeadModel",
        sizes=lambda s: {
            "n_layer": s.layers,
            "n_embd": s.hidden,
            "n_head": s.heads,
            "n_positions": s.seq,
            "vocab_size": s.vocab,
            "bos_token_id": s.last_token(),  # GPT-2's own 50256 lies outside a small vocabulary
            "eos_token_id": s.last_token(),
        },
    ),
    "llama": Family(
        config="LlamaConfig",
        model="LlamaForCausalLM",
        sizes=lambda s: _decoder(s, num_key_value_heads=s.kv_heads),
    ),
    "mistral": Family(
        config="MistralConfig",
        model="MistralForCausalLM",
        sizes=lambda s: _decoder(s, num_key_value_heads=s.kv_heads, head_dim=s.head_dim),
    ),
    "qwen3": Family(
        config="Qwen3Config",
        model="Qwen3ForCausalLM",
        sizes=lambda s: _decoder(s, num_key_value_heads=s.kv_heads, head_dim=s.head_dim),
        since="4.51",
    ),
    "phi3": Family(
        config="Phi3Config",
        model="Phi3ForCausalLM",
        sizes=lambda s: _decoder(
            s,
            original_max_position_embeddings=s.seq,
            eos_token_id=s.last_token(),  # Phi-3's 32000 lies outside a small vocabulary
            pad_token_id=s.last_token(),
        ),
    ),
    "gemma2": Family(
        config="Gemma2Config",
        model="Gemma2ForCausalLM",
        sizes=lambda s: _decoder(
            s,
            num_key_value_heads=s.kv_heads,
            head_dim=s.head_dim,
            # its window (4096) scaled to a short sequence, so that the alternating sliding
            # layers really see another mask than the full-attention ones
            sliding_window=max(1, s.seq // 4),
        ),
    ),
    "falcon": Family(
        config="FalconConfig",
        model="FalconForCausalLM",
        sizes=lambda s: {
            "num_hidden_layers": s.layers,
            "hidden_size": s.hidden,
            "num_attention_heads": s.heads,
            "max_position_embeddings": s.seq,
            "vocab_size": s.vocab,
        },
    ),
    "mixtral": Family(
        config="MixtralConfig",
        model="MixtralForCausalLM",
        sizes=lambda s: _decoder(s, num_key_value_heads=s.kv_heads),
    ),
    "opt": Family(
        config="OPTConfig",
        model="OPTForCausalLM",
        sizes=lambda s: {
            "num_hidden_layers": s.layers,
            "hidden_size": s.hidden,
            "word_embed_proj_dim": s.hidden,
            "ffn_dim": s.hidden * 4,
            "num_attention_heads": s.heads,
            "max_position_embeddings": s.seq,
            "vocab_size": s.vocab,
        },
    ),
    "bert": Family(
        config="BertConfig",
        model="BertForMaskedLM",
        sizes=lambda s: _encoder(s, max_position_embeddings=s.seq, vocab_size=s.vocab),
        sample="masked",
    ),
    "roberta": Family(
        config="RobertaConfig",
        model="RobertaForMaskedLM",
        # RoBERTa's positions start after the padding index (1): two more than the sequence
        sizes=lambda s: _encoder(s, max_position_embeddings=s.seq + 2, vocab_size=s.vocab),
        sample="masked",
    ),
    "vit": Family(
        config="ViTConfig",
        model="ViTForImageClassification",
        sizes=lambda s: _encoder(
            s, image_size=IMAGE_SIZE, patch_size=IMAGE_SIZE // 8, num_labels=IMAGE_CLASSES
        ),
        sample="pixels",
    ),
    "convnext": Family(
        config="ConvNextConfig",
        model="ConvNextForImageClassification",
        sizes=lambda s: {
            "hidden_sizes": [s.hidden // 8, s.hidden // 4, s.hidden // 2, s.hidden],
            "depths": [s.layers] * 4,
            "image_size": IMAGE_SIZE,
            "num_labels": IMAGE_CLASSES,
        },
        sample="pixels",
    ),
    "bart": Family(
        config="BartConfig",
        model="BartForConditionalGeneration",
        sizes=lambda s: {
            "encoder_layers": s.layers,
            "decoder_layers": s.layers,
            "d_model": s.hidden,
            "encoder_attention_heads": s.heads,
            "decoder_attention_heads": s.heads,
            "encoder_ffn_dim": s.hidden * 4,
            "decoder_ffn_dim": s.hidden * 4,
            "max_position_embeddings": s.seq,
            "vocab_size": s.vocab,
        },
        sample="seq2seq",
    ),
}


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "Hugging Face models need transformers: pip install 'memfit[hf]'"
        ) from None
    return transformers


def _sample(
    family: Family, config: Any, batch: int, seq: int, vocab: int, generator: torch.Generator
) -> Sample:
    if family.sample == "pixels":
        pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        labels = torch.randint(0, IMAGE_CLASSES, (batch,), generator=generator)
        return {"pixel_values": pixels, "labels": labels}
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    sample = {"input_ids": input_ids, "labels": input_ids.clone()}
    if family.sample == "masked":
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - seq // 4 :] = 0  # some padding, so that the mask matters
        input_ids[mask == 0] = config.pad_token_id
        sample["attention_mask"] = mask
        sample["labels"][mask == 0] = -100
    return sample


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
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Sample]:
    """A small Hugging Face model with random weights (no download) and a sample batch.

    Only sizes are small: caching, attention implementation, dropout and tied embeddings are
    the library's defaults, and the model is in train mode. ``model(**sample).loss`` is the
    loss: token models get ``input_ids`` and ``labels`` (BERT and RoBERTa add an
    ``attention_mask`` with padding; BART shifts the labels into its decoder inputs itself);
    vision models get 32x32 ``pixel_values`` and class ``labels`` and ignore ``seq`` and
    ``vocab``.

    Args:
        arch: one of :data:`FAMILIES` (``gpt2``, ``llama``, ``bert``, ``bart``, ``vit``, ...).
        layers, hidden, heads, seq, batch, vocab: sizes.
        seed: seeds the weights and the sample.
        attn_implementation: ``None`` for the library's default, or ``"eager"``/``"sdpa"``.

    Returns:
        ``(model, sample)``.

    Raises:
        ValueError: unknown architecture or attention implementation, listing the choices, or
            an implementation the model does not support.
        ImportError: transformers is not installed, or is older than the family (Qwen3 needs
            transformers 4.51 or newer).

    Example:
        >>> model, sample = build_hf("llama", layers=2, attn_implementation="eager")
        >>> model(**sample).loss.backward()
    """
    if arch not in FAMILIES:
        raise ValueError(
            f"unknown Hugging Face architecture {arch!r}; choose one of {sorted(FAMILIES)}"
        )
    if attn_implementation is not None and attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be None (the library's default) or one of "
            f"{list(ATTENTION_IMPLEMENTATIONS)}; got {attn_implementation!r}"
        )
    transformers = _require_transformers()
    family = FAMILIES[arch]
    if not family.available(transformers):
        raise ImportError(
            f"Hugging Face architecture {arch!r} needs transformers>={family.since} "
            f"({family.model}); transformers {transformers.__version__} is installed: "
            f"pip install 'transformers>={family.since}'"
        )
    if attn_implementation is not None and not family.supports(transformers, attn_implementation):
        raise ValueError(
            f"{family.model} does not support attn_implementation={attn_implementation!r}; "
            f"use None (the library's default) or 'eager'"
        )
    sizes = Sizes(layers=layers, hidden=hidden, heads=heads, seq=seq, vocab=vocab)
    options = family.sizes(sizes)
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    config = getattr(transformers, family.config)(**options)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model)(config)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    return model, _sample(family, model.config, batch, seq, vocab, generator)
