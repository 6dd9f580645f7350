"""Offload's mechanics on CPU, with the host-to-host stand-in that runs the same code without
streams: hooks, storage dedup with views, the pool, the fetch order, cleanup, gradients."""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import pickle
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.errors import PlanMismatchError
from memfit.integrations.hf import build_hf
from memfit.measuring import offload as offload_module
from memfit.measuring.chain import find_chain
from memfit.measuring.offload import offloadable
from memfit.models import build
from memfit.planning.costs import KEEP
from memfit.planning.offload import with_offload
from memfit.planning.plan import Plan, Segment, Stage, Tree, recompute_one
from memfit.planning.simulate import simulate
from memfit.runtime import apply_plan, remove_plan
from memfit.runtime.apply import planned, planned_module
from memfit.runtime.executor import Executor
from memfit.runtime.offload import Entry, Group, HostCopies, Offloader
from tests.helpers.plans import make_plan
from tests.helpers.steps import assert_same_step, chain_of, step


@pytest.fixture(autouse=True)
def every_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models are tiny: offload every activation, however small."""
    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 1)


def seg(start: int, stop: int, offload: bool = True) -> Segment:
    return Segment(start, stop, tuple(Stage(i) for i in range(start, stop)), offload=offload)


# stages: 0 <pre>, 1..4 the blocks, 5 <post>
TREES: dict[str, Tree] = {
    "every block offloaded": (Stage(0), *[Stage(i, "offload") for i in range(1, 5)], Stage(5)),
    "every input offloaded": (Stage(0), *[seg(i, i + 1) for i in range(1, 5)], Stage(5)),
    "mixed": (
        Stage(0),
        Stage(1, "offload"),
        Segment(2, 4, (recompute_one(2), Stage(3)), offload=True),
        Stage(4, "offload"),
        Stage(5),
    ),
    "offload next to keep and recompute": (
        Stage(0),
        Stage(1),
        Stage(2, "offload"),
        recompute_one(3),
        seg(4, 5),
        Stage(5),
    ),
}


def offloader_of(model: nn.Module) -> Offloader:
    executor = executor_of(model)
    return executor.offloader


def executor_of(model: nn.Module) -> Executor:
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if hasattr(forward, "executor"):
            return forward.executor  # type: ignore[no-any-return]
    raise AssertionError("no planned block")


@pytest.mark.parametrize("name", TREES)
def test_gpt_gradients_bit_identical(name: str) -> None:
    model, sample = build("gpt", layers=4, width=32, heads=4, seq=16, batch=2, vocab=64)
    reference = step(model, sample)
    apply_plan(model, chain_of(model, sample), make_plan(chain_of(model, sample), TREES[name]))
    assert_same_step(reference, step(model, sample))
    assert_same_step(reference, step(model, sample))  # the second step reuses the pool
    remove_plan(model)
    assert_same_step(reference, step(model, sample))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_gradients_bit_identical(arch: str) -> None:
    """Library defaults (KV cache on, dropout on for GPT-2, SDPA)."""
    model, sample = build_hf(arch, layers=4, hidden=32, heads=2, seq=16, batch=2)

    def hf_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model(**sample).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = hf_step()
    chain = find_chain(model, lambda: model(**sample))
    apply_plan(model, chain, make_plan(chain, TREES["mixed"]))
    assert_same_step(reference, hf_step())
    assert not offloader_of(model).storages


def test_pool_is_reused_and_nothing_outlives_the_step() -> None:
    model, sample = build("gpt", layers=4, width=32, heads=4, seq=16, batch=2, vocab=64)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES["mixed"]))
    step(model, sample)
    offloader = offloader_of(model)
    pool = offloader.pools["cpu"]
    made = pool.allocated
    assert made > 0
    assert not offloader.storages  # every entry let go after its backward
    free = sum(buffer.numel() for bucket in pool.free.values() for buffer in bucket)
    assert free == pool.held_bytes  # every buffer back in the pool
    step(model, sample)
    assert pool.allocated == made  # same sizes: no new buffer
    offloader.clear()
    assert pool.held_bytes == 0 and not pool.free


def test_pool_keeps_one_step_of_buffers_when_shapes_change() -> None:
    """Sequence lengths that change from step to step must not add pinned buffers for ever;
    gradient accumulation's later forwards keep the buffers the earlier ones use."""
    model, sample = build("gpt", layers=4, width=32, heads=4, seq=16, batch=2, vocab=64)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES["mixed"]))
    pool = offloader_of(model).pools

    def buffers() -> dict[int, int]:
        return {nbytes: len(bucket) for nbytes, bucket in pool["cpu"].free.items()}

    short = tuple(t[:, :8] for t in sample)
    step(model, short)
    only_short = buffers()
    step(model, sample)
    step(model, short)
    step(model, short)
    assert buffers() == only_short
    made = []
    for _ in range(2):  # three micro-batches, then one backward: twice
        sum(model(*sample) for _ in range(3)).backward()
        made.append(pool["cpu"].allocated)
    assert made[1] == made[0]  # the second round found every buffer the first one made


