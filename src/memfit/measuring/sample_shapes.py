"""The shape of a sample: where its batch and sequence axes are, and samples of other shapes.

One rule, used to make samples of other shapes for profiling (:func:`resize_sample`) and to read
the shape of each batch a planned model gets (:func:`batch_shape`); and the plain step timed at
several shapes side by side (:func:`step_seconds_at`):

* the batch is dim 0 of every tensor of the sample with at least one dim (all must agree);
* the sequence length is dim 1 of the first integer tensor with two or more dims (token ids,
  ``input_ids``; HF's ``attention_mask`` and ``labels`` have the same shape), or, without one,
  of the first floating tensor with exactly three dims (``(batch, seq, hidden)`` embeddings).
  Images (four dims) and flat features have no sequence axis;
* the sequence axes are dim 1 of every tensor with two or more dims whose dim 1 has that length,
  and, for integer and bool tensors, every later dim of that length too (a 2-D mask per sample).

Only the top level of the sample is read (a tuple of positional or a dict of keyword arguments).
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memfit.measuring.loop import TrainingLoop
from memfit.measuring.run import USUAL, step_clock
from memfit.measuring.step import split_sample
from memfit.planning.shape_fits import Shape

Key = int | str  # a positional argument's index or a keyword argument's name


@dataclass(frozen=True, slots=True)
class SampleLayout:
    """Where a sample's batch and sequence axes are.

    Attributes:
        shape: the sample's own shape (``seq`` 0 when it has no sequence axis).
        reference: the argument that carries the shape (its dims 0 and 1).
        batch_keys: the tensor arguments with a batch axis (dim 0).
        seq_axes: argument -> its sequence dims.
    """

    shape: Shape
    reference: Key
    batch_keys: tuple[Key, ...]
    seq_axes: Mapping[Key, tuple[int, ...]]

    @property
    def has_seq(self) -> bool:
        return self.shape.seq > 0


def _items(sample: Any) -> list[tuple[Key, Any]]:
    args, kwargs = split_sample(sample)
    return [*enumerate(args), *kwargs.items()]


def _name(key: Key) -> str:
    return f"argument {key}" if isinstance(key, int) else repr(key)


def _integral(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex())


def sample_layout(sample: Any) -> SampleLayout:
    """Find the batch and sequence axes of ``sample`` (see the module docstring).

    Raises:
        ValueError: the sample has no tensor with a batch axis, or its tensors disagree on the
            batch size (dim 0), naming them.

    Example:
        >>> sample_layout({"input_ids": ids, "labels": ids}).shape
        Shape(batch=2, seq=128)
    """
    tensors = [(k, v) for k, v in _items(sample) if isinstance(v, torch.Tensor) and v.dim() >= 1]
    if not tensors:
        raise ValueError(
            "the sample has no tensor with a batch axis (dim 0); shapes need a batch of tensors "
            "such as input_ids of shape (batch, seq)"
        )
    sizes = {key: tensor.shape[0] for key, tensor in tensors}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{_name(k)} {tuple(t.shape)}" for k, t in tensors)
        raise ValueError(
            f"expected every tensor of the sample to carry the batch on dim 0 (one size); got "
            f"{listed}; pass samples whose tensors are batch-first"
        )
    reference = next(
        (key for key, t in tensors if t.dim() >= 2 and _integral(t)),
        next((key for key, t in tensors if t.dim() == 3 and t.is_floating_point()), None),
    )
    batch = tensors[0][1].shape[0]
    if reference is None:
        return SampleLayout(Shape(batch, 0), tensors[0][0], tuple(sizes), {})
    seq = dict(tensors)[reference].shape[1]
    axes: dict[Key, tuple[int, ...]] = {}
    for key, tensor in tensors:
        if tensor.dim() < 2 or tensor.shape[1] != seq:
            continue
        dims = [1]
        if _integral(tensor):
            dims += [d for d in range(2, tensor.dim()) if tensor.shape[d] == seq]
        axes[key] = tuple(dims)
    return SampleLayout(Shape(batch, seq), reference, tuple(sizes), axes)


def _resize(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    old = tensor.shape[dim]
    # spread over the old axis (floor(i * old / size)): shorter samples keep its end (padding
    # at the end of a mask stays there), longer ones repeat each position in place
    index = torch.div(torch.arange(size) * old, size, rounding_mode="floor")
    return tensor.index_select(dim, index.to(tensor.device))


def resize_sample(sample: Any, shape: Shape, layout: SampleLayout | None = None) -> Any:
    """A copy of ``sample`` with another batch size and sequence length.

    Rows are taken in turn (``i % batch``: a larger batch repeats the sample's rows); sequence
    positions are spread over the old length (a shorter sample keeps the end's padding, a
    longer one repeats each position). Every tensor is a new one (its own storage), with the
    old one's ``requires_grad``; other arguments are passed as they are.

    Raises:
        ValueError: ``shape.seq`` is set but the sample has no sequence axis.
    """
    layout = layout or sample_layout(sample)
    if shape.seq and not layout.has_seq:
        raise ValueError(
            f"cannot make samples of {shape.seq} tokens: the sample has no sequence axis "
            f"(expected token ids of shape (batch, seq), or (batch, seq, hidden) embeddings); "
            f"give shapes by batch only"
        )
    items = []
    for key, value in _items(sample):
        if key in layout.batch_keys:
            with torch.no_grad():
                rows = torch.arange(shape.batch) % value.shape[0]
                value_ = value.index_select(0, rows.to(value.device))
                for dim in layout.seq_axes.get(key, ()):
                    value_ = _resize(value_, dim, shape.seq)
            value = value_.requires_grad_(value.requires_grad)
        items.append((key, value))
    if isinstance(sample, tuple):
        return tuple(value for _, value in items)
    return dict(items)


def _argument(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], key: Key, forward: Any = None
) -> Any:
    """The call's argument ``key`` (a position or a keyword), also when the call passes it the
    other way: the sample gave it by position and the call by keyword, or the reverse, matched
    through ``forward``'s signature."""
    if isinstance(key, str) and key in kwargs:
        return kwargs[key]
    if isinstance(key, int) and key < len(args):
        return args[key]
    if forward is None:
        return None
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return None
    positional = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if isinstance(key, int):  # given by position in the sample, by keyword now
        if key < len(positional) and parameters[key].kind is not inspect.Parameter.POSITIONAL_ONLY:
            return kwargs.get(positional[key])  # positional parameters come first
        return None
    if key in positional:  # given by keyword in the sample, by position now
        index = positional.index(key)
        return args[index] if index < len(args) else None
    return None


def batch_shape(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], layout: SampleLayout, forward: Any = None
) -> Shape:
    """The shape of one call's batch, read from the argument ``layout`` names as reference.

    Args:
        forward: the model's ``forward``: with it, the reference argument is found also when
            the call passes it by keyword where the sample had it by position, or the reverse.

    Raises:
        ValueError: that argument is missing or is not a tensor of the expected rank.
    """
    key = layout.reference
    value = _argument(args, kwargs, key, forward)
    rank = 2 if layout.has_seq else 1
    if not isinstance(value, torch.Tensor) or value.dim() < rank:
        raise ValueError(
            f"a planned model with shape-dependent plans reads each batch's shape from "
            f"{_name(key)} (a tensor with {rank} dims or more, as in the sample it was planned "
            f"with); got {type(value).__name__ if value is None or not isinstance(value, torch.Tensor) else tuple(value.shape)}"
        )
    return Shape(value.shape[0], value.shape[1] if layout.has_seq else 0)


def step_seconds_at(
    model: nn.Module,
    samples: Mapping[Shape, Any],
    *,
    rounds: int = 5,
    loop: TrainingLoop = USUAL,
) -> dict[Shape, float]:
    """The median CPU seconds (wall on CUDA) of a training step of ``model`` as it is now at
    each of several samples, timed in ``rounds`` passes over all of them, so that another
    process's load, which moves even CPU seconds (+20% at a wall/CPU factor of 3:
    ``benchmarks/results/design-figures.md``, "Cost of the stage marks"),
    reaches every shape alike. Each step comes after one untimed step of the same sample and
    has no stage marks (:func:`~memfit.measuring.run.step_clock`).

    Raises:
        ValueError: ``rounds`` below 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    seconds: dict[Shape, list[float]] = {shape: [] for shape in samples}
    for _ in range(rounds):
        for shape, sample in samples.items():
            _wall, cpu = step_clock(model, sample, loop=loop)
            seconds[shape].append(cpu)
    return {shape: statistics.median(values) for shape, values in seconds.items()}
