"""Hugging Face transformers: small random-weight models from configs, the layer stack, and HF's
own gradient checkpointing (turned off in favour of a memfit plan, never stacked with it).

transformers is optional: it is imported only inside the functions that need it. memfit finds
the layer stack of HF encoders/decoders with its generic chain search (each layer is called once,
in order, on the previous layer's hidden states); :func:`hf_block_names` names it from the
model's own metadata where that search cannot run (LayerDrop skipping layers, say).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memfit.runtime.apply import register_before_apply

Sample = dict[str, torch.Tensor]


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "Hugging Face models need transformers: pip install 'memfit[hf]'"
        ) from None
    return transformers


def _token_sample(vocab: int, batch: int, seq: int, generator: torch.Generator) -> Sample:
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


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
        bos_token_id=vocab - 1,  # GPT-2's own 50256 lies outside a small vocabulary
        eos_token_id=vocab - 1,
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
        attention_dropout=0.1,  # llama's only dropout
        use_cache=False,
    )
    return t.LlamaForCausalLM(config)


def _opt(t: Any, layers: int, hidden: int, heads: int, seq: int, vocab: int) -> Any:
    config = t.OPTConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=hidden * 4,
        num_attention_heads=heads,
        max_position_embeddings=seq,
        vocab_size=vocab,
        dropout=0.1,
        attention_dropout=0.1,
        layerdrop=0.0,  # LayerDrop draws random numbers between layers: see runtime guards
        use_cache=False,
    )
    return t.OPTForCausalLM(config)


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
        use_cache=False,
    )
    return t.BertForMaskedLM(config)


def _vit(t: Any, layers: int, hidden: int, heads: int, seq: int, vocab: int) -> Any:
    config = t.ViTConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=heads,
        image_size=_VIT_IMAGE,
        patch_size=_VIT_PATCH,
        num_labels=10,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return t.ViTForImageClassification(config)


_VIT_IMAGE, _VIT_PATCH = 32, 8
ARCHITECTURES: dict[str, Callable[..., Any]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "llama": _llama,
    "opt": _opt,
    "vit": _vit,
}


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
) -> tuple[nn.Module, Sample]:
    """A small Hugging Face model with random weights (no download) and a sample batch.

    Dropout is on wherever the config has it and the model is in train mode. The sample is a
    dict such that ``model(**sample).loss`` is the loss: ``input_ids`` and ``labels`` (BERT adds
    an ``attention_mask`` with padding; ViT takes 32x32 ``pixel_values`` and class ``labels``
    and ignores ``seq`` and ``vocab``).

    Args:
        arch: one of :data:`ARCHITECTURES` (``bert``, ``gpt2``, ``llama``, ``opt``, ``vit``).
        layers, hidden, heads, seq, batch, vocab: sizes.
        seed: seeds the weights and the sample.

    Returns:
        ``(model, sample)``.

    Raises:
        ValueError: unknown architecture, listing the ones available.
        ImportError: transformers is not installed.

    Example:
        >>> model, sample = build_hf("llama", layers=2)
        >>> model(**sample).loss.backward()
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
    if arch == "vit":
        pixels = torch.randn(batch, 3, _VIT_IMAGE, _VIT_IMAGE, generator=generator)
        labels = torch.randint(0, 10, (batch,), generator=generator)
        return model, {"pixel_values": pixels, "labels": labels}
    sample = _token_sample(vocab, batch, seq, generator)
    if arch == "bert":
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - seq // 4 :] = 0  # some padding, so that the mask matters
        sample["attention_mask"] = mask
        sample["labels"][mask == 0] = -100
    return model, sample


def hf_block_names(model: nn.Module) -> tuple[str, ...] | None:
    """The fqns of a Hugging Face model's layer stack, from its own metadata, or ``None``.

    The layers are the modules whose class HF lists in ``_no_split_modules`` or that subclass
    ``GradientCheckpointingLayer``; when they sit in several containers (encoder and decoder),
    the container with the most layers wins. Pass the result as ``blocks=``.

    Returns:
        The fqns in module order, or ``None`` when the model names no layers (not an HF model).
    """
    layer_class: tuple[type, ...] = ()
    # an HF model means transformers is imported already; never pay its import for other models
    layers_module = sys.modules.get("transformers.modeling_layers")
    if layers_module is not None and hasattr(layers_module, "GradientCheckpointingLayer"):
        layer_class = (layers_module.GradientCheckpointingLayer,)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and (type(module).__name__ in no_split or isinstance(module, layer_class)):
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    stacks: list[list[str]] = [names for names in groups.values() if len(names) >= 2]
    if not stacks:
        return None
    largest: list[str] = max(stacks, key=len)
    return tuple(largest)


def _checkpointing_on(module: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


def disable_hf_checkpointing(model: nn.Module) -> bool:
    """Turn off Hugging Face's own gradient checkpointing if the user enabled it.

    A memfit plan replaces it; both at once would checkpoint inside checkpoints. Looks inside
    wrappers too (an HF model held by a plain ``nn.Module``). Warns when it acts.
    :func:`memfit.runtime.apply_plan` calls it.

    Args:
        model: any model; HF models are recognised by their ``gradient_checkpointing`` flags.

    Returns:
        Whether HF checkpointing was on (and is now off).
    """
    if not _checkpointing_on(model):
        return False
    warnings.warn(
        "Hugging Face gradient checkpointing was enabled on this model; memfit turned it off "
        "because memfit's plan replaces it (both at once would recompute twice)",
        UserWarning,
        stacklevel=3,
    )
    for module in model.modules():
        # transformers 5 renamed it "activation checkpointing" and warns on the old names
        names = ("activation_checkpointing_disable", "gradient_checkpointing_disable")
        disable = next((getattr(module, n) for n in names if hasattr(module, n)), None)
        if disable is not None and _checkpointing_on(module):
            disable()
    for module in model.modules():  # layers of custom code that HF's switch does not reach
        if getattr(module, "gradient_checkpointing", False) is True:
            module.gradient_checkpointing = False  # type: ignore[assignment]
    return True


register_before_apply(disable_hf_checkpointing)
