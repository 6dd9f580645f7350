"""Finding a sample's batch and sequence axes, and samples of other shapes."""

from __future__ import annotations

import pytest
import torch

from memfit.measuring.sample_shapes import batch_shape, resize_sample, sample_layout
from memfit.planning.shape_fits import Shape


def hf_sample(batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.arange(batch * seq).reshape(batch, seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def test_hf_dict_sample() -> None:
    layout = sample_layout(hf_sample())
    assert layout.shape == Shape(2, 8) and layout.reference == "input_ids"
    assert dict(layout.seq_axes) == {"input_ids": (1,), "attention_mask": (1,), "labels": (1,)}


def test_resize_keeps_padding_at_the_end_and_owns_storage() -> None:
    sample = hf_sample()
    short = resize_sample(sample, Shape(3, 4))
    assert short["input_ids"].shape == (3, 4)
    assert short["attention_mask"][0].tolist() == [1, 1, 1, 0]  # padding stays at the end
    assert torch.equal(short["input_ids"][2], short["input_ids"][0])  # rows taken in turn
    assert short["input_ids"].untyped_storage().nbytes() == 3 * 4 * 8
    long = resize_sample(sample, Shape(1, 16))
    assert long["labels"].shape == (1, 16)


def test_positional_and_embedding_samples() -> None:
    tokens = torch.zeros(4, 32, dtype=torch.long)
    assert sample_layout((tokens, tokens)).shape == Shape(4, 32)
    embeddings = torch.randn(4, 32, 16, requires_grad=True)
    layout = sample_layout((embeddings,))
    assert layout.shape == Shape(4, 32)
    resized = resize_sample((embeddings,), Shape(2, 64), layout)[0]
    assert resized.shape == (2, 64, 16) and resized.requires_grad and resized.is_leaf
    assert batch_shape((torch.zeros(3, 7, 16),), {}, layout) == Shape(3, 7)


def test_no_sequence_axis() -> None:
    images = (torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    layout = sample_layout(images)
    assert layout.shape == Shape(8, 0) and not layout.has_seq
    assert resize_sample(images, Shape(2, 0))[0].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="no sequence axis"):
        resize_sample(images, Shape(2, 16))


def test_bad_samples_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match="batch on dim 0"):
        sample_layout((torch.zeros(2, 8, dtype=torch.long), torch.zeros(3, 8)))
    with pytest.raises(ValueError, match="no tensor with a batch axis"):
        sample_layout((3,))
    layout = sample_layout(hf_sample())
    with pytest.raises(ValueError, match="reads each batch's shape from 'input_ids'"):
        batch_shape((), {"inputs_embeds": torch.zeros(2, 8, 4)}, layout)


def test_step_seconds_at_every_shape_leaves_gradients() -> None:
    from memfit.measuring.sample_shapes import step_seconds_at
    from memfit.models import gpt

    model, sample = gpt(layers=2, width=32, heads=2, vocab=64, seq=32, batch=2)
    model(*sample).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    shapes = [Shape(1, 16), Shape(2, 32)]
    seconds = step_seconds_at(model, {s: resize_sample(sample, s) for s in shapes}, rounds=3)
    assert list(seconds) == shapes and all(value > 0 for value in seconds.values())
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="rounds"):
        step_seconds_at(model, {shapes[0]: sample}, rounds=0)
