"""The ``rebuild`` option: what it drops (to the byte), what it rebuilds (to the bit), misuse."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import memfit
from memfit.measuring.step import storage_key
from memfit.measuring.trace import compare_traces, tracing
from memfit.models import build
from memfit.planning.solve import solve
from memfit.report.tables import describe_ops
from memfit.runtime import pure_module, rebuilding, recording
from memfit.runtime.rebuild import TWO_VALUED_LABEL, TWO_VALUED_MIN_NUMEL, two_valued

# big enough that dropout masks (batch * seq * width floats) pass the two-valued size floor
GPT = dict(layers=3, width=64, heads=4, vocab=128, seq=32, batch=4)


def saved_storage_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def test_a_gpt_block_frees_its_norm_and_gelu_outputs_and_most_of_its_masks() -> None:
    model, _sample = build("gpt", **GPT)
    block = model.blocks[0]
    x = torch.randn(GPT["batch"], GPT["seq"], GPT["width"], requires_grad=True)
    tokens = GPT["batch"] * GPT["seq"]
    floats = 4  # bytes
    norm_outputs = 2 * tokens * GPT["width"] * floats  # ln1, ln2
    gelu_output = tokens * 4 * GPT["width"] * floats
    masks = 2 * tokens * GPT["width"] * floats  # two dropouts, float masks on CPU
    with recording() as log, rebuilding():
        kept_under_rebuild = block(x)
    bool_masks_and_values = masks // 4 + 2 * floats
    assert log == [
        {
            "LayerNorm": norm_outputs,
            "gelu": gelu_output,
            TWO_VALUED_LABEL: masks - bool_masks_and_values,
        }
    ]
    assert kept_under_rebuild.requires_grad
    with recording() as log, rebuilding(linear=True):
        block(x)
    # and the qkv (3 wide) and fc (4 wide) outputs, rebuilt with one matmul each; the
    # projections' outputs are not saved at all (dropout keeps only its mask)
    linear_outputs = (3 + 4) * tokens * GPT["width"] * floats
    assert log[0]["Linear"] == linear_outputs
    assert log[0]["LayerNorm"] == norm_outputs and log[0]["gelu"] == gelu_output


def test_profile_measures_the_drop_the_plan_explains_it() -> None:
    model, sample = build("gpt", **GPT)
    prof = memfit.profile(model, sample, options=["rebuild", "selective:matmul"], repeats=1)
    block = prof.costs.stages[1]
    keep, rebuild = block.options["keep"], block.options["rebuild"]
    dropped = sum(rebuild.detail["rebuilds"].values())
    # the meter, which knows nothing of rebuild, sees exactly what rebuild says it freed
    assert keep.saved_bytes - rebuild.saved_bytes == dropped
    selective = block.options["selective:matmul"].detail
    assert "addmm" in selective["saves"] and "gelu" in selective["recomputes"]
    # a menu where rebuild is the only way to save memory, so the plan must use it
    only_rebuild = replace(
        prof.costs,
        stages=[
            replace(
                stage,
                checkpointable=False,
                options={k: v for k, v in stage.options.items() if k in ("keep", "rebuild")},
            )
            for stage in prof.costs.stages
        ],
    )
    chosen = solve(only_rebuild, prof.measurement.peak_bytes - 1)
    shown = {name: chosen.info["ops"][name] for name, o in chosen.options.items() if o == "rebuild"}
    assert shown, chosen.options
    assert all(detail == rebuild.detail for detail in shown.values())
    assert memfit.Plan.from_json(chosen.to_json()).info["ops"] == chosen.info["ops"]
    line = describe_ops("rebuild", next(iter(shown.values())))
    assert (
        line
        == "rebuilds in backward: LayerNorm 64.00 KiB, gelu 128.00 KiB, masks as bool 47.99 KiB"
    )


@pytest.mark.parametrize("linear", [False, True], ids=["rebuild", "rebuild+linear"])
def test_rebuilt_tensors_are_bit_identical_and_the_graph_is_the_same(linear: bool) -> None:
    torch.manual_seed(3)
    layer = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(8, 64, requires_grad=True)
    reference = torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()])
    with recording() as log, rebuilding(linear):
        out = layer(x)
    # chained under rebuild+linear: the LayerNorm output feeds the Linear rebuilt from it, whose
    # output feeds the GELU rebuilt from it
    assert set(log[0]) == ({"LayerNorm", "Linear", "gelu"} if linear else {"LayerNorm", "gelu"})
    rebuilt = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    for a, b in zip(reference, rebuilt, strict=True):
        assert torch.equal(a, b)


def test_the_block_output_is_never_dropped() -> None:
    norm = nn.LayerNorm(16)
    x = torch.randn(4, 16, requires_grad=True)
    with recording() as log, rebuilding() as state:
        out = norm(x)
        saved_by_the_caller_too = out * out  # saves `out` inside the block
        state.outputs = out
    assert log == [{}]
    saved_by_the_caller_too.sum().backward()


def test_double_backward_through_rebuilt_tensors() -> None:
    torch.manual_seed(4)
    layer = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 1))
    x = torch.randn(4, 16, requires_grad=True)

    def gradient_penalty(forward) -> torch.Tensor:
        (grad,) = torch.autograd.grad(forward().sum(), x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), layer[0].weight)[0]

    reference = gradient_penalty(lambda: layer(x))

    def rebuilt_forward() -> torch.Tensor:
        with rebuilding():
            return layer(x)

    assert torch.equal(gradient_penalty(rebuilt_forward), reference)


def test_an_input_changed_in_place_after_the_forward_raises() -> None:
    norm, linear = nn.LayerNorm(32), nn.Linear(32, 8)
    hidden = torch.randn(4, 32, requires_grad=True) * 1.0  # a non-leaf we may change in place
    with rebuilding():
        out = linear(norm(hidden))
    with torch.no_grad():
        hidden.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        out.sum().backward()


def test_nothing_happens_without_grad() -> None:
    block = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    with recording() as log, torch.no_grad(), rebuilding():
        block(torch.randn(2, 8))
    assert log == [{}]


def test_pure_modules() -> None:
    assert pure_module(nn.LayerNorm(4)) and pure_module(nn.GELU()) and pure_module(nn.RMSNorm(4))
    assert not pure_module(nn.Dropout()) and not pure_module(nn.Linear(2, 2))


def test_a_module_whose_input_is_not_saved_is_not_rebuilt() -> None:
    # GELU's input is saved by GELU, but a LayerNorm fed by a dropout output (saved by nobody)
    # would need that output kept: rebuild leaves such outputs alone.
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.linear = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.norm(x * 2))  # x * 2 is saved by LayerNorm: rebuildable

    x = torch.randn(4, 16, requires_grad=True)
    with recording() as log, rebuilding():
        Odd()(x)
    assert log == [{"LayerNorm": 4 * 16 * 4}]
    assert saved_storage_bytes(lambda: nn.Linear(16, 16)(x)) > 0


def test_two_valued_masks_round_trip_bit_for_bit() -> None:
    mask = torch.empty(64, 128).bernoulli_(0.9).div_(0.9)
    packed = two_valued(mask)
    assert packed is not None and packed.nonzero.dtype == torch.bool
    assert torch.equal(packed.rebuild().view(torch.int32), mask.view(torch.int32))
    additive = torch.full((64, 128), float("-inf")).triu(1)  # a causal mask: 0 and -inf
    assert torch.equal(two_valued(additive).rebuild(), additive)
    late = torch.zeros(64, 128)
    late[-1, -1] = 3.0  # the only nonzero is the last element
    assert torch.equal(two_valued(late).rebuild(), late)


@pytest.mark.parametrize(
    "case",
    ["negative zero", "nan", "three values", "small", "requires grad", "view", "integer"],
)
def test_two_valued_refuses_what_it_cannot_restore_exactly(case: str) -> None:
    mask = torch.empty(64, 128).bernoulli_(0.5)
    tensor = {
        "negative zero": mask.clone().index_fill_(1, torch.tensor([7]), -0.0),
        "nan": mask.clone().index_fill_(1, torch.tensor([100]), float("nan")),
        "three values": mask.clone().index_fill_(1, torch.tensor([127]), 2.0),
        "small": mask[:1, : TWO_VALUED_MIN_NUMEL // 256],
        "requires grad": mask.clone().requires_grad_(),
        "view": mask[1:],
        "integer": mask.long(),
    }[case]
    assert two_valued(tensor) is None


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    st.floats(allow_nan=False, allow_infinity=True, width=16).filter(lambda v: v != 0),
    st.floats(min_value=0.0, max_value=1.0),
    st.integers(min_value=TWO_VALUED_MIN_NUMEL, max_value=3 * TWO_VALUED_MIN_NUMEL),
)
def test_two_valued_is_exact_for_any_value_and_density(dtype, value, density, numel) -> None:
    mask = torch.rand(numel) < density
    tensor = torch.where(mask, torch.tensor(value, dtype=dtype), torch.zeros((), dtype=dtype))
    packed = two_valued(tensor)
    assert packed is not None
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    assert torch.equal(packed.rebuild().view(bits), tensor.view(bits))


def test_functional_gelu_and_silu_are_rebuilt_without_modules() -> None:
    x = torch.randn(8, 32, requires_grad=True)
    weight = torch.randn(32, 32, requires_grad=True)
    with recording() as log, rebuilding():
        out = F.gelu(x @ weight, approximate="tanh") @ weight + F.silu(x @ weight) @ weight
    assert log == [{"gelu": 8 * 32 * 4, "silu": 8 * 32 * 4}]
    out.sum().backward()


def grads_with_and_without_rebuild(forward, leaves, linear: bool = False, ops: bool = False):
    """Gradients of ``forward().sum()`` w.r.t. ``leaves`` plain, then under rebuild; the log."""
    plain = torch.autograd.grad(forward().sum(), leaves)
    with recording() as log:
        with rebuilding(linear, ops=ops):
            out = forward()
        rebuilt = torch.autograd.grad(out.sum(), leaves)
    return plain, rebuilt, log[0]


def test_a_saved_tensor_changed_in_place_inside_the_block_raises_as_autograd_does() -> None:
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def forward() -> torch.Tensor:
        x = h * 1.0
        out = x @ w  # saves x
        with torch.no_grad():
            x.mul_(3)
        return out

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        forward().sum().backward()
    with rebuilding():
        out = forward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_outputs_changed_in_place_are_not_rebuilt() -> None:
    norm, h = nn.LayerNorm(8), torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def forward() -> torch.Tensor:
        y = norm(h)
        y.mul_(2)  # legal in grad mode: y is not saved by anything yet
        return y @ w

    plain, rebuilt, log = grads_with_and_without_rebuild(forward, [h, w, norm.weight])
    assert "LayerNorm" not in log
    assert all(torch.equal(a, b) for a, b in zip(plain, rebuilt, strict=True))


def test_views_of_another_dtype_are_not_rebuilt() -> None:
    norm, h = nn.LayerNorm(32), torch.randn(64, 32, requires_grad=True)
    wc = torch.randn(64, 16, dtype=torch.complex64)

    def forward() -> torch.Tensor:
        c = torch.view_as_complex(norm(h).reshape(64, 16, 2))
        return (c * wc).abs()

    plain, rebuilt, log = grads_with_and_without_rebuild(forward, [h, norm.weight])
    assert "LayerNorm" not in log
    assert all(torch.equal(a, b) for a, b in zip(plain, rebuilt, strict=True))


def test_modules_with_hooks_or_of_a_subclass_are_not_rerun() -> None:
    class Shifted(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + torch.rand_like(x)  # not pure

    hooked = nn.LayerNorm(16)
    hooked.register_forward_hook(lambda _m, _i, out: out * 2)
    h, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)
    for norm in (Shifted(16), hooked):
        with recording() as log, rebuilding():
            (norm(h) @ w).sum()
        assert "LayerNorm" not in log[0] and "Shifted" not in log[0]


def test_a_later_block_leaves_an_earlier_blocks_nodes_alone() -> None:
    torch.manual_seed(5)
    first, second = nn.LayerNorm(16), nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    with recording() as log:
        with rebuilding() as state:
            y = F.gelu(first(x))
            state.outputs = y
        with rebuilding() as state:
            out = second(y)  # saves y, whose node (a GELU) belongs to the first block
            state.outputs = out
    assert log == [{"LayerNorm": 4 * 16 * 4}, {}]


def test_arguments_and_unusual_tensors_are_saved_as_they_are() -> None:
    mask = torch.empty(64, 128).bernoulli_(0.5)  # two-valued, but made outside the block
    x, w = torch.randn(64, 128), torch.randn(128, 128, requires_grad=True)
    sparse = torch.eye(64).to_sparse()
    with recording() as log, rebuilding(inputs=(mask,)):
        out = torch.sparse.mm(sparse, (x @ w) * mask)  # saves the sparse matrix and the mask
    assert log == [{}]
    out.sum().backward()


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU as Hugging Face writes it: Python arithmetic, no GELU module or node."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_chains_of_cheap_ops_are_rebuilt_from_what_stays_saved(autocast: bool) -> None:
    torch.manual_seed(6)
    up, down = nn.Linear(16, 64), nn.Linear(64, 16)
    x = torch.randn(32, 16, requires_grad=True)
    leaves = [x, *up.parameters(), *down.parameters()]

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return F.dropout(down(tanh_gelu(up(x))), 0.1)

    torch.manual_seed(7)
    plain = torch.autograd.grad(forward().float().square().sum(), leaves)
    torch.manual_seed(7)
    with recording() as log, rebuilding(ops=True):
        out = forward()
    rebuilt = torch.autograd.grad(out.float().square().sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(plain, rebuilt, strict=True))
    # tanh's output, 0.5 * x, 1 + tanh and their product (down's input): rebuilt from up's
    # output, which pow and the first multiplication keep saved
    size = 32 * 64 * (2 if autocast else 4)
    chains = {label: freed for label, freed in log[0].items() if label.endswith(" chain")}
    expected = {"tanh chain": size, "mul chain": 2 * size, "add chain": size}
    if autocast:  # and the weights' bf16 copies the matmuls save, from the parameters
        expected["_to_copy chain"] = (64 * 16 + 16 * 64) * 2
    assert chains == expected


def test_an_argument_changed_in_place_before_its_use_is_not_rerun() -> None:
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)

    def forward() -> torch.Tensor:
        kept = x @ w  # saves x
        a = x * 2.0
        a.add_(1.0)  # the op that made a no longer made what tanh reads
        b = x * 3.0
        c = torch.tanh(b)  # saves its output; b, read before the write below, can be rerun
        b.add_(1.0)
        return torch.tanh(a) @ w + c @ w + kept

    plain, rebuilt, log = grads_with_and_without_rebuild(forward, [x, w], ops=True)
    assert all(torch.equal(p, r) for p, r in zip(plain, rebuilt, strict=True))
    assert log.get("tanh chain") == 8 * 16 * 4  # c's, from x; never tanh(a)'s


def test_random_ops_are_never_rerun() -> None:
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)

    def forward() -> torch.Tensor:
        torch.manual_seed(8)
        dropped = F.dropout(x @ w, 0.5)  # only its mask is saved
        return torch.tanh(dropped * 3.0) @ w

    plain, rebuilt, log = grads_with_and_without_rebuild(forward, [x, w], ops=True)
    assert all(torch.equal(p, r) for p, r in zip(plain, rebuilt, strict=True))
    assert "tanh chain" not in log and "mul chain" not in log


class CountOps(TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_op_chains_rerun_each_op_once_not_the_whole_module_again() -> None:
    """GPT-2's GELU module (Hugging Face's ``NewGELUActivation``, Python arithmetic): its output
    is the product of two saved storages, so backward reruns the tanh chain once and the
    product from the rebuilt factors, never the module's forward a second time."""
    from transformers.activations import NewGELUActivation

    torch.manual_seed(9)
    up, down, gelu = nn.Linear(16, 64), nn.Linear(64, 16), NewGELUActivation()
    x = torch.randn(32, 16, requires_grad=True)
    leaves = [x, *up.parameters(), *down.parameters()]
    plain = torch.autograd.grad(down(gelu(up(x))).sum(), leaves)
    with recording() as log, rebuilding(ops=True):
        out = down(gelu(up(x)))
    assert "NewGELUActivation" not in log[0] and log[0]["mul chain"] == 2 * 32 * 64 * 4
    with CountOps() as counted:
        rebuilt = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(plain, rebuilt, strict=True))
    loss = down(gelu(up(x))).sum()
    with CountOps() as unplanned:
        torch.autograd.grad(loss, leaves)
    # ops beyond those of a plain backward: the tanh chain once (with a module rerun: twice),
    # its intermediates written in place (tanh_ on the scaled sum, mul_ on pow's output)
    extra = {k: n - unplanned.counts.get(k, 0) for k, n in counted.counts.items()}
    assert extra.get("tanh", 0) + extra.get("tanh_", 0) == 1 and extra["pow"] == 1
    assert extra.get("tanh_") == 1 and extra.get("mul_", 0) >= 2


