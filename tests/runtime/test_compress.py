"""The ``compress:*`` options: what they store, what passes through, bytes predicted against
measured, and the exact path left as it was."""

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit.models import build
from memfit.planning.candidates import without
from memfit.planning.solve import min_peak_bytes
from memfit.runtime import BF16, FP8, compress_log
from memfit.runtime.compress import MIN_NUMEL, Compressed, _narrow, compressing, fp8_halved

GPT = dict(layers=3, width=64, heads=4, vocab=128, seq=32, batch=4)


def test_bf16_stores_the_cast_and_gives_it_back_in_the_original_dtype() -> None:
    t = torch.randn(64, 128)
    stored = _narrow(t, torch.bfloat16)
    assert stored is not None and stored.nbytes() == t.numel() * 2
    back = stored.value()
    assert back.dtype == torch.float32
    assert torch.equal(back.view(64, 128), t.to(torch.bfloat16).to(torch.float32))


def test_fp8_scales_each_row_so_a_small_row_keeps_its_precision() -> None:
    t = torch.randn(64, 128)
    t[0] *= 1e4  # one row far larger than the rest
    stored = _narrow(t, torch.float8_e4m3fn)
    assert stored is not None
    assert stored.nbytes() == t.numel() + 64 * 4  # one byte a value, one float32 scale a row
    back = stored.value().view(64, 128)
    scale = t.abs().amax(dim=1, keepdim=True) / 448
    # e4m3: 3 mantissa bits (half a step: 2^-4 relative); below 2^-6 of a row's scale, fixed
    # steps of 2^-9 (half: 2^-10)
    bound = torch.maximum(t.abs() * 2**-4, scale * 2**-10)
    assert bool(((back - t).abs() <= bound * (1 + 1e-6)).all())
    assert not torch.equal(back, t)


