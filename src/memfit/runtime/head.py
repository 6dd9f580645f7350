"""Options of the ``<post>`` stage (final norm, head, loss): where large vocabularies set the floor.

With every block recomputed, the peak of a language model with a large vocabulary is the start
of the loss's backward: the logits (held by the model's output in the usual loop), the
log-softmax that ``cross_entropy`` saves, its dense gradient and the logits' gradient, four
tensors of tokens x vocabulary each. Options (``Stage(last, option)`` in a plan):

* ``head:lean-loss`` (exact): every ``F.cross_entropy`` over 2-D logits that the model's forward
  calls after its last block runs as :class:`~memfit.runtime.losses.LeanCrossEntropy`: the same
  loss and gradients bit for bit, one logits-sized tensor (the gradient) instead of three in its
  backward. Found by a ``TorchFunctionMode`` entered when the last block returns and left when
  the model's forward returns, so it reaches losses computed inside the model (Hugging Face's
  ``labels=``, a model returning its loss), not a loss the training loop computes afterwards
  (``loss_fn``): the profile then finds no call and leaves the option out, saying so.
* ``head:chunked`` (exact to rounding, opt-in: ``exact=False``): the head and the loss fused and
  chunked over the tokens (:class:`~memfit.runtime.losses.ChunkedLinearCrossEntropy`, as Liger's
  fused linear cross-entropy and Cut Cross-Entropy do): no logits are ever made whole. For
  Hugging Face causal LMs whose loss is ``ForCausalLMLoss`` and whose output embedding is an
  ``nn.Linear`` of the vocabulary's size (:func:`chunked_head_support` says why not otherwise):
  in a training forward with ``labels`` the head returns ``None`` and the model's
  ``loss_function`` computes the loss from the head's input, with the library's semantics
  (labels shifted, ``ignore_index``, mean over counted tokens or sum over
  ``num_items_in_batch``, ``shift_labels``). The output's ``logits`` is then ``None``, as with
  Liger's kernels in training.

Why not a checkpoint around the head and the loss: it leaves the floor where it is (measured
on a Llama with a 32,000-token vocabulary: the same peak with and without it;
``benchmarks/results/design-figures.md``, "No checkpoint around the head and loss"): the
recompute rebuilds the very tensors the backward then peaks on, and nothing else runs between
``<post>``'s forward and its backward that the saved bytes could make room for.

Both options compute the same loss with other ops, by design: their ops run inside a
:func:`~memfit.measuring.trace.by_design` region (forward and backward), and
:func:`marking_head` marks the same region around the computation they replace in a plain step,
so that an op trace (``verify(trace=True)``) cuts the two out and compares every other op.

Every object here is a plain module-level class, so copies of a planned model (``deepcopy``,
``pickle``) carry the option with their own modules.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from memfit.measuring.trace import by_design, by_design_backward
from memfit.runtime.losses import (
    CHUNKS,
    REDUCTIONS,
    chunked_linear_cross_entropy,
    lean_cross_entropy,
)
from memfit.runtime.options import is_exact

HEAD = "head:"
LEAN_LOSS = "head:lean-loss"
CHUNKED = "head:chunked"


@dataclass(frozen=True, kw_only=True, slots=True)
class HeadOption:
    """One ``<post>`` option.

    Attributes:
        name: the option's name in plans.
        exact: gradients and loss bit-identical to the unplanned model's; ``False``: exact to
            rounding only (other summation orders), offered only when the user opts in.
        does: what it does, in words (plans and tables show it).
    """

    name: str
    exact: bool
    does: str


HEAD_OPTIONS = {
    LEAN_LOSS: HeadOption(
        name=LEAN_LOSS,
        exact=True,
        does=(
            "cross-entropy saves the logits only and builds their gradient in chunks of rows "
            "(no log-softmax kept, no dense gradient of it); bit-identical"
        ),
    ),
    CHUNKED: HeadOption(
        name=CHUNKED,
        exact=False,
        does=(
            f"head and loss fused, in up to {CHUNKS} chunks of tokens, logits never whole and "
            f"recomputed per chunk in backward; output logits None; exact to rounding"
        ),
    ),
}
INEXACT_NOTE = "exact to rounding, not bit for bit (other summation orders)"


def is_head_option(option: str) -> bool:
    """Whether ``option`` names a ``<post>`` option (``head:...``)."""
    return option.startswith(HEAD)


def head_option(option: str) -> HeadOption:
    """The ``<post>`` option called ``option``.

    Raises:
        ValueError: not one, listing them.
    """
    found = HEAD_OPTIONS.get(option)
    if found is None:
        raise ValueError(
            f"unknown <post> option {option!r}; expected one of {sorted(HEAD_OPTIONS)}"
        )
    return found


def inexact_options(options: Iterable[str]) -> list[str]:
    """The options among ``options`` that are not bit-identical: exact to rounding only
    (``head:chunked``) or lossy (``compress:*``, :attr:`~memfit.runtime.options.OptionKind.exact`)."""
    return sorted(
        {o for o in options if (not head_option(o).exact if is_head_option(o) else not is_exact(o))}
    )


def chunked_head_support(model: nn.Module) -> str | None:
    """Why ``head:chunked`` cannot run on ``model``, or ``None`` when it can."""
    loss_utils = sys.modules.get("transformers.loss.loss_utils")
    outputs = getattr(model, "get_output_embeddings", None)
    head = outputs() if callable(outputs) else None
    if loss_utils is None or not callable(outputs):
        return "not a Hugging Face model (head:chunked hooks HF's lm_head and loss_function)"
    if not isinstance(head, nn.Linear):
        return f"its output embedding is {type(head).__name__}, not an nn.Linear"
    if getattr(model, "loss_function", None) is not loss_utils.ForCausalLMLoss:
        return "its loss_function is not Hugging Face's ForCausalLMLoss (a causal LM's)"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if head.out_features != vocab:
        return f"its head has {head.out_features} outputs, its config's vocab_size is {vocab}"
    if "labels" not in inspect.signature(type(model).forward).parameters:
        return "its forward takes no labels"
    return None


# what each head option did in the forwards run meanwhile (the profile keeps only options that
# took effect)
_USAGE: list[list[str]] = []


@contextmanager
def head_usage() -> Iterator[list[str]]:
    """Collect, in call order, a line per loss a ``<post>`` option computed meanwhile."""
    log: list[str] = []
    _USAGE.append(log)
    try:
        yield log
    finally:
        _USAGE.remove(log)


def _used(line: str) -> None:
    for log in _USAGE:
        log.append(line)


_CROSS_ENTROPY = inspect.signature(F.cross_entropy)


def _lean_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """``(logits, target, ignore_index, reduction)`` when a ``cross_entropy`` call is one the
    lean loss computes bit for bit (2-D float logits, class targets, no weight, no smoothing)."""
    try:
        bound = _CROSS_ENTROPY.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    call = bound.arguments
    logits, target = call["input"], call["target"]
    if not (
        isinstance(logits, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and type(logits) is torch.Tensor
        and logits.dim() == 2
        and logits.is_floating_point()
        and logits.requires_grad
        and target.dim() == 1
        and target.dtype == torch.int64
        and target.shape[0] == logits.shape[0]
        and call["weight"] is None
        and call["size_average"] is None
        and call["reduce"] is None
        and call["label_smoothing"] == 0.0
        and call["reduction"] in REDUCTIONS
        # autocast would run the loss in float32 in forward, not in the lean backward
        and not (
            torch.is_autocast_enabled(logits.device.type)
            and logits.dtype not in (torch.float32, torch.float64)
        )
    ):
        return None
    return logits, target, int(call["ignore_index"]), call["reduction"]


class _LeanLossMode(TorchFunctionMode):
    """Routes eligible ``F.cross_entropy`` calls to the lean, bit-identical loss (``replace``
    false: runs them as they are, only marking them by design for an op trace)."""

    def __init__(self, replace: bool) -> None:
        super().__init__()
        self.replace = replace

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            lean = _lean_arguments(args, kwargs)
            if lean is not None:
                rows, classes = lean[0].shape
                label = f"{LEAN_LOSS}: cross_entropy over {rows} x {classes} logits"
                with by_design(label):
                    if self.replace:
                        _used(label)
                        loss = lean_cross_entropy(*lean)
                    else:
                        loss = func(*args, **kwargs)
                by_design_backward(label, loss, lean[0])
                return loss
        return func(*args, **kwargs)


class HeadRun:
    """One planned model's ``<post>`` option: what its hooks share during a forward.

    ``replace`` false: the plain step of an op trace, whose ops the option would replace are only
    marked by design (:func:`marking_head`)."""

    def __init__(self, option: str, model: nn.Module, replace: bool = True) -> None:
        self.option = option
        self.replace = replace
        self.armed = False
        self.mode: _LeanLossMode | None = None
        self.hidden: torch.Tensor | None = None
        self.labels_position = _labels_position(model)
        # head:chunked's forward region, from the head's call to the loss's return
        self.label = ""
        self.region: AbstractContextManager[None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # per forward: never copied or pickled
        return vars(self) | {"armed": False, "mode": None, "hidden": None, "region": None}

    def open(self, hidden: torch.Tensor, classes: int) -> None:
        """Enter head:chunked's by-design region at the head's call."""
        self.hidden = hidden
        if self.region is None:
            rows = hidden.numel() // hidden.shape[-1]
            self.label = f"{CHUNKED}: head and loss over {rows} x {classes} logits"
            self.region = by_design(self.label)
            self.region.__enter__()

    def close(self, loss: torch.Tensor | None = None, source: torch.Tensor | None = None) -> None:
        """Leave the region when the loss is made; its backward is by design until the head's
        input has its gradient."""
        region, self.region = self.region, None
        if region is not None:
            region.__exit__(None, None, None)
            if loss is not None and source is not None:
                by_design_backward(self.label, loss, source)

    def arm(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # traced by a compile around the plan: the model runs as it is (as memfit's guards do
        # there); the memory is then the compiler's
        self.armed = (
            torch.is_grad_enabled() and model.training and not torch.compiler.is_compiling()
        )
        if self.armed and self.option == CHUNKED:
            labels = kwargs.get("labels")
            position = self.labels_position
            if labels is None and position is not None and len(args) > position:
                labels = args[position]
            self.armed = labels is not None

    def enter(self) -> None:
        if self.armed and self.option == LEAN_LOSS and self.mode is None:
            self.mode = _LeanLossMode(self.replace)
            self.mode.__enter__()

    def disarm(self) -> None:
        self.armed = False
        self.hidden = None
        self.close()
        mode, self.mode = self.mode, None
        if mode is not None:
            mode.__exit__(None, None, None)


def _labels_position(model: nn.Module) -> int | None:
    """Where ``labels`` sits among the positional arguments of ``model(...)``."""
    names = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
    return names.index("labels") if "labels" in names else None


class _Arm:
    def __init__(self, run: HeadRun) -> None:
        self.run = run

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.run.arm(module, args, kwargs)


class _Enter:
    def __init__(self, run: HeadRun) -> None:
        self.run = run

    def __call__(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self.run.enter()


class _Disarm:
    def __init__(self, run: HeadRun) -> None:
        self.run = run

    def __call__(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self.run.disarm()


class DeferredHead:
    """The head's forward under ``head:chunked``: in an armed forward it keeps its input for the
    loss and returns ``None`` (no logits); otherwise (or only marking) the head's own forward."""

    def __init__(self, run: HeadRun, head: nn.Module, previous: Any) -> None:
        self.run = run
        self.head = head
        self.previous = previous  # the head's instance forward before, or None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.run.armed and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            assert isinstance(self.head, nn.Linear)  # chunked_head_support
            self.run.open(hidden, self.head.out_features)
            if self.run.replace:
                return None
        if self.previous is not None:
            return self.previous(hidden)
        return type(self.head).forward(self.head, hidden)


