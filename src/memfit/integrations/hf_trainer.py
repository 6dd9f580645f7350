"""The Hugging Face ``Trainer`` one-liner: plan on the first training batch, then train as before.

    trainer.add_callback(MemfitCallback(budget="50%"))   # or Trainer(..., callbacks=[...])

``on_train_begin`` sees the model but no batch, so the callback puts a forward pre-hook on the
model there. The first forward with gradients in training mode (the Trainer's first
``model(**inputs)``) hands the hook that batch; the hook takes itself off, runs
:func:`memfit.auto` on it (profile, plan, apply; profiling leaves parameters, buffers, RNG
states and ``.grad`` as it found them), and the forward then runs planned. The Trainer computes
the loss from the output and drops the output before backward, so the plan is made for that
loop (``keep_output=False``); the profile runs under whatever the Trainer has entered around
its forward (autocast for ``bf16=True``), so its costs are those of the training step. The
callback logs one line (``logging``, INFO, logger ``memfit.integrations.hf_trainer``) with the
plan it applied; profiling prints nothing.

``gradient_checkpointing=True`` (``activation_checkpointing``) in ``TrainingArguments``: the
Trainer turns Hugging Face's checkpointing on just before ``on_train_begin``; the callback turns
it off again there with one warning (memfit's plan replaces it; both would recompute twice). A
second ``trainer.train()`` keeps the plan (the Trainer re-enables HF checkpointing each time,
and the callback turns it off each time).

This module imports transformers; :mod:`memfit.integrations.hf` gives ``MemfitCallback`` without
importing it until asked.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from memfit.planning.plan import Plan
from memfit.runtime.apply import applied_plan
from memfit.runtime.hf_switches import disable_hf_checkpointing
from memfit.units import Budget, format_bytes, parse_budget
from memfit.verbs.api import auto
from memfit.verbs.profile_options import ProfileOptions
from memfit.verbs.shape_profiles import shape_profile_options

logger = logging.getLogger(__name__)

TAKE_OVER = (
    "gradient_checkpointing=True (activation_checkpointing) in TrainingArguments: memfit's "
    "plan replaces Hugging Face's checkpointing, which is turned off (both would recompute "
    "twice); drop the argument to silence this"
)


# memfit.auto's own keywords beside budget and strategy (candidates, max_error, shapes...): the
# callback hands them to auto as they are; every other keyword is a profile option
AUTO_KEYWORDS = frozenset(
    name
    for name, parameter in inspect.signature(auto).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
) - {"budget", "strategy"}


def _check_profile_options(arguments: Mapping[str, Any]) -> None:
    """Refuse what :func:`memfit.auto` would refuse among ``arguments``' profile options, as
    it checks them (:class:`ProfileOptions`; with ``shapes="dynamic"`` as
    :func:`memfit.profile_shapes` does, beside its ``shapes_profiled`` and ``shape_profile``)."""
    options = {name: value for name, value in arguments.items() if name not in AUTO_KEYWORDS}
    if arguments.get("shapes") == "dynamic":
        options.pop("shapes_profiled", None)
        options.pop("shape_profile", None)
        shape_profile_options(**options)
    else:
        ProfileOptions.of(**options)


class MemfitCallback(TrainerCallback):
    """Plan the model's checkpointing on the Trainer's first training batch and apply it.

    Args:
        budget: as for :func:`memfit.auto`: ``"50%"`` (of the step's activation memory) or bytes
            of step peak (``"12GiB"``). A byte budget counts what is held when the first batch
            arrives: parameters, and an optimizer state that is still empty (Adam creates it in
            its first step), so leave room for it or use a percentage.
        strategy: as for :func:`memfit.auto`.
        **profile_options: passed to :func:`memfit.profile` (``repeats``, ``options``,
            ``loss_fn``, ``blocks``...). ``keep_output`` defaults to ``False``: the Trainer keeps
            only the loss through backward.

    Attributes:
        plan: the plan applied, once the first batch has been seen (``None`` before).

    Raises:
        ValueError, TypeError: a malformed budget or profile option, or a keyword neither
            :func:`memfit.auto` nor :func:`memfit.profile` takes: at construction, checked as
            :func:`memfit.profile` checks them (:class:`~memfit.verbs.profile_options.ProfileOptions`),
            before any training.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data)
        >>> trainer.add_callback(MemfitCallback(budget="50%"))
        >>> trainer.train()
    """

    def __init__(
        self,
        budget: int | float | str | Budget,
        *,
        strategy: str = "optimal",
        **profile_options: Any,
    ) -> None:
        # a malformed budget or profile option fails here, not at the first training batch
        parse_budget(budget)
        self.budget = budget
        self.strategy = strategy
        self.profile_options = {"keep_output": False, **profile_options}
        _check_profile_options(self.profile_options)
        self.plan: Plan | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"MemfitCallback needs the Trainer's model in on_train_begin; got "
                f"{type(model).__name__}. Use it with transformers.Trainer"
            )
        if getattr(args, "activation_checkpointing", False) or getattr(
            args, "gradient_checkpointing", False
        ):
            warnings.warn(TAKE_OVER, UserWarning, stacklevel=2)
            with warnings.catch_warnings():  # one warning, the one above
                warnings.simplefilter("ignore", UserWarning)
                disable_hf_checkpointing(model)
        if applied_plan(model) is not None or self._handle is not None:
            return  # a second train(): the plan stays
        self._handle = model.register_forward_pre_hook(self._first_batch, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hook()  # training ended before any batch: leave no hook behind

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _first_batch(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (model.training and torch.is_grad_enabled()):
            return  # an evaluation before training: wait for a training batch
        self._remove_hook()
        if applied_plan(model) is not None:
            return
        if args and kwargs:
            raise TypeError(
                f"MemfitCallback plans on one batch given either as keywords (the Trainer's "
                f"model(**inputs)) or positionally; the model got {len(args)} positional "
                f"arguments and the keywords {sorted(kwargs)}"
            )
        sample: tuple[Any, ...] | Mapping[str, Any] = dict(kwargs) if kwargs else args
        self.plan = auto(
            model, sample, budget=self.budget, strategy=self.strategy, **self.profile_options
        )
        budget = self.plan.budget_bytes
        logger.info(
            "memfit applied a plan made on the first training batch: %s (%s); predicted peak "
            "%s of a %s budget",
            self.plan.summary,
            self.plan.strategy,
            format_bytes(self.plan.predicted_peak_bytes),
            "no" if budget is None else format_bytes(budget),
        )
