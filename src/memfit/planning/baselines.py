"""The baseline schedules that practitioners use by hand, each a pure ``(costs) -> tree``.

* ``none``: keep everything (plain training).
* ``all``: recompute every checkpointable stage on its own (what Hugging Face's
  ``gradient_checkpointing_enable()`` does).
* ``every:k``: recompute every k-th checkpointable stage on its own, starting with the first
  (the "checkpoint every k layers" knob of Megatron-LM, DeepSpeed and many training scripts).
* ``sqrt``: Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": about ``sqrt(n)``
  contiguous recompute segments over the ``n`` checkpointable stages, each kept whole inside.
* ``all+offload``: ``all`` with every segment's input in host memory until its recompute
  (DeepSpeed's ``cpu_checkpointing``, Megatron's activation offload); CUDA profiles only.
"""

from __future__ import annotations

import math

from memfit.planning._chain import menu_names
from memfit.planning.costs import CHECKPOINT, ChainCosts
from memfit.planning.offload import offloads_input
from memfit.planning.plan import Item, Segment, Stage, Tree, keep_tree, recompute_one


def keep_all(costs: ChainCosts) -> Tree:
    """Every stage kept: no recompute.

    Args:
        costs: the chain.

    Returns:
        The schedule tree.
    """
    return keep_tree(0, len(costs.stages))


def recompute_all(costs: ChainCosts) -> Tree:
    """Every checkpointable stage recomputed in its own one-stage segment, and every block no
    gradient reaches under its checkpoint where the profile offers it (Hugging Face's switch
    checkpoints those too: LLaVA's last vision layer).

    Args:
        costs: the chain.

    Returns:
        The schedule tree.
    """
    return tuple(
        Stage(item.index, CHECKPOINT)
        if isinstance(item, Stage) and CHECKPOINT in menu_names(costs.stages[item.index])
        else item
        for item in every_k(costs, 1)
    )


def every_k(costs: ChainCosts, k: int) -> Tree:
    """Checkpointable stages number 0, k, 2k, ... (counting checkpointable stages only) recomputed.

    Args:
        costs: the chain.
        k: the period, at least 1.

    Returns:
        The schedule tree.

    Raises:
        ValueError: ``k`` is below 1.

    Example:
        >>> from memfit.planning import uniform_chain
        >>> [type(item).__name__ for item in every_k(uniform_chain(4), 2)]
        ['Segment', 'Stage', 'Segment', 'Stage']
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"every:k needs an integer k >= 1; got {k!r}")
    items: list[Item] = []
    count = 0
    for index, stage in enumerate(costs.stages):
        if stage.checkpointable:
            items.append(recompute_one(index) if count % k == 0 else Stage(index))
            count += 1
        else:
            items.append(Stage(index))
    return tuple(items)


def sqrt_segments(costs: ChainCosts) -> Tree:
    """About ``sqrt(n)`` contiguous recompute segments (Chen et al. 2016), all-keep inside.

    Segments hold only checkpointable stages and end where a stage does not join the one before
    it; non-checkpointable stages are kept.

    Args:
        costs: the chain.

    Returns:
        The schedule tree.
    """
    checkpointable = sum(stage.checkpointable for stage in costs.stages)
    if checkpointable == 0:
        return keep_all(costs)
    length = math.ceil(checkpointable / max(1, round(math.sqrt(checkpointable))))
    items: list[Item] = []
    start: int | None = None

    def close(stop: int) -> None:
        nonlocal start
        if start is not None:
            items.append(Segment(start, stop, keep_tree(start, stop)))
            start = None

    for index, stage in enumerate(costs.stages):
        if not stage.checkpointable:
            close(index)
            items.append(Stage(index))
            continue
        if start is not None and (not stage.joins_previous or index - start >= length):
            close(index)
        if start is None:
            start = index
    close(len(costs.stages))
    return tuple(items)


def offloaded(costs: ChainCosts, tree: Tree) -> Tree:
    """``tree`` with every top-level segment's input offloaded (where it may be: see
    :func:`~memfit.planning.offload.offloads_input`)."""
    return tuple(
        Segment(item.start, item.stop, item.inner, offload=True)
        if isinstance(item, Segment) and offloads_input(costs, item.start)
        else item
        for item in tree
    )


def recompute_all_offload(costs: ChainCosts) -> Tree:
    """Every checkpointable stage recomputed on its own, its input waiting in host memory.

    Raises:
        ValueError: the costs have no host to offload to (a CPU profile).
    """
    if costs.host_bytes_per_s <= 0:
        raise ValueError(
            "strategy 'all+offload' moves block inputs from a CUDA device to host memory; "
            "this profile has none (a model on the CPU): use 'all'"
        )
    return offloaded(costs, recompute_all(costs))
