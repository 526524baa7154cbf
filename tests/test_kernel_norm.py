"""Tests for the fused residual add + RMSNorm (+ int8 or e4m3 quantize) kernel (quamba_fx.kernels.norm).

Run on CPU with the Triton interpreter:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest tests/test_kernel_norm.py -q

Without the interpreter, kernel tests run on CUDA when present and are skipped otherwise; reference
and validation tests always run. Tolerances (see the module docstring): the new residual stream is
bit-exact; normed values agree to rtol 1e-5 (fp32) or one ulp of a 16-bit output; int8 results may
differ by one step on rare .5 boundaries.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quamba_fx.kernels import norm
from quamba_fx.kernels.norm import add_rmsnorm_quantize, add_rmsnorm_quantize_reference

from .kernel_support import DEVICE, assert_fp8_close, needs_kernel, reference_calls

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Relative tolerance of a normed value stored as this dtype: a few fp32 ulps apart before the cast
# can round to neighbouring 16-bit values, one ulp of the output type apart.
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def assert_normed_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    rtol = RTOL[want.dtype]
    # Below the smallest normal value an ulp is fixed, so compare relative to that value there.
    tiny = torch.finfo(want.dtype).tiny
    got, want = got.cpu().double(), want.cpu().double()
    err = (got - want).abs() / want.abs().clamp_min(tiny)
    assert float(err.max()) <= rtol * 1.001, f"max relative error {float(err.max()):.3g} > {rtol:.3g}"


def assert_int8_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """At most one step apart, on at most 0.1% of the elements (+1): .5 boundaries only."""
    assert got.dtype == want.dtype == torch.int8
    assert got.shape == want.shape and got.is_contiguous()
    diff = (got.cpu().int() - want.cpu().int()).abs()
    n_diff = int((diff != 0).sum())
    msg = f"{n_diff} of {diff.numel()} int8 values differ, max |diff| {int(diff.max()) if diff.numel() else 0}"
    assert n_diff == 0 or int(diff.max()) <= 1, msg
    assert n_diff <= 1 + diff.numel() // 1000, msg


def assert_outputs(got, want) -> None:
    (q, r), (q_ref, r_ref) = got, want
    assert r.dtype == torch.float32 and r.is_contiguous()
    assert torch.equal(r.cpu(), r_ref.cpu()), "the residual stream must be bit-exact"
    if q_ref.dtype == torch.int8:
        assert_int8_close(q, q_ref)
    elif q_ref.dtype == FP8:
        assert_fp8_close(q, q_ref)
    else:
        assert_normed_close(q, q_ref)


def make(gen: torch.Generator, lead: tuple, H: int, dtype: torch.dtype, layout: str, device: str,
         scale: float = 1.0) -> torch.Tensor:
    """`[*lead, H]` in a memory layout: contiguous, rows of a wider buffer, or transposed lead dims."""
    if layout == "contiguous":
        v = torch.randn(*lead, H, generator=gen)
    elif layout == "row_stride":
        v = torch.randn(*lead, 2 * H, generator=gen)[..., :H]
    else:  # "transposed"
        v = torch.randn(*reversed(lead), H, generator=gen).transpose(0, -2) if len(lead) > 1 \
            else torch.randn(*lead, H, generator=gen)
    return (v * scale).to(dtype).to(device)


def build(case: dict, device: str):
    gen = torch.Generator().manual_seed(case["seed"])
    lead, H = case["lead"], case["H"]
    x = make(gen, lead, H, case["dtype"], case["layout"], device)
    residual = make(gen, lead, H, torch.float32, case["res_layout"], device, 4.0) if case["has_res"] else None
    weight = (1 + 0.5 * torch.randn(H, generator=gen)).to(case["w_dtype"]).to(device)
    return x, residual, weight


@st.composite
def cases(draw, max_h=300):
    rows = draw(st.integers(1, 20))
    return dict(
        lead=draw(st.sampled_from([(rows,), (2, (rows + 1) // 2), (1, rows)])),
        H=draw(st.one_of(st.integers(1, max_h), st.sampled_from([1, 4, 64, 100, 128, 256]))),
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        w_dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        layout=draw(st.sampled_from(["contiguous", "row_stride", "transposed"])),
        res_layout=draw(st.sampled_from(["contiguous", "row_stride"])),
        has_res=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-6, 0.1])),
        # None: the floating (norm_f) mode with this out_dtype; a number: scale = max|y| / 127 * it.
        out=draw(st.sampled_from([0.3, 0.8, 1.5, torch.float32, torch.float16, torch.bfloat16])),
        fp8=draw(st.booleans()),  # with a scale: e4m3 out (scale = max|y| / 448 * out)
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_both(case: dict, x, residual, weight):
    if isinstance(case["out"], torch.dtype):
        args = (x, residual, weight, case["eps"], None, case["out"])
    else:
        y, _ = add_rmsnorm_quantize_reference(x, residual, weight, case["eps"], None, torch.float32)
        qmax = 448 if case.get("fp8") else 127
        scale = (y.abs().amax().clamp_min(1e-6) / qmax * case["out"]).reshape(()).float()
        args = (x, residual, weight, case["eps"], scale) + ((FP8,) if case.get("fp8") else ())
    return add_rmsnorm_quantize(*args), add_rmsnorm_quantize_reference(*args)


# ---------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------


@needs_kernel
@settings(max_examples=25, **SETTINGS)
@given(case=cases())
def test_matches_reference(case):
    x, residual, weight = build(case, DEVICE)
    got, want = run_both(case, x, residual, weight)
    assert got[0].shape == x.shape and got[1].shape == x.shape
    assert_outputs(got, want)
    if case["out"] in (0.3, 0.8) and x.numel() > 1:
        qmax = 448 if case["fp8"] else 127
        assert float(got[0].float().abs().max()) >= qmax, "the scale should saturate some values"


@needs_kernel
@settings(max_examples=15, **SETTINGS)
@given(case=cases(max_h=100))
def test_two_pass_loop_matches_reference(case):
    """Rows longer than _MAX_BLOCK_H take the blocked two-pass path; force it on small rows.
    (Set by hand, not with the monkeypatch fixture: hypothesis reruns the body per example.)"""
    saved = norm._MAX_BLOCK_H
    norm._MAX_BLOCK_H = 16
    try:
        x, residual, weight = build(case, DEVICE)
        assert_outputs(*run_both(case, x, residual, weight))
    finally:
        norm._MAX_BLOCK_H = saved


@needs_kernel
@pytest.mark.parametrize("H", [768, 2560, 5120])
@pytest.mark.parametrize("has_res", [False, True])
def test_mamba_sizes(H, has_res):
    case = dict(seed=H, lead=(2, 2), H=H, dtype=torch.float16, w_dtype=torch.float32, layout="row_stride",
                res_layout="contiguous", has_res=has_res, eps=1e-5, out=0.5)
    x, residual, weight = build(case, DEVICE)
    assert_outputs(*run_both(case, x, residual, weight))
    case["fp8"] = True
    assert_outputs(*run_both(case, x, residual, weight))
    case["out"] = torch.float16
    assert_outputs(*run_both(case, x, residual, weight))


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_matches_hugging_face_rmsnorm(use_kernel):
    """Independent of the reference: HF's MambaRMSNorm on the fp32 residual sum (its cast back to
    the input dtype is then a no-op), and a float64 formula."""
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    device = DEVICE if use_kernel else "cpu"
    fn = add_rmsnorm_quantize if use_kernel else add_rmsnorm_quantize_reference
    gen = torch.Generator().manual_seed(0)
    H = 96
    x = torch.randn(5, H, generator=gen).half()
    residual = 3 * torch.randn(5, H, generator=gen)
    hf = MambaRMSNorm(H, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(H, generator=gen))
        want = hf(x.float() + residual)
    got, r = fn(x.to(device), residual.to(device), hf.weight.detach().to(device), 1e-5, None, torch.float32)
    assert torch.equal(r.cpu(), x.float() + residual)
    assert_normed_close(got, want)
    r64 = x.double() + residual.double()
    want64 = hf.weight.detach().double() * r64 / (r64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    assert float(((got.cpu().double() - want64).abs() / want64.abs()).max()) <= 1e-5


@needs_kernel
def test_kernel_path_is_taken(monkeypatch):
    """Guards the comparisons above: the entry point must not fall back to the reference."""
    def boom(*args, **kwargs):
        raise AssertionError("entry point fell back to the reference")

    monkeypatch.setattr(norm, "add_rmsnorm_quantize_reference", boom)
    x = torch.randn(2, 8, device=DEVICE)
    add_rmsnorm_quantize(x, None, torch.ones(8, device=DEVICE), 1e-5, torch.tensor(0.1, device=DEVICE))


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    calls = reference_calls(monkeypatch, norm, "add_rmsnorm_quantize_reference")
    q, r = add_rmsnorm_quantize(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 1e-5, torch.tensor(0.1))
    assert calls == [1] and q.dtype == torch.int8 and r.dtype == torch.float32


@needs_kernel
def test_scale_changed_in_place_takes_effect():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=gen).to(DEVICE)
    w = torch.ones(64, device=DEVICE)
    scale = torch.tensor([0.01], device=DEVICE)
    first, _ = add_rmsnorm_quantize(x, None, w, 1e-5, scale)
    scale.fill_(0.05)
    second, _ = add_rmsnorm_quantize(x, None, w, 1e-5, scale)
    assert not torch.equal(first, second)
    assert_int8_close(second, add_rmsnorm_quantize_reference(x, None, w, 1e-5, scale)[0])


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_ties_round_half_to_even(use_kernel):
    """r = (1, -1, 1, -1) and eps = 0 give rsqrt(mean) = 1 exactly, so y = weight * r: exact .5
    quotients, checked against Python's half-to-even round rather than the reference."""
    device = DEVICE if use_kernel else "cpu"
    fn = add_rmsnorm_quantize if use_kernel else add_rmsnorm_quantize_reference
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 3, device=device)
    weights = torch.tensor([[0.5, 1.5, 2.5, 3.5], [4.5, 5.5, 126.5, 127.5], [-0.5, 200.0, 2.0, 6.5]])
    for w in weights:
        q, _ = fn(x, None, w.to(device), 0.0, torch.tensor(1.0, device=device))
        signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
        expected = [max(-128, min(127, round(float(v)))) for v in w * signs]
        assert q.cpu()[0].tolist() == expected


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_fp8_ties_subnormals_and_saturation(use_kernel):
    """As above (y = weight * r exactly), with e4m3 midpoints, a subnormal tie, saturation and
    tiny negatives that round to -0.0, against e4m3 codes written out by hand."""
    device = DEVICE if use_kernel else "cpu"
    fn = add_rmsnorm_quantize if use_kernel else add_rmsnorm_quantize_reference
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 3, device=device)
    cases = [([1.0625, 1.1875, 3 * 2.0**-10, 464.0], [1.0, -1.25, 2.0**-8, -448.0]),
             ([2.0**-11, 2.0**-10, 1000.0, 0.8125], [0.0, -0.0, 448.0, -0.8125])]
    for w, expected in cases:
        q, _ = fn(x, None, torch.tensor(w, device=device), 0.0, torch.tensor(1.0, device=device), FP8)
        want = torch.tensor(expected).to(FP8).view(torch.uint8)
        assert torch.equal(q.cpu()[0].view(torch.uint8), want)


