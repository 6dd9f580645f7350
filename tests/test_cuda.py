"""The CUDA path end to end (skipped without a GPU: run by ``benchmarks/gpu_check.sh``).

What a CPU cannot show: the meter against the caching allocator's own count, rebuilt linear
outputs bit-identical under cuBLAS, SDPA's flash and memory-efficient kernels with dropout
under recompute, and predicted peaks against ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import memfit
from memfit.integrations.hf import build_hf
from memfit.models import build
from memfit.runtime import rebuilding

pytestmark = pytest.mark.cuda


def _on_cuda(model: nn.Module, sample: object) -> tuple[nn.Module, object]:
    model = model.to("cuda")
    if isinstance(sample, dict):
        return model, {k: v.to("cuda") for k, v in sample.items()}
    return model, tuple(t.to("cuda") for t in sample)  # type: ignore[union-attr]


@pytest.mark.parametrize("budget", ["30%", "60%"])
def test_optimal_plans_on_cuda_are_bit_identical_and_predicted(budget: str) -> None:
    model, sample = _on_cuda(*build("gpt", layers=6, width=256, heads=4, seq=256, batch=8))
    plan = memfit.auto(model, sample, budget=budget, repeats=2)
    check = memfit.verify(model, sample, repeats=2)
    assert check.gradients_equal and check.loss_equal
    assert check.measured_peak_bytes <= (plan.budget_bytes or 0)
    assert abs(check.prediction_error) <= 0.02, (
        check.predicted_peak_bytes,
        check.measured_peak_bytes,
    )
    # reserved memory: at least the allocated peak, and the plan left room for the slack
    assert check.reserved_peak_bytes >= check.measured_peak_bytes
    print("reserved", check.reserved_peak_bytes, "allocated", check.measured_peak_bytes)
    # the meter's peak against the allocator's own high-water mark of one planned step
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(*sample).backward()
    torch.cuda.synchronize()
    allocator_peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    assert abs(check.planned.activation_bytes / allocator_peak - 1) <= 0.02


def test_rebuilt_linear_outputs_are_bit_identical_under_cublas() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.LayerNorm(512), nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
    layer = layer.cuda()
    x = torch.randn(64, 128, 512, device="cuda", requires_grad=True)
    leaves = [x, *layer.parameters()]
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            plain = torch.autograd.grad(layer(x).float().square().sum(), leaves)
            with rebuilding(linear=True):
                out = layer(x)
        rebuilt = torch.autograd.grad(out.float().square().sum(), leaves)
        assert all(torch.equal(a, b) for a, b in zip(plain, rebuilt, strict=True)), dtype


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_sdpa_kernels_with_dropout_recompute_bit_identically(kernel: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    model, sample = build_hf("llama", layers=4, hidden=256, heads=4, seq=512, batch=4)
    model.config.attention_dropout = 0.1  # the test is about dropout inside the kernel
    model, sample = _on_cuda(model.to(torch.bfloat16), sample)
    reference = copy.deepcopy(model)
    with sdpa_kernel(backend[kernel]):
        memfit.auto(model, sample, budget="40%", repeats=1)
        for module, seed in ((model, 3), (reference, 3)):
            torch.manual_seed(seed)
            module(**sample).loss.backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def _planned_by_hand(prof: memfit.Profile, tree: tuple) -> memfit.Plan:
    """A hand-written tree with the simulator's predictions, as ``verify`` compares them."""
    from memfit.planning.simulate import simulate

    run = simulate(prof.costs, tree)
    names = [stage.name for stage in prof.costs.stages]
    plan = memfit.Plan.from_tree(names, tree, "hand")
    return dataclasses.replace(
        plan, predicted_peak_bytes=run.peak_bytes, predicted_step_s=run.step_s
    )


@pytest.mark.parametrize("how", ["inputs", "stages"])
def test_offload_is_bit_identical_predicted_and_leaves_nothing(how: str) -> None:
    from memfit.planning.plan import Segment, Stage

    model, sample = _on_cuda(*build("gpt", layers=6, width=512, heads=8, seq=512, batch=8))
    prof = memfit.profile(model, sample, repeats=1)
    assert prof.costs.host_bytes_per_s > 1e9  # pinned copies: GB/s
    blocks = [i for i, s in enumerate(prof.costs.stages) if s.checkpointable]
    assert all(prof.costs.stages[i].offload_bytes > 0 for i in blocks)
    last = len(prof.costs.stages) - 1
    if how == "inputs":
        middle = tuple(Segment(i, i + 1, (Stage(i),), offload=True) for i in blocks)
    else:
        middle = tuple(Stage(i, "offload") for i in blocks)
    plan = _planned_by_hand(prof, (Stage(0), *middle, Stage(last)))
    memfit.apply(model, plan)
    check = memfit.verify(model, sample, repeats=2)
    assert check.gradients_equal and check.loss_equal
    assert abs(check.prediction_error) <= 0.02, (
        check.predicted_peak_bytes,
        check.measured_peak_bytes,
    )
    # nothing outlives a step, and the pool stops growing after the first
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        model(*sample).backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    assert torch.cuda.memory_allocated() <= base


def test_optimal_plans_offload_near_the_floor() -> None:
    model, sample = _on_cuda(*build("gpt", layers=8, width=512, heads=8, seq=512, batch=8))
    prof = memfit.profile(model, sample, repeats=1)
    # near the floor, not at a fixed percentage: with one block's recompute and <post> at
    # the peak, the floor of 8 blocks lies near 20% of the activations (a CPU proxy of this
    # model: 24%), so "15%" was infeasible whatever offload did
    with pytest.raises(memfit.InfeasibleBudgetError) as floor:
        memfit.plan(prof, budget="1%")
    plan = memfit.plan(prof, budget=int(floor.value.min_feasible_bytes * 1.05))
    assert any("offload" in option for option in plan.options.values()), plan.options
    memfit.apply(model, plan)
    assert plan.info["host_peak_bytes"] > 0
    check = memfit.verify(model, sample, repeats=2)
    assert check.gradients_equal and check.loss_equal
    assert check.measured_peak_bytes <= (plan.budget_bytes or 0)
    assert abs(check.prediction_error) <= 0.02


def test_offload_copies_never_race_the_frees() -> None:
    """torchtune's NaN gradients: a device buffer reused while its copy still read it. Many
    steps with big activations, the compute stream busy, gradients equal every time."""
    from memfit.planning.plan import Stage

    model, sample = _on_cuda(*build("gpt", layers=4, width=1024, heads=16, seq=1024, batch=4))
    reference = copy.deepcopy(model)
    prof = memfit.profile(model, sample, repeats=1, options=["offload"])  # no other option
    blocks = [i for i, s in enumerate(prof.costs.stages) if s.checkpointable]
    last = len(prof.costs.stages) - 1
    tree = (Stage(0), *(Stage(i, "offload") for i in blocks), Stage(last))
    memfit.apply(model, _planned_by_hand(prof, tree))
    for seed in range(5):
        for module in (model, reference):
            module.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            module(*sample).backward()
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)