@pytest.mark.parametrize(
    "write", ["dropout", "negative scale", "partial scale", "overflowing scale", "half view"]
)
def test_masks_are_checked_however_they_were_made(write: str) -> None:
    """Every mask is checked element by element before it is packed, whatever the ops that
    made it suggest: scaled by a negative scalar (zeros become -0), only in part, by a scalar
    that overflows float32 (0 * inf is NaN), or filled through a view of another dtype."""
    x = torch.randn(64, 128, requires_grad=True)

    def forward() -> torch.Tensor:
        torch.manual_seed(10)
        if write == "dropout":
            return torch.tanh(F.dropout(x, 0.1))
        mask = torch.empty_like(x)
        if write == "half view":
            mask.view(torch.float16).bernoulli_(0.5)  # four float32 values
        else:
            mask.bernoulli_(0.5)
        scale = {"negative scale": -2.0, "overflowing scale": 1e39}.get(write, 2.0)
        target = mask[:32] if write == "partial scale" else mask
        torch.ops.aten.mul_.Scalar(target, scale)  # as dropout's div_ calls it, from C++
        return torch.tanh(x * mask)  # mul saves the mask

    plain, rebuilt, log = grads_with_and_without_rebuild(forward, [x], ops=True)
    bits = [(p.view(torch.int32), r.view(torch.int32)) for p, r in zip(plain, rebuilt, strict=True)]
    assert all(torch.equal(p, r) for p, r in bits)
    packed = 64 * 128 * 4 - (64 * 128 + 4)
    assert log.get(TWO_VALUED_LABEL, 0) == (packed if write == "dropout" else 0)