def test_fetches_run_one_item_ahead_in_backward_order() -> None:
    model, sample = build("gpt", layers=4, width=32, heads=4, seq=16, batch=2, vocab=64)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES["every block offloaded"]))
    offloader = offloader_of(model)
    offloader.log = []
    step(model, sample)
    log = offloader.log
    fetches = [group for event, group in log if event == "fetch"]
    blocks = [chain.stage_names[i] for i in range(1, 5)]
    assert fetches == blocks[::-1]
    for lower, upper in itertools.pairwise(blocks):
        # block k is fetched when block k+1's backward starts: before k+1's own tensors are
        # unpacked, so its copies overlap k+1's backward
        assert log.index(("fetch", lower)) < log.index(("unpack", upper))
    # in forward, block k's copies are waited for when block k+1's forward ends
    drained = [group for event, group in log if event == "drained"]
    assert drained == blocks
    first_unpack = min(i for i, entry in enumerate(log) if entry[0] == "unpack")
    assert all(log.index(("drained", block)) < first_unpack for block in blocks)


class Views(nn.Module):
    """Saves one storage several ways: the tensor, its transpose, a slice, and q/k/v views of
    one projection (like a fused attention input)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2)  # saves q and k: views of one storage
        y = torch.sin(x) * x.transpose(-1, -2).transpose(-1, -2)  # saves x, and x again
        return y + scores.softmax(-1) @ v + x[..., :1].exp()


def test_one_copy_per_storage_and_views_come_back_right(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), *[Views(8) for _ in range(3)], nn.Linear(8, 1))
    sample = (torch.randn(2, 5, 8),)

    def loss_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(*sample).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = loss_step()
    chain = find_chain(model, lambda: model(*sample), blocks=["1", "2", "3"])
    tree = (Stage(0), *[Stage(i, "offload") for i in range(1, 4)], Stage(4))
    apply_plan(model, chain, make_plan(chain, tree))
    offloader = offloader_of(model)
    packed: list[tuple[int, int]] = []
    pack = Offloader.pack

    def spy(self: Offloader, tensor: torch.Tensor, group: Any) -> Any:
        packed.append((tensor.untyped_storage()._cdata, id(tensor)))
        return pack(self, tensor, group)

    monkeypatch.setattr(Offloader, "pack", spy)
    offloader.log = []
    assert_same_step(reference, loss_step())
    copies = sum(1 for event, _ in offloader.log if event == "copy out")
    assert copies == len({storage for storage, _ in packed}) < len(packed)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    assert not params & {storage for storage, _ in packed}  # weights and their views stay


def test_offloadable_filter() -> None:
    weight = nn.Parameter(torch.randn(4, 4))
    assert not offloadable(weight)
    assert not offloadable(torch.randn(4, requires_grad=True))  # a leaf that wants grad
    assert not offloadable(torch.randn(1, 4).expand(64, 4))  # broadcast
    assert offloadable(torch.randn(4, 4) * 2)
    # no plain storage, or a view whose conjugate/negative bit set_ would drop
    assert not offloadable((torch.randn(4, 4) * 2).to_sparse())
    assert not offloadable((torch.randn(4, 4, dtype=torch.complex64) * 2).conj())
    assert not offloadable((torch.randn(4, 4, dtype=torch.complex64) * 2).conj().imag)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 1 << 16)
        assert not offloadable(torch.randn(4, 4) * 2)  # tiny


def test_conjugate_views_come_back_right() -> None:
    z = torch.randn(8, 8, dtype=torch.complex64, requires_grad=True)

    def grad(offloader: Offloader | None) -> torch.Tensor:
        z.grad = None
        with offloader.saving(Group("g"), keep=lambda _: False) if offloader else nullcontext():
            loss = ((z * 2).conj() * (z * 3)).real.sum()  # mul saves the lazy conjugate
        loss.backward()
        assert z.grad is not None
        return z.grad.clone()

    assert torch.equal(grad(None), grad(Offloader()))


class Failing(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("boom")
        return torch.tanh(self.linear(x))


def test_nothing_stays_after_an_exception() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), *[Failing(8) for _ in range(4)], nn.Linear(8, 1))
    sample = (torch.randn(4, 8),)
    reference = step_of(model, sample)
    chain = find_chain(model, lambda: model(*sample), blocks=["1", "2", "3", "4"])
    tree = (Stage(0), Stage(1, "offload"), seg(2, 3), Stage(3, "offload"), Stage(4), Stage(5))
    apply_plan(model, chain, make_plan(chain, tree))
    offloader = offloader_of(model)
    model[4].fail = True
    with pytest.raises(RuntimeError, match="boom"):
        model(*sample).sum().backward()
    gc.collect()
    assert not offloader.storages
    pool = offloader.pools["cpu"]
    assert sum(b.numel() for bucket in pool.free.values() for b in bucket) == pool.held_bytes
    model[4].fail = False
    assert_same_step(reference, step_of(model, sample))


def step_of(model: nn.Module, sample: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    loss = model(*sample).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


class Waits(HostCopies):
    """The stand-in, noting which copies the compute stream waited for."""

    def __init__(self) -> None:
        self.waited: list[str] = []

    def wait_out(self, entry: Entry) -> None:
        self.waited.append("out")

    def wait_in(self, entry: Entry) -> None:
        self.waited.append("in")


def test_memory_a_copy_uses_goes_only_after_a_wait() -> None:
    """A fetch that no unpack waited for (a node whose backward never runs, an exception), and
    a forward cut short before its copies were waited for: on CUDA, the allocator would hand
    the memory to a compute op while the side stream still wrote or read it."""
    offloader = Offloader()
    copies = offloader.copies["cpu"] = Waits()
    x = torch.randn(64, 64, requires_grad=True)
    fetched = Group("fetched, never unpacked")
    with offloader.saving(fetched, keep=lambda _: False):
        y = (x * 2).sin()  # sin saves its input: offloaded
    offloader.drain(fetched)
    offloader.fetch(fetched)
    assert copies.waited == ["out"]
    del y
    gc.collect()
    assert copies.waited == ["out", "in"]
    copies.waited.clear()
    with offloader.saving(Group("cut short"), keep=lambda _: False):
        y = (x * 2).sin()
    del y
    gc.collect()
    assert copies.waited == ["out"]
    assert not offloader.storages


def test_nested_offload_is_refused() -> None:
    model, sample = build("gpt", layers=4, width=32, heads=4, seq=16, batch=2, vocab=64)
    chain = chain_of(model, sample)
    inner = (seg(1, 2), Stage(2), Stage(3), Stage(4))
    with pytest.raises(PlanMismatchError, match="inside another segment"):
        apply_plan(model, chain, make_plan(chain, (Stage(0), Segment(1, 5, inner), Stage(5))))
    assert planned_module(model) is None


def test_copies_of_an_offloading_model_train_alike() -> None:
    """deepcopy (EMA) and pickle carry the plan, not the offload state or buffers."""
    model, sample = build("gpt", layers=4, width=32, heads=4, seq=16, batch=2, vocab=64)
    reference = step(model, sample)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES["mixed"]))
    step(model, sample)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert offloader_of(twin) is not offloader_of(model)
        assert not offloader_of(twin).pools
        assert_same_step(reference, step(twin, sample))


def test_no_grad_forward_offloads_nothing() -> None:
    model, sample = build("gpt", layers=4, width=32, heads=4, seq=16, batch=2, vocab=64)
    chain = chain_of(model, sample)
    apply_plan(model, chain, make_plan(chain, TREES["mixed"]))
    with torch.no_grad():
        model(*sample)
    assert not offloader_of(model).pools


class Tabled(nn.Module):
    """A block that saves a side input every block gets (like rotary tables)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return x + torch.sin(self.linear(x)) * table


