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


def verified_at_its_floor(built: Built) -> tuple[int, Any, Any]:
    """Profile ``built`` as it is, plan at the smallest budget memfit names (the error of a 1%
    budget), apply that plan and verify it with the op trace: ``(floor, plan, report)``."""
    import pytest

    import memfit
    from memfit.errors import InfeasibleBudgetError

    profile = memfit.profile(built.model, built.sample, loss_fn=built.loss_fn)
    with pytest.raises(InfeasibleBudgetError) as raised:
        memfit.plan(profile, budget="1%")
    floor = raised.value.min_feasible_bytes
    plan = memfit.plan(profile, budget=floor)
    memfit.apply(built.model, plan)
    report = memfit.verify(built.model, built.sample, loss_fn=built.loss_fn, repeats=1, trace=True)
    return floor, plan, report


def verified_within_budget(model: nn.Module, sample: Any, loss_fn: LossFn | None, plan: Any) -> Any:
    """Apply ``plan`` to ``model``, ``memfit.verify`` it with the op trace and take the plan off
    again; assert what every real-model case asserts of a plan: loss and gradients
    ``torch.equal`` to the unplanned step's, the same ops on the same layouts, the measured
    peak within the plan's budget (when it has one), the predicted peak within 2% of the
    measured one. Returns the report for the case's own checks."""
    import memfit

    memfit.apply(model, plan)
    try:
        report = memfit.verify(model, sample, loss_fn=loss_fn, repeats=1, trace=True)
    finally:
        memfit.remove(model)
    assert report.loss_equal and report.gradients_equal, report.mismatched
    assert report.trace_difference == "", report.trace_difference
    if plan.budget_bytes is not None:
        assert report.budget_bytes == plan.budget_bytes
        assert report.measured_peak_bytes <= plan.budget_bytes, (
            report.measured_peak_bytes,
            plan.budget_bytes,
        )
    assert abs(report.prediction_error) <= 0.02, (
        report.predicted_peak_bytes,
        report.measured_peak_bytes,
    )
    return report


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


def hgnet_v2() -> Built:
    from transformers import HGNetV2Config, HGNetV2ForImageClassification

    config = HGNetV2Config(
        embeddings_size=10,
        hidden_sizes=[64, 128, 256, 512],
        stage_in_channels=[16, 64, 128, 256],
        stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 128, 256, 512],
        stage_num_blocks=[1, 1, 2, 1],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        stage_numb_of_layers=[3, 3, 3, 3],
        stem_channels=[3, 16, 16],
        depths=[1, 1, 2, 1],
        hidden_act="relu",
        num_labels=3,
    )
    return _image_classifier(HGNetV2ForImageClassification(config), 3, 32, 3)


def textnet() -> Built:
    from transformers import TextNetConfig, TextNetForImageClassification

    config = TextNetConfig(
        stage1_in_channels=[64],
        stage1_out_channels=[64],
        stage1_kernel_size=[[3, 3]],
        stage1_stride=[1],
        stage2_in_channels=[64],
        stage2_out_channels=[128],
        stage2_kernel_size=[[3, 1]],
        stage2_stride=[2],
        stage3_in_channels=[128],
        stage3_out_channels=[256],
        stage3_kernel_size=[[1, 3]],
        stage3_stride=[2],
        stage4_in_channels=[256],
        stage4_out_channels=[512],
        stage4_kernel_size=[[3, 3]],
        stage4_stride=[2],
        hidden_sizes=[64, 64, 128, 256, 512],
        num_labels=3,
    )
    return _image_classifier(TextNetForImageClassification(config), 3, 32, 3)


def mobilenet_v1() -> Built:
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification

    config = MobileNetV1Config(
        image_size=32,
        depth_multiplier=0.25,
        min_depth=8,
        tf_padding=True,
        hidden_act="relu6",
        classifier_dropout_prob=0.1,
        num_labels=10,
    )
    return _image_classifier(MobileNetV1ForImageClassification(config), 13, 32, 10)


def reformer() -> Built:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(
        vocab_size=32,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=32,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        local_attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        is_decoder=True,
        axial_pos_embds=True,
        axial_pos_shape=[4, 8],
        axial_pos_embds_dim=[16, 16],
        local_attn_chunk_length=4,
        local_num_chunks_after=0,
        local_num_chunks_before=1,
        num_hashes=1,
        attn_layers=["local", "local"],
        pad_token_id=0,
        eos_token_id=2,
        hash_seed=0,
    )
    ids = _tokens(seq=32, vocab=32)
    mask = torch.randint(0, 2, ids.shape).index_fill_(1, torch.tensor([0]), 1)
    sample = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    return Built(ReformerModelWithLMHead(config).train(), sample)


