"""Tests for the selective-scan Triton kernels (quamba_fx.kernels.scan).

Run on CPU with the Triton interpreter (OMP_NUM_THREADS=1 keeps numpy's small blocks fast):

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest tests/test_kernel_scan.py -q

Without the interpreter, kernel tests run on CUDA when present and are skipped otherwise; reference
and validation tests always run.

Tolerance. The kernel is compared with `selective_scan_int8_reference` (dequantize, then
`quamba_fx.ops.selective_scan_reference` in fp32), which it does not match bit for bit: exp/log
come from other implementations (numpy under the interpreter, ex2/lg2 approximations on CUDA) and
the kernel reassociates a few products (module docstring). Each of these is a relative error of a
few fp32 ulps (~1e-6) on each term of `y = sum_n C_n sum_s exp(..) dt_s u_s B_s + D u`, and the
scan is contractive, so errors do not grow with L; but terms may cancel, so the bound is relative
to the *magnitude* of the terms, not to y: `mag` is the same scan run on |u|, |B|, |C|, |D|
(times |silu(z)|), an upper bound of the sum of |terms|. We allow `1e-4 * mag` (about 100x the
expected error, so the tests are not flaky, and still ~1000x below what a wrong index, a skipped
step or a missing term produces) plus half an ulp of the output dtype on |y| for its final
rounding. The final state gets `1e-4 * hmag` likewise.

The chunked prefill (few channels: the scan split over L, see the kernel module's docstring) is
held to the same tolerance: it regroups the sums by chunk and takes a chunk's decay as one exp of
the summed dt, each a few ulps of the terms. Under the interpreter chunks are 16 steps long, so the
property tests (L up to 40) cover one to three chunks; `test_chunked_scan_matches_reference` pins
chunk lengths from 1 step to one chunk.

Chained decode steps after a prefill must reproduce the prefill: bit for bit under the interpreter
(both kernels run the same per-step helpers, and L <= 16 is one chunk there), within the
tolerance above on CUDA.

A float16 or bfloat16 state is read as fp32 and stored rounded to nearest even, so against the
fp32 reference it gets half an ulp of its dtype on top (`assert_close_scan` adds it for got's
dtype); under the interpreter the kernel with such a state is, bit for bit, the kernel with the
same values in an fp32 state, its stored state rounded.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quamba_fx import ops as qops
from quamba_fx.kernels import scan, split_k
from quamba_fx.kernels.scan import (
    DeltaProjection,
    DeltaProjectionW4,
    selective_scan,
    selective_scan_int8_reference,
    selective_state_update,
    selective_state_update_reference,
)

from quamba_fx.quant.int4 import quantize_weight_int4, w4a16_linear

from .kernel_support import DEVICE, EXACT, needs_kernel, reference_calls

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RTOL = 1e-4
# Half an ulp (relative) of each output dtype: the final rounding of y.
HALF_ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
SUBNORMAL_HALF_ULP = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150}
ACT_NAMES = ("u", "delta", "B", "C", "z")


def _force_config(block_d: int, num_warps: int, unroll: int, tile_t: int = 0):
    """Make the autotuned prefill kernel run one config (one config: the autotuner benchmarks nothing)."""
    kernel = scan._selective_scan_kernel
    saved = kernel.configs
    kernel.configs = [scan._config(block_d, num_warps, unroll, tile_t)]
    # Tuned launches bypass the autotuner (and so its configs): forget them.
    scan._TUNED.clear()
    return kernel, saved


@contextlib.contextmanager
def _pinned_config(*config):
    """`_force_config` for the duration of a with block; the autotuner's configs come back after."""
    kernel, saved = _force_config(*config)
    try:
        yield
    finally:
        kernel.configs = saved
        scan._TUNED.clear()


@pytest.fixture(autouse=True)
def _one_config_on_cuda():
    """On CUDA, every new flag combination would otherwise autotune (compile and time every config):
    the property tests use one config; `test_every_gpu_config` covers the others."""
    if DEVICE != "cuda":
        yield
        return
    with _pinned_config(*scan.GPU_CONFIGS[0]):
        yield


# ---------------------------------------------------------------------------------------------
# Building inputs
# ---------------------------------------------------------------------------------------------


