"""Cross-entropy losses that never hold a full logits-sized tensor more than they must.

Two autograd functions, used by the ``<post>`` options of :mod:`memfit.runtime.head`:

* :class:`LeanCrossEntropy` is ``F.cross_entropy(logits, target, ignore_index=...,
  reduction=...)`` over 2-D logits, bit for bit (loss and gradient), that saves only the logits
  (which the model's output holds anyway in the usual loop) instead of the log-softmax, and
  builds the logits' gradient chunk of rows by chunk of rows instead of allocating the
  log-softmax's gradient whole. torch's own composite keeps three logits-sized tensors at the
  start of its backward (log-softmax output, its dense gradient, the logits' gradient); this
  keeps one (the logits' gradient) plus two chunks. Bit-identity rests on two facts checked by
  the tests with ``torch.equal``: the softmax kernels compute each row on its own (a chunk of
  rows gives the rows of the whole), and the loss is reduced by the same ``nll_loss`` kernel
  over the same values in the same order (one picked log-probability per row).
* :class:`ChunkedLinearCrossEntropy` is the fused head + loss of Liger's fused linear
  cross-entropy and of Cut Cross-Entropy: ``cross_entropy(hidden @ W.T + b, target)`` without
  ever making the logits whole. Each chunk's logits are made, reduced to its rows' log-sum-exp
  and picked logit, and dropped; backward makes them again chunk by chunk and accumulates the
  hidden states' and the head's gradients. Its summation orders differ from the unchunked head
  (the head's weight gradient is a sum of per-chunk products), so it is exact only to rounding.

Known inefficiencies: chunks are a fixed share of the rows (:data:`CHUNKS`, at least
:data:`MIN_CHUNK_BYTES` of logits), not sized to a cache or to the memory left; the lean loss recomputes the log-softmax of every chunk in backward
(one more pass over the logits); neither runs a fused kernel, so on CUDA they do more memory
traffic than Liger's Triton kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

aten = torch.ops.aten

CHUNKS = 32  # a chunk is 1/CHUNKS of the rows...
MIN_CHUNK_BYTES = 1 << 20  # ...or 1 MiB of logits, whichever is larger: each chunk runs a few
# parallel kernels, and on a loaded CPU tiny ones cost more in waiting threads than they save
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def chunk_rows(rows: int, row_bytes: int) -> int:
    """Rows per chunk for ``rows`` rows of logits of ``row_bytes`` bytes each."""
    return max(1, math.ceil(rows / CHUNKS), MIN_CHUNK_BYTES // max(1, row_bytes))


def _picked_input(
    picked: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``nll_loss``'s view of the picked log-probabilities: an ``[N, 2]`` input whose column
    ``column`` holds them, and targets naming that column (``ignore_index`` where ignored), so
    that ``nll_loss`` reduces the same values in the same order as over the whole logits."""
    column = 1 if ignore_index == 0 else 0
    values = picked.new_zeros(picked.shape[0], 2)
    values[:, column] = picked
    columns = torch.where(target != ignore_index, column, ignore_index)
    return values, columns, column


def _check_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"Target {value} is out of bounds for {classes} classes")


class LeanCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy`` over ``[N, C]`` logits, bit for bit, with a lean backward."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str
    ) -> torch.Tensor:
        rows, classes = logits.shape
        _check_targets(target, classes, ignore_index)
        safe = torch.where(target != ignore_index, target, 0).unsqueeze(1)
        picked = logits.new_empty(rows)
        step = chunk_rows(rows, classes * logits.element_size())
        for start in range(0, rows, step):
            part = torch.log_softmax(logits[start : start + step], 1)
            picked[start : start + step] = part.gather(1, safe[start : start + step]).squeeze(1)
            del part
        values, columns, column = _picked_input(picked, target, ignore_index)
        loss, total_weight = aten.nll_loss_forward(
            values, columns, None, REDUCTIONS[reduction], ignore_index
        )
        ctx.save_for_backward(logits, safe, columns, total_weight)
        ctx.settings = (ignore_index, REDUCTIONS[reduction], column)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        logits, safe, columns, total_weight = ctx.saved_tensors
        ignore_index, reduction, column = ctx.settings
        rows = logits.shape[0]
        # the same kernel as torch's backward, over the picked column only: the same values
        picked_grad = aten.nll_loss_backward(
            grad, logits.new_empty(rows, 2), columns, None, reduction, ignore_index, total_weight
        )[:, column : column + 1]
        out = torch.empty_like(logits)
        step = chunk_rows(rows, logits.shape[1] * logits.element_size())
        for start in range(0, rows, step):
            stop = start + step
            part = torch.log_softmax(logits[start:stop], 1)
            dense = torch.zeros_like(part).scatter_(1, safe[start:stop], picked_grad[start:stop])
            aten._log_softmax_backward_data.out(dense, part, 1, logits.dtype, out=out[start:stop])
            del part, dense
        return out, None, None, None


