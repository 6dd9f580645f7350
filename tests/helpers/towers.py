"""Models of several towers at tiny sizes, built from their transformers config classes with
random weights and the library's defaults (dropout, ``use_cache``, attention implementation):
LLaVA (a CLIP vision tower, a projector, a Llama language model) and T5 (an encoder and a
decoder). The sizes are Hugging Face's tester configurations (``tests/helpers/hf_testers.py``)
with more layers per tower, so that the blocks hold most of the step's activation memory as in
real models: at the testers' 2 layers a tower, one block's recompute alone is a third of it.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.helpers.hf_testers import BATCH, SEQ, VOCAB, Built, _tokens


def _feed_forward(width: int) -> int:
    """The testers' feed-forward width (37 for 32), scaled with the width."""
    return 37 * width // 32


def llava(
    vision_layers: int = 2, text_layers: int = 2, image_size: int = 8, width: int = 32
) -> Built:
    """``LlavaForConditionalGeneration``: a CLIP vision tower of ``vision_layers`` layers on
    3 images of ``image_size`` pixels (patches of 2), the projector, and a Llama of
    ``text_layers`` layers reading the image features and 7 text tokens, with labels; both
    towers ``width`` wide (the testers' 32; the benchmark's larger rows 256)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_tokens = (image_size // 2) ** 2
    config = LlavaConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "intermediate_size": _feed_forward(width),
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": width,
            "projection_dim": width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 4,
            "intermediate_size": _feed_forward(width),
        },
        image_token_index=0,
        image_seq_length=image_tokens,
    )
    ids = _tokens(batch=3, seq=SEQ + image_tokens, vocab=VOCAB - 2) + 2
    ids[:, :image_tokens] = 0
    sample: dict[str, Any] = {
        "pixel_values": torch.rand(3, 3, image_size, image_size),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
    }
    return Built(LlavaForConditionalGeneration(config).train(), sample)


def t5(encoder_layers: int = 2, decoder_layers: int = 2, width: int = 32) -> Built:
    """``T5ForConditionalGeneration`` with ``encoder_layers`` and ``decoder_layers`` layers
    ``width`` wide on 13 sequences of 7 tokens (a random padding mask), decoder inputs and
    labels."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=width,
        d_ff=_feed_forward(width),
        d_kv=width // 4,
        num_layers=encoder_layers,
        num_decoder_layers=decoder_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        eos_token_id=1,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    ids = _tokens(BATCH, SEQ)
    sample = {
        "input_ids": ids,
        "attention_mask": torch.randint(0, 2, ids.shape).index_fill_(1, torch.tensor([0]), 1),
        "decoder_input_ids": _tokens(BATCH, SEQ),
        "labels": _tokens(BATCH, SEQ),
    }
    return Built(T5ForConditionalGeneration(config).train(), sample)
