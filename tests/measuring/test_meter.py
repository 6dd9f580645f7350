"""The meter against hand-computed bytes (CPU, float32): it must agree to the byte."""

import pytest
import torch
from torch import nn

from memfit.measuring.meter import MemoryMeter, metered_range

L, WIDTH, BATCH = 3, 256, 64
A = BATCH * WIDTH * 4  # one activation
W = WIDTH * WIDTH * 4  # one weight
B = WIDTH * 4  # one bias


def linear_gelu_chain() -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(L)])


def test_plain_allocations_and_frees() -> None:
    with MemoryMeter() as meter:
        x = torch.empty(1000, dtype=torch.uint8)
        meter.mark("second")
        y = torch.empty(4000, dtype=torch.uint8)
        del y
        view = x[10:]  # a view allocates nothing
    reading = meter.reading
    assert (reading.peak_bytes, reading.end_bytes) == (5000, 1000)
    assert [s.label for s in reading.spans] == ["<start>", "second"]
    assert reading.span("second") == reading.spans[1]
    assert (reading.spans[1].start_bytes, reading.spans[1].peak_bytes) == (1000, 5000)
    assert view.numel() == 990


def test_ranges_across_marks_and_ended_by_an_exception() -> None:
    """A range (a block's rerun in backward) has its own start, peak and end, across marks; an
    exception leaving it ends it there (torch's early stop leaves a recompute by raising)."""
    with MemoryMeter() as meter:
        x = torch.empty(1000, dtype=torch.uint8)
        with metered_range("first"):
            y = torch.empty(3000, dtype=torch.uint8)
            meter.mark("inside")
            del y
            z = torch.empty(500, dtype=torch.uint8)
        try:
            with metered_range("second"):
                w = torch.empty(2000, dtype=torch.uint8)
                raise KeyError("stop")
        except KeyError:
            del w
        u = torch.empty(9000, dtype=torch.uint8)
        del u
    first, second = meter.reading.ranges
    assert (first.label, first.start_bytes, first.peak_bytes, first.end_bytes) == (
        "first",
        1000,
        4000,
        1500,
    )
    assert (second.label, second.start_bytes, second.peak_bytes) == ("second", 1500, 3500)
    assert [s.label for s in meter.reading.spans] == ["<start>", "inside"]
    assert x.numel() + z.numel() == 1500


def test_ranges_cost_nothing_without_a_meter() -> None:
    with metered_range("outside"), MemoryMeter() as meter:
        torch.empty(100, dtype=torch.uint8)
    assert meter.reading.ranges == ()


def test_frees_of_memory_from_before_the_region_do_not_count() -> None:
    before = torch.empty(10_000, dtype=torch.uint8)
    with MemoryMeter() as meter:
        del before
        kept = torch.empty(100, dtype=torch.uint8)
    assert (meter.reading.peak_bytes, meter.reading.end_bytes) == (100, 100)
    assert kept.numel() == 100


def test_forward_peak_and_saved_bytes_of_linear_gelu_chain() -> None:
    model, x = linear_gelu_chain(), torch.randn(BATCH, WIDTH)
    with MemoryMeter() as meter:
        out = model(x)
    # Each Linear allocates its output (saved by the GELU after it); each GELU its output (saved
    # by the next Linear; the last one is `out`). Nothing else is allocated or freed.
    assert meter.reading.peak_bytes == 2 * L * A
    assert meter.reading.end_bytes == 2 * L * A
    assert out.shape == (BATCH, WIDTH)


def test_step_peak_of_linear_gelu_chain() -> None:
    model, x = linear_gelu_chain(), torch.randn(BATCH, WIDTH)
    with MemoryMeter() as meter:
        out = model(x)
        loss = out.sum()
        meter.mark("backward")
        loss.backward()
    reading = meter.reading
    grads = L * (W + B)
    # Forward: 2LA of activations + the 4-byte loss.
    assert reading.spans[0].end_bytes == 2 * L * A + 4
    # Backward frees every saved activation; what stays: gradients, `out`, `loss`.
    assert reading.end_bytes == grads + A + 4
    # Peak: the first layer's bias gradient is allocated while its weight gradient, the other
    # layers' gradients, the gradient of its output (A), `out`, `loss` and the loss's seed
    # gradient (4 bytes) are live. The input needs no gradient, so no A for it.
    assert reading.peak_bytes == grads + A + 4 + A + 4
    assert reading.peak_op == "AddmmBackward0 > aten::sum"


def test_repeatable() -> None:
    model, x = linear_gelu_chain(), torch.randn(BATCH, WIDTH)
    peaks = set()
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with MemoryMeter() as meter:
            model(x).sum().backward()
        peaks.add(meter.reading.peak_bytes)
    assert len(peaks) == 1


