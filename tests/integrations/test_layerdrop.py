"""LayerDrop (random layer skipping, on by default in wav2vec2 and its kin): refused clearly,
before anything is measured or changed."""

from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import UnsupportedModelError
from memfit.integrations.hf import layerdrop_fields
from memfit.measuring.chain import find_chain
from memfit.planning.plan import Plan, Stage, recompute_one

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:transformers")

AUDIO = {  # as the transformers testers build them: hidden 16, 2 layers, head width 8
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 20,
    "conv_dim": (32, 32, 32),
    "conv_stride": (4, 4, 4),
    "conv_kernel": (8, 8, 8),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "vocab_size": 32,
}


def _audio(family: str, **changes: Any) -> nn.Module:
    config_class, model_class = {
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2ForCTC),
        "hubert": (transformers.HubertConfig, transformers.HubertForCTC),
    }[family]
    torch.manual_seed(0)
    return model_class(config_class(**{**AUDIO, **changes})).train()


SAMPLE = {"input_values": torch.randn(2, 1024), "labels": torch.randint(1, 32, (2, 5))}


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_layerdrop_is_refused_before_profiling(family: str) -> None:
    model = _audio(family)
    assert model.config.layerdrop == 0.1  # the library's default, as users get it
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(
        UnsupportedModelError, match=r"LayerDrop: config\.layerdrop=0\.1.*layerdrop=0\.0"
    ):
        memfit.auto(model, SAMPLE, budget="80%")
    assert calls == []  # nothing ran: refused before any step


def test_layerdrop_is_refused_by_apply() -> None:
    model = _audio("wav2vec2", layerdrop=0.0)
    chain = find_chain(model, lambda: model(**SAMPLE))
    tree = tuple(
        recompute_one(i) if chain.block_of_stage(i) is not None else Stage(i)
        for i in range(len(chain))
    )
    plan = Plan.from_tree(chain.stage_names, tree, "all")
    model.config.layerdrop = 0.05
    with pytest.raises(UnsupportedModelError, match=r"config\.layerdrop=0\.05"):
        memfit.apply(model, plan)
    assert memfit.remove(model) is False  # nothing was applied
    model.config.layerdrop = 0.0
    memfit.apply(model, plan)
    assert memfit.remove(model) is True


class CopiedLayerDrop(nn.Module):
    """A layer stack that copied its config's LayerDrop when built, as BART's encoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.layerdrop = 0.2
        self.use_layerdrop = True  # not a probability: other names are left alone


def test_layerdrop_fields_name_module_attributes() -> None:
    model = nn.Sequential(nn.Linear(4, 4), CopiedLayerDrop())
    assert layerdrop_fields(model) == {"1.layerdrop": 0.2}
    model[1].layerdrop = 0.0
    assert layerdrop_fields(model) == {}
