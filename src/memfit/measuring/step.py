"""One training step the way memfit measures it: forward, loss, backward.

``sample`` is a tuple of positional arguments or a dict of keyword arguments for ``model(...)``.
The loss is the output itself when it is a scalar tensor, ``output.loss`` when it has one (Hugging
Face), else ``loss_fn(output)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

LossFn = Callable[[Any], torch.Tensor]


def split_sample(sample: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Raises:
        TypeError: the sample is neither a tuple nor a dict.
    """
    if isinstance(sample, tuple):
        return sample, {}
    if isinstance(sample, Mapping):
        if not all(isinstance(key, str) for key in sample):
            raise TypeError("a dict sample must have str keys (keyword arguments of the model)")
        return (), dict(sample)
    hint = " (write (x,) for a single tensor)" if isinstance(sample, torch.Tensor) else ""
    raise TypeError(
        f"sample must be a tuple of positional arguments or a dict of keyword arguments for "
        f"model(...); got {type(sample).__name__}{hint}"
    )


def check_step_arguments(
    model: Any, sample: Any, loss_fn: Any = None, optimizer: Any = None
) -> None:
    """Refuse, before any step runs, arguments that no training step can be measured with.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, the sample is neither a tuple nor a dict,
            ``loss_fn`` is not callable, or ``optimizer`` has no ``state_dict()`` (not an
            optimizer), naming what came.
        ValueError: nothing to train: every parameter is frozen and no tensor of the sample
            requires grad, so a step has no backward and no activation memory to save.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected the model, an nn.Module; got {type(model).__name__}")
    split_sample(sample)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a function of the model's output returning the scalar loss "
            f"(e.g. loss_fn=lambda output: output.logits.sum()), or None; got "
            f"{type(loss_fn).__name__} {loss_fn!r}"
        )
    if optimizer is not None and not callable(getattr(optimizer, "state_dict", None)):
        raise TypeError(
            f"optimizer must be the training's optimizer (a torch.optim.Optimizer: its "
            f"state_dict() is counted as held memory), or None; got {type(optimizer).__name__} "
            f"{optimizer!r}"
        )
    if any(p.requires_grad for p in model.parameters()):
        return
    if any(t.requires_grad for t in _tensors_in(split_sample(sample))):
        return  # inputs trained (latents fed in, an adversarial input): gradients to compute
    count = sum(1 for _ in model.parameters())
    held = f"all {count} parameters of" if count else "no parameters in"
    raise ValueError(
        f"nothing to train: {held} {type(model).__name__} require grad (requires_grad=False) "
        f"and no tensor of the sample does, so a training step has no backward and no "
        f"activation memory to save. Unfreeze what you train (p.requires_grad_(True)) "
        f"before memfit measures the model"
    )


def compute_loss(output: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The step's scalar loss from the model's output.

    Raises:
        TypeError: no scalar loss can be found, naming what came and what to pass.
    """
    if loss_fn is not None:
        given = loss_fn(output)
        if not (isinstance(given, torch.Tensor) and given.numel() == 1):
            raise TypeError(f"loss_fn must return a scalar tensor; it returned {_describe(given)}")
        return given
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    raise TypeError(
        f"cannot find the loss: the model returned {_describe(output)}, which is not a scalar "
        f"tensor and has no .loss; pass loss_fn=lambda output: ... returning a scalar tensor "
        f"(or give a Hugging Face model its labels)"
    )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def sample_device(model: nn.Module, sample: Any) -> torch.device:
    """The device the step runs on: the sample's tensors', else the model's parameters'."""
    args, kwargs = split_sample(sample)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a ``DTensor``'s local shard (FSDP2's sharded parameters,
    their gradients and optimizer states), any other tensor itself."""
    local = getattr(tensor, "_local_tensor", None)  # DTensor, without importing it
    return local if isinstance(local, torch.Tensor) else tensor


def sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2's sharded parameters between its calls)."""
    return hasattr(tensor, "_local_tensor") and hasattr(tensor, "device_mesh")


