"""The optional C++/CUDA extension backend ("ext") against the torch backend and the reference.

Skips cleanly when the extension cannot be built here (no compiler, no ninja,
PNP_KERNELS_NO_EXT=1); the loader's own fast failure path is tested regardless.
"""
import os
import subprocess
import sys

import pytest
import torch

from pnp_kernels import pnp_loss
from pnp_kernels.backends import ext
from pnp_kernels.backends import torch as torch_backend
from pnp_kernels.reference import pnp_loss_reference
from pnp_kernels.variants import VARIANTS

VARIANT_NAMES = tuple(VARIANTS)

needs_ext = pytest.mark.skipif(not ext.is_available(), reason=f"ext backend unavailable: {ext.why_unavailable()}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ext.is_available() and not ext.cuda_status() else [])


def _segments(labels):
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, side="left", out_int32=True)
    hi = torch.searchsorted(sorted_labels, sorted_labels, side="right", out_int32=True)
    return lo, hi, perm


def _labels(kind, B, gen):
    if kind == "grouped":
        return torch.arange(B // 4).repeat_interleave(4)[:B]
    if kind == "random":
        return torch.randint(0, max(1, B // 3), (B,), generator=gen)
    if kind == "singletons":  # some singletons (dropped queries) among real classes
        lab = torch.randint(0, max(1, B // 4), (B,), generator=gen)
        lab[: B // 3] = torch.arange(1000, 1000 + B // 3)
        return lab
    if kind == "one_class":
        return torch.zeros(B, dtype=torch.int64)
    if kind == "all_distinct":
        return torch.arange(B)
    if kind == "big_class":  # a class larger than the kernels' positive chunks (8 CUDA, 16 CPU)
        lab = torch.randint(1, 6, (B,), generator=gen)
        lab[: 40] = 0
        return lab
    raise ValueError(kind)


def _block(kind, B, dtype, seed, D=16, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    labels = _labels(kind, B, gen)
    lo, hi, perm = _segments(labels)
    X = torch.nn.functional.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1) * scale
    Xs = X[perm]
    S = (Xs @ Xs.t()).to(dtype)
    return S.double(), S, lo, hi  # the float64 oracle sees exactly the kernel's input


def _rel(a, r):
    a, r = a.detach().double().cpu(), r.detach().double().cpu()
    return float((a - r).norm() / r.norm().clamp_min(1e-300))


def test_loader_never_raises_and_is_cached():
    reason = ext.why_unavailable()
    assert isinstance(reason, str)
    assert ext.is_available() == (reason == "")
    assert ext.why_unavailable() == reason  # cached
    info = ext.build_info()
    assert info["ok"] == ext.is_available()


def test_disabled_by_env_is_fast_and_import_never_builds(tmp_path):
    code = (
        "import time, sys; t = time.perf_counter();"
        "import pnp_kernels; from pnp_kernels.backends import ext;"
        "assert ext._state is None, 'import must not build';"
        "r = ext.why_unavailable(); assert 'PNP_KERNELS_NO_EXT' in r, r;"
        "assert 'ext' not in pnp_kernels.available_backends();"
        "print('ok')"
    )
    env = dict(os.environ, PNP_KERNELS_NO_EXT="1", PNP_KERNELS_EXT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing built


def test_missing_sources_reason(monkeypatch):
    monkeypatch.setattr(ext, "source_dir", lambda: None)
    assert "csrc" in ext._quick_reason(ext.source_dir())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["grouped", "random", "singletons", "one_class", "all_distinct", "big_class"])
def test_rows_forward_matches_torch_backend(device, dtype, kind):
    B = 70 if kind != "grouped" else 64
    S64, S, lo, hi = _block(kind, B, dtype, seed=sum(map(ord, kind)))
    S, lo_d, hi_d = S.to(device), lo.to(device), hi.to(device)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name in VARIANT_NAMES:
        v = VARIANTS[name]
        ref_l, ref_G = torch_backend.rows_forward(S64, lo, hi, v, 0.05, 1.5, 2.0, True)
        loss, G = ext.rows_forward(S, lo_d, hi_d, v, 0.05, 1.5, 2.0, True)
        assert loss.dtype == dtype and G.dtype == dtype and G.shape == S.shape
        assert torch.isfinite(loss).all() and torch.isfinite(G).all()
        assert _rel(loss, ref_l) <= tol, (name, _rel(loss, ref_l))
        assert _rel(G, ref_G) <= tol, (name, _rel(G, ref_G))
        dropped = (hi - lo) < 2
        assert (loss.cpu()[dropped] == 0).all() and (G.cpu()[dropped] == 0).all()
        loss2, G2 = ext.rows_forward(S, lo_d, hi_d, v, 0.05, 1.5, 2.0, False)
        assert G2 is None
        assert torch.equal(loss2, loss)  # the same kernel arithmetic with or without G
        loss3, G3 = ext.rows_forward(S, lo_d, hi_d, v, 0.05, 1.5, 2.0, True)
        assert torch.equal(loss3, loss) and torch.equal(G3, G)  # deterministic


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_similarities_never_nan(device, dtype):
    # tau = 1e-3 with dot similarities of norm 30: |z| up to ~1e6, far past exp overflow
    S64, S, lo, hi = _block("random", 50, dtype, seed=3, scale=30.0)
    for name in VARIANT_NAMES:
        v = VARIANTS[name]
        loss, G = ext.rows_forward(S.to(device), lo.to(device), hi.to(device), v, 1e-3, 1.0, 2.0, True)
        assert torch.isfinite(loss).all() and torch.isfinite(G).all()
        ref_l, ref_G = torch_backend.rows_forward(S64, lo, hi, v, 1e-3, 1.0, 2.0, True)
        assert _rel(loss, ref_l) <= 1e-5


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_forward_large_row(device, dtype):
    # many negatives per row: float partial sums must stay accurate
    S64, S, lo, hi = _block("random", 1500, dtype, seed=5, D=8)
    v = VARIANTS["Dq"]
    ref_l, ref_G = torch_backend.rows_forward(S64, lo, hi, v, 0.01, 1.0, 2.0, True)
    loss, G = ext.rows_forward(S.to(device), lo.to(device), hi.to(device), v, 0.01, 1.0, 2.0, True)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _rel(loss, ref_l) <= tol and _rel(G, ref_G) <= tol


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_forward_strided_block(device, dtype):
    # a (queries x gallery) block that is a row slice with a row stride > n
    S64, S, lo, hi = _block("random", 40, dtype, seed=7)
    big = torch.zeros(40, 55, dtype=dtype)
    big[:, :40] = S
    view = big[:, :40].to(device)
    v = VARIANTS["Ds"]
    a = ext.rows_forward(view, lo.to(device), hi.to(device), v, 0.05, 1.0, 2.0, True)
    b = ext.rows_forward(view.contiguous(), lo.to(device), hi.to(device), v, 0.05, 1.0, 2.0, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 31, 33, 100])
def test_symmetric_grad_matches_torch_backend(device, dtype, n):
    gen = torch.Generator().manual_seed(n)
    G = torch.randn(n, n, generator=gen, dtype=dtype)
    g = torch.randn(n, generator=gen, dtype=dtype)
    H = ext.symmetric_grad(G.to(device), g.to(device))
    ref = torch_backend.symmetric_grad(G, g)
    assert H.dtype == dtype
    # two products and a sum per element: exact on the CPU, one rounding apart where the
    # compiler contracts a*b + c*d into a fused multiply-add (nvcc does)
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=4 * eps, atol=4 * eps * float(ref.abs().max()))
    torch.testing.assert_close(H.cpu(), ref, **tol)
    # a broadcast weight vector (what the "mean" reduction hands in) works too
    gm = torch.tensor(0.25, dtype=dtype).expand(n)
    torch.testing.assert_close(ext.symmetric_grad(G.to(device), gm.to(device)).cpu(),
                               torch_backend.symmetric_grad(G, gm), **tol)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("kind", ["random", "singletons", "one_class"])
def test_pnp_loss_end_to_end_vs_reference(device, variant, similarity, kind):
    gen = torch.Generator().manual_seed(11)
    B, D = 48, 12
    labels = _labels(kind, B, gen)
    E64 = torch.randn(B, D, generator=gen, dtype=torch.float64)
    if similarity == "dot":
        E64 = E64 / E64.norm(dim=1, keepdim=True) * 1.3
    kw = dict(variant=variant, anneal=0.05, alpha=1.5, b=2.0, similarity=similarity)
    Er = E64.clone().requires_grad_(True)
    ref = pnp_loss_reference(Er, labels, **kw)
    ref.backward()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        E = E64.to(device, dtype).requires_grad_(True)
        loss = pnp_loss(E, labels.to(device), backend="ext", **kw)
        loss.backward()
        assert loss.dtype == dtype and E.grad.dtype == dtype
        assert torch.isfinite(loss) and torch.isfinite(E.grad).all()
        assert abs(loss.item() - ref.item()) <= tol * max(abs(ref.item()), 1e-3), (dtype, loss.item(), ref.item())
        assert _rel(E.grad, Er.grad) <= tol or float(Er.grad.norm()) == 0.0, (dtype, _rel(E.grad, Er.grad))
        if float(Er.grad.norm()) == 0.0:
            assert float(E.grad.norm()) == 0.0


@needs_ext
def test_reduction_none_and_deterministic():
    gen = torch.Generator().manual_seed(2)
    B = 96
    labels = _labels("random", B, gen)
    E = torch.randn(B, 32, generator=gen).requires_grad_(True)
    out = pnp_loss(E, labels, backend="ext", reduction="none", variant="Dq")
    ref = pnp_loss(E.detach().double(), labels, backend="torch", reduction="none", variant="Dq")
    assert out.shape == (B,)
    assert _rel(out, ref) <= 1e-5
    grads = []
    for _ in range(2):
        E.grad = None
        pnp_loss(E, labels, backend="ext", variant="Dq").backward()
        grads.append(E.grad.clone())
    assert torch.equal(grads[0], grads[1])


@needs_ext
def test_errors_are_clear():
    S = torch.randn(4, 4)
    lo = torch.zeros(4, dtype=torch.int32)
    hi = torch.full((4,), 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="float32 or float64"):
        ext.rows_forward(S.half(), lo, hi, VARIANTS["O"], 0.1, 1.0, 2.0, False)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.rows_forward(S, lo, hi + 1, VARIANTS["O"], 0.1, 1.0, 2.0, False)


@needs_ext
def test_kernel_level_segment_check():
    """The C++ op validates segments itself too (called directly, bypassing the wrapper).

    Run in a subprocess: on the GPU machine (torch 2.11+cu130, g++ 13, CUDA build) this
    direct call was seen to end in a segfault instead of a RuntimeError; a subprocess turns
    that into one failed test instead of a crashed test session."""
    code = (
        "import torch; from pnp_kernels.backends import ext; assert ext.is_available();"
        "ops = torch.ops.pnp_kernels_ext\n"
        "try:\n"
        "    ops.rows_forward(torch.randn(4, 4), torch.zeros(4, dtype=torch.int32),"
        " torch.full((4,), 5, dtype=torch.int32), 0, 0.1, 1.0, 2.0, False)\n"
        "except RuntimeError as e:\n"
        "    assert 'out of range' in str(e), e; print('raised')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "raised" in out.stdout, (out.returncode, out.stdout, out.stderr[-2000:])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fused_pipeline_matches_staged_pipeline(device, cosine, mean, dtype):
    """ext's one-op forward/backward (csrc/pnp_pipeline.cpp) against the same ext kernels driven by
    the PyTorch stages of pipeline.py: identical segments and permutation, and loss, saved tensors
    and gradient equal to rounding (the C++ stages order a few reductions differently)."""
    from pnp_kernels import pipeline

    gen = torch.Generator().manual_seed(21)
    B, D = 37, 10
    labels = _labels("singletons", B, gen).to(device)
    E = (torch.randn(B, D, generator=gen) * 1.7).to(device, dtype)
    E[3] = 0  # a zero-norm row: the eps branch of the normalisation
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    v = VARIANTS["Dq"]
    out, prep, n_valid, G = ext.loss_forward(E, labels, v, 0.05, 1.5, 2.0, cosine, mean, True)

    sprep = pipeline.prepare(E, labels, cosine, cdt)
    per_row, sG = ext.rows_forward(sprep.Xs @ sprep.Xs.t(), sprep.lo, sprep.hi, v, 0.05, 1.5, 2.0, True)
    sout, sn_valid = pipeline.finalize(per_row, sprep, mean)
    for name in ("perm", "lo", "hi"):
        assert torch.equal(getattr(prep, name), getattr(sprep, name)), name
    tol = 1e-12 if cdt == torch.float64 else 1e-6
    assert out.dtype == cdt and out.shape == sout.shape
    assert float(n_valid) == float(sn_valid)
    torch.testing.assert_close(out, sout, rtol=tol, atol=tol)
    torch.testing.assert_close(prep.Xs, sprep.Xs, rtol=tol, atol=tol)
    torch.testing.assert_close(prep.denom, sprep.denom, rtol=tol, atol=tol)
    torch.testing.assert_close(G, sG, rtol=tol, atol=tol)

    grad_out = (torch.rand(out.shape, generator=gen) + 0.5).to(device, cdt)
    dE = ext.loss_backward(grad_out, prep, n_valid, G, cosine, mean, dtype)
    H = pipeline.symmetric_grad_from(ext, sG, grad_out, sprep, sn_valid, mean)
    sdE = pipeline.unprepare(H @ sprep.Xs, sprep, cosine, dtype)
    assert dE.dtype == dtype and dE.shape == E.shape
    assert torch.isfinite(dE).all()
    scale = float(sdE.double().abs().max())
    torch.testing.assert_close(dE.double(), sdE.double(), rtol=0, atol=max(scale, 1e-30) * (1e-3 if dtype == torch.float16 else tol * 10))
