"""memfit's use of torch's profiler, which is one per process: one session at a time, never
the user's, and quiet.

* **One at a time.** Every entry point that runs steps (``profile``, ``verify``, ``measure``...,
  through :func:`memfit.measuring.state.preserving_state`) and every :class:`MemoryMeter` run
  under one process-wide reentrant lock (:func:`exclusive`). Two threads planning two models
  take turns: kineto sessions started from two threads at once crashed the process
  ("External init callback must run in same thread as registerClient", then a segfault), and
  the other thread's allocations would land in the meter's count. Steps that the user runs in
  another thread meanwhile still do: plan while nothing else trains.
* **Never the user's.** Starting a session inside the user's own ``torch.profiler.profile()``
  ends the user's (its trace then has no events), so memfit refuses to run its steps while a
  profiler session is active (:func:`refuse_inside_profiler`), before doing anything.
* **Quiet.** This torch build's kineto writes ``USDT: ... profiler_start`` and ``profiler_stop``
  to stderr at every session's start and stop. ``KINETO_LOG_LEVEL=6`` silences them only when
  set before the process's first session (measured with torch 2.13: set around memfit's own
  sessions it silenced the user's later ones too, and did nothing when the user had profiled
  first), so the library leaves the environment alone and points file descriptor 2 at
  ``/dev/null`` around its own sessions' start and stop only (:func:`quiet_stderr`): a few
  milliseconds in which another thread's stderr output is lost too.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from memfit.errors import MemfitError

PROFILER_LOCK = threading.RLock()


def profiler_active() -> bool:
    """Whether a session of torch's profiler (autograd's or kineto's) is running now."""
    legacy = bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))
    return legacy or bool(torch._C._autograd._profiler_enabled())


def refuse_inside_profiler() -> None:
    """Raise when a profiler session that memfit did not start is running.

    Raises:
        MemfitError: a ``torch.profiler.profile()`` (or ``torch.autograd.profiler``) session
            is active: memfit's memory meter would end it.
    """
    if profiler_active():
        raise MemfitError(
            "memfit measures memory with torch's profiler, which runs one session per process, "
            "and a torch.profiler.profile() session is running now: starting memfit's would end "
            "yours (its trace would lose its events). Call memfit.profile/plan/auto/verify "
            "before or after your profiler session; a planned model trains under your profiler "
            "as usual"
        )


@contextmanager
def exclusive() -> Iterator[None]:
    """Hold memfit's process-wide lock (reentrant: nested entry points pass), refusing to start
    inside a profiler session memfit did not start (:func:`refuse_inside_profiler`)."""
    with PROFILER_LOCK:
        refuse_inside_profiler()
        yield


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at ``/dev/null`` for the body (the profiler's start and stop
    lines), then back; nothing happens where fd 2 cannot be duplicated."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
