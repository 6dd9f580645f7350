"""Hugging Face's own tiny test configurations (the ``*ModelTester`` classes of transformers'
``tests/models/<arch>/test_modeling_<arch>.py``), written out as sizes.

Each builder makes the model from its transformers config class at the tester's sizes (hidden
16-32, two layers, head width 8 where the tester has attention) and leaves every other setting
at the library's default: dropout, LayerDrop, drop path, ``use_cache``, the attention
implementation. The sample is the one the tester makes (``input_ids`` with its padding mask,
``pixel_values``, ``input_values``...) plus labels where the model computes a loss from them;
models without a loss get ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LossFn = Callable[[Any], torch.Tensor]

# the causal-LM tester's sizes (tests/causal_lm_tester.py), with head width 8
BATCH, SEQ, VOCAB = 13, 7, 99
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class Built:
    model: nn.Module
    sample: dict[str, Any]
    loss_fn: LossFn | None = None


def _tokens(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def _decoder_sample() -> dict[str, Any]:
    """The causal-LM tester's inputs: ids, a lower-triangular padding mask, labels."""
    ids = _tokens()
    return {"input_ids": ids, "attention_mask": torch.tril(torch.ones_like(ids)), "labels": ids}


def _causal_lm(config_name: str, model_name: str, **extra: Any) -> Callable[[], Built]:
    def build() -> Built:
        import pytest
        import transformers

        if not hasattr(transformers, model_name):  # Doge, VaultGemma, Ernie 4.5: newer ones
            pytest.skip(f"{model_name} is not in transformers {transformers.__version__}")
        config = getattr(transformers, config_name)(**(DECODER | extra))
        model = getattr(transformers, model_name)(config).train()
        return Built(model, _decoder_sample())

    return build


def gpt2() -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    ids = _tokens()
    sample = {
        "input_ids": ids,
        "attention_mask": torch.tril(torch.ones_like(ids)),
        "token_type_ids": _tokens(vocab=16),
        "labels": ids,
    }
    return Built(GPT2LMHeadModel(config).train(), sample)


def mpt() -> Built:
    from transformers import MptConfig, MptForCausalLM

    config = MptConfig(
        d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=VOCAB, max_seq_len=512
    )
    return Built(MptForCausalLM(config).train(), _decoder_sample())


def t5() -> Built:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        eos_token_id=1,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    ids, labels = _tokens(), _tokens()
    sample = {
        "input_ids": ids,
        "attention_mask": torch.randint(0, 2, ids.shape).index_fill_(1, torch.tensor([0]), 1),
        "decoder_input_ids": _tokens(),
        "labels": labels,
    }
    return Built(T5ForConditionalGeneration(config).train(), sample)


def llava() -> Built:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_tokens = (8 // 2) ** 2
    config = LlavaConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 32,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
        },
        image_token_index=0,
        image_seq_length=image_tokens,
    )
    ids = _tokens(batch=3, seq=SEQ + image_tokens, vocab=VOCAB - 2) + 2
    ids[:, :image_tokens] = 0
    sample = {
        "pixel_values": torch.rand(3, 3, 8, 8),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
    }
    return Built(LlavaForConditionalGeneration(config).train(), sample)


def _image_classifier(model: nn.Module, batch: int, size: int, labels: int) -> Built:
    sample = {
        "pixel_values": torch.rand(batch, 3, size, size),
        "labels": torch.randint(0, labels, (batch,)),
    }
    return Built(model.train(), sample)


def focalnet() -> Built:
    from transformers import FocalNetConfig, FocalNetForImageClassification

    config = FocalNetConfig(
        image_size=32,
        patch_size=2,
        embed_dim=16,
        hidden_sizes=[32, 64, 128],
        depths=[1, 2, 1],
        num_heads=[2, 2, 4],
        window_size=2,
        mlp_ratio=2.0,
        num_labels=10,
    )
    return _image_classifier(FocalNetForImageClassification(config), 13, 32, 10)


def poolformer() -> Built:
    from transformers import PoolFormerConfig, PoolFormerForImageClassification

    config = PoolFormerConfig(
        image_size=64,
        num_encoder_blocks=4,
        depths=[2, 2, 2, 2],
        hidden_sizes=[16, 32, 64, 128],
        num_labels=3,
    )
    return _image_classifier(PoolFormerForImageClassification(config), 13, 64, 3)


def mobilenet_v2() -> Built:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, min_depth=8, num_labels=10, finegrained_output=True
    )
    return _image_classifier(MobileNetV2ForImageClassification(config), 13, 32, 10)


def sew() -> Built:
    from transformers import SEWConfig, SEWForSequenceClassification

    config = SEWConfig(
        hidden_size=32,
        conv_dim=(64, 32, 32),
        conv_stride=(5, 2, 1),
        conv_kernel=(10, 3, 1),
        num_conv_pos_embeddings=31,
        num_conv_pos_embedding_groups=2,
        squeeze_factor=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=20,
        vocab_size=32,
        # memfit refuses LayerDrop (tests/integrations/test_layerdrop.py) and says to turn it
        # off, as a user would; what this case checks is SEW's NumPy time masking
        layerdrop=0.0,
    )
    sample = {"input_values": torch.rand(13, 1024) * 2 - 1, "labels": torch.randint(0, 2, (13,))}
    return Built(SEWForSequenceClassification(config).train(), sample)


def _audio_loss(output: Any) -> torch.Tensor:
    return output.audio_values.square().mean()


def encodec() -> Built:
    from transformers import EncodecConfig, EncodecModel

    config = EncodecConfig(
        audio_channels=2,
        chunk_in_sec=None,
        hidden_size=32,
        num_filters=8,
        num_residual_layers=1,
        upsampling_ratios=[8, 4],
        num_lstm_layers=1,
        codebook_size=64,
    )
    sample = {"input_values": torch.rand(12, 2, 40) * 2 - 1}
    return Built(EncodecModel(config).train(), sample, _audio_loss)


def mimi() -> Built:
    from transformers import MimiConfig, MimiModel

    config = MimiConfig(
        audio_channels=1,
        hidden_size=32,
        num_filters=8,
        num_residual_layers=1,
        upsampling_ratios=[8, 4],
        codebook_size=64,
        vector_quantization_hidden_dimension=64,
        codebook_dim=64,
        upsample_groups=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=512,
    )
    sample = {"input_values": torch.rand(5, 1, 40) * 2 - 1}
    return Built(MimiModel(config).train(), sample, _audio_loss)


TESTERS: dict[str, Callable[[], Built]] = {
    "gpt2": gpt2,
    "gemma2": _causal_lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=8),
    "mpt": mpt,
    "doge": _causal_lm("DogeConfig", "DogeForCausalLM"),
    "vaultgemma": _causal_lm("VaultGemmaConfig", "VaultGemmaForCausalLM", head_dim=8),
    "emu3": _causal_lm("Emu3TextConfig", "Emu3ForCausalLM"),
    "cohere": _causal_lm("CohereConfig", "CohereForCausalLM"),
    "ernie4_5": _causal_lm("Ernie4_5Config", "Ernie4_5ForCausalLM"),
    "t5": t5,
    "llava": llava,
    "focalnet": focalnet,
    "poolformer": poolformer,
    "mobilenet_v2": mobilenet_v2,
    "sew": sew,
    "encodec": encodec,
    "mimi": mimi,
}