def test_a_parameter_an_op_chain_read_changed_in_place_raises() -> None:
    """Hugging Face's ``DebertaLayerNorm`` adds its bias in Python arithmetic (``add`` saves
    nothing of it): the chain reads the parameter, and a change before backward raises, as a
    module rerun's does, instead of rebuilding with the new value."""
    from transformers.models.deberta.modeling_deberta import DebertaLayerNorm

    norm, linear = DebertaLayerNorm(64), nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    with recording() as log, rebuilding(ops=True) as state:
        out = state.outputs = linear(norm(x))
    assert log[0].get("add chain") == 32 * 64 * 4
    with torch.no_grad():
        norm.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        out.sum().backward()


def test_an_intermediate_is_rerun_even_where_a_saved_storage_took_its_address() -> None:
    """A chain's unsaved intermediate is freed during the forward; a saved storage may then get
    its identity (the storage key the rebuild's records use, ``storage_key``: the storage
    object's address) or its memory address. The rebuild tells them apart by what made each.

    Which of the two the allocator hands on depends on the process's heap (a long xdist worker
    reused neither memory address in 8 rounds where a fresh process always did): the case is
    met when either repeats."""
    x, y = torch.randn(64, 128, requires_grad=True), torch.randn(64, 128, requires_grad=True)

    def forward(reused: list[bool]) -> torch.Tensor:
        a = x * 2.0
        d = a + 1.0  # d's chain reruns a
        address, key = a.untyped_storage().data_ptr(), storage_key(a)
        del a
        held = []
        for _ in range(64):
            b = y * 3.0  # saved below
            if b.untyped_storage().data_ptr() == address or storage_key(b) == key:
                break
            held.append(b)
        reused.append(b.untyped_storage().data_ptr() == address or storage_key(b) == key)
        del held
        return (d + b) * y + b * y + torch.sin(x)

    plain = torch.autograd.grad(forward([]).sum(), [x, y])
    reused: list[bool] = []
    for _ in range(8):
        with rebuilding(ops=True) as state:
            out = state.outputs = forward(reused)
        rebuilt = torch.autograd.grad(out.sum(), [x, y])
        assert all(torch.equal(p, r) for p, r in zip(plain, rebuilt, strict=True))
    assert any(reused)  # the case this is about happened at least once