@needs_kernel
def test_first_block_returns_a_fresh_residual():
    """Without a residual, r is x.float(): a new tensor even when x already is contiguous fp32."""
    x = torch.randn(4, 32, device=DEVICE)
    _, r = add_rmsnorm_quantize(x, None, torch.ones(32, device=DEVICE), 1e-5, None)
    assert torch.equal(r, x) and r.data_ptr() != x.data_ptr()
    _, r_ref = add_rmsnorm_quantize_reference(x, None, torch.ones(32, device=DEVICE), 1e-5, None)
    assert r_ref.data_ptr() != x.data_ptr()


@needs_kernel
def test_output_dtypes():
    x = torch.randn(3, 40, device=DEVICE).half()
    w = torch.ones(40, device=DEVICE)
    s = torch.tensor(0.05, device=DEVICE)
    assert add_rmsnorm_quantize(x, None, w, 1e-5, None)[0].dtype == torch.float16  # the default
    assert add_rmsnorm_quantize(x, None, w, 1e-5, None, torch.bfloat16)[0].dtype == torch.bfloat16
    # With a scale the result is int8 whatever out_dtype says (a graph may pass its op's default).
    for out_dtype in (None, torch.int8, torch.float16):
        assert add_rmsnorm_quantize(x, None, w, 1e-5, s, out_dtype)[0].dtype == torch.int8
    # ... except float8_e4m3fn, the fp8 recipe's in_proj input.
    assert add_rmsnorm_quantize(x, None, w, 1e-5, s, FP8)[0].dtype == FP8


