"""The user's training loop, as far as a measured step depends on it: :class:`TrainingLoop`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memfit.measuring.step import LossFn, check_step_arguments

__all__ = ["TrainingLoop"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingLoop:
    """How the user's loop runs a step, which every step memfit measures repeats.

    Attributes:
        loss_fn: maps the model's output to the scalar loss where the output is not one (see
            :func:`memfit.measure`); ``None``: the output itself, or its ``.loss``.
        optimizer: the training's optimizer; its state counts as held before the step.
        keep_output: ``True`` when the model's output stays alive through backward
            (``out = model(**batch); out.loss.backward()``); ``False`` when only the loss does.
        accumulate: the gradient-accumulation steady state: gradients exist before the step.
    """

    loss_fn: LossFn | None = None
    optimizer: Any = None
    keep_output: bool = True
    accumulate: bool = False

    def check(self, model: Any, sample: Any) -> None:
        """Refuse, before any step runs, a loop no step of ``model`` on ``sample`` can be
        measured with (see :func:`~memfit.measuring.step.check_step_arguments`).

        Raises:
            TypeError: not a model, a malformed sample, ``loss_fn`` not callable, an
                ``optimizer`` that is none.
            ValueError: nothing to train.
        """
        check_step_arguments(model, sample, self.loss_fn, self.optimizer)