def test_fp8_halved_gives_every_finite_e4m3_code_exactly() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    plain = codes.to(torch.float32)
    finite = torch.isfinite(plain)
    assert int(finite.sum()) == 254  # all but the two NaN codes, subnormals and -0 included
    halved = fp8_halved(codes)
    assert halved.dtype == torch.float32
    assert torch.equal((halved * 256)[finite].view(torch.int32), plain[finite].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_unpacks_as_the_plain_cast_times_the_scale_bit_for_bit(dtype: torch.dtype) -> None:
    t = (torch.randn(32, 256) * torch.logspace(-6, 6, 32).unsqueeze(1)).to(dtype)
    t[1, :200] = 0.0  # a row of mostly zeros, and e4m3 subnormals in every row
    t[2] = 0.0  # an all-zero row: scale 1
    stored = _narrow(t, torch.float8_e4m3fn)
    assert stored is not None and stored.scale is not None
    expected = (stored.data.to(torch.float32) * stored.scale).to(dtype).reshape(-1)
    assert torch.equal(stored.value(), expected)
    assert torch.equal(stored.value().view(32, 256)[2], t[2])


def test_fp8_keeps_a_storage_with_an_infinity_as_it_is() -> None:
    t = torch.randn(64, 128)
    t[3, 5] = float("inf")
    assert _narrow(t, torch.float8_e4m3fn) is None
    assert _narrow(t, torch.bfloat16) is not None  # bf16 holds inf


def test_integers_bool_masks_narrow_floats_leaves_and_small_tensors_pass_through() -> None:
    with compressing(torch.bfloat16) as state:
        for tensor in (
            torch.randint(0, 9, (MIN_NUMEL * 2,)),
            torch.rand(MIN_NUMEL * 2) > 0.5,
            torch.randn(MIN_NUMEL * 2, dtype=torch.bfloat16, requires_grad=True) * 2,
            torch.randn(MIN_NUMEL * 2, requires_grad=True),  # a leaf: alive anyway
        ):
            assert state.pack(tensor) is tensor
    small = torch.randn(MIN_NUMEL // 2, requires_grad=True) * 2
    big = torch.randn(MIN_NUMEL * 2, requires_grad=True) * 2
    with compressing(torch.bfloat16) as state:
        packed = [state.pack(small), state.pack(big)]
    state.finish(None)
    assert packed[0].stored is None and packed[0].unpack() is small  # too small to pay
    assert packed[1].stored is not None  # an intermediate of the graph: stored in bf16


def _block(
    x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Saves an integer index, a bool mask and bf16 activations, and no float32 intermediate."""
    picked = F.embedding(index, w)  # saves index (int64)
    hidden = (picked * x.to(torch.bfloat16)).tanh()  # saves bf16 tensors
    return hidden.float().masked_fill(mask, 0.0)  # saves the bool mask


def test_a_block_saving_only_what_passes_through_keeps_its_gradients_bit_for_bit() -> None:
    x = torch.randn(8, 1024, requires_grad=True)
    w = torch.randn(16, 1024, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, 16, (8,))
    mask = torch.rand(8, 1024) > 0.5
    plain = torch.autograd.grad(_block(x, index, mask, w).sum(), (x, w))
    with compress_log() as log:
        out = Compressed(_block, BF16)(x, index, mask, w)
    assert log == [(0, 0)]  # nothing compressed
    assert all(map(torch.equal, plain, torch.autograd.grad(out.sum(), (x, w))))


def test_a_block_input_and_output_pass_through_and_dropout_masks_stay_exact() -> None:
    model, _sample = build("gpt", **GPT)
    block = model.blocks[0]
    x = torch.randn(GPT["batch"], GPT["seq"], GPT["width"], requires_grad=True)
    torch.manual_seed(1)
    y = block(x)
    with compress_log() as log:
        torch.manual_seed(1)
        y_compressed = Compressed(block.forward, FP8)(x)
    assert torch.equal(y, y_compressed)  # the forward itself is unchanged
    ((original, stored),) = log
    assert 0 < stored < original / 3  # fp8 and bool masks
    grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    grads_compressed = torch.autograd.grad(y_compressed.square().sum(), [x, *block.parameters()])
    relative = [
        float((a - b).norm() / a.norm()) for a, b in zip(grads, grads_compressed, strict=True)
    ]
    assert 0 < max(relative) < 0.2


def test_a_saved_tensor_changed_in_place_stays_as_it_is_and_backward_raises() -> None:
    x = torch.randn(64, 128, requires_grad=True)
    w = torch.randn(128, requires_grad=True)

    def changes(x: torch.Tensor) -> torch.Tensor:
        t = x.exp()
        out = t * w  # saves t
        t.add_(1)
        return out

    out = Compressed(changes, BF16)(x)
    with pytest.raises(RuntimeError, match="inplace operation"):
        out.sum().backward()


def test_lossy_options_are_refused_without_exact_false_before_anything_runs() -> None:
    model, sample = build("gpt", **GPT)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    for call in (
        lambda: memfit.profile(model, sample, options=[BF16]),
        lambda: memfit.plan(model, sample, budget="50%", options=[FP8]),
        lambda: memfit.auto(model, sample, budget="50%", options=["rebuild", FP8]),
    ):
        with pytest.raises(ValueError, match="exact=False"):
            call()
    with pytest.raises(ValueError, match="exact=False"):
        memfit.plan(model, sample, budget="50%", max_error=0.01)
    assert not calls


def test_a_lossy_plan_fits_its_budget_as_predicted_and_reports_its_error() -> None:
    model, sample = build("gpt", **GPT)
    prof = memfit.profile(model, sample, options=["rebuild", BF16, FP8], exact=False)
    for stage in prof.costs.stages[1:-1]:
        bf16, fp8 = stage.options[BF16], stage.options[FP8]
        assert fp8.saved_bytes < bf16.saved_bytes < stage.options["keep"].saved_bytes
        assert 0 < bf16.detail["error"] < fp8.detail["error"] < 0.2
    floor_exact = min_peak_bytes(without(prof.costs, {BF16, FP8}))
    lossy_floor = min_peak_bytes(prof.costs)
    assert lossy_floor <= floor_exact
    # a budget only compression reaches without recompute everywhere
    plan = memfit.plan(prof, budget=(lossy_floor + floor_exact) // 2 + 1, max_error=0.2)
    assert not plan.exact and plan.max_error == 0.2
    assert any(option in (BF16, FP8) for option in plan.options.values())
    assert all("lossy" in why for why in plan.inexact.values())
    memfit.apply(model, plan)
    try:
        report = memfit.verify(model, sample, repeats=1)
    finally:
        memfit.remove(model)
    assert report.measured_peak_bytes <= plan.budget_bytes
    assert abs(report.prediction_error) < 0.02
    assert report.lossy and report.ok and not report.gradients_equal
    assert (
        0
        < report.relative_error
        <= max(
            stage.options[o].detail["error"]
            for stage in prof.costs.stages
            for o in (BF16, FP8)
            if o in stage.options
        )
        * 1.5
    )
    assert 0.95 < report.cosine < 1.0
    assert set(report.group_errors) >= {"blocks.0", "blocks.1", "blocks.2"}


def test_the_exact_path_measures_and_plans_no_lossy_option() -> None:
    model, sample = build("gpt", **GPT)
    prof = memfit.profile(model, sample, options=["rebuild"])
    assert not any(o.startswith("compress:") for s in prof.costs.stages for o in s.options)
    plan = memfit.plan(prof, budget="60%")
    assert plan.exact and plan.max_error is None


def test_auto_with_its_defaults_measures_and_plans_no_lossy_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import memfit.verbs.api

    profiles = []
    real = memfit.verbs.api.profile_with

    def spy(*args: object, **kwargs: object) -> object:
        profiles.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return profiles[-1]

    monkeypatch.setattr(memfit.verbs.api, "profile_with", spy)
    model, sample = build("gpt", **GPT)
    plan = memfit.auto(model, sample, budget="50%")
    memfit.remove(model)
    assert plan.exact and not plan.inexact
    (prof,) = profiles
    assert not [o for s in prof.costs.stages for o in s.options if o.startswith("compress:")]
    # with exact=False the same call measures them
    profiles.clear()
    memfit.auto(model, sample, budget="60%", exact=False, options=[BF16])
    memfit.remove(model)
    assert all(BF16 in s.options for s in profiles[0].costs.stages[1:-1])


def test_the_plan_table_says_what_a_compressed_stage_stores() -> None:
    from memfit.report.tables import describe_ops

    line = describe_ops(
        FP8, {"exact": False, "stores": "float8_e4m3fn", "error": 0.03, "compressed": [4096, 1024]}
    )
    assert "float8_e4m3fn: 4.00 KiB -> 1.00 KiB" in line and "3.0e-02" in line