class TableModel(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Tabled(width) for _ in range(4))
        self.head = nn.Linear(width, 1)
        self.register_buffer("base", torch.randn(128, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.base * 2
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, table)
        return self.head(x).square().mean()


@pytest.mark.parametrize("name", ["gpt", "shared table"])
def test_simulated_peaks_match_the_stand_in_to_the_byte(name: str) -> None:
    """The simulator's offload events against the runtime's frees: on CPU the stand-in's
    fetched copies are new allocations and its pool buffers exist before the measured step,
    so the meter sees what the CUDA allocator would (profile faked as CUDA's: bandwidth and
    offload bytes measured as on CUDA). A table every block saves stays on the device."""
    if name == "gpt":
        model, sample = build("gpt", layers=4, width=64, heads=4, seq=64, batch=2, vocab=64)
    else:
        model, sample = TableModel(64), (torch.randn(128, 64),)
    prof = memfit.profile(model, sample, repeats=1, options=())
    chain = chain_of(model, sample)
    blocks = {i: block for i in chain.block_stages if (block := chain.block_of_stage(i))}
    keep_all = make_plan(chain, tuple(Stage(i) for i in range(len(chain))))
    with planned(model, chain, keep_all):
        moved = offload_module.saved_activation_bytes(blocks, lambda: model(*sample))
    stages = [
        dataclasses.replace(stage, offload_bytes=moved.get(index, 0))
        for index, stage in enumerate(prof.costs.stages)
    ]
    costs = with_offload(dataclasses.replace(prof.costs, stages=stages, host_bytes_per_s=1e9))
    assert all(KEEP in stage.options for stage in costs.stages)
    for name, tree in TREES.items():
        run = simulate(costs, tree)
        plan = dataclasses.replace(
            Plan.from_tree(chain.stage_names, tree, "hand"), predicted_peak_bytes=run.peak_bytes
        )
        memfit.apply(model, plan)
        check = memfit.verify(model, sample, repeats=1)
        memfit.remove(model)
        assert check.gradients_equal, name
        # never under; over by the checkpoints' RNG states the simulator holds longer than
        # torch does (nested segments: a documented upper bound)
        over = run.peak_bytes - check.measured_peak_bytes
        slack = 0.005 * check.measured_peak_bytes + 2 * costs.checkpoint_bytes
        assert 0 <= over <= slack, (name, over, run.peak_where)


class Mutating(nn.Module):
    """Saves its input-derived tensor for backward, then changes it in place."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        y = torch.sin(h)  # sin saves h
        h.mul_(2)  # ... which is then changed: the saved value is gone
        return y + h


def test_an_in_place_change_of_an_offloaded_tensor_is_an_error() -> None:
    """Without offload autograd raises in backward; saved-tensor hooks skip its check, so the
    offloader checks the versions itself instead of training on either value silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Mutating(8), Mutating(8), nn.Linear(8, 1))
    sample = (torch.randn(4, 8),)
    with pytest.raises(RuntimeError, match="inplace operation"):
        model(*sample).sum().backward()
    chain = find_chain(model, lambda: model(*sample), blocks=["1", "2"])
    tree = (Stage(0), Stage(1, "offload"), Stage(2, "offload"), Stage(3))
    apply_plan(model, chain, make_plan(chain, tree))
    with pytest.raises(RuntimeError, match="changed it in place"):
        model(*sample).sum().backward()