class ChunkedLoss:
    """The model's ``loss_function`` under ``head:chunked``: Hugging Face's ``ForCausalLMLoss``
    computed from the head's input, chunk by chunk; the original for real logits."""

    def __init__(self, run: HeadRun, head: nn.Linear, original: Any) -> None:
        self.run = run
        self.head = head
        self.original = original

    def __call__(
        self,
        logits: torch.Tensor | None,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        hidden, self.run.hidden = self.run.hidden, None
        if logits is not None or hidden is None:
            loss = self.original(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        else:
            loss = self._chunked(
                hidden, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels
            )
        self.run.close(loss, hidden)
        return loss

    def _chunked(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None,
        ignore_index: int,
        shift_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        if vocab_size != self.head.out_features:
            raise ValueError(
                f"head:chunked: the loss was asked for vocab_size={vocab_size}, but the head "
                f"has {self.head.out_features} outputs"
            )
        if shift_labels is None:  # as ForCausalLMLoss: tokens < n predict n
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:].contiguous()
        target = shift_labels.reshape(-1).to(hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] != target.shape[0]:
            raise ValueError(
                f"head:chunked: {rows.shape[0]} positions reach the head but the labels have "
                f"{target.shape[0]} (logits_to_keep in training?)"
            )
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = chunked_linear_cross_entropy(
            rows,
            self.head.weight,
            self.head.bias,
            target,
            ignore_index=ignore_index,
            reduction=reduction,
            dtype=torch.float32,  # ForCausalLMLoss upcasts the logits
        )
        _used(f"{CHUNKED}: head and loss over {rows.shape[0]} x {vocab_size} logits, chunked")
        if reduction == "sum":
            assert num_items_in_batch is not None
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss


def check_head_install(model: nn.Module, option: str) -> None:
    """Raise ``ValueError`` when ``option`` is no ``<post>`` option or cannot run on ``model``."""
    head_option(option)
    reason = chunked_head_support(model) if option == CHUNKED else None
    if reason is not None:
        raise ValueError(f"{CHUNKED} cannot run on {type(model).__name__}: {reason}")


class HeadInstall:
    """A ``<post>`` option installed on a model; :meth:`remove` undoes it.

    ``replace`` false: the option's computation is not run; the ops it would replace are marked
    by design for an op trace (:func:`marking_head`)."""

    def __init__(
        self, model: nn.Module, last_block: nn.Module, option: str, replace: bool = True
    ) -> None:
        check_head_install(model, option)
        self.model = model
        self.run = HeadRun(option, model, replace)
        self.handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(_Arm(self.run), with_kwargs=True),
            model.register_forward_hook(_Disarm(self.run), always_call=True),
        ]
        if option == LEAN_LOSS:
            self.handles.append(last_block.register_forward_hook(_Enter(self.run)))
        self.head: nn.Module | None = None
        self.previous_forward: Any = None
        # the model's own _loss_function before (a flag, not a sentinel object: copies of the
        # model copy a sentinel into another object)
        self.had_loss = False
        self.previous_loss: Any = None
        if option == CHUNKED:
            head = model.get_output_embeddings()  # type: ignore[operator]
            assert isinstance(head, nn.Linear)  # chunked_head_support
            self.head = head
            self.previous_forward = head.__dict__.get("forward")
            self.had_loss = "_loss_function" in model.__dict__
            self.previous_loss = model.__dict__.get("_loss_function")
            original = model.loss_function
            head.forward = DeferredHead(  # type: ignore[method-assign,assignment]
                self.run, head, self.previous_forward
            )
            model.loss_function = ChunkedLoss(self.run, head, original)  # type: ignore[assignment]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.run.disarm()
        if self.head is not None:
            del self.head.forward
            if self.previous_forward is not None:
                self.head.forward = self.previous_forward
            self.model.__dict__.pop("_loss_function", None)
            if self.had_loss:
                self.model.__dict__["_loss_function"] = self.previous_loss


@contextmanager
def marking_head(model: nn.Module, last_block: nn.Module, options: Iterable[str]) -> Iterator[None]:
    """In a plain step (``model`` carries no plan), mark by design the ops that the ``<post>``
    option among ``options`` would replace (the same calls, found the same way), running them as
    they are: an op trace of the plain step then cuts out what a planned step's trace cuts out
    (:func:`~memfit.measuring.trace.compare_traces`). Nothing is marked without a head option."""
    heads = [option for option in options if is_head_option(option)]
    install = HeadInstall(model, last_block, heads[0], replace=False) if heads else None
    try:
        yield
    finally:
        if install is not None:
            install.remove()