@needs_kernel
def test_empty_rows():
    x = torch.empty(0, 2, 16, device=DEVICE)
    q, r = add_rmsnorm_quantize(x, None, torch.ones(16, device=DEVICE), 1e-5, torch.tensor(1.0, device=DEVICE))
    assert q.shape == r.shape == (0, 2, 16) and q.dtype == torch.int8 and r.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _good():
    return dict(x=torch.zeros(2, 8, dtype=torch.float16), residual=torch.zeros(2, 8), weight=torch.ones(8),
                eps=1e-5, scale=torch.tensor(0.1))


ERRORS = [
    (dict(x=[1.0]), r"x must be a torch.Tensor, got list"),
    (dict(x=torch.zeros(2, 8, dtype=torch.int8)), r"x must be float16, bfloat16 or float32, got torch.int8"),
    (dict(x=torch.zeros(2, 8, dtype=torch.float64)), r"x must be float16, bfloat16 or float32, got torch.float64"),
    (dict(x=torch.zeros(2, 0), weight=torch.ones(0)), r"H >= 1"),
    (dict(residual=torch.zeros(2, 8, dtype=torch.float16)), r"residual must be None or a float32 tensor, got torch.float16"),
    (dict(residual=torch.zeros(2, 9)), r"residual has shape \(2, 9\) but x has shape \(2, 8\)"),
    (dict(residual=torch.zeros(8)), r"residual has shape \(8,\) but x has shape \(2, 8\)"),
    (dict(weight=torch.ones(9)), r"weight has 9 elements but x has H=8"),
    (dict(weight=torch.ones(2, 8)), r"weight must be a 1-dim floating tensor \[H\]"),
    (dict(weight=torch.ones(8, dtype=torch.int32)), r"weight must be a 1-dim floating tensor"),
    (dict(eps=-1.0), r"eps must be a non-negative float"),
    (dict(eps="1e-5"), r"eps must be a non-negative float"),
    (dict(scale=0.1), r"scale must be None or a 0-dim or 1-element float32 tensor .*got float"),
    (dict(scale=torch.tensor([0.1, 0.2])), r"scale must be a 0-dim or 1-element float32 tensor, got .*\(2,\)"),
    (dict(scale=torch.tensor(0.1, dtype=torch.float16)), r"scale must be .*float32 tensor, got torch.float16"),
    (dict(scale=None, out_dtype=torch.int8), r"without a scale, out_dtype must be float16, bfloat16 or float32"),
    (dict(scale=None, out_dtype=torch.float64), r"without a scale, out_dtype must be"),
    (dict(out_dtype=torch.int32), r"out_dtype must be None, torch.int8 or a float dtype"),
]


@pytest.mark.parametrize("fn", [add_rmsnorm_quantize, add_rmsnorm_quantize_reference])
@pytest.mark.parametrize("override,match", ERRORS)
def test_rejects_bad_inputs(fn, override, match):
    kwargs = {**_good(), **override}
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