def lean_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``F.cross_entropy(logits, target, ignore_index=..., reduction=...)`` for ``[N, C]``
    logits and ``[N]`` class targets, bit for bit, keeping less memory in backward."""
    return LeanCrossEntropy.apply(logits, target, ignore_index, reduction)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(F.linear(hidden, weight, bias).to(dtype), target)`` in chunks of rows."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        ignore_index: int,
        reduction: str,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        rows = hidden.shape[0]
        classes = weight.shape[0]
        _check_targets(target, classes, ignore_index)
        safe = torch.where(target != ignore_index, target, 0).unsqueeze(1)
        picked = torch.empty(rows, dtype=dtype, device=hidden.device)
        lse = torch.empty(rows, dtype=dtype, device=hidden.device)
        step = chunk_rows(rows, classes * lse.element_size())
        with torch.no_grad():
            for start in range(0, rows, step):
                stop = start + step
                logits = F.linear(hidden[start:stop], weight, bias).to(dtype)
                lse[start:stop] = torch.logsumexp(logits, 1)
                picked[start:stop] = logits.gather(1, safe[start:stop]).squeeze(1) - lse[start:stop]
                del logits
        values, columns, column = _picked_input(picked, target, ignore_index)
        loss, total_weight = aten.nll_loss_forward(
            values, columns, None, REDUCTIONS[reduction], ignore_index
        )
        ctx.save_for_backward(hidden, weight, bias, safe, columns, total_weight, lse)
        ctx.settings = (ignore_index, REDUCTIONS[reduction], column, dtype)
        device = hidden.device.type  # backward makes the logits again as forward made them
        ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, safe, columns, total_weight, lse = ctx.saved_tensors
        ignore_index, reduction, column, dtype = ctx.settings
        rows = hidden.shape[0]
        picked_grad = aten.nll_loss_backward(
            grad, lse.new_empty(rows, 2), columns, None, reduction, ignore_index, total_weight
        )[:, column : column + 1]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        hidden_grad = torch.empty_like(hidden) if need_hidden else None
        # the head's gradients accumulate over chunks: in float32 at least, cast at the end
        wide = torch.promote_types(weight.dtype, torch.float32)
        weight_grad = torch.zeros_like(weight, dtype=wide) if need_weight else None
        bias_grad = None
        if need_bias and bias is not None:
            bias_grad = torch.zeros_like(bias, dtype=wide)
        step = chunk_rows(rows, weight.shape[0] * lse.element_size())
        for start in range(0, rows, step):
            stop = start + step
            part = hidden[start:stop]
            device, enabled, cast = ctx.autocast
            with torch.autocast(device, dtype=cast, enabled=enabled):
                logits = F.linear(part, weight, bias).to(dtype)
            # d loss / d logits = g * (onehot - softmax), g the picked log-probability's gradient
            scale = picked_grad[start:stop]
            logits.sub_(lse[start:stop, None]).exp_().mul_(-scale)
            logits.scatter_add_(1, safe[start:stop], scale)
            logits_grad = logits.to(hidden.dtype)
            del logits
            if hidden_grad is not None:
                torch.mm(logits_grad, weight, out=hidden_grad[start:stop])
            if weight_grad is not None:
                weight_grad.addmm_(logits_grad.t().to(wide), part.to(wide))
            if bias_grad is not None:
                bias_grad.add_(logits_grad.sum(0, dtype=wide))
            del logits_grad
        return (
            hidden_grad,
            None if weight_grad is None else weight_grad.to(weight.dtype),
            None if bias_grad is None or bias is None else bias_grad.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).to(dtype), target, ...)`` for ``[N, H]``
    hidden states, never holding more than one chunk of logits; exact to rounding."""
    return ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, target, ignore_index, reduction, dtype
    )