def xlstm() -> Built:
    from transformers import xLSTMConfig, xLSTMForCausalLM

    config = xLSTMConfig(
        num_heads=2,
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        qk_dim_factor=0.5,
        v_dim_factor=1.0,
        use_cache=True,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
        chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native",
        step_kernel="native",
        tie_word_embeddings=False,
    )
    ids = _tokens()
    return Built(xLSTMForCausalLM(config).train(), {"input_ids": ids, "labels": ids})


def falcon_h1() -> Built:
    from transformers import FalconH1Config, FalconH1ForCausalLM

    config = FalconH1Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        hidden_act="silu",
        attention_dropout=0.0,
        max_position_embeddings=512,
        pad_token_id=0,
        mamba_n_groups=1,
        mamba_n_heads=16,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
    )
    return Built(FalconH1ForCausalLM(config).train(), _decoder_sample())


def _speech_sample() -> dict[str, Any]:
    """The speech testers' inputs: 1,024 samples with a random padding mask, and class labels."""
    values = torch.rand(13, 1024) * 2 - 1
    mask = torch.randint(0, 2, values.shape).index_fill_(1, torch.tensor([0]), 1)
    return {"input_values": values, "attention_mask": mask, "labels": torch.randint(0, 2, (13,))}


def sew_d() -> Built:
    from transformers import SEWDConfig, SEWDForSequenceClassification

    config = SEWDConfig(
        hidden_size=32,
        feat_extract_norm="group",
        feat_extract_dropout=0.0,
        feat_extract_activation="gelu",
        conv_dim=(64, 32, 32),
        conv_stride=(5, 2, 1),
        conv_kernel=(10, 3, 1),
        conv_bias=False,
        num_conv_pos_embeddings=31,
        num_conv_pos_embedding_groups=2,
        squeeze_factor=2,
        max_position_embeddings=512,
        position_buckets=256,
        share_att_key=True,
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=("p2c", "c2p"),
        norm_rel_ebd="layer_norm",
        num_hidden_layers=4,
        num_attention_heads=2,
        hidden_dropout=0.1,
        intermediate_size=20,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        vocab_size=32,
    )
    return Built(SEWDForSequenceClassification(config).train(), _speech_sample())


def wav2vec2_conformer() -> Built:
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerForSequenceClassification

    config = Wav2Vec2ConformerConfig(
        hidden_size=16,
        feat_extract_norm="group",
        feat_extract_dropout=0.0,
        feat_extract_activation="gelu",
        conv_dim=(32, 32, 32),
        conv_stride=(4, 4, 4),
        conv_kernel=(8, 8, 8),
        conv_bias=False,
        mask_time_prob=0.5,
        mask_time_length=2,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_dropout_prob=0.1,
        intermediate_size=20,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        vocab_size=32,
        num_adapter_layers=1,
        adapter_stride=2,
        tdnn_dim=(32, 32),
        tdnn_kernel=(5, 3),
        tdnn_dilation=(1, 2),
        xvector_output_dim=32,
        position_embeddings_type="relative",
        # LayerDrop is refused (test_layerdrop.py) and turned off as a user would; what this case
        # checks is the NumPy time masking (mask_time_prob)
        layerdrop=0.0,
    )
    return Built(Wav2Vec2ConformerForSequenceClassification(config).train(), _speech_sample())