def test_chain_intermediates_are_written_in_place_only_where_the_result_fits_them() -> None:
    """A chain op reruns in place on the intermediate it reads only when its output has that
    intermediate's dtype and layout: not across a promotion to float32, not into a
    broadcast column."""
    x = torch.randn(32, 64, requires_grad=True)
    half = torch.randn(32, 64).half().requires_grad_()
    w = torch.randn(64, 64, requires_grad=True)
    index = torch.randint(0, 64, (32, 64), dtype=torch.int32)

    def forward() -> torch.Tensor:
        kept = x @ w  # saves x
        # tanh saves its fp16 output; the product is an fp16 intermediate, the sum fp32
        promoted = (torch.tanh(half) * 3.0) + x
        column = (x[:, :1] * 2.0) + x  # a (32, 1) intermediate broadcast to (32, 64)
        chained = torch.tanh((x * 0.5) * 2.0)  # fits: both products written in place
        picked = torch.gather(x, 1, index)  # saves the int32 index
        widened = (index * 2) + x  # an int32 intermediate, a float32 sum of the same width
        product = torch.sin(promoted) * torch.sin(column) * torch.sin(chained)
        return (product * torch.sin(widened) + picked) @ w + kept

    plain, rebuilt, log = grads_with_and_without_rebuild(forward, [x, half, w], ops=True)
    assert all(torch.equal(p, r) for p, r in zip(plain, rebuilt, strict=True))
    # promoted, column and widened (add), chained (tanh)
    assert log.get("add chain") == 3 * 32 * 64 * 4 and log.get("tanh chain") == 32 * 64 * 4


