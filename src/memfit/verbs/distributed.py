"""Several processes (``torchrun``, DDP, FSDP2): one plan that every rank runs.

A rank that recomputes more than its peers makes all of them wait at the next collective, so
memfit never lets ranks plan alone. When a default process group of more than one rank exists
(``distributed=None``, the default of :func:`memfit.profile`), profiling

1. checks that every rank profiles the same sample shapes, the same chain and the same options
   before it runs a step (:class:`~memfit.errors.RankMismatchError` on every rank otherwise:
   an error, never a hang at the first collective of a step one rank does not run);
2. measures on every rank, then merges the profiles: every figure is the largest any rank
   measured (the worst rank's memory, the slowest rank's times), every flag holds only if it
   holds on all ranks, an option stays on the menu only where every rank has it;

and :func:`memfit.plan` solves the merged profile on every rank, then takes rank 0's plan
(identical unless the solver is not deterministic, which would be a bug: logged).

Everything travels as JSON text in a ``uint8`` tensor (``all_gather``), never pickled: the
collectives run on the device of the group's backend (CUDA for NCCL, else the CPU).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from memfit.errors import RankMismatchError
from memfit.measuring.profile import Profile
from memfit.measuring.step import split_sample
from memfit.planning.plan import Plan

logger = logging.getLogger(__name__)


def ranks(distributed: bool | None = None) -> int:
    """How many ranks must agree on the plan: the default process group's size, or 1.

    Args:
        distributed: ``None`` (default): all ranks of an initialised default process group of
            more than one rank; ``False``: this process alone; ``True``: as ``None``, but an
            error without such a group.

    Raises:
        ValueError: ``distributed=True`` without an initialised group of several ranks.
    """
    if distributed is False:
        return 1
    size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if distributed and size < 2:
        raise ValueError(
            f"distributed=True needs torch.distributed initialised with several ranks "
            f"(torchrun, then torch.distributed.init_process_group()); found {size} rank(s). "
            f"Leave distributed unset to plan in one process"
        )
    return size


def _device() -> torch.device:
    backend = str(dist.get_backend())
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange(text: str) -> list[str]:
    """Every rank's ``text``, in rank order (a collective: every rank must call it)."""
    device = _device()
    encoded = text.encode()
    data = (
        torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        if encoded
        else torch.zeros(0, dtype=torch.uint8)
    )
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data.to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [
        g[: int(s.item())].cpu().numpy().tobytes().decode()
        for g, s in zip(gathered, sizes, strict=True)
    ]


def describe_sample(sample: Any) -> list[list[str]]:
    """The sample's arguments as ``[name, shape, dtype]`` (``[name, type]`` for non-tensors)."""
    args, kwargs = split_sample(sample)
    rows: list[list[str]] = []
    for key, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            rows.append([str(key), str(tuple(value.shape)), str(value.dtype)])
        else:
            rows.append([str(key), type(value).__name__])
    return rows


def agree(what: str, value: Any, fix: str) -> None:
    """Raise :class:`RankMismatchError` on every rank unless every rank has the same ``value``
    (JSON-able); ``what`` names it and ``fix`` says what to do, in the message."""
    texts = exchange(json.dumps(value, sort_keys=True))
    if len(set(texts)) == 1:
        return
    shown = "; ".join(f"rank {rank}: {text[:200]}" for rank, text in enumerate(texts))
    raise RankMismatchError(
        f"memfit makes one plan for every rank, but the ranks differ in {what} ({shown}). {fix}"
    )


def rank0(value: Any) -> Any:
    """Rank 0's ``value`` (JSON-able), on every rank."""
    return json.loads(exchange(json.dumps(value))[0])


def merge(values: list[Any]) -> Any:
    """Merge the ranks' JSON values: numbers the largest, booleans all true, dicts on the keys
    every rank has, lists item by item when as long, anything else rank 0's."""
    first = values[0]
    if isinstance(first, bool):
        return all(values)
    if isinstance(first, int | float) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        return max(values)
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        keys = [key for key in first if all(key in v for v in values)]
        return {key: merge([v[key] for v in values]) for key in keys}
    if isinstance(first, list) and all(
        isinstance(v, list) and len(v) == len(first) for v in values
    ):
        return [merge([v[i] for v in values]) for i in range(len(first))]
    return first


def merge_profiles(profile: Profile) -> Profile:
    """The profile every rank plans with: the worst of every rank's figures (see the module
    docstring); ``info["ranks"]`` records how many were merged."""
    each = [json.loads(text) for text in exchange(profile.to_json())]
    merged = merge(each)
    # the worst rank's copy bandwidth is the slowest one
    merged["costs"]["host_bytes_per_s"] = min(p["costs"].get("host_bytes_per_s", 0) for p in each)
    merged["info"]["ranks"] = dist.get_world_size()
    return Profile.from_dict(merged)


def agree_on_plan(plan: Plan) -> Plan:
    """Rank 0's plan, on every rank (each solved the same merged profile)."""
    texts = exchange(plan.to_json())
    trees = {json.dumps(json.loads(text)["tree"]) for text in texts}  # info holds solve times
    if len(trees) > 1:
        logger.warning(
            "memfit: ranks solved the same merged profile to different plans; every rank runs "
            "rank 0's"
        )
    return Plan.from_json(texts[0])


def rank0_plans(plans: list[Plan]) -> list[Plan]:
    """Rank 0's list of plans, on every rank (the candidates all ranks time in lockstep)."""
    return [Plan.from_json(text) for text in rank0([plan.to_json() for plan in plans])]


def rank0_plan(plan: Plan) -> Plan:
    """Rank 0's plan, on every rank, without a warning: after timing, each rank may have
    measured another plan fastest, and every rank must run the same one."""
    return Plan.from_json(rank0(plan.to_json()))