def own_fsdp_unit(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself: its parameters are gathered
    before and freed after each of its calls (FSDP2's hooks on it)."""
    get = getattr(module, "_get_fsdp_state", None)  # FSDPModule, without importing FSDP
    return callable(get) and get() is not None


def storage_key(tensor: torch.Tensor) -> int:
    """Which storage holds ``tensor``: the same key for its views, aliases and detached copies
    while the storage lives (a ``DTensor``: its local shard's storage).

    The key is the storage object's identity (``untyped_storage()._cdata``), not its memory
    address (``data_ptr()``): every zero-size storage has address 0, so addresses would make
    all empty tensors one storage, and a storage resized to nothing (FSDP2's freed parameters)
    would change its address but not its identity. Like an address, a key may be reused once
    its storage is freed. Memory addresses (what the profiler's allocation events report) are a
    different question: the meter asks ``data_ptr()`` for those."""
    return local_tensor(tensor).untyped_storage()._cdata


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and ties counted once; a
    ``DTensor`` counts its local shard: what this rank holds)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "meta":
            seen[storage_key(tensor)] = local_tensor(tensor).untyped_storage().nbytes()
    return sum(seen.values())


def trained_inputs(model: nn.Module, sample: Any) -> list[torch.Tensor]:
    """The sample's leaf tensors that require grad and are not the model's parameters (a
    tensor the user differentiates, Perceiver-style latents handed in): the step gives them a
    ``.grad`` as it gives the parameters, so memfit treats them alike (reset before each step,
    the user's own gradients put back afterwards)."""
    own = {id(p) for p in model.parameters()}
    found: dict[int, torch.Tensor] = {}
    for tensor in _tensors_in(sample):
        if tensor.requires_grad and tensor.is_leaf and id(tensor) not in own:
            found.setdefault(id(tensor), tensor)
    return list(found.values())


def held_bytes(model: nn.Module, sample: Any, extra: Any = None) -> int:
    """Bytes live before the step: parameters, buffers, existing gradients (the sample's
    trained inputs' too), the sample, any tensors reachable from ``extra`` (e.g. an optimizer's
    state), and DDP's gradient buckets."""
    tensors: list[torch.Tensor | None] = []
    for parameter in model.parameters():
        tensors += [parameter, parameter.grad]
    tensors += list(model.buffers())
    tensors += list(_tensors_in(sample))
    tensors += [tensor.grad for tensor in trained_inputs(model, sample)]
    if extra is not None:
        state = extra.state_dict() if hasattr(extra, "state_dict") else extra
        tensors += list(_tensors_in(state))
    return tensor_bytes(*tensors) + _ddp_bucket_bytes(model)


def _ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of ``DistributedDataParallel``'s gradient buckets (the all-reduce buffers it
    allocates when it wraps the model and keeps), 0 for other models."""
    logging_data = getattr(model, "_get_ddp_logging_data", None)
    if not callable(logging_data):
        return 0
    sizes = str(logging_data().get("bucket_sizes", ""))
    return sum(int(size) for size in sizes.split(",") if size.strip().isdigit())


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors_in(item)


@contextmanager
def preserved_grads(model: nn.Module, sample: Any = None) -> Iterator[None]:
    """Give the user's gradients back after memfit's measuring steps (the sample's trained
    inputs' too, with ``sample``)."""
    tensors: list[torch.Tensor] = list(model.parameters())
    if sample is not None:
        tensors += trained_inputs(model, sample)
    saved = {parameter: parameter.grad for parameter in tensors}
    try:
        yield
    finally:
        for parameter, grad in saved.items():
            parameter.grad = grad


def reset_grads(model: nn.Module, accumulate: bool, sample: Any = None) -> None:
    """Gradients as they are at the start of a step in the steady state the user trains in.

    ``accumulate=False``: ``zero_grad(set_to_none=True)`` before every step (gradients are
    allocated during backward). ``accumulate=True``: gradient buffers exist for the whole step
    (gradient accumulation from the second micro-batch on). With ``sample``, its trained
    inputs (:func:`trained_inputs`) are reset alike.
    """
    tensors: list[torch.Tensor] = list(model.parameters())
    if sample is not None:
        tensors += trained_inputs(model, sample)
    for parameter in tensors:
        if accumulate and parameter.requires_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            else:
                parameter.grad.zero_()
        else:
            parameter.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
