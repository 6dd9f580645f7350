"""Tiny models of issue 24 whose blocks the chain finder alone did not find, built from their
libraries' config classes with every other setting at the library's default (random weights,
no downloads).

transformers: the sizes of its own ``*ModelTester`` classes (hidden 16-32, two layers), as in
:mod:`tests.helpers.hf_testers`. diffusers: sizes from its own model tests (head width 8-16,
width 32; SD3 and Flux from :mod:`tests.helpers.diffusion`); the U-Net is Stable-Diffusion-like (cross-attention down and up blocks,
``block_out_channels=(32, 64)``). Diffusion models get a diffusion step's loss: the mean
squared error of the prediction against a fixed target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.helpers import diffusion
from tests.helpers.hf_testers import BATCH, DECODER, VOCAB, Built, _decoder_sample, _tokens


def _mse_to(target: torch.Tensor) -> Callable[[Any], torch.Tensor]:
    def loss_fn(output: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(output.sample, target)

    return loss_fn


def _classified() -> dict[str, Any]:
    ids = _tokens()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}


def flaubert() -> Built:
    from transformers import FlaubertConfig, FlaubertForSequenceClassification

    config = FlaubertConfig(
        vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=512
    )
    return Built(FlaubertForSequenceClassification(config).train(), _classified())


def xlm() -> Built:
    from transformers import XLMConfig, XLMForSequenceClassification

    config = XLMConfig(
        vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=512
    )
    return Built(XLMForSequenceClassification(config).train(), _classified())


def squeezebert() -> Built:
    from transformers import SqueezeBertConfig, SqueezeBertForSequenceClassification

    config = SqueezeBertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        embedding_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        q_groups=2,
        k_groups=2,
        v_groups=2,
        post_attention_groups=2,
        intermediate_groups=4,
        output_groups=1,
    )
    return Built(SqueezeBertForSequenceClassification(config).train(), _classified())


def ibert() -> Built:
    from transformers import IBertConfig, IBertForSequenceClassification

    config = IBertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        quant_mode=True,
    )
    return Built(IBertForSequenceClassification(config).train(), _classified())


def recurrent_gemma() -> Built:
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(
        **(DECODER | dict(num_hidden_layers=3, lru_width=32, attention_window_size=16, head_dim=8))
    )
    return Built(RecurrentGemmaForCausalLM(config).train(), _decoder_sample())


def gemma4() -> Built:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        **(
            DECODER
            | dict(
                head_dim=8,
                global_head_dim=8,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=4,
                hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=VOCAB,
            )
        )
    )
    return Built(Gemma4ForCausalLM(config).train(), _decoder_sample())


def longcat_flash() -> Built:
    """Two layers (each two attentions and a mixture of experts with zero-computation experts)."""
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    decoder = {
        key: value
        for key, value in DECODER.items()
        if key not in ("num_hidden_layers", "intermediate_size", "num_key_value_heads")
    }
    config = LongcatFlashConfig(
        **decoder,
        num_layers=2,
        ffn_hidden_size=37,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        moe_topk=2,
        zero_expert_num=2,
        expert_ffn_hidden_size=16,
    )
    return Built(LongcatFlashForCausalLM(config).train(), _decoder_sample())


def florence2() -> Built:
    """A DaViT vision tower of two stages (one block each) and a BART-like language model of
    2 + 2 layers; 17 image tokens (16 patches and one pooled) before 7 text tokens."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    vision = dict(
        depths=(1, 1),
        patch_size=(7, 3),
        patch_stride=(4, 2),
        patch_padding=(3, 1),
        patch_prenorm=(False, True),
        embed_dim=(16, 32),
        num_heads=(2, 4),
        num_groups=(2, 4),
        window_size=2,
        projection_dim=32,
        max_position_embeddings=16,
        max_temporal_embeddings=4,
    )
    text = dict(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    image_token = VOCAB - 1
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=image_token)
    ids = torch.cat([torch.full((2, 17), image_token), torch.randint(3, VOCAB - 9, (2, 7))], 1)
    sample = {
        "pixel_values": torch.rand(2, 3, 32, 32),
        "input_ids": ids,
        "labels": torch.randint(3, VOCAB - 9, (2, 5)),
    }
    return Built(Florence2ForConditionalGeneration(config).train(), sample)