def test_reading_before_exit_is_an_error() -> None:
    meter = MemoryMeter()
    with pytest.raises(RuntimeError, match="after the `with` block"):
        _ = meter.reading


def test_bad_device() -> None:
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        MemoryMeter("meta")


@pytest.mark.cuda
def test_cuda_meter_counts_allocations() -> None:
    with MemoryMeter("cuda") as meter:
        x = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        meter.mark("more")
        y = torch.empty(1 << 21, dtype=torch.uint8, device="cuda")
        del y
    reading = meter.reading
    assert reading.device == "cuda"
    assert reading.peak_bytes == 3 << 20
    assert reading.end_bytes == 1 << 20
    assert reading.span("more").peak_bytes == 3 << 20
    assert x.numel() == 1 << 20


@pytest.mark.cuda
def test_cuda_meter_keeps_the_users_peak_statistics() -> None:
    torch.cuda.reset_peak_memory_stats()
    big = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    del big
    peak = torch.cuda.max_memory_allocated()
    with MemoryMeter("cuda") as meter:
        x = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        meter.mark("more")
    assert meter.reading.peak_bytes == 1 << 20 and x.numel() == 1 << 20
    assert torch.cuda.max_memory_allocated() == peak


def _event(name: str, start_ns: int, kind: object, fields: object = None) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(
        name=name,
        start_time_ns=start_ns,
        tag=kind,
        extra_fields=fields,
        typed=(kind, fields),
        children=[],
    )


def test_replay_counts_only_the_metered_device() -> None:
    """The CUDA path runs through the same replay: allocations of other devices (another GPU,
    the host) do not count. A synthetic event tree stands in for a CUDA profiler run."""
    from types import SimpleNamespace

    from torch._C._profiler import _EventType

    from memfit.measuring.meter import MARK_PREFIX, _replay

    def allocation(start_ns: int, size: int, ptr: int, device: str) -> object:
        fields = SimpleNamespace(device=torch.device(device), alloc_size=size, ptr=ptr)
        return _event("[memory]", start_ns, _EventType.Allocation, fields)

    roots = [
        allocation(1, 1000, 1, "cuda:0"),
        allocation(2, 5000, 2, "cuda:1"),  # another GPU
        allocation(3, 7000, 3, "cpu"),  # the host
        _event(f"{MARK_PREFIX}0", 4, _EventType.TorchOp),
        allocation(5, 300, 4, "cuda:0"),
        allocation(6, -1000, 1, "cuda:0"),
        allocation(7, -64, 99, "cuda:0"),  # freed, allocated before the region: ignored
    ]
    reading = _replay(roots, ["second"], torch.device("cuda", 0))
    assert reading.device == "cuda"
    assert (reading.peak_bytes, reading.end_bytes) == (1300, 300)
    second = reading.span("second")
    assert (second.start_bytes, second.peak_bytes, second.end_bytes) == (1000, 1300, 300)
    on_host = _replay(roots, ["second"], torch.device("cpu"))
    assert (on_host.peak_bytes, on_host.end_bytes) == (7000, 7000)


def test_meter_keeps_fd_2() -> None:
    """No file-descriptor juggling around the profiler: fd 2 stays the process's."""
    import os

    before = os.fstat(2)
    with MemoryMeter() as meter:
        assert os.fstat(2) == before
        torch.empty(16)
    assert meter.reading.peak_bytes == 64


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_meter_without_ops_reads_the_same_bytes(device: str) -> None:
    """``ops=False`` (the profile's meter: no op recorded, only allocations and memfit's own
    ranges) gives the reading of ``ops=True`` to the byte: spans, ranges, freed storages."""
    readings = []
    for ops in (True, False):
        torch.manual_seed(0)
        model = linear_gelu_chain().to(device)
        x = torch.randn(BATCH, WIDTH, device=device)
        with MemoryMeter(device, ops=ops) as meter:
            hidden = model[0](x)
            meter.watch("hidden", hidden)
            meter.mark("rest")
            with metered_range("tail"):
                out = model[1:](hidden)
            del hidden
            meter.mark("backward")
            out.sum().backward()
        readings.append(meter.reading)
    named, plain = readings
    assert named.peak_op and plain.peak_op == ""
    assert (plain.peak_bytes, plain.end_bytes) == (named.peak_bytes, named.end_bytes)
    assert plain.spans == named.spans and len(plain.spans) == 3
    assert plain.ranges == named.ranges and len(plain.ranges) == 1
    assert plain.freed == named.freed and "hidden" in plain.freed