@st.composite
def cases(draw, max_b=3, max_d=40, max_l=40, min_l=1):
    kinds = draw(st.sampled_from(["int8", "float32", "float16", "bfloat16", "mixed"]))
    if kinds == "mixed":  # each activation int8 or float on its own
        kind = {n: draw(st.sampled_from(["int8", "float32", "float16"])) for n in ACT_NAMES}
    else:
        kind = {n: kinds for n in ACT_NAMES}
    return dict(
        batch=draw(st.integers(1, max_b)),
        # The interpreter runs 16-channel programs: hit 1, the edges of a block and several blocks.
        d_inner=draw(st.one_of(st.integers(1, max_d), st.sampled_from([d for d in (1, 15, 16, 17, 33) if d <= max_d]))),
        # 5: a d_state that is padded to a power of two inside the kernel.
        d_state=draw(st.sampled_from([1, 4, 5, 8, 16])),
        L=draw(st.one_of(st.integers(min_l, max_l), st.sampled_from([v for v in (1, 2, 3) if min_l <= v <= max_l]))),
        kind=kind,
        layout=draw(st.sampled_from(["graph", "contiguous", "strided"])),
        has_D=draw(st.booleans()),
        has_z=draw(st.booleans()),
        has_bias=draw(st.booleans()),
        softplus=draw(st.booleans()),
        has_h0=draw(st.booleans()),
        # The dtype the state is kept in: the initial state's and the final (or updated) one's.
        state_dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])),
        out_dtype=draw(st.sampled_from([None, None, torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _act(gen, shape, kind, lo, hi, scale, float_scale):
    """An activation of `shape` (fp32 values, then int8 or float storage) and its scale."""
    if kind == "int8":
        q = torch.randint(lo, hi, shape, dtype=torch.int8, generator=gen)
        return q, torch.tensor(scale)
    x = torch.rand(shape, generator=gen) * (hi - lo) + lo
    return (x * float_scale).to(getattr(torch, kind)), None


def build(case: dict, device: str) -> dict:
    """Scan inputs as keyword arguments, with the memory layouts of our graphs.

    "graph": u, delta are `[b, L, D]` contiguous viewed as `[b, D, L]`; z is the second half of
    in_proj's `[b, L, 2D]`; B and C are slices of x_proj's `[b, L, R + 2N]`. "strided": every other
    time step of `[b, *, 2L]` buffers. "contiguous": plain `[b, *, L]`.
    """
    gen = torch.Generator().manual_seed(case["seed"])
    b, d, n, L, kind = case["batch"], case["d_inner"], case["d_state"], case["L"], case["kind"]
    sp = case["softplus"]
    # Without softplus dt must be >= 0 (as after softplus) or exp(dt * A) > 1 makes the scan blow up.
    u, u_s = _act(gen, (b, L, d), kind["u"], -128, 128, 0.02, 1 / 64)
    if sp:
        delta, delta_s = _act(gen, (b, L, d), kind["delta"], -128, 128, 0.03, 1 / 32)
    else:
        delta, delta_s = _act(gen, (b, L, d), kind["delta"], 0, 128, 0.005, 1 / 200)
    rank = 3
    xdbl, bc_s = _act(gen, (b, L, rank + 2 * n), kind["B"], -128, 128, 0.05, 1 / 40)
    xdbl_c, c_s = _act(gen, (b, L, rank + 2 * n), kind["C"], -128, 128, 0.04, 1 / 40)
    xz, z_s = _act(gen, (b, L, 2 * d), kind["z"], -128, 128, 0.03, 1 / 40)
    B = xdbl[:, :, rank:rank + n]
    C = xdbl_c[:, :, rank + n:]
    z = xz[:, :, d:]
    acts = dict(u=u, delta=delta, B=B, C=C, z=z)
    if case["layout"] == "graph":
        acts = {k: v.to(device).transpose(1, 2) for k, v in acts.items()}
    elif case["layout"] == "contiguous":
        acts = {k: v.transpose(1, 2).contiguous().to(device) for k, v in acts.items()}
    else:
        acts = {k: torch.repeat_interleave(v.transpose(1, 2), 2, dim=2).to(device)[:, :, ::2] for k, v in acts.items()}
    # Mamba's A = -exp(A_log) with A_log ~ log(1..16).
    A = -torch.exp(torch.rand(d, n, generator=gen) * 3.0 - 0.5)
    D = torch.randn(d, generator=gen)
    bias = (torch.rand(d, generator=gen) * 4 - 5) if sp else torch.rand(d, generator=gen) * 0.05
    h0 = torch.randn(b, d, n, generator=gen).to(state_dtype_of(case))
    scales = dict(u_scale=u_s, delta_scale=delta_s, B_scale=bc_s, C_scale=c_s, z_scale=z_s)
    if not case["has_z"]:
        acts["z"] = None
        scales["z_scale"] = None
    kwargs = dict(
        u=acts["u"], delta=acts["delta"], A=A.to(device), B=acts["B"], C=acts["C"],
        D=D.to(device) if case["has_D"] else None, z=acts["z"],
        delta_bias=bias.to(device) if case["has_bias"] else None, delta_softplus=sp,
        initial_state=h0.to(device) if case["has_h0"] else None, out_dtype=case["out_dtype"],
    )
    kwargs.update({k: (v.to(device) if v is not None else None) for k, v in scales.items()})
    return kwargs


def state_dtype_of(case: dict) -> torch.dtype:
    return case.get("state_dtype", torch.float32)


def magnitudes(kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds of sum |terms| of y and of the final state: the scan of the inputs' magnitudes."""
    def deq(name):
        x, s = kw[name], kw.get(f"{name}_scale")
        return None if x is None else (x.float() * s if s is not None else x.float())

    u, delta, B, C, z = (deq(n) for n in ACT_NAMES)
    D = kw["D"].abs() if kw["D"] is not None else None
    h0 = kw["initial_state"].abs() if kw["initial_state"] is not None else None
    # dt and A as given (the decay factors are positive), the other factors as magnitudes.
    y, h = qops.selective_scan_reference(u.abs(), delta, kw["A"], B.abs(), C.abs(), D, None, kw["delta_bias"],
                                         kw["delta_softplus"], h0)
    if z is not None:
        y = y * F.silu(z).abs()
    return y, h


def assert_close_scan(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, what: str = "y") -> None:
    """|got - want| <= RTOL * mag + half an ulp of got's dtype at want (want is fp32)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    g, w, m = got.float().cpu(), want.float().cpu(), mag.float().cpu()
    # Half an ulp of the output dtype: relative for normal numbers, absolute below (subnormals).
    tol = RTOL * m + HALF_ULP[got.dtype] * w.abs() + SUBNORMAL_HALF_ULP[got.dtype]
    err = (g - w).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = int(torch.where(bad.flatten(), err.flatten() / tol.flatten(), torch.zeros(())).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} values off; worst: got {float(g.flatten()[i]):.9g}, "
            f"want {float(w.flatten()[i]):.9g}, |err| {float(err.flatten()[i]):.3g} > "
            f"tol {float(tol.flatten()[i]):.3g} (mag {float(m.flatten()[i]):.3g})"
        )


def ref_call(kw: dict, **extra):
    """The reference with fp32 output: what the kernel's pre-rounding y approximates."""
    args = {**kw, **extra, "out_dtype": torch.float32}
    return selective_scan_int8_reference(**args)


def expected_out_dtype(kw: dict) -> torch.dtype:
    if kw["out_dtype"] is not None:
        return kw["out_dtype"]
    if any(kw[f"{n}_scale"] is not None for n in ACT_NAMES):
        return torch.float16
    return kw["u"].dtype


# ---------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------


@needs_kernel
@settings(max_examples=10, **SETTINGS)
@given(case=cases())
def test_prefill_matches_reference(case):
    check_prefill(case)


@pytest.mark.slow
@needs_kernel
@settings(max_examples=40, **SETTINGS)
@given(case=cases())
def test_prefill_matches_reference_on_more_cases(case):
    check_prefill(case)


def check_prefill(case: dict) -> None:
    """The kernel against the reference on one drawn case: output, final state, layouts."""
    kw = build(case, DEVICE)
    state_dtype = state_dtype_of(case)
    y, final = selective_scan(**kw, return_final_state=True, state_dtype=state_dtype)
    # The reference's final state unrounded (fp32): the kernel's gets half an ulp of its dtype.
    y_ref, final_ref = ref_call(kw, return_final_state=True, state_dtype=torch.float32)
    mag, hmag = magnitudes(kw)
    b, d, n, L = case["batch"], case["d_inner"], case["d_state"], case["L"]
    # y: [b, d, L] laid out as [b, L, d] (what out_proj reads); state contiguous, in its dtype.
    assert y.shape == (b, d, L) and y.stride() == (L * d, 1, d)
    assert y.dtype == expected_out_dtype(kw) and y.device.type == DEVICE
    assert final.shape == (b, d, n) and final.dtype == state_dtype and final.is_contiguous()
    assert_close_scan(y, y_ref, mag)
    assert_close_scan(final, final_ref, hmag, "final state")
    # One more kernel run either way (the interpreter's time is the suite's budget).
    if EXACT and state_dtype != torch.float32:
        # The narrow state is the fp32 one read exactly and rounded once, at the store.
        h0 = kw["initial_state"]
        y32, final32 = selective_scan(**{**kw, "initial_state": None if h0 is None else h0.float()},
                                      return_final_state=True)
        assert torch.equal(y, y32) and torch.equal(final, final32.to(state_dtype))
    else:
        # Without return_final_state the result is the bare tensor, identical.
        alone = selective_scan(**kw)
        assert isinstance(alone, torch.Tensor) and torch.equal(alone, y)


@needs_kernel
@settings(max_examples=15, **SETTINGS)
@given(case=cases(max_l=16, min_l=1), data=st.data())
def test_decode_chain_equals_prefill(case, data):
    """Prefill a prefix, decode the rest one token at a time: same y and final state as one prefill."""
    kw = build(case, DEVICE)
    b, d, n, L = case["batch"], case["d_inner"], case["d_state"], case["L"]
    cut = data.draw(st.integers(0, L - 1), label="cut")
    # A narrow initial state is read as fp32; the chain keeps fp32 (a narrow one would round the
    # state after every step, the prefill only at its end).
    y_all, final_all = selective_scan(**kw, return_final_state=True, state_dtype=torch.float32)

    def part(x, sl):
        return None if x is None else x[:, :, sl]

    seq = ("u", "delta", "B", "C", "z")
    head = {**kw, **{k: part(kw[k], slice(0, cut)) for k in seq}}
    y_head, state = selective_scan(**head, return_final_state=True, state_dtype=torch.float32)
    # A non-contiguous state buffer: the update must honour its strides in place.
    buf = torch.empty(b, n, d, dtype=torch.float32, device=DEVICE).transpose(1, 2)
    buf.copy_(state)
    ys = [y_head]
    step_kw = {k: v for k, v in kw.items() if k not in seq + ("initial_state",)}
    for t in range(cut, L):
        tok = {k: None if kw[k] is None else kw[k][:, :, t] for k in seq}
        before = buf.clone()
        y_t = selective_state_update(buf, **tok, **step_kw)
        ref_state = before.clone()
        y_t_ref = selective_state_update_reference(ref_state, **tok, **{**step_kw, "out_dtype": torch.float32})
        assert y_t.shape == (b, d) and y_t.is_contiguous() and y_t.dtype == y_all.dtype
        # One step from the same state agrees with the reference too.
        one = {k: None if v is None else v[..., None] for k, v in tok.items()}
        step_mag, _ = magnitudes({**step_kw, **one, "initial_state": before})
        assert_close_scan(y_t, y_t_ref, step_mag[..., 0], "decode y")
        ys.append(y_t[:, :, None])
    y_chain = torch.cat(ys, dim=2)
    if EXACT:
        assert torch.equal(y_chain, y_all)
        assert torch.equal(buf, final_all)
    else:
        mag, hmag = magnitudes(kw)
        assert_close_scan(y_chain, y_all.float(), mag)
        assert_close_scan(buf, final_all, hmag, "final state")


@needs_kernel
@settings(max_examples=12, **SETTINGS)
@given(case=cases(max_l=1, min_l=1))
def test_decode_matches_reference(case):
    kw = build(case, DEVICE)
    tok = {k: None if kw[k] is None else kw[k][:, :, 0] for k in ACT_NAMES}
    rest = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state",)}
    b, d, n = case["batch"], case["d_inner"], case["d_state"]
    state_dtype = state_dtype_of(case)
    before = torch.randn(b, d, n, generator=torch.Generator().manual_seed(case["seed"])).to(DEVICE, state_dtype)
    # The reference from the same values in fp32, so its new state is unrounded.
    state, ref_state = before.clone(), before.to(torch.float32, copy=True)
    y = selective_state_update(state, **tok, **rest)
    y_ref = selective_state_update_reference(ref_state, **tok, **{**rest, "out_dtype": torch.float32})
    assert y.dtype == expected_out_dtype(kw) and y.shape == (b, d) and y.is_contiguous()
    assert state.dtype == state_dtype
    mag, hmag = magnitudes({**kw, "initial_state": before})
    assert_close_scan(y, y_ref, mag[..., 0])
    assert_close_scan(state, ref_state, hmag, "state")
    if EXACT and state_dtype != torch.float32:
        # The kernel's own fp32 step from the same values, its new state rounded once.
        state32 = before.to(torch.float32, copy=True)
        y32 = selective_state_update(state32, **tok, **rest)
        assert torch.equal(y, y32) and torch.equal(state, state32.to(state_dtype))


@needs_kernel
def test_kernel_path_is_taken(monkeypatch):
    """Guards the comparisons above: the wrappers must not fall back to the reference."""
    def boom(*args, **kwargs):
        raise AssertionError("wrapper fell back to the reference")

    monkeypatch.setattr(scan, "selective_scan_int8_reference", boom)
    monkeypatch.setattr(scan, "selective_state_update_reference", boom)
    case = dict(batch=1, d_inner=8, d_state=4, L=5, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=False, out_dtype=None, seed=0)
    kw = build(case, DEVICE)
    selective_scan(**kw)
    state = torch.zeros(1, 8, 4, device=DEVICE)
    tok = {k: kw[k][:, :, 0] for k in ACT_NAMES}
    rest = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state",)}
    selective_state_update(state, **tok, **rest)


# ---------------------------------------------------------------------------------------------
# dt_proj inside the decode kernel (DeltaProjection)
# ---------------------------------------------------------------------------------------------


def _decode_step_inputs(batch: int, d_inner: int, kind: str, seed: int, device: str | None):
    """One decode step's activations but delta (`kind` storage, graph layouts) as `tok`, the other
    keyword arguments but delta's scale and the initial state as `rest`, and a generator for more."""
    case = dict(batch=batch, d_inner=d_inner, d_state=5, L=1, kind={n: kind for n in ACT_NAMES},
                layout="graph", has_D=True, has_z=True, has_bias=False, softplus=True, has_h0=False,
                out_dtype=None, seed=seed)
    kw = build(case, device)
    tok = {k: kw[k][:, :, 0] for k in ACT_NAMES if k != "delta"}
    rest = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state", "delta_scale")}
    return tok, rest, torch.Generator().manual_seed(seed + 1)


def _step_with_projection(batch: int, d_inner: int, rank: int, per_channel: bool, has_bias: bool, seed: int,
                          device: str | None = DEVICE):
    """One decode step's inputs (int8, graph layouts) and a DeltaProjection whose x is a slice of an
    x_proj-like row, as in the lowered graph."""
    tok, rest, gen = _decode_step_inputs(batch, d_inner, "int8", seed, device)
    xdbl = torch.randint(-128, 128, (batch, rank + 7), dtype=torch.int8, generator=gen)
    proj = DeltaProjection(
        x=xdbl[:, :rank].to(device), x_scale=torch.tensor(0.05, device=device),
        weight=torch.randint(-128, 128, (d_inner, rank), dtype=torch.int8, generator=gen).to(device),
        weight_scale=(torch.rand(d_inner if per_channel else 1, generator=gen) * 4e-3 + 1e-4).to(device),
        bias=(torch.rand(d_inner, generator=gen) * 4 - 5).to(device) if has_bias else None,
        out_scale=torch.tensor(0.04, device=device),
    )
    return tok, rest, proj, torch.randn(batch, d_inner, 5, generator=gen).to(device)


@needs_kernel
@pytest.mark.parametrize("batch, d_inner, rank, per_channel, has_bias, state_dtype", [
    (1, 33, 37, True, True, torch.float16),  # several R steps (8 a step under the interpreter), a partial block
    (3, 16, 1, False, True, torch.float32),  # rank 1, one scale for the whole weight
    (2, 40, 8, True, False, torch.float32),  # no bias
])
def test_dt_proj_in_the_kernel_equals_the_gemm_then_the_update(batch, d_inner, rank, per_channel, has_bias,
                                                               state_dtype, monkeypatch):
    tok, rest, proj, state = _step_with_projection(batch, d_inner, rank, per_channel, has_bias, seed=batch + rank)
    state = state.to(state_dtype)
    delta = proj.delta()
    assert delta.dtype == torch.int8 and delta.shape == (batch, d_inner)
    plain_state = state.clone()
    plain = selective_state_update(plain_state, delta=delta, delta_scale=proj.out_scale, **tok, **rest)

    def no_gemm():
        raise AssertionError("the projection ran as its own GEMM")

    with monkeypatch.context() as m:
        m.setattr(DeltaProjection, "delta", lambda self: no_gemm())
        fused = selective_state_update(state, delta=None, delta_proj=proj, **tok, **rest)
    # The same int32 sums and epilogue (mul_rn keeps its rounding under fp fusion on CUDA): the
    # same delta, so the same step: bit for bit under the interpreter. On CUDA the two launches
    # are compiled for different channel blocks, whose state updates may contract into FMAs
    # differently (H200: y equal, the state within an ulp or two).
    if EXACT:
        assert torch.equal(fused, plain)
        assert torch.equal(state, plain_state)
    else:
        torch.testing.assert_close(fused, plain, rtol=2.0**-10, atol=1e-6)
        ulp = 1e-6 if state.dtype == torch.float32 else 2.0**-10  # an fp32 state's few ulps, or an fp16 one
        torch.testing.assert_close(state.float(), plain_state.float(), rtol=ulp, atol=1e-6)


@needs_kernel
def test_dt_proj_above_the_batch_limit_runs_as_a_gemm_with_the_same_result(monkeypatch):
    tok, rest, proj, state = _step_with_projection(2, 24, 11, True, True, seed=5)
    fused_state = state.clone()
    fused = selective_state_update(fused_state, delta=None, delta_proj=proj, **tok, **rest)
    gemms = []
    real = DeltaProjection.delta
    monkeypatch.setattr(scan, "DT_PROJ_MAX_BATCH", 1)
    monkeypatch.setattr(scan, "DT_PROJ_ROWS_MAX_BATCH", 0)  # nor in a block of sequences
    monkeypatch.setattr(DeltaProjection, "delta", lambda self: gemms.append(1) or real(self))
    split = selective_state_update(state, delta=None, delta_proj=proj, **tok, **rest)
    assert gemms == [1]
    if EXACT:
        assert torch.equal(split, fused) and torch.equal(state, fused_state)
    else:
        torch.testing.assert_close(split, fused, rtol=2.0**-10, atol=1e-6)
        torch.testing.assert_close(state, fused_state, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("batch, d_inner, rank, per_channel, has_bias, state_dtype", [
    (16, 40, 9, True, True, torch.float32),  # one block of sequences, a partial block of channels
    (9, 33, 37, False, True, torch.float16),  # a partial block of sequences; K padded from 37 to 64
    (33, 16, 1, True, False, torch.float32),  # three blocks of sequences, the last holding one
])
def test_dt_proj_for_a_block_of_sequences_equals_the_gemm_then_the_update(batch, d_inner, rank, per_channel,
                                                                         has_bias, state_dtype, monkeypatch):
    """Above DT_PROJ_MAX_BATCH the projection runs inside `_state_update_rows_kernel`, one MMA for
    ROWS_BLOCK_B sequences: the GEMM's int32 sums and epilogue, so the same delta and step."""
    monkeypatch.setattr(scan, "DT_PROJ_ROWS_MAX_BATCH", 64)  # several blocks of sequences too
    tok, rest, proj, state = _step_with_projection(batch, d_inner, rank, per_channel, has_bias, seed=batch + rank)
    state = state.to(state_dtype)
    plain_state = state.clone()
    plain = selective_state_update(plain_state, delta=proj.delta(), delta_scale=proj.out_scale, **tok, **rest)
    monkeypatch.setattr(DeltaProjection, "delta", lambda self: pytest.fail("the projection ran as its own GEMM"))
    rows = selective_state_update(state, delta=None, delta_proj=proj, **tok, **rest)
    if EXACT:
        assert torch.equal(rows, plain) and torch.equal(state, plain_state)
    else:
        torch.testing.assert_close(rows, plain, rtol=2.0**-10, atol=1e-6)
        ulp = 1e-6 if state.dtype == torch.float32 else 2.0**-10
        torch.testing.assert_close(state.float(), plain_state.float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("batch, rows_max, four_bit, runs", [
    (8, None, False, False),  # up to DT_PROJ_MAX_BATCH: the per-sequence kernel
    (9, None, False, True), (32, None, False, True),
    (33, None, False, False),  # above the limit (32 by default): the GEMM
    (64, 64, False, True), (65, 64, False, False),
    (16, 0, False, False),  # turned off
    (16, None, True, False),  # a 4-bit projection: its own kernel
])
def test_which_batches_take_the_block_of_sequences_kernel(batch, rows_max, four_bit, runs, monkeypatch):
    if rows_max is not None:
        monkeypatch.setattr(scan, "DT_PROJ_ROWS_MAX_BATCH", rows_max)
    x = torch.zeros(batch, 5, dtype=torch.float16 if four_bit else torch.int8)
    proj = (DeltaProjectionW4(x, torch.zeros(8, 3, dtype=torch.uint8), torch.ones(8, 1), 8, None) if four_bit
            else DeltaProjection(x, torch.tensor(1.0), torch.zeros(8, 5, dtype=torch.int8), torch.ones(8), None,
                                 torch.tensor(1.0)))
    assert scan._rows_kernel_takes(proj, torch.zeros(batch, 8, 4)) == runs


def _step_with_w4_projection(batch: int, d_inner: int, rank: int, group: int, has_bias: bool, seed: int,
                             device: str | None = DEVICE):
    """One W4A16 decode step's inputs (fp16, graph layouts) and a DeltaProjectionW4 whose x is a
    slice of an x_proj-like fp16 row, as in the lowered graph."""
    tok, rest, gen = _decode_step_inputs(batch, d_inner, "float16", seed, device)
    xdbl = torch.randn(batch, rank + 7, generator=gen).half()
    packed, scale = quantize_weight_int4(torch.randn(d_inner, rank, generator=gen) * 0.3, group)
    proj = DeltaProjectionW4(x=xdbl[:, :rank].to(device), weight=packed.to(device), weight_scale=scale.to(device),
                             group_size=group,
                             bias=(torch.rand(d_inner, generator=gen) * 4 - 5).to(device) if has_bias else None)
    return tok, rest, proj, torch.randn(batch, d_inner, 5, generator=gen).to(device)


@needs_kernel
@settings(max_examples=12, **SETTINGS)
@given(batch=st.integers(1, 3), d_inner=st.integers(1, 40), rank=st.integers(1, 40), group=st.sampled_from([8, 32]),
       has_bias=st.booleans(), seed=st.integers(0, 99))
@example(batch=1, d_inner=1, rank=1, group=8, has_bias=False, seed=0)  # failed to compile on the H100 (session 46)
def test_a_4bit_dt_proj_in_the_kernel_matches_the_projection_then_the_update(batch, d_inner, rank, group, has_bias,
                                                                             seed):
    # Odd ranks leave the last byte's high nibble as padding; ranks above BLOCK_R take several steps.
    tok, rest, proj, state = _step_with_w4_projection(batch, d_inner, rank, group, has_bias, seed)
    # The plain path's delta is the fp32 reference's, not the GEMV's: on a GPU the GEMV sums each
    # chunk's products in fp16 (gemv_w4.py), which moved delta by up to 0.006 on these inputs (a
    # CPU emulation, docs/benchmarks.md session 45), more than the last bit the kernel's fp32 sum
    # may differ by. (The GEMV is held to its own bound by
    # test_kernel_gemm_w4.py.)
    delta = w4a16_linear(proj.x, proj.weight, proj.weight_scale, proj.group_size, proj.bias)
    assert delta.dtype == torch.float16 and delta.shape == (batch, d_inner)
    plain_state = state.clone()
    plain = selective_state_update(plain_state, delta=delta, **tok, **rest)
    projection = DeltaProjectionW4.delta
    DeltaProjectionW4.delta = lambda self: pytest.fail("the projection ran as its own GEMV")
    try:
        fused = selective_state_update(state, delta=None, delta_proj=proj, **tok, **rest)
    finally:
        DeltaProjectionW4.delta = projection
    # The kernel sums the projection in fp32 in its own order: the fp16 deltas may differ in their
    # last bit, which moves y and the state by about as much.
    torch.testing.assert_close(fused.float(), plain.float(), rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(state, plain_state, rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("interpret, rank, four_bit, block_r", [
    (False, 1, True, 2),  # one packed byte: a tile of one column would be a zero-length arange
    (False, 1, False, 1),
    (False, 160, True, 256),  # mamba-2.8b's rank in one tile
    (False, 300, False, 256),
    (True, 1, True, 2),
    (True, 40, True, 8),  # the interpreter walks several tiles
])
def test_the_decode_projection_tile_fits_the_rank_and_holds_a_byte(monkeypatch, interpret, rank, four_bit, block_r):
    monkeypatch.setattr(scan, "_INTERPRET", interpret)
    assert scan._projection_block_r(rank, four_bit) == block_r


def test_the_reference_with_a_4bit_projection_is_the_reference_with_its_delta():
    tok, rest, proj, state = _step_with_w4_projection(2, 9, 13, 8, True, seed=4, device="cpu")
    a, b = state.clone(), state.clone()
    y_proj = selective_state_update_reference(a, delta=None, delta_proj=proj, **tok, **rest)
    delta = torch.ops.quamba.w4a16_linear(proj.x, proj.weight, proj.weight_scale, proj.group_size, proj.bias)
    y = selective_state_update_reference(b, delta=delta, **tok, **rest)
    assert torch.equal(y_proj, y) and torch.equal(a, b)


def test_a_4bit_projection_of_the_wrong_shape_is_refused():
    tok, rest, proj, state = _step_with_w4_projection(1, 9, 13, 8, False, seed=4, device="cpu")
    wrong = DeltaProjectionW4(proj.x, proj.weight[:5], proj.weight_scale[:5], 8, None)
    with pytest.raises(ValueError, match="delta_proj.weight must be"):
        selective_state_update(state, delta=None, delta_proj=wrong, **tok, **rest)
    with pytest.raises(ValueError, match="delta_proj.x must be float"):
        selective_state_update(state, delta=None, delta_proj=DeltaProjectionW4(
            proj.x.to(torch.int8), proj.weight, proj.weight_scale, 8, None), **tok, **rest)
    with pytest.raises(ValueError, match="delta_proj.weight_scale must be float16"):
        selective_state_update(state, delta=None, delta_proj=DeltaProjectionW4(
            proj.x, proj.weight, proj.weight_scale.float(), 8, None), **tok, **rest)


def test_reference_with_a_projection_equals_the_reference_with_its_delta():
    tok, rest, proj, state = _step_with_projection(2, 9, 6, True, True, seed=3, device="cpu")
    a, b = state.clone(), state.clone()
    y_proj = selective_state_update_reference(a, delta=None, delta_proj=proj, **tok, **rest)
    delta = torch.ops.quamba.int8_linear(proj.x, proj.x_scale, proj.weight, proj.weight_scale, proj.bias,
                                         proj.out_scale, None)
    y = selective_state_update_reference(b, delta=delta, delta_scale=proj.out_scale, **tok, **rest)
    assert torch.equal(y_proj, y) and torch.equal(a, b)


@pytest.mark.parametrize("fn", [selective_state_update, selective_state_update_reference])
@pytest.mark.parametrize("change, match", [
    (dict(delta=torch.zeros(2, 4, dtype=torch.int8)), r"with delta_proj, delta and delta_scale must be None"),
    (dict(x=torch.zeros(2, 6)), r"delta_proj.x must be int8 \[batch=2, R >= 1\]"),
    (dict(x=torch.zeros(2, 6, 2, dtype=torch.int8)[:, :, 0]), r"unit stride along R"),
    (dict(weight=torch.zeros(4, 5, dtype=torch.int8)), r"delta_proj.weight must be int8 \[d_inner, R\] = \(4, 6\)"),
    (dict(weight_scale=torch.ones(3)), r"delta_proj.weight_scale must be float32 with 1 or d_inner = 4"),
    (dict(out_scale=torch.ones(2)), r"delta_proj.out_scale must be a one-element float32 tensor"),
    (dict(bias=torch.zeros(4, dtype=torch.float16)), r"delta_proj.bias must be None or a float32 tensor"),
])
def test_bad_delta_projections_are_refused(fn, change, match):
    kw = _good_prefill()
    kwargs = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state", "delta_scale")}
    kwargs.update({k: kw[k][:, :, 0] for k in ACT_NAMES if k != "delta"})
    fields = dict(x=torch.zeros(2, 6, dtype=torch.int8), x_scale=torch.tensor(0.1),
                  weight=torch.zeros(4, 6, dtype=torch.int8), weight_scale=torch.ones(4), bias=None,
                  out_scale=torch.tensor(0.1))
    change = dict(change)  # parametrize shares the dict between the two functions
    delta = change.pop("delta", None)
    fields.update(change)
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(2, 4, 3), delta=delta, delta_proj=DeltaProjection(**fields), **kwargs)


@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cached_op_keeps_the_state_in_its_dtype(state_dtype):
    """The decode cache's op writes the prefill's final state into `ssm_state` in that tensor's
    dtype (the kernel's fp32 state, rounded) and advances it in place by one decode step."""
    case = dict(batch=2, d_inner=8, d_state=4, L=5, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=False, out_dtype=None, seed=13)
    kw = build(case, DEVICE)
    op = torch.ops.quamba.selective_scan_int8_cached.default

    def steps(sl):
        part = {n: kw[n][:, :, sl] for n in ACT_NAMES}
        return part, (part["u"], kw["u_scale"], part["delta"], kw["delta_scale"], kw["A"], part["B"], kw["B_scale"],
                      part["C"], kw["C_scale"], kw["D"], part["z"], kw["z_scale"], kw["delta_bias"], True,
                      torch.float16)

    params = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state",)}
    ssm = torch.full((2, 8, 4), float("nan"), dtype=state_dtype, device=DEVICE)
    part, args = steps(slice(0, 4))
    y = op(*args, ssm, False)
    y_want, final = selective_scan(**part, **params, return_final_state=True)
    assert final.dtype == torch.float32
    assert torch.equal(y, y_want) and ssm.dtype == state_dtype and torch.equal(ssm, final.to(state_dtype))
    part, args = steps(slice(4, 5))
    state = ssm.clone()
    y = op(*args, ssm, True)
    y_want = selective_state_update(state, **{n: part[n][:, :, 0] for n in ACT_NAMES}, **params)
    assert torch.equal(y[:, :, 0], y_want) and torch.equal(ssm, state)


@needs_kernel
def test_kernels_always_get_a_bias(monkeypatch):
    """Without delta_bias the kernels get zeros: the bias load fixes the layout of the per-channel
    work (`scan._bias_or_zeros`; without it a 2.8b model's scan ran 1.7x slower on an H200)."""
    biases = []
    launch = scan._launch_chunks
    monkeypatch.setattr(scan, "_launch_chunks", lambda *a: biases.append(a[5][7]) or launch(*a))
    case = dict(batch=1, d_inner=8, d_state=4, L=5, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=False, softplus=True, has_h0=False, out_dtype=None, seed=0)
    kw = build(case, DEVICE)
    assert kw["delta_bias"] is None
    y = selective_scan(**kw)
    assert biases and all(b.dtype == torch.float32 and b.shape == (8,) and not b.any() for b in biases)
    with_zeros = selective_scan(**{**kw, "delta_bias": torch.zeros(8, device=DEVICE)})
    assert torch.equal(y, with_zeros)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    calls = reference_calls(monkeypatch, scan, "selective_scan_int8_reference")
    case = dict(batch=1, d_inner=4, d_state=4, L=3, kind={n: "float32" for n in ACT_NAMES}, layout="contiguous",
                has_D=True, has_z=False, has_bias=False, softplus=True, has_h0=False, out_dtype=None, seed=0)
    y = selective_scan(**build(case, "cpu"))
    assert calls == [1] and y.stride() == (12, 1, 4)


@needs_kernel
def test_scale_changed_in_place_takes_effect():
    case = dict(batch=2, d_inner=20, d_state=8, L=6, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=False, out_dtype=torch.float32, seed=3)
    kw = build(case, DEVICE)
    first = selective_scan(**kw)
    for name in ACT_NAMES:
        kw[f"{name}_scale"].mul_(1.5)
    second = selective_scan(**kw)
    assert not torch.equal(first, second)
    mag, _ = magnitudes(kw)
    assert_close_scan(second, ref_call(kw), mag)


@needs_kernel
def test_empty_sequence_passes_state_through():
    case = dict(batch=2, d_inner=5, d_state=4, L=1, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=None, seed=4)
    kw = build(case, DEVICE)
    kw.update({k: kw[k][:, :, :0] for k in ACT_NAMES})
    y, final = selective_scan(**kw, return_final_state=True)
    assert y.shape == (2, 5, 0) and y.dtype == torch.float16
    assert torch.equal(final, kw["initial_state"]) and final.data_ptr() != kw["initial_state"].data_ptr()
    kw["initial_state"] = None
    _, zero = selective_scan(**kw, return_final_state=True)
    assert torch.equal(zero, torch.zeros(2, 5, 4, device=DEVICE))


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
def test_softplus_and_extremes(use_kernel):
    """With A = 0, u = B = C = 1 and a zero state, one step gives y = dt exactly (no rounding in the
    rest of the step), so y is the kernel's softplus itself: checked against float64 over the whole
    range, including the threshold at 20 and inputs where log(1 + e) would lose all precision."""
    device = DEVICE if use_kernel else "cpu"
    fn = selective_scan if use_kernel else selective_scan_int8_reference
    x = torch.tensor([-100.0, -30.0, -17.0, -5.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 19.9, 20.0, 20.01, 50.0, 1e4])
    d = x.numel()
    one = torch.ones(1, d, 1, device=device)
    y = fn(one, x.view(1, d, 1).to(device), torch.zeros(d, 1, device=device), torch.ones(1, 1, 1, device=device),
           torch.ones(1, 1, 1, device=device), out_dtype=torch.float32)
    want = F.softplus(x.double())
    # ~ a few fp32 ulps; CUDA's approximate exp/log may cost a little more.
    # (atol: softplus(-100) = 3.7e-44 is an fp32 subnormal, with few significant bits.)
    torch.testing.assert_close(y.view(-1).cpu().double(), want, rtol=1e-6 if EXACT or not use_kernel else 1e-5,
                               atol=1e-42)
    # Extreme gates stay finite: silu(-1e4) = -0, silu(1e4) = 1e4.
    z = torch.tensor([-1e4, -100.0, -90.0, 0.0, 100.0, 1e4]).view(1, 6, 1).to(device)
    y = fn(torch.ones(1, 6, 1, device=device), torch.zeros(1, 6, 1, device=device), torch.zeros(6, 1, device=device),
           torch.ones(1, 1, 1, device=device), torch.ones(1, 1, 1, device=device), z=z, delta_softplus=False,
           D=torch.ones(6, device=device), out_dtype=torch.float32)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.view(-1).cpu(), F.silu(z.view(-1).cpu()), rtol=1e-6, atol=1e-30)


def _gpu_config_param(config: tuple):
    """A GPU config as a test parameter; the tiled walk's are slow under the interpreter, whose
    tl.associative_scan runs one element at a time in Python (CI still runs them; CUDA runs always)."""
    tiled = config in scan.TILED_GPU_CONFIGS
    marks = [pytest.mark.slow] if tiled and DEVICE != "cuda" else []
    return pytest.param(config, id="x".join(map(str, config)), marks=marks)


@needs_kernel
@pytest.mark.parametrize("config", [_gpu_config_param(c) for c in scan.GPU_CONFIGS + scan.TILED_GPU_CONFIGS])
def test_every_gpu_config(config):
    """Each autotune candidate computes the same scan (tile edges: d_inner not a multiple of any
    BLOCK_D, d_state padded from 12 to 16); under the interpreter too, where they are not tuned."""
    case = dict(batch=2, d_inner=260, d_state=12, L=3, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=None, seed=9)
    kw = build(case, DEVICE)
    with _pinned_config(*config):
        y, final = selective_scan(**kw, return_final_state=True)
    y_ref, final_ref = ref_call(kw, return_final_state=True)
    mag, hmag = magnitudes(kw)
    assert_close_scan(y, y_ref, mag)
    assert_close_scan(final, final_ref, hmag, "final state")


def check_against_reference(kw: dict) -> None:
    """The kernel's output and final state against the reference loop, within the scan tolerance."""
    y, final = selective_scan(**kw, return_final_state=True)
    y_ref, final_ref = ref_call(kw, return_final_state=True)
    mag, hmag = magnitudes(kw)
    assert_close_scan(y, y_ref, mag)
    assert_close_scan(final, final_ref, hmag, "final state")


@needs_kernel
def test_model_sized_channels_match_reference():
    """A model's d_inner takes the default tile for its size (under the interpreter a wide one that
    keeps model-level tests affordable): same contract, ragged last channel block."""
    case = dict(batch=2, d_inner=520, d_state=16, L=5, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=False, softplus=True, has_h0=True, out_dtype=None, seed=11)
    kw = build(case, DEVICE)
    check_against_reference(kw)


@pytest.mark.slow
@needs_kernel
def test_long_sequence_is_stable():
    """Many steps through one program (the loop, not the tile edges): still within tolerance."""
    case = dict(batch=1, d_inner=3, d_state=16, L=300, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=torch.float32, seed=5)
    kw = build(case, DEVICE)
    check_against_reference(kw)


@needs_kernel
# One-step chunks are the costliest case under the interpreter (a carry pass per step): slow.
@pytest.mark.parametrize("chunk_len", [pytest.param(1, marks=pytest.mark.slow), 3, 8, 64])
@pytest.mark.parametrize("one_launch", [True, False], ids=["one launch", "three launches"])
def test_chunked_scan_matches_reference(chunk_len, one_launch, monkeypatch):
    """The scan split into chunks over L (pass 1: each chunk's state from zero and its sum of dt;
    pass 2: the true state entering each chunk; pass 3: each chunk from that state) computes the
    same scan: ragged last chunk, an initial state, a single step per chunk (37 chunks: more than
    one launch takes), and one chunk (64); in one launch (PASS 0) or three."""
    monkeypatch.setattr(scan, "CHUNK_LEN", chunk_len)
    monkeypatch.setattr(scan, "ONE_LAUNCH", one_launch)
    case = dict(batch=2, d_inner=20, d_state=5, L=37, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=torch.float32, seed=12)
    kw = build(case, DEVICE)
    check_against_reference(kw)


@needs_kernel
# The interpreter runs tl.associative_scan one element at a time in Python: few, small tiles.
@pytest.mark.parametrize("tile_t, chunk_len, one_launch", [(4, 8, True), (8, 8, False), (8, 64, True)],
                         ids=["two tiles a chunk, one launch", "one tile a chunk, three launches", "one chunk"])
def test_tiled_walk_matches_reference(tile_t, chunk_len, one_launch, monkeypatch):
    """The walk in tiles of TILE_T steps (the per-channel terms of a tile as one block, its state
    updates scanned along time) computes the same scan: chunks of one and of several tiles, the
    last tile ragged, an initial state, a padded d_state, in every pass."""
    monkeypatch.setattr(scan, "CHUNK_LEN", chunk_len)
    monkeypatch.setattr(scan, "ONE_LAUNCH", one_launch)
    case = dict(batch=2, d_inner=20, d_state=5, L=37, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=torch.float32, seed=13)
    kw = build(case, DEVICE)
    with _pinned_config(16, 1, 1, tile_t):
        check_against_reference(kw)


@pytest.mark.slow
@needs_kernel
@settings(max_examples=6, **SETTINGS)
@given(case=cases(max_l=24), tile_t=st.sampled_from([4, 8]))
def test_tiled_walk_matches_reference_on_any_inputs(case, tile_t):
    """The tiled walk over the property cases' dtypes, layouts and flags (float and mixed inputs, no
    gate, no skip, no softplus, narrow states)."""
    with _pinned_config(16, 1, 1, tile_t):
        check_prefill(case)


def _passes_run(monkeypatch) -> list:
    """The PASS of every chunked-scan launch from now on."""
    passes = []
    launch = scan._launch_chunks
    monkeypatch.setattr(scan, "_launch_chunks", lambda *a: passes.append(a[1]) or launch(*a))
    return passes


@needs_kernel
@pytest.mark.parametrize("chunk_len, one_launch, max_chunk_len, want", [
    (8, True, 64, [0]), (8, False, 64, [1, 3]), (1, True, 64, [1, 3]), (8, True, 4, [1, 3]), (64, True, 64, [3]),
], ids=["5 chunks", "5 chunks, switched off", "37 chunks", "chunks too long", "one chunk"])
def test_which_passes_run(chunk_len, one_launch, max_chunk_len, want, monkeypatch):
    """With ONE_LAUNCH, one launch from 2 to ONE_LAUNCH_MAX_CHUNKS chunks of up to
    ONE_LAUNCH_MAX_CHUNK_LEN steps, else passes 1-3; passes 1-3 without it; pass 3 alone for one
    chunk."""
    monkeypatch.setattr(scan, "CHUNK_LEN", chunk_len)
    monkeypatch.setattr(scan, "ONE_LAUNCH", one_launch)
    monkeypatch.setattr(scan, "ONE_LAUNCH_MAX_CHUNK_LEN", max_chunk_len)
    kw = build(dict(batch=1, d_inner=20, d_state=5, L=37, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                    has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=False, out_dtype=torch.float32,
                    seed=3), DEVICE)
    passes = _passes_run(monkeypatch)
    selective_scan(**kw)
    assert passes == want


def _prefill_with_projection(batch: int, d_inner: int, L: int, rank: int, per_channel: bool, has_bias: bool,
                              seed: int, device: str | None = DEVICE):
    """A prefill's int8 inputs but delta (graph layouts) and a DeltaProjection whose x is the dt
    slice of an x_proj-like `[batch, L, rank + 7]` output, as in the lowered graph."""
    kw = build(dict(batch=batch, d_inner=d_inner, d_state=5, L=L, kind={n: "int8" for n in ACT_NAMES},
                    layout="graph", has_D=True, has_z=True, has_bias=False, softplus=True, has_h0=True,
                    out_dtype=torch.float16, seed=seed), device)
    del kw["delta"], kw["delta_scale"]
    gen = torch.Generator().manual_seed(seed + 1)
    xdbl = torch.randint(-128, 128, (batch, L, rank + 7), dtype=torch.int8, generator=gen)
    proj = DeltaProjection(
        x=xdbl[:, :, :rank].to(device), x_scale=torch.tensor(0.05, device=device),
        weight=torch.randint(-128, 128, (d_inner, rank), dtype=torch.int8, generator=gen).to(device),
        weight_scale=(torch.rand(d_inner if per_channel else 1, generator=gen) * 4e-3 + 1e-4).to(device),
        bias=(torch.rand(d_inner, generator=gen) * 4 - 5).to(device) if has_bias else None,
        out_scale=torch.tensor(0.04, device=device),
    )
    return kw, proj


_TWO_RANK_STEPS = (2, 20, 37, True, True)  # two rank steps, a partial channel block
_RANK_ONE = (1, 33, 1, False, False)  # rank 1, one weight scale, no bias
_WALKS = {"one launch": (8, True), "three launches": (8, False), "one chunk": (64, True)}


def _fold_case(shape: tuple, walk: str, slow: bool = False):
    return pytest.param(*_WALKS[walk], *shape, id=f"{walk}-{'x'.join(map(str, shape[:3]))}",
                        marks=[pytest.mark.slow] if slow else [])


@needs_kernel
@pytest.mark.parametrize("chunk_len, one_launch, batch, d_inner, rank, per_channel, has_bias", [
    # Each walk and each shape in the fast suite; the other three pairs (~20 s interpreted) are slow.
    _fold_case(_TWO_RANK_STEPS, "one launch", slow=True),
    _fold_case(_RANK_ONE, "three launches"),
    _fold_case(_RANK_ONE, "one chunk"),
    _fold_case(_TWO_RANK_STEPS, "three launches", slow=True),
    _fold_case(_TWO_RANK_STEPS, "one chunk", slow=True),
    _fold_case(_RANK_ONE, "one launch", slow=True),
])
def test_dt_proj_in_the_prefill_kernel_equals_the_gemm_then_the_scan(chunk_len, one_launch, batch, d_inner, rank,
                                                                      per_channel, has_bias, monkeypatch):
    """The prefill kernel computes dt_proj's int8 output itself (the program that walks a chunk
    first: pass 1's part, or pass 3's on the last chunk) and scans the same delta bits as the GEMM
    would give it: ragged chunks (37 steps), a partial last tile of 16 steps."""
    monkeypatch.setattr(scan, "CHUNK_LEN", chunk_len)
    monkeypatch.setattr(scan, "ONE_LAUNCH", one_launch)
    if DEVICE == "cuda":  # the fixture's one config has 8 channels a program; the dot takes 16 or more
        _force_config(16, 1, 2)
    kw, proj = _prefill_with_projection(batch, d_inner, 37, rank, per_channel, has_bias, seed=rank + d_inner)
    plain = selective_scan(**kw, delta=proj.delta().transpose(1, 2), delta_scale=proj.out_scale,
                           return_final_state=True)
    allocate = scan._prefill_delta_buffer

    def poisoned(*args):  # every delta the scan reads must be one the kernel wrote
        buffer, scale = allocate(*args)
        return buffer.fill_(77), scale

    with monkeypatch.context() as m:
        m.setattr(DeltaProjection, "delta", lambda self: pytest.fail("the projection ran as its own GEMM"))
        m.setattr(scan, "_prefill_delta_buffer", poisoned)
        fused = selective_scan(**kw, delta=None, delta_proj=proj, return_final_state=True)
    for got, want in zip(fused, plain):
        if EXACT:
            assert torch.equal(got, want)
        else:  # two compilations of the walk may contract its FMAs differently
            torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-10, atol=1e-5)


def test_the_prefill_reference_with_a_projection_is_the_reference_with_its_delta(monkeypatch):
    monkeypatch.setattr(scan, "_use_triton", lambda t: False)
    kw, proj = _prefill_with_projection(2, 9, 11, 13, True, True, seed=6, device="cpu")
    fused = selective_scan(**kw, delta=None, delta_proj=proj)
    plain = selective_scan(**kw, delta=proj.delta().transpose(1, 2), delta_scale=proj.out_scale)
    assert torch.equal(fused, plain)


@pytest.mark.parametrize("cached", [False, True], ids=["op", "cached op"])
def test_the_prefill_projection_ops_pass_opcheck(cached):
    """The graph ops of the fold (`selective_scan_int8_dt_proj` and its cached form): schema,
    fake tensor (y's `[B, L, D]` layout) and autograd registration agree with the real op."""
    kw, proj = _prefill_with_projection(1, 9, 5, 3, True, True, seed=2, device="cpu")
    args = [kw["u"], kw["u_scale"], proj.x, proj.x_scale, proj.weight, proj.weight_scale, proj.bias, proj.out_scale,
            kw["A"], kw["B"], kw["B_scale"], kw["C"], kw["C_scale"], kw["D"], kw["z"], kw["z_scale"], None, True,
            torch.float16]
    op = torch.ops.quamba.selective_scan_int8_dt_proj.default
    if cached:
        op = torch.ops.quamba.selective_scan_int8_dt_proj_cached.default
        args += [torch.zeros(1, 9, 5), False]
    torch.library.opcheck(op, tuple(args))


def test_a_prefill_projection_over_no_steps_passes_the_state_through():
    kw, proj = _prefill_with_projection(2, 9, 0, 5, True, True, seed=1)
    y, final = selective_scan(**kw, delta=None, delta_proj=proj, return_final_state=True)
    assert y.shape == (2, 9, 0) and torch.equal(final, kw["initial_state"])


def test_a_prefill_projection_of_the_wrong_shape_is_refused():
    kw, proj = _prefill_with_projection(2, 9, 11, 13, True, True, seed=6, device="cpu")
    with pytest.raises(ValueError, match=r"delta_proj must be a DeltaProjection whose x is int8 \[batch=2, L=11, R\]"):
        selective_scan(**kw, delta=None, delta_proj=replace(proj, x=proj.x[:, 0]))
    with pytest.raises(ValueError, match=r"delta_proj.weight must be int8 \[d_inner, R\] = \(9, 13\)"):
        selective_scan(**kw, delta=None, delta_proj=replace(proj, weight=proj.weight[:, :5]))
    with pytest.raises(ValueError, match="with delta_proj, delta and delta_scale must be None"):
        selective_scan(**kw, delta=proj.delta().transpose(1, 2), delta_scale=proj.out_scale, delta_proj=proj)


# Over 10 s on the oldest CI leg (2 cores, Triton 3.6's interpreter): CI's slow run keeps it.
@pytest.mark.slow
@needs_kernel
def test_one_launch_leaves_its_scratch_zero_and_repeats_bit_for_bit(monkeypatch):
    """The tickets, flags and counters are back at zero after each launch (a CUDA graph replays the
    launch on the same scratch), and a second call gives the same bits: the entering states are
    folded in a fixed order, whatever order the programs ran in."""
    monkeypatch.setattr(scan, "CHUNK_LEN", 4)
    monkeypatch.setattr(scan, "ONE_LAUNCH", True)
    kw = build(dict(batch=2, d_inner=20, d_state=5, L=37, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                    has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=torch.float32,
                    seed=4), DEVICE)
    passes = _passes_run(monkeypatch)
    first = selective_scan(**kw, return_final_state=True)
    sync = split_k.scratch(torch.device(DEVICE), 0, scan._sync_words(2, 20))[1]
    assert passes == [0] and not sync.any()
    second = selective_scan(**kw, return_final_state=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and not sync.any()


def test_chunk_len_rule(monkeypatch):
    """The GPU rule: one chunk once the channels fill the device; otherwise chunks enough for about
    TARGET_THREADS (within the factor 2 of a power-of-two length), within the length limits."""
    monkeypatch.setattr(scan, "_INTERPRET", False)
    monkeypatch.setattr(scan, "CHUNK_LEN", None)
    assert scan._chunk_len(8, 5120, 2048) >= 2048
    for batch, d_inner, L in [(1, 5120, 2048), (1, 1536, 2048), (2, 768, 2048), (1, 768, 10**6), (1, 40, 5)]:
        chunk = scan._chunk_len(batch, d_inner, L)
        n_chunks = -(-L // chunk)
        assert chunk >= scan.MIN_CHUNK_LEN and n_chunks <= scan.MAX_CHUNKS, (batch, d_inner, L, chunk)
        assert (2 * batch * d_inner * n_chunks >= scan.TARGET_THREADS or chunk == scan.MIN_CHUNK_LEN
                or n_chunks == scan.MAX_CHUNKS or n_chunks == 1), (batch, d_inner, L, chunk)
        assert n_chunks == 1 or n_chunks >= scan.MIN_CHUNKS, (batch, d_inner, L, chunk)
    # Short prompts on 2.8b's 5120 channels: short chunks (the fastest measured on an H200).
    assert scan._chunk_len(1, 5120, 128) == 16
    assert scan._chunk_len(1, 5120, 512) == 32
    # Two chunks would be no shorter a chain than one: run as one.
    monkeypatch.setattr(scan, "MIN_CHUNK_LEN", 64)
    assert scan._chunk_len(1, 5120, 128) >= 128


# ---------------------------------------------------------------------------------------------
# Reference: the dequantization contract, in one place
# ---------------------------------------------------------------------------------------------


def test_reference_dequantizes_then_calls_the_oracle():
    case = dict(batch=2, d_inner=6, d_state=4, L=7, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=torch.float32, seed=6)
    kw = build(case, "cpu")
    y, final = selective_scan_int8_reference(**kw, return_final_state=True)
    deq = {n: kw[n].float() * kw[f"{n}_scale"] for n in ACT_NAMES}
    y2, final2 = qops.selective_scan_reference(deq["u"], deq["delta"], kw["A"], deq["B"], deq["C"], kw["D"],
                                               deq["z"], kw["delta_bias"], True, kw["initial_state"])
    assert torch.equal(y, y2) and torch.equal(final, final2)
    assert y.stride() == (7 * 6, 1, 6)
    # A narrow state: read as fp32, the final one rounded to nearest even (torch's own cast).
    for dtype in (torch.float16, torch.bfloat16):
        h0 = kw["initial_state"].to(dtype)
        y3, final3 = selective_scan_int8_reference(**{**kw, "initial_state": h0}, return_final_state=True)
        y4, final4 = qops.selective_scan_reference(deq["u"], deq["delta"], kw["A"], deq["B"], deq["C"], kw["D"],
                                                   deq["z"], kw["delta_bias"], True, h0.float())
        assert final3.dtype == dtype and torch.equal(final3, final4.to(dtype)) and torch.equal(y3, y4)
        _, final5 = selective_scan_int8_reference(**kw, return_final_state=True, state_dtype=dtype)
        assert torch.equal(final5, final2.to(dtype))
    # Default output dtype: fp16 for int8 inputs.
    kw["out_dtype"] = None
    assert selective_scan_int8_reference(**kw).dtype == torch.float16


def test_reference_state_update_advances_in_place():
    case = dict(batch=2, d_inner=6, d_state=4, L=3, kind={n: "bfloat16" for n in ACT_NAMES}, layout="contiguous",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=None, seed=7)
    kw = build(case, "cpu")
    y_all, final = selective_scan_int8_reference(**kw, return_final_state=True)
    state = kw["initial_state"].clone()
    rest = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state",)}
    for t in range(3):
        y_t = selective_state_update_reference(state, **{k: kw[k][:, :, t] for k in ACT_NAMES}, **rest)
        assert y_t.dtype == torch.bfloat16
        assert torch.equal(y_t, y_all[:, :, t])
    assert torch.equal(state, final)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
def test_reference_state_update_rounds_a_narrow_state_each_step(state_dtype):
    """Each step reads the state as fp32 and stores it rounded to nearest even: the fp32 step from
    the same values, rounded (what the kernel does, and mamba_ssm with its fp16 state)."""
    case = dict(batch=2, d_inner=6, d_state=4, L=3, kind={n: "int8" for n in ACT_NAMES}, layout="contiguous",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=True, out_dtype=None, seed=7,
                state_dtype=state_dtype)
    kw = build(case, "cpu")
    state = kw["initial_state"].clone()
    rest = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state",)}
    for t in range(3):
        tok = {k: kw[k][:, :, t] for k in ACT_NAMES}
        wide = state.float()
        y_wide = selective_state_update_reference(wide, **tok, **rest)
        y_t = selective_state_update_reference(state, **tok, **rest)
        assert state.dtype == state_dtype and torch.equal(y_t, y_wide)
        assert torch.equal(state, wide.to(state_dtype)) and not torch.equal(state.float(), wide)


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _good_prefill() -> dict:
    case = dict(batch=2, d_inner=4, d_state=3, L=5, kind={n: "int8" for n in ACT_NAMES}, layout="graph",
                has_D=True, has_z=True, has_bias=True, softplus=True, has_h0=False, out_dtype=None, seed=8)
    return build(case, "cpu")


I8 = dict(dtype=torch.int8)
PREFILL_ERRORS = [
    (dict(u=torch.zeros(2, 4, **I8)), r"u must be \[batch, d_inner, L\], got shape \(2, 4\)"),
    (dict(u="x"), r"u must be a torch.Tensor"),
    (dict(delta=torch.zeros(2, 4, 6, **I8)), r"delta must have shape \(2, 4, 5\), got \(2, 4, 6\)"),
    (dict(B=torch.zeros(2, 4, 5, **I8)), r"B must have shape \(2, 3, 5\)"),
    (dict(C=torch.zeros(2, 3, 5, dtype=torch.int32)), r"C must be int8 \(with C_scale\) or float16/bfloat16/float32"),
    (dict(u_scale=None), r"u is int8, so u_scale \(its per-tensor fp32 scale\) is required"),
    (dict(z_scale=0.1), r"z_scale must be a 0-dim or 1-element float32 tensor"),
    (dict(B_scale=torch.tensor([0.1, 0.2])), r"B_scale must be a 0-dim or 1-element float32 tensor"),
    (dict(delta_scale=torch.tensor(0.1, dtype=torch.float64)), r"delta_scale must be .*float32"),
    (dict(u=torch.zeros(2, 4, 5)), r"u is torch.float32, not int8, so u_scale must be None"),
    (dict(z=None), r"z_scale was given but z is None"),
    (dict(A=torch.zeros(4, 3, dtype=torch.float16)), r"A must be a float32 tensor of shape \(4, 3\)"),
    (dict(A=torch.zeros(5, 3)), r"A must be a float32 tensor of shape \(4, 3\)"),
    (dict(A=torch.zeros(4)), r"A must be a float32 \[d_inner, d_state\] tensor"),
    (dict(A=torch.zeros(4, 300), B=torch.zeros(2, 300, 5, **I8), C=torch.zeros(2, 300, 5, **I8)),
     r"d_state \(A.shape\[1\]\) must be in 1..256, got 300"),
    (dict(D=torch.zeros(5)), r"D must be None or a float32 tensor of shape \(4,\)"),
    (dict(delta_bias=torch.zeros(4, dtype=torch.float16)), r"delta_bias must be None or a float32 tensor"),
    (dict(initial_state=torch.zeros(2, 4, 4)),
     r"initial_state must be a float16/bfloat16/float32 tensor of shape .* = \(2, 4, 3\)"),
    (dict(initial_state=torch.zeros(2, 4, 3, dtype=torch.float64)),
     r"initial_state must be a float16/bfloat16/float32 tensor .* got torch.float64"),
    (dict(state_dtype=torch.int8), r"state_dtype must be None, float16, bfloat16 or float32, got torch.int8"),
    (dict(out_dtype=torch.int8), r"out_dtype must be None, float16, bfloat16 or float32"),
]


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_int8_reference])
@pytest.mark.parametrize("override,match", PREFILL_ERRORS)
def test_prefill_rejects_bad_inputs(fn, override, match):
    kwargs = {**_good_prefill(), **override}
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


UPDATE_ERRORS = [
    (dict(state=torch.zeros(2, 4, 3, dtype=torch.float64)),
     r"state must be a float16/bfloat16/float32 tensor of shape .* got torch.float64"),
    (dict(state=torch.zeros(2, 4, 3, dtype=torch.int8)), r"state must be a float16/bfloat16/float32 tensor"),
    (dict(state=torch.zeros(2, 4, 5)),
     r"state must be a float16/bfloat16/float32 tensor of shape \[batch, d_inner, d_state\] = \(2, 4, 3\)"),
    (dict(u=torch.zeros(2, 4, 1, **I8)), r"u must be \[batch, d_inner\], got shape \(2, 4, 1\)"),
    (dict(B=torch.zeros(2, 4, **I8)), r"B must have shape \(2, 3\)"),
    (dict(C_scale=None), r"C is int8, so C_scale .* is required"),
]


@pytest.mark.parametrize("fn", [selective_state_update, selective_state_update_reference])
@pytest.mark.parametrize("override,match", UPDATE_ERRORS)
def test_update_rejects_bad_inputs(fn, override, match):
    kw = _good_prefill()
    kwargs = {k: v for k, v in kw.items() if k not in ACT_NAMES + ("initial_state",)}
    kwargs.update({k: kw[k][:, :, 0] for k in ACT_NAMES})
    kwargs["state"] = torch.zeros(2, 4, 3)
    kwargs.update(override)
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


@triton.jit
def _channel_math_kernel(x_ptr, softplus_ptr, silu_ptr, n, FAST_MATH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(softplus_ptr + offs, scan._softplus(x, FAST_MATH), mask=mask)
    tl.store(silu_ptr + offs, scan._silu(x, FAST_MATH), mask=mask)


@needs_kernel
@pytest.mark.parametrize("fast", [False, True])
def test_the_softplus_and_gate_are_within_ulps_of_float64(fast):
    # Every x the scan may see from -30 to 25, densely around the series' switch (e = 1/8, x = -2.08)
    # and torch's threshold (20). The interpreter runs the same formulas without PTX: there `fast`
    # changes nothing; on CUDA it takes MUFU's ex2 / lg2 / rcp (scan.FAST_MATH's path).
    if fast and DEVICE == "cpu":
        pytest.skip("MUFU's approximations run on CUDA only")
    x = torch.cat([torch.linspace(-30, 25, 20001), torch.linspace(-2.2, -1.9, 4001), torch.linspace(19.9, 20.1, 401)])
    x = x.to(DEVICE)
    softplus, silu = torch.empty_like(x), torch.empty_like(x)
    _channel_math_kernel[(triton.cdiv(x.numel(), 1024),)](x, softplus, silu, x.numel(), FAST_MATH=fast, BLOCK=1024)
    x64 = x.double()
    want_softplus = torch.where(x64 > 20, x64, torch.log1p(torch.exp(x64)))
    want_silu = x64 * torch.sigmoid(x64)
    # Bounds in units of 2^-24, element by element: a few for the formulas, plus |x| because on
    # CUDA every exp (tl.exp too) is ex2 of x * log2(e) rounded to fp32, a relative error up to
    # about |x| * 2^-24 in exp(x) that carries into log1p(e) and the gate's factor; MUFU's lg2
    # adds up to 2^-20 (16 units) just above the series' switch. libdevice's path took 1.014 times
    # |x| + 8 units on an H100 (session 43; the interpreter stays under that): 10.
    units = 2.0**-24 * (x64.abs().clamp_max(20.0) + (20.0 if fast else 10.0))
    softplus_err = (softplus.double() - want_softplus).abs() / want_softplus.abs()
    # SiLU: relative to |x| (the gate is x times a factor in (0, 1); near its zero the factor's
    # error is what matters).
    silu_err = (silu.double() - want_silu).abs() / x64.abs().clamp_min(1e-30)
    assert torch.all(softplus_err <= units), float((softplus_err / units).max())
    assert torch.all(silu_err <= units), float((silu_err / units).max())