def evolla() -> Built:
    """A SaProt protein encoder of one layer, a resampler of depth 2 and a Llama-like decoder of
    two layers (hidden 16, head width 8) whose layers cross-attend to the protein features;
    20 text and 10 protein tokens."""
    from transformers import EvollaConfig, EvollaForProteinText2Text

    protein = dict(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
    )
    config = EvollaConfig(
        protein_encoder_config=protein,
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        aligner_num_add_layers=1,
        resampler_depth=2,
        resampler_num_latents=7,
        resampler_ff_mult=1,
        resampler_heads=2,
        resampler_dim_head=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    ids = torch.randint(3, VOCAB, (2, 20))
    sample = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "protein_input_ids": torch.randint(4, 20, (2, 10)),
        "protein_attention_mask": torch.ones(2, 10, dtype=torch.long),
    }
    return Built(EvollaForProteinText2Text(config).train(), sample)


def wav2vec2_bert() -> Built:
    """LayerDrop off (0.1 by default): memfit refuses LayerDrop and says to turn it off."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForSequenceClassification

    config = Wav2Vec2BertConfig(
        layerdrop=0.0,
        hidden_size=16,
        feature_projection_input_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        conv_depthwise_kernel_size=3,
        output_hidden_size=16,
    )
    sample = {
        "input_features": torch.rand(BATCH, 32, 16),
        "attention_mask": torch.ones(BATCH, 32, dtype=torch.long),
        "labels": torch.randint(0, 2, (BATCH,)),
    }
    return Built(Wav2Vec2BertForSequenceClassification(config).train(), sample)


_EOMT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=4,
    num_queries=5,
    num_blocks=1,
    num_labels=3,
    num_register_tokens=0,
)


def eomt() -> Built:
    from transformers import EomtConfig, EomtForUniversalSegmentation

    return Built(EomtForUniversalSegmentation(EomtConfig(**_EOMT)).train(), _segmentation())


def eomt_dinov3() -> Built:
    from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

    config = EomtDinov3Config(**_EOMT, intermediate_size=64)
    return Built(EomtDinov3ForUniversalSegmentation(config).train(), _segmentation())


def _segmentation() -> dict[str, Any]:
    return {
        "pixel_values": torch.rand(2, 3, 32, 32),
        "mask_labels": [torch.randint(0, 2, (2, 32, 32)).float() for _ in range(2)],
        "class_labels": [torch.randint(0, 3, (2,)) for _ in range(2)],
    }


def unet(size: int = 16) -> Built:
    """Latents of ``size`` x ``size`` (16: the second down block works on 8 x 8, each
    attention on 256 positions; what the tests check, the children, joins and skips, does not
    depend on the size, and a step at 32 x 32 costs about four times as much)."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    sample = {
        "sample": torch.randn(2, 4, size, size),
        "timestep": torch.randint(0, 1000, (2,)),
        "encoder_hidden_states": torch.randn(2, 7, 32),
    }
    return Built(model.train(), sample, _mse_to(torch.randn(2, 4, size, size)))


def unet_children(model: torch.nn.Module) -> list[str]:
    """The U-Net's resnets, attentions, down- and upsamplers in the order its forward runs
    them."""
    names = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        container = getattr(model, part)
        blocks = (
            [(part, container)]
            if part == "mid_block"
            else [(f"{part}.{i}", block) for i, block in enumerate(container)]
        )
        for prefix, block in blocks:
            attentions = getattr(block, "attentions", None) or []
            if part == "mid_block":  # resnet, then (attention, resnet) pairs
                names.append(f"{prefix}.resnets.0")
                for j in range(len(attentions)):
                    names += [f"{prefix}.attentions.{j}", f"{prefix}.resnets.{j + 1}"]
                continue
            for j in range(len(block.resnets)):
                names.append(f"{prefix}.resnets.{j}")
                if j < len(attentions):
                    names.append(f"{prefix}.attentions.{j}")
            for sampler in ("downsamplers", "upsamplers"):
                if getattr(block, sampler, None) is not None:
                    names.append(f"{prefix}.{sampler}.0")
    return names


def vae() -> Built:
    """``AutoencoderKL`` with two down and two up blocks: diffusers checkpoints each down block,
    each mid block and each up block."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=32,
    )
    target = torch.randn(2, 3, 32, 32)
    return Built(model.train(), {"sample": torch.randn(2, 3, 32, 32)}, _mse_to(target))


MODELS: dict[str, Callable[[], Built | diffusion.Built]] = {
    "flaubert": flaubert,
    "xlm": xlm,
    "squeezebert": squeezebert,
    "ibert": ibert,
    "recurrent_gemma": recurrent_gemma,
    "gemma4": gemma4,
    "longcat_flash": longcat_flash,
    "florence2": florence2,
    "evolla": evolla,
    "wav2vec2_bert": wav2vec2_bert,
    "eomt": eomt,
    "eomt_dinov3": eomt_dinov3,
    "sd3": diffusion.sd3,
    "flux": diffusion.flux,
    "unet": unet,
    "vae": vae,
}