def test_an_intermediate_read_twice_is_rebuilt_once_as_in_the_forward() -> None:
    """A rotary table as RecurrentGemma's layers make it, ``cat((freqs, freqs))`` of positions
    times a 0-d scale tensor times inverse frequencies: the chain rebuilt for ``cos`` computes
    ``freqs`` once, as the forward did (the op trace is the plain step's: computed twice, it
    was not), and the other reader of ``freqs`` (a product written in place when it is the
    last reader) does not overwrite it before the concatenation reads it."""
    x = torch.randn(3, 7, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    positions = torch.arange(7.0).view(1, 7, 1)
    inv_freq, scale = torch.tensor([1.0, 0.01]), torch.tensor(2.0)

    def forward() -> torch.Tensor:
        freqs = (positions * scale) * inv_freq
        table = torch.cat((freqs * 3.0, freqs), -1)
        return (x * table.cos()) @ w

    with tracing() as plain_trace:
        plain = torch.autograd.grad(forward().sum(), [x, w])
    with tracing() as trace, recording() as log:
        with rebuilding(ops=True):
            out = forward()
        rebuilt = torch.autograd.grad(out.sum(), [x, w])
    assert log[0].get("cos chain") == 7 * 4 * 4  # the case this is about happened
    assert all(torch.equal(p, r) for p, r in zip(plain, rebuilt, strict=True))
    difference = compare_traces(plain_trace, trace)
    assert difference is None, str(difference)
