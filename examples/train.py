"""Train a Hugging Face Llama-family model on several processes with memfit.

    torchrun --nproc-per-node 2 examples/train.py --fsdp --budget 50%
    torchrun --nproc-per-node 2 examples/train.py --ddp --budget 50%

gloo on CPU, NCCL where CUDA exists. The model is built from a config (random weights, no
download) with the library's defaults. Every rank profiles its own batch (same shape, other
tokens); memfit merges the ranks' profiles (the worst rank's memory, the slowest rank's times)
so that every rank runs the same plan, and the budget is per rank: sharded parameters, the
gathered parameters of the blocks at work, gradients, collective buffers and Adam's moments.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # quiet profiler (memfit's meter uses it)

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import memfit
from memfit.integrations.hf import build_hf


def batch(step: int, rank: int, shape: tuple[int, int], device: torch.device) -> dict:
    """This rank's batch for ``step``: random tokens, the same shape on every rank."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 256, shape, generator=generator).to(device)
    return {"input_ids": tokens, "labels": tokens.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    wrap = parser.add_mutually_exclusive_group(required=True)
    wrap.add_argument("--fsdp", action="store_true", help="fully_shard every layer, then the root")
    wrap.add_argument("--ddp", action="store_true", help="DistributedDataParallel")
    parser.add_argument("--budget", default="50%", help='per rank: "50%%" or bytes ("2GiB")')
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    device = device or torch.device("cpu")

    model, _ = build_hf(
        "llama", layers=args.layers, hidden=args.hidden, seq=args.seq, batch=args.batch
    )
    model.to(device)
    if args.fsdp:  # torchtitan's order: every block, then the root
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shape = (args.batch, args.seq)

    for step in range(args.steps):
        sample = batch(step, rank, shape, device)
        if step == 1:  # Adam's moments exist now: the per-rank budget covers them
            plan = memfit.auto(model, sample, budget=args.budget, optimizer=optimizer)
            if rank == 0:
                blocks = {n: o for n, o in plan.options.items() if not n.startswith("<")}
                changed = sum(option != "keep" for option in blocks.values())
                print(
                    f"plan: {changed} of {len(blocks)} blocks recomputed or rebuilt, "
                    f"predicted peak {memfit.format_bytes(plan.predicted_peak_bytes)} per rank "
                    f"(budget {memfit.format_bytes(plan.budget_bytes or 0)})",
                    flush=True,
                )
        loss = model(**sample).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"rank {rank} step {step}: loss {loss.item():.4f}", flush=True)

    sample = batch(args.steps, rank, shape, device)
    check = memfit.verify(model, sample, optimizer=optimizer)
    print(
        f"rank {rank}: gradients equal to the unplanned model: {check.gradients_equal}; "
        f"peak {memfit.format_bytes(check.measured_peak_bytes)} measured, "
        f"{memfit.format_bytes(check.predicted_peak_bytes)} predicted, "
        f"{memfit.format_bytes(check.baseline_peak_bytes)} without memfit",
        flush=True,
    )
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
