"""Finding the chain of blocks."""

import pytest
import torch
from torch import nn

from memfit.errors import UnsupportedModelError
from memfit.measuring.chain import POST, PRE, find_chain
from memfit.models import build


def _find(model: nn.Module, sample: tuple, blocks=None):
    return find_chain(model, lambda: model(*sample), blocks)


@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_builtin_models(name: str) -> None:
    model, sample = build(name, layers=3)
    chain = _find(model, sample)
    assert chain.container == "blocks"
    assert chain.stage_names == (PRE, "blocks.0", "blocks.1", "blocks.2", POST)
    assert chain.block_of_stage(1) is model.blocks[0]
    assert chain.block_of_stage(0) is None and chain.block_of_stage(4) is None


def test_blocks_given_by_name_and_by_container() -> None:
    model, sample = build("gpt", layers=3)
    by_names = _find(model, sample, ["blocks.0", "blocks.1"])
    assert by_names.block_names == ("blocks.0", "blocks.1")
    assert _find(model, sample, "blocks").block_names == ("blocks.0", "blocks.1", "blocks.2")


def test_blocks_out_of_order_are_not_a_chain() -> None:
    model, sample = build("gpt", layers=3)
    with pytest.raises(UnsupportedModelError, match="not a chain"):
        _find(model, sample, ["blocks.1", "blocks.0"])


def test_unknown_block_name() -> None:
    model, sample = build("gpt", layers=2)
    with pytest.raises(ValueError, match="not submodules"):
        _find(model, sample, ["blocks.7"])


class NoChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).sum()


class Parallel(nn.Module):
    """A ModuleList whose members all read the same input: not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(head(x) for head in self.heads).sum()


@pytest.mark.parametrize("model", [NoChain(), Parallel()])
def test_no_chain_is_a_clear_error(model: nn.Module) -> None:
    with pytest.raises(UnsupportedModelError, match="blocks="):
        _find(model, (torch.zeros(2, 4),))


def test_one_rule_for_the_main_input() -> None:
    from memfit.measuring.chain import side_inputs, split_main

    x, mask = torch.ones(2), torch.zeros(2)
    assert split_main((x, mask), {"scale": 2}) == (x, (mask,), {"scale": 2})
    main, rest, kwargs = split_main((), {"attention_mask": mask, "hidden_states": x})
    assert main is x and rest == () and kwargs == {"attention_mask": mask}
    assert split_main((), {"attention_mask": mask}) == (None, (), {"attention_mask": mask})
    assert side_inputs((), {"hidden_states": x, "attention_mask": mask}) == (
        (),
        {"attention_mask": mask},
    )


class SkipReader(nn.Module):
    """Each block reads ``cat(f(previous output), skip)``, as a U-Net's up blocks do: not a
    chain. The previous output dies just before the concatenation is made, which is then
    likely to get its ``id()``."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = h = x
        for block in self.blocks:
            h = torch.tanh(h)  # the block's output is freed here
            h = torch.cat([h, skip], dim=-1)
            h = block(h)
        return h.sum()


def test_blocks_reading_a_concatenated_skip_are_not_a_chain() -> None:
    model = SkipReader()
    for _ in range(5):  # the same answer on every call
        with pytest.raises(UnsupportedModelError, match="found no chain"):
            _find(model, (torch.randn(2, 8),))


def test_stable_diffusion_unet_up_blocks_are_not_a_chain() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    sample = {
        "sample": torch.randn(1, 4, 8, 8),
        "timestep": torch.tensor(1),
        "encoder_hidden_states": torch.randn(1, 4, 32),
    }
    chains = [find_chain(model, lambda: model(**sample)) for _ in range(4)]
    # up_blocks.1's resnets read the 64 channels of cat(previous output, skip), not the 32 of
    # the previous output
    assert not any(name.startswith("up_blocks.1.") for name in chains[0].block_names)
    assert {chain.block_names for chain in chains} == {chains[0].block_names}


class SharedHead(nn.Module):
    """A list of modules registered under their own names too (HGNetV2's classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.pool = nn.Tanh()
        self.flatten = nn.Flatten()
        self.classifier = nn.ModuleList([self.pool, self.flatten])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        for layer in self.classifier:
            x = layer(x)
        return x.sum()


def test_a_module_registered_under_two_names() -> None:
    model = SharedHead()
    sample = (torch.randn(2, 4),)
    assert _find(model, sample).block_names == ("blocks.0", "blocks.1", "blocks.2")
    assert _find(model, sample, ["pool", "flatten"]).block_names == ("pool", "flatten")
    with pytest.raises(ValueError, match=r"'classifier.0' \(first 'pool'\)"):
        _find(model, sample, "classifier")


def test_hgnet_v2_classifier_shares_its_pool() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.HGNetV2Config(
        embeddings_size=10,
        hidden_sizes=[16, 32],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16],
        stage_mid_channels=[8, 16],
        stage_out_channels=[16, 32],
        stage_num_blocks=[1, 2],
        stage_downsample=[False, True],
        stage_light_block=[False, True],
        stage_kernel_size=[3, 3],
        stage_numb_of_layers=[2, 2],
        depths=[1, 2],
        num_labels=3,
    )
    model = transformers.HGNetV2ForImageClassification(config).train()
    sample = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}
    chain = find_chain(model, lambda: model(**sample))  # was KeyError: 'classifier.0'
    assert not any(name.startswith("classifier.") for name in chain.block_names)


class _Modulation(nn.Module):
    """FocalNet's focal modulation: focal layers run as a chain, and the module sums their
    outputs as they come (``ctx_all = ctx_all + ctx * gate``)."""

    def __init__(self, width: int, levels: int = 3) -> None:
        super().__init__()
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(levels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        for layer in self.focal_layers:
            x = layer(x)
            total = total + x * 0.5
        return total


class _FocalLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.modulation = _Modulation(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.modulation(self.norm(x))


def test_layers_whose_outputs_the_parent_sums_are_not_a_chain() -> None:
    # FocalNet at its tester size: the focal layers (3 of them) outnumbered the model's own
    # layers (2) and were planned as the chain, with their outputs alive in the parent's sum:
    # 11% over the prediction and over the budget. They are one computation's steps.
    model = nn.Sequential(_FocalLayer(8), _FocalLayer(8))
    x = torch.randn(2, 8)
    chain = find_chain(model, lambda: model(x))
    assert chain.block_names == ("0", "1")
    # named by hand, they are still taken as asked
    named = find_chain(model, lambda: model(x), blocks="0.modulation.focal_layers")
    assert named.block_names == tuple(f"0.modulation.focal_layers.{i}" for i in range(3))
