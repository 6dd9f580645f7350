"""Leave the user's model and process as memfit found them.

Measuring runs real training steps: they update BatchNorm's running statistics, draw random
numbers, set ``.grad`` fields, and profiling turns Hugging Face's own checkpointing off. Every
public entry point that runs steps (``profile``, ``plan`` on a model, ``verify``, ``bench``,
``measure``; ``auto`` through ``profile``) runs inside :func:`preserved_state`, which snapshots
what a step can change and puts it back afterwards:

* ``.grad`` of every parameter, and of the sample's tensors that require grad (a tensor the user
  differentiates, latents handed in as an ``nn.Parameter``): taken off for the duration (the
  same tensor objects come back, their values untouched even by steps that accumulate into
  gradients);
* ``requires_grad`` of every parameter and ``training`` of every module;
* buffers (running statistics, ``num_batches_tracked``): copied to host memory at entry (never
  to the device: a CUDA meter counts what is allocated there), copied back at exit;
* the global CPU RNG state, and the CUDA ones when CUDA is initialised;
* Hugging Face ``config`` objects (``use_cache``, ...) and the per-module checkpointing switches
  (``gradient_checkpointing``, ``_gradient_checkpointing_func``).

Parameters are not copied (that would double the model's memory): memfit's steps never change
them, and a change made by the model's own forward is reported as an error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from memfit.errors import MemfitError
from memfit.measuring.session import exclusive
from memfit.measuring.step import trained_inputs

# Attributes Hugging Face's gradient_checkpointing_enable/disable set on modules.
_HF_SWITCHES = ("gradient_checkpointing", "_gradient_checkpointing_func")
_CONFIG_ATTRIBUTES = ("config", "generation_config")
_MISSING = object()

F = TypeVar("F", bound=Callable[..., Any])


def _configs(model: nn.Module) -> list[Any]:
    """The distinct config objects of the model's modules and the configs nested in them."""
    found: dict[int, Any] = {}
    pending = [
        getattr(module, name, None) for module in model.modules() for name in _CONFIG_ATTRIBUTES
    ]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "to_dict"):
            continue
        if not hasattr(config, "__dict__"):
            continue
        found[id(config)] = config
        pending += [value for value in vars(config).values() if hasattr(value, "to_dict")]
    return list(found.values())


class Buffers:
    """The model's buffers as they are now, copied to host memory (never to the device: a CUDA
    meter counts what is allocated there), to put back between steps."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [
            (module, name, buffer, buffer.detach().to("cpu", copy=True))
            for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]

    def restore(self) -> None:
        """The same buffer objects back in their modules (a forward may have rebound them, as
        I-BERT's quantisation statistics), holding the values copied."""
        with torch.no_grad():
            for module, name, buffer, copy in self.saved:
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
                # Always: BatchNorm's kernel updates its running statistics without bumping
                # their version counters, so versions cannot tell what changed.
                buffer.copy_(copy)


def buffer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer of ``model`` by name, copied to host memory (to compare two steps' ends)."""
    return {
        name: buffer.detach().to("cpu", copy=True)
        for name, buffer in model.named_buffers(remove_duplicate=False)
    }


class ModelState:
    """A snapshot of what a training step can change on ``model`` and in the process (and on
    the sample's tensors that require grad: their ``.grad``)."""

    def __init__(self, model: nn.Module, sample: Any = None) -> None:
        inputs = [] if sample is None else trained_inputs(model, sample)
        self.grads: dict[torch.Tensor, torch.Tensor | None] = {
            p: p.grad for p in [*model.parameters(), *inputs]
        }
        self.requires_grad = {p: p.requires_grad for p in model.parameters()}
        self.versions = {name: p._version for name, p in model.named_parameters()}
        self.parameters = dict(model.named_parameters())
        self.training = {module: module.training for module in model.modules()}
        self.buffers = Buffers(model)
        # every module: turning HF checkpointing off may set a switch on a module whose
        # instance had none (a class attribute), which restoring must remove again
        self.switches = {
            (module, name): module.__dict__.get(name, _MISSING)
            for module in model.modules()
            for name in _HF_SWITCHES
        }
        self.configs = [(config, dict(vars(config))) for config in _configs(model)]
        self.cpu_rng = torch.get_rng_state()
        # Only when initialised: reading the states would initialise CUDA for a CPU-only user.
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def detach_grads(self) -> None:
        """Take the user's gradients off the parameters, so steps cannot touch their values."""
        for parameter in self.grads:
            parameter.grad = None

    def restore(self) -> None:
        """Put everything back (parameters' values are checked by :meth:`check_parameters`)."""
        for parameter, flag in self.requires_grad.items():
            if parameter.requires_grad != flag:
                parameter.requires_grad_(flag)
        for tensor, grad in self.grads.items():
            tensor.grad = grad
        for module, flag in self.training.items():
            module.training = flag  # not .train(): that recurses and may run user overrides
        self.buffers.restore()
        for (module, name), value in self.switches.items():
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
        for config, saved in self.configs:
            for key in set(vars(config)) - set(saved):
                delattr(config, key)
            for key, value in saved.items():
                if vars(config).get(key, _MISSING) is not value:
                    vars(config)[key] = value
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def check_parameters(self) -> None:
        """Raise if a parameter's values changed (only the model's own forward can do that)."""
        changed = [name for name, p in self.parameters.items() if p._version != self.versions[name]]
        if changed:
            raise MemfitError(
                f"the model changed parameters in place while memfit ran its steps "
                f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); memfit "
                f"keeps no copy of parameters to undo that: make the forward leave them alone "
                f"(e.g. update them in the optimizer step) before profiling"
            )


@contextmanager
def preserved_state(model: nn.Module, sample: Any = None) -> Iterator[ModelState]:
    """Run the body, then give the model and the process back as they were (see the module
    docstring for what is covered).

    Args:
        model: the user's model.
        sample: the sample the body runs steps on (its tensors that require grad get their
            ``.grad`` back too).

    Yields:
        The snapshot (the model's gradients are off it while the body runs).

    Raises:
        MemfitError: the model's forward changed parameter values in place.

    Example:
        >>> with preserved_state(model):
        ...     model(x).sum().backward()  # BatchNorm statistics, RNG, .grad restored after
    """
    state = ModelState(model, sample)
    state.detach_grads()
    try:
        yield state
    finally:
        state.restore()
    state.check_parameters()


def preserving_state(function: F) -> F:
    """Decorate an entry point whose first arguments are the model and the sample with
    :func:`preserved_state`, run under memfit's process-wide lock, refused inside the user's
    profiler session (:func:`memfit.measuring.session.exclusive`). Arguments that are not
    modules (``memfit.plan`` takes a profile too) pass through."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, nn.Module):
            return function(*args, **kwargs)
        sample = args[1] if len(args) > 1 else kwargs.get("sample")
        with exclusive(), preserved_state(model, sample):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
