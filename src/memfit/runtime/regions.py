"""Recompute regions that span several block calls of the model's own loop.

A multi-block segment is one non-reentrant checkpoint over blocks ``s..t-1``. Running it as one
function call (the segment's first block running all of them) would hand the model the last
block's output in place of every earlier block's: a model that reads a middle block's output
(``output_hidden_states``, LLaVA's ``hidden_states[-2]``, feature pyramids, sums of block
outputs) would read the wrong tensor. So the segment's checkpoint is *opened* when block ``s`` is
called and *closed* when block ``t-1`` returns, with torch's own non-reentrant checkpoint
(``_checkpoint_without_reentrant_generator``, the generator ``torch.utils.checkpoint.checkpoint``
itself drives), and every block runs in its own call and returns its own output. In backward
the checkpoint reruns the segment's blocks as one function (:class:`SegmentBody`), from the first
block's input, which holds because each block is checked to receive the previous block's output,
with no random numbers drawn between them, and gets its own side inputs again (the executor
keeps each block's).

Between two blocks of an open region the model's own code runs (collecting hidden states,
logging). Its tensors must not be saved through the checkpoint's hooks (the rerun would not
make them), so :class:`Region` takes the checkpoint's saved-tensor hooks off autograd's stack
when a block returns and puts them back when the next block is called: between blocks autograd
saves as if no checkpoint were open.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import _checkpoint_without_reentrant_generator, noop_context_fn

Hooks = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]


class Region:
    """One open non-reentrant checkpoint over a run of blocks.

    Args:
        body: what the checkpoint reruns in backward, called as ``body(*args, **kwargs)``.
        args, kwargs: the region's inputs (the first block's call).
    """

    def __init__(self, body: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        main = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.input = weakref.ref(main) if main is not None else None
        self._hooks: Hooks | None = None  # taken off autograd's stack between blocks
        self._open = _checkpoint_without_reentrant_generator(
            body, True, noop_context_fn, "default", False, True, *args, **kwargs
        )
        next(self._open)  # torch's pre-forward: inputs saved, its hooks pushed
        self._pushed = torch.is_grad_enabled()  # without grad torch pushes nothing

    def suspend(self) -> None:
        """A block returned: take the region's hooks off the stack until the next block."""
        if self._pushed and self._hooks is None:
            hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
            assert hooks is not None
            torch._C._autograd._pop_saved_tensors_default_hooks()
            self._hooks = hooks

    def resume(self) -> None:
        """The next block is called: the region's hooks on the stack again."""
        if self._hooks is not None:
            torch._C._autograd._push_saved_tensors_default_hooks(*self._hooks)
            self._hooks = None

    def close(self, error: BaseException | None = None) -> None:
        """End the region (its hooks must be on top of the stack, or suspended): normally, or
        after ``error`` (then nothing of it is kept; the error is not raised here)."""
        self.resume()
        if error is None:
            next(self._open, None)
            return
        try:
            self._open.throw(error)
        except BaseException as raised:
            if raised is not error:
                raise


class Regions:
    """The open regions of one top-level segment, outermost first."""

    def __init__(self) -> None:
        self.open: list[tuple[int, Region]] = []  # (the segment's stop, its region)

    def enter(self, stop: int, region: Region) -> None:
        self.open.append((stop, region))

    def suspend(self) -> None:
        for _, region in reversed(self.open):  # innermost is on top of the stack
            region.suspend()

    def resume(self) -> None:
        for _, region in self.open:
            region.resume()

    def close_through(self, stop: int) -> list[Region]:
        """Close the regions that end with the block before ``stop``, innermost first."""
        closed = []
        while self.open and self.open[-1][0] == stop:
            _, region = self.open.pop()
            region.close()
            closed.append(region)
        return closed

    def abandon(self, error: BaseException) -> None:
        """Close every open region after ``error``, innermost first."""
        self.resume()
        while self.open:
            _, region = self.open.pop()
            region.close(error)
