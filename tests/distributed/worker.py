"""One rank of the distributed tests: run by ``torchrun --nproc-per-node 2`` (gloo, CPU) from
``test_distributed.py``, one scenario per launch; writes what it saw to ``<out>/rank<r>.json``.

Models are Hugging Face configs with their defaults (GPT-2: dropout 0.1; Llama), every rank
starting from the same weights (seed 0) and training on its own batch of the same shape.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import pathlib
import sys
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.nn.parallel import DistributedDataParallel

import memfit
from memfit.integrations.hf import build_hf
from memfit.planning.plan import Plan, Segment, Stage, tree_to_data

ALL_GATHERS: collections.Counter[str] = collections.Counter()
_all_gather = _fsdp_param_group.foreach_all_gather


def _counted_all_gather(*args: Any, **kwargs: Any) -> Any:
    ALL_GATHERS["all_gather"] += 1
    return _all_gather(*args, **kwargs)


_fsdp_param_group.foreach_all_gather = _counted_all_gather  # type: ignore[attr-defined]


def rank_batch(sample: dict[str, torch.Tensor], rank: int, seq: int | None = None) -> dict:
    """This rank's batch: other tokens, the sample's shape (or ``seq`` tokens)."""
    ids = sample["input_ids"]
    shape = (ids.shape[0], seq or ids.shape[1])
    tokens = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(100 + rank))
    return {"input_ids": tokens, "labels": tokens.clone()}


def step(model: torch.nn.Module, batch: dict, seed: int, **context: Any) -> torch.Tensor:
    torch.manual_seed(seed)
    ALL_GATHERS.clear()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach()


def full(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def same_grads(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    results = [torch.equal(full(a.grad), full(b.grad)) for a, b in pairs]  # type: ignore[arg-type]
    for module in (model, reference):
        module.zero_grad(set_to_none=True)
    return all(results)


def tree(plan: Plan) -> str:
    return json.dumps(tree_to_data(plan.tree))


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def ddp(rank: int) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for order in ("after", "before"):
        for budget in ("50%", "80%"):
            model, sample = build_hf("gpt2", layers=4, seq=64)
            batch = rank_batch(sample, rank)
            reference = DistributedDataParallel(copy.deepcopy(model))
            if order == "after":
                model = DistributedDataParallel(model)
            plan = memfit.auto(model, batch, budget=budget, repeats=1)
            if order == "before":
                model = DistributedDataParallel(model)
            key = f"{order} {budget}"
            seen[f"{key} tree"] = tree(plan)
            seen[f"{key} recomputes"] = any(o != "keep" for o in plan.options.values())
            seen[f"{key} loss"] = bool(
                torch.equal(step(model, batch, 7 + rank), step(reference, batch, 7 + rank))
            )
            seen[f"{key} grads"] = same_grads(model, reference)
            if budget == "50%":  # this rank's peak, DDP's gradient buckets held
                check = memfit.verify(model, batch, repeats=1)
                seen[f"{key} verify"] = {
                    "measured": check.measured_peak_bytes,
                    "predicted": check.predicted_peak_bytes,
                    "budget": check.budget_bytes,
                    "held": check.planned.held_bytes,
                    "buckets": sum(
                        int(size)
                        for size in model._get_ddp_logging_data()["bucket_sizes"].split(",")
                    ),
                }
            # gradient accumulation: the first micro-batch without the all-reduce
            other = rank_batch(sample, rank + 10)
            for module in (model, reference):
                with module.no_sync():
                    step(module, other, 11)
                step(module, batch, 12)
            seen[f"{key} no_sync grads"] = same_grads(model, reference)
    return seen


def fsdp(rank: int) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    model, sample = build_hf("llama", layers=4, seq=512)
    batch = rank_batch(sample, rank)
    reference = shard(copy.deepcopy(model))
    shard(model)
    # Adam's moments exist (one step taken by both models alike): the budget covers them
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, reference)]
    for module, optimizer in zip((model, reference), optimizers, strict=True):
        step(module, batch, 1)
        optimizer.step()
        module.zero_grad(set_to_none=True)
    plan = memfit.auto(model, batch, budget="60%", repeats=1, optimizer=optimizers[0])
    seen["tree"] = tree(plan)
    seen["recomputes"] = any(o != "keep" for o in plan.options.values())
    seen["loss"] = bool(torch.equal(step(model, batch, 5), step(reference, batch, 5)))
    seen["all_gathers"] = ALL_GATHERS["all_gather"]
    step(reference, batch, 5)
    seen["reference_all_gathers"] = ALL_GATHERS["all_gather"]
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    step(model, batch, 5)
    step(reference, batch, 5)
    seen["grads"] = same_grads(model, reference)
    check = memfit.verify(model, batch, optimizer=optimizers[0])
    seen["verify"] = {
        "gradients_equal": check.gradients_equal,
        "measured": check.measured_peak_bytes,
        "predicted": check.predicted_peak_bytes,
        "budget": check.budget_bytes,
    }
    # gradient accumulation: the first micro-batch without the reduce-scatter
    other = rank_batch(sample, rank + 10)
    for module in (model, reference):
        module.set_requires_gradient_sync(False)
        step(module, other, 11)
        module.set_requires_gradient_sync(True)
        step(module, batch, 12)
    seen["accumulated grads"] = same_grads(model, reference)
    # a multi-block segment (the planner ends segments at FSDP2 units; a user may still ask)
    memfit.remove(model)
    names = plan.stage_names
    forced = Plan.from_tree(
        names,
        (
            Stage(0),
            Segment(1, 3, (Stage(1), Stage(2))),
            Segment(3, 5, (Stage(3), Stage(4))),
            *(Stage(i) for i in range(5, len(names))),
        ),
        "two-block segments",
    )
    memfit.apply(model, forced)
    seen["segments loss"] = bool(torch.equal(step(model, batch, 3), step(reference, batch, 3)))
    seen["segments all_gathers"] = ALL_GATHERS["all_gather"]
    seen["segments grads"] = same_grads(model, reference)
    # the other order: plan the bare model, then shard it
    bare, _ = build_hf("llama", layers=4, seq=512)
    reference = shard(copy.deepcopy(bare))
    plan = memfit.auto(bare, batch, budget="60%", repeats=1)
    shard(bare)
    seen["before tree"] = tree(plan)
    seen["before loss"] = bool(torch.equal(step(bare, batch, 5), step(reference, batch, 5)))
    seen["before grads"] = same_grads(bare, reference)
    return seen


def candidates(rank: int) -> dict[str, Any]:
    """Plans timed on every rank in lockstep (DDP's all-reduce in each timed step): every rank
    runs rank 0's choice, bit-identical to DDP without memfit."""
    model, sample = build_hf("gpt2", layers=4, seq=64, batch=4)
    batch = rank_batch(sample, rank)
    reference = DistributedDataParallel(copy.deepcopy(model))
    model = DistributedDataParallel(model)
    plan = memfit.auto(model, batch, budget="50%", repeats=1, candidates=3)
    return {
        "tree": tree(plan),
        "chosen_by": plan.info.get("chosen_by"),
        "timed": len(plan.info.get("timed", [])),
        "loss": bool(torch.equal(step(model, batch, 7), step(reference, batch, 7))),
        "grads": same_grads(model, reference),
    }


def mismatch(rank: int) -> dict[str, Any]:
    model, sample = build_hf("gpt2", layers=2, seq=32)
    batch = rank_batch(sample, rank, seq=32 + 8 * rank)
    try:
        memfit.auto(DistributedDataParallel(model), batch, budget="50%", repeats=1)
    except memfit.errors.RankMismatchError as error:
        return {"error": str(error)}
    return {"error": None}


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "candidates": candidates,
    "ddp": ddp,
    "fsdp": fsdp,
    "mismatch": mismatch,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("out", type=pathlib.Path)
    options = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        seen = SCENARIOS[options.scenario](rank)
    except Exception:
        seen = {"exception": traceback.format_exc()}
        (options.out / f"rank{rank}.json").write_text(json.dumps(seen))
        sys.exit(1)
    (options.out / f"rank{rank}.json").write_text(json.dumps(seen, indent=1))
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