def wav2vec2() -> Built:
    """LayerDrop on (0.1, the library's default): memfit refuses it before profiling."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        hidden_size=16,
        conv_dim=(32, 32, 32),
        conv_stride=(4, 4, 4),
        conv_kernel=(8, 8, 8),
        conv_bias=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        mask_time_prob=0.5,
        mask_time_length=2,
        vocab_size=32,
    )
    return Built(Wav2Vec2ForSequenceClassification(config).train(), _speech_sample())


def pp_lcnet() -> Built:
    from transformers import PPLCNetConfig, PPLCNetForImageClassification

    config = PPLCNetConfig(
        scale=1.0,
        reduction=4,
        dropout_prob=0.2,
        class_expand=1280,
        use_last_conv=True,
        hidden_act="hardswish",
        id2label={"0": "0", "1": "90", "2": "180", "3": "270"},
        block_configs=[
            [[3, 16, 32, 1, False]],
            [[3, 32, 32, 2, False], [3, 32, 32, 1, False]],
            [[3, 32, 32, 2, False], [3, 32, 32, 1, False]],
            [[3, 32, 32, 2, False]] + [[5, 32, 32, 1, False]] * 5,
            [[5, 32, 32, 2, True], [5, 32, 32, 1, True]],
        ],
    )
    sample = {"pixel_values": torch.rand(3, 3, 128, 128)}
    return Built(PPLCNetForImageClassification(config).train(), sample, _logits_loss)


def _logits_loss(output: Any) -> torch.Tensor:
    return output.last_hidden_state.square().mean()


def pp_doclayout_v3() -> Built:
    import pytest
    import transformers

    if not hasattr(transformers, "PPDocLayoutV3ForObjectDetection"):
        pytest.skip(f"PP-DocLayoutV3 is not in transformers {transformers.__version__}")
    backbone = {
        "model_type": "hgnet_v2",
        "arch": "L",
        "return_idx": [0, 1, 2, 3],
        "hidden_sizes": [32, 32, 32, 32],
        "stem_channels": [3, 32, 32],
        "stage_in_channels": [32, 32, 32, 32],
        "stage_mid_channels": [32, 32, 32, 32],
        "stage_out_channels": [32, 32, 32, 32],
        "freeze_stem_only": True,
        "freeze_at": 0,
        "freeze_norm": True,
        "lr_mult_list": [0, 0.05, 0.05, 0.05, 0.05],
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    }
    config = transformers.PPDocLayoutV3Config(
        backbone_config=backbone,
        encoder_hidden_dim=32,
        encoder_in_channels=[20, 30, 40],
        feat_strides=[8, 16, 32],
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        dropout=0.0,
        activation_dropout=0.0,
        encode_proj_layers=[2],
        encoder_activation_function="gelu",
        activation_function="silu",
        mask_feature_channels=[32, 32],
        x4_feat_dim=32,
        d_model=32,
        num_queries=30,
        decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=8,
        num_feature_levels=3,
        decoder_n_points=4,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_activation_function="relu",
        attention_dropout=0.0,
        num_denoising=0,
        learn_initial_query=False,
        image_size=128,
        disable_custom_kernels=True,
        num_labels=25,
    )
    model = transformers.PPDocLayoutV3ForObjectDetection(config).train()
    return Built(model, {"pixel_values": torch.rand(3, 3, 128, 128)}, _detection_loss)


def _detection_loss(output: Any) -> torch.Tensor:
    return output.logits.square().mean() + output.pred_boxes.square().mean()


def lightglue() -> Built:
    from transformers import LightGlueConfig, LightGlueForKeypointMatching

    config = LightGlueConfig(
        keypoint_detector_config={
            "encoder_hidden_sizes": [32, 32, 64],
            "decoder_hidden_size": 64,
            "keypoint_decoder_dim": 65,
            "descriptor_decoder_dim": 64,
            "keypoint_threshold": 0.005,
            "max_keypoints": 256,
            "nms_radius": 4,
            "border_removal_distance": 4,
        },
        descriptor_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        depth_confidence=1.0,
        width_confidence=1.0,
        filter_threshold=0.1,
        matching_threshold=0.0,
        attn_implementation="eager",
    )
    sample = {"pixel_values": torch.rand(2, 2, 3, 60, 80)}
    return Built(LightGlueForKeypointMatching(config).train(), sample, _matching_loss)


def _matching_loss(output: Any) -> torch.Tensor:
    return output.matching_scores.square().mean()


def phi4_multimodal() -> Built:
    from transformers import (
        Phi4MultimodalAudioConfig,
        Phi4MultimodalConfig,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalVisionConfig,
    )

    audio = Phi4MultimodalAudioConfig(
        num_blocks=2,
        hidden_size=32,
        num_attention_heads=8,
        intermediate_size=48,
        depthwise_separable_out_channel=128,
        nemo_conv_channels=128,
        initializer_range=1e-5,
    )
    vision = Phi4MultimodalVisionConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=8,
        crop_size=16,
        initializer_range=1e-5,
    )
    config = Phi4MultimodalConfig(
        num_hidden_layers=2,
        vocab_size=49,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=8,
        num_key_value_heads=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        vision_config=vision,
        audio_config=audio,
    )
    batch, image_tokens, audio_tokens = 2, 275, 8
    ids = _tokens(batch=batch, seq=12 + image_tokens + audio_tokens, vocab=49)
    ids[ids == 0] = 1
    ids[-1, 0] = 0
    ids[:, -image_tokens - audio_tokens : -audio_tokens] = 1
    ids[:, -audio_tokens:] = 2
    mask = torch.ones_like(ids)
    mask[-1, 0] = 0
    sample = {
        "input_ids": ids,
        "attention_mask": mask,
        "image_pixel_values": torch.rand(batch, 2, 3, 16, 16),
        "image_attention_mask": torch.ones(batch, 2, 1, 1),
        "image_sizes": torch.tensor([[16, 16]] * batch),
        "audio_input_features": torch.rand(batch, 61, 80),
        "audio_embed_sizes": torch.tensor([audio_tokens] * batch),
        "labels": ids,
    }
    return Built(Phi4MultimodalForCausalLM(config).train(), sample)


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
    "hgnet_v2": hgnet_v2,
    "phi4_multimodal": phi4_multimodal,
    "reformer": reformer,
    "wav2vec2_conformer": wav2vec2_conformer,
    "textnet": textnet,
    "mobilenet_v1": mobilenet_v1,
    "falcon_h1": falcon_h1,
    "sew_d": sew_d,
    "pp_lcnet": pp_lcnet,
    "pp_doclayout_v3": pp_doclayout_v3,
    "lightglue": lightglue,
    "wav2vec2": wav2vec2,
    "xlstm": xlstm,
}
