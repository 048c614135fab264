"""The C++/CUDA extension's ops (torch.ops.pnp_kernels_ext) and its loader.

* row_losses_and_dS, every loss kind and variant, against the float64 oracle
  ``reference.row_losses_reference`` (dS by autograd through it), with own columns inside,
  outside and absent from the segments (Recall@k leaves them out; the others ignore them);
* symmetrize against plain torch;
* loss_forward / loss_backward against the same pipeline composed of plain torch
  ops around the extension's rows op, and against the end-to-end references;
* the loader: build log, fast failure paths, errors of the ops.

The module skips when the extension cannot be built here, unless
PNP_KERNELS_REQUIRE_BACKENDS lists "ext": then it fails.
"""

import functools
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pnp_kernels.backends import ext_build
from pnp_kernels.reference import (
    pnp_loss_reference,
    recall_at_k_loss_reference,
    row_losses_reference,
    smooth_ap_loss_reference,
)
from pnp_kernels.spec import HALF_MAX, NORM_EPS
from pnp_kernels.variants import LOSS_KINDS, LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, VARIANTS

from conftest import REQUIRED_BACKENDS


def _require_ext():
    """Skip the module where the extension is unavailable, fail where it is required."""
    reason = ext_build.why_unavailable()
    if not reason:
        return
    if "ext" in REQUIRED_BACKENDS:
        pytest.fail(
            f"backend 'ext' is required (PNP_KERNELS_REQUIRE_BACKENDS) but unavailable: {reason}", pytrace=False
        )
    pytest.skip(f"backend 'ext' unavailable here: {reason}", allow_module_level=True)


_require_ext()

OPS = ext_build.ops()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not ext_build.cuda_status() else [])
KINDS = tuple(LOSS_KINDS.items())  # (name, code)
TAU, ALPHA, B_IB = 0.05, 1.5, 2.0
# Recall@k's k values (any order) and tau2_k: k = 2 (a wide tau2) clips (s_k >= k) in the large classes
KS, K_TEMPS = [4.0, 1.0, 2.0, 8.0], [2.0, 0.25, 8.0, 4.0]


def _variants(kind):
    """Every variant for PNP; Smooth-AP and Recall@k ignore the variant (one is enough)."""
    return tuple(VARIANTS.values()) if kind == LOSS_PNP else (VARIANTS["O"],)


def _segments(labels, min_size):
    """(lo, hi, perm): each sorted row's class segment; classes smaller than min_size are empty."""
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, side="left", out_int32=True)
    hi = torch.searchsorted(sorted_labels, sorted_labels, side="right", out_int32=True)
    hi = torch.where(hi - lo >= min_size, hi, lo)
    return lo, hi, perm


def _unit_rows(n, D, gen, scale=1.0):
    X = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(X, dim=1) * scale


@functools.cache
def _case(name):
    """(S64, lo, hi, own) of a named similarity block; S64 is exactly representable in float32.

    own: each row's own column (-1: none), inside its segment at its start, middle and end,
    outside it, or absent."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "square":  # a batch against itself: classes of 1-5 (a class of one: empty segment)
        B = 60
        labels = torch.randint(0, 18, (B,), generator=gen)
        lo, hi, perm = _segments(labels, 2)
        X = _unit_rows(B, 16, gen)[perm]
        S = X @ X.t()
        own = torch.arange(B, dtype=torch.int32)
    elif name in ("rect", "strided"):  # queries against a reference set: single-positive and empty rows
        Q, M = 27, 70
        # classes 20, 21, 22 have one reference row each: single-positive queries
        ref_labels = torch.cat([torch.randint(0, 12, (M - 3,), generator=gen), torch.tensor([20, 21, 22])])
        ref_labels = torch.sort(ref_labels).values
        q_labels = torch.randint(0, 14, (Q,), generator=gen)  # 12, 13: no positive (empty segment)
        q_labels[:5] = torch.tensor([20, 21, 22, 13, 12])
        lo = torch.searchsorted(ref_labels, q_labels, side="left").to(torch.int32)
        hi = torch.searchsorted(ref_labels, q_labels, side="right").to(torch.int32)
        assert ((hi - lo) == 1).sum() >= 3 and ((hi - lo) == 0).sum() >= 2
        S = _unit_rows(Q, 16, gen) @ _unit_rows(M, 16, gen).t()
        # own copies: rows 0 and 1 (single positive: Recall@k drops them), then first, last and a
        # middle member of the segment, a column outside it, none
        pick = torch.randint(0, 1 << 20, (Q,), generator=gen)
        cnt = (hi - lo).clamp(min=1)
        inside = (lo + pick % cnt).to(torch.int32)
        own = torch.full((Q,), -1, dtype=torch.int32)
        own[:2] = lo[:2]
        own[5:] = inside[5:]
        own[5::5] = lo[5::5]
        own[6::5] = (hi[6::5] - 1).clamp(min=0)
        own[7::5] = (hi[7::5] % M).to(torch.int32)  # outside the segment (or empty segment)
        own[8::5] = -1
    elif name == "big_class":  # classes larger than the kernels' positive chunks (8 CUDA, 16 CPU)
        B = 72
        labels = torch.randint(1, 4, (B,), generator=gen)
        labels[:37] = 0
        lo, hi, perm = _segments(labels, 2)
        X = _unit_rows(B, 12, gen)[perm]
        S = X @ X.t()
        own = torch.arange(B, dtype=torch.int32)
        own[::7] = -1
    else:
        raise ValueError(name)
    return S.float().double(), lo, hi, own


@functools.cache
def _reference(name, kind, variant):
    """(loss, dS) of the float64 oracle; dS by autograd of a randomly weighted sum of the rows."""
    S64, lo, hi, own = _case(name)
    w = torch.rand(S64.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    S = S64.clone().requires_grad_(True)
    loss = _row_oracle(S, lo, hi, own, kind, variant, TAU)
    (dS,) = torch.autograd.grad((loss * w).sum(), S)
    return loss.detach(), dS, w


def _rel(a, r):
    a, r = a.detach().double().cpu(), r.detach().double().cpu()
    return float((a - r).norm() / r.norm().clamp_min(1e-300))


def _row_oracle(S, lo, hi, own, kind, variant, anneal):
    return row_losses_reference(
        S, lo, hi, own, kind=kind, variant=variant, anneal=anneal, alpha=ALPHA, b=B_IB, ks=KS, k_temperatures=K_TEMPS
    )


def _rows(S, lo, hi, own, kind, variant, grad=True, anneal=TAU, ks=KS, temps=K_TEMPS):
    dev = S.device
    return OPS.row_losses_and_dS(
        S, lo.to(dev), hi.to(dev), own.to(dev), kind, variant.code, anneal, ALPHA, B_IB, ks, temps, grad
    )


# ----------------------------------------------------------------------------------------- loader


def test_build_info_and_log():
    info = ext_build.build_info()
    assert info["ok"] and info["reason"] == "" and ext_build.why_unavailable() == ""
    for key in ("build_dir", "log_path", "cuda", "cuda_reason", "source_dir"):
        assert key in info
    assert os.path.isfile(info["log_path"]) and os.path.dirname(info["log_path"]) == info["build_dir"]
    # the language standard is torch's choice (no -std of our own), on every torch version
    assert info["std"] and info["std"] == ext_build.torch_std_flag()
    assert ext_build.cuda_status() == ("" if info["cuda"] else info["cuda_reason"])
    assert ext_build.source_dir() is not None


def _run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


def test_disabled_by_env_is_fast_and_import_never_builds(tmp_path):
    code = (
        "from pnp_kernels.backends import ext_build as eb\n"
        "assert eb._state is None, 'import must not build'\n"
        "r = eb.why_unavailable(); assert r == 'disabled by PNP_KERNELS_NO_EXT', r\n"
        "assert not eb.is_available()\n"
        "try:\n"
        "    eb.ops()\n"
        "except RuntimeError as e:\n"
        "    assert str(e) == \"backend='ext' is unavailable: disabled by PNP_KERNELS_NO_EXT\", e\n"
        "    print('raised')\n"
    )
    out = _run_python(code, PNP_KERNELS_NO_EXT="1", PNP_KERNELS_EXT_DIR=str(tmp_path))
    assert out.returncode == 0 and "raised" in out.stdout, out.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # nothing built


def test_build_failure_keeps_first_line_and_logs_everything(tmp_path):
    """A compile error: the short reason is one line and names the log holding the whole output."""
    src = tmp_path / "csrc"
    shutil.copytree(ext_build.source_dir(), src)
    for f in ("pnp_cpu.cpp", "pnp_pipeline.cpp"):  # a fatal error on line 1: no slow compile
        (src / f).write_text(f'#include "deliberately broken {f}"\n' + (src / f).read_text())
    code = (
        "import os\n"
        "from pnp_kernels.backends import ext_build as eb\n"
        "r = eb.why_unavailable(); info = eb.build_info()\n"
        "assert '\\n' not in r and 'deliberately broken' in r, r\n"
        "assert r.endswith('(full build log: ' + info['log_path'] + ')'), r\n"
        "log = open(info['log_path']).read()\n"
        "assert 'deliberately broken pnp_cpu.cpp' in log and 'deliberately broken pnp_pipeline.cpp' in log\n"
        "try:\n"
        "    eb.ops()\n"
        "except RuntimeError as e:\n"
        "    assert str(e) == \"backend='ext' is unavailable: \" + r, e\n"
        "    print('raised')\n"
    )
    out = _run_python(
        code, PNP_KERNELS_CSRC=str(src), PNP_KERNELS_EXT_DIR=str(tmp_path / "build"), CUDA_VISIBLE_DEVICES=""
    )
    assert out.returncode == 0 and "raised" in out.stdout, out.stderr[-3000:]


def test_missing_sources_reason():
    assert "csrc" in ext_build._quick_reason(None)


# ------------------------------------------------------------------------------------- row_losses_and_dS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind_name,kind", KINDS)
@pytest.mark.parametrize("case", ["square", "rect", "big_class", "strided"])
def test_row_losses_and_dS_matches_reference(device, dtype, kind_name, kind, case):
    S64, lo, hi, own = _case(case)
    if case == "strided":  # a row slice of a wider buffer: row stride > number of columns
        buf = torch.zeros(S64.shape[0], S64.shape[1] + 13, dtype=dtype, device=device)
        buf[:, 5 : 5 + S64.shape[1]] = S64.to(device, dtype)
        S = buf[:, 5 : 5 + S64.shape[1]]
        assert S.stride(0) > S.shape[1]
    else:
        S = S64.to(device, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    dropped = (hi - lo) < 1
    if kind == LOSS_RECALL_AT_K:  # no positive besides the own column
        dropped |= ((hi - lo) == 1) & (own == lo)
    for v in _variants(kind):
        ref_l, ref_dS, w = _reference(case, kind, v.name)
        loss, G = _rows(S, lo, hi, own, kind, v)
        assert loss.dtype == dtype and G.dtype == dtype and G.shape == S.shape and loss.shape == (S.shape[0],)
        assert torch.isfinite(loss).all() and torch.isfinite(G).all()
        assert _rel(loss, ref_l) <= tol, (v.name, _rel(loss, ref_l))
        dS = G.double().cpu() * w[:, None]  # G is per row: d loss[p] / d S[p, :]
        assert _rel(dS, ref_dS) <= tol, (v.name, _rel(dS, ref_dS))
        assert (loss.cpu()[dropped] == 0).all() and (G.cpu()[dropped] == 0).all()
        if kind == LOSS_RECALL_AT_K:  # the own column is not ranked: no gradient there
            rows = torch.nonzero(own >= 0)[:, 0]
            assert (G.cpu()[rows, own[rows].long()] == 0).all()
        loss2, G2 = _rows(S, lo, hi, own, kind, v, grad=False)
        assert G2.shape == (0,)
        assert torch.equal(loss2, loss)  # the same arithmetic with or without the gradient
        loss3, G3 = _rows(S, lo, hi, own, kind, v)
        assert torch.equal(loss3, loss) and torch.equal(G3, G)  # deterministic
        if case == "strided":
            l4, G4 = _rows(S.contiguous(), lo, hi, own, kind, v)
            assert torch.equal(l4, loss) and torch.equal(G4, G)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind_name,kind", KINDS)
def test_row_losses_and_dS_ignored_args(device, kind_name, kind):
    """variant/alpha/b matter to PNP only, own and ks/k_temperatures to Recall@k only."""
    S64, lo, hi, own = _case("rect")
    S, lo, hi, own = S64.to(device), lo.to(device), hi.to(device), own.to(device)
    none = torch.full_like(own, -1)

    def same(x, y):
        return torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])

    a = OPS.row_losses_and_dS(S, lo, hi, own, kind, 0, TAU, 1.0, 2.0, KS, K_TEMPS, True)
    b = OPS.row_losses_and_dS(S, lo, hi, own, kind, 3, TAU, 0.3, 5.0, KS, K_TEMPS, True)
    assert same(a, b) == (kind != LOSS_PNP)
    c = OPS.row_losses_and_dS(S, lo, hi, none, kind, 0, TAU, 1.0, 2.0, KS, K_TEMPS, True)
    assert same(a, c) == (kind != LOSS_RECALL_AT_K)
    if kind != LOSS_RECALL_AT_K:  # the other kinds take any (or no) k values
        d = OPS.row_losses_and_dS(S, lo, hi, own, kind, 0, TAU, 1.0, 2.0, [], [], True)
        assert same(a, d)
    else:
        d = OPS.row_losses_and_dS(S, lo, hi, own, kind, 0, TAU, 1.0, 2.0, KS[::-1], K_TEMPS[::-1], True)
        torch.testing.assert_close(d[0], a[0], rtol=1e-6, atol=0)  # the order of the k values is free
        torch.testing.assert_close(d[1], a[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind_name,kind", KINDS)
def test_extreme_similarities_never_nan(device, dtype, kind_name, kind):
    # tau = 1e-3 with dot similarities of norm 30: |z| up to ~1e6, far past exp overflow
    gen = torch.Generator().manual_seed(3)
    X = _unit_rows(40, 16, gen, scale=30.0)
    S64 = (X @ X.t()).float().double()
    lo, hi, _ = _segments(torch.randint(0, 8, (40,), generator=gen).sort().values, 2)
    own = torch.arange(40, dtype=torch.int32)
    for v in _variants(kind):
        loss, G = _rows(S64.to(device, dtype), lo, hi, own, kind, v, anneal=1e-3)
        assert torch.isfinite(loss).all() and torch.isfinite(G).all()
        ref = _row_oracle(S64, lo, hi, own, kind, v.name, 1e-3)
        assert _rel(loss, ref) <= 1e-5, (v.name, _rel(loss, ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind_name,kind", KINDS)
def test_nan_similarity_gives_nan_row(device, kind_name, kind):
    """A NaN similarity makes its row's loss NaN (never a finite number, e.g. a clipped Recall@k
    sum) and leaves the other rows as they were."""
    S64, lo, hi, own = _case("square")
    row = int(torch.nonzero((hi - lo) >= 3)[0, 0])
    col = (int(own[row]) + 20) % S64.shape[1]  # a ranked column, not the own one
    S = S64.to(device, torch.float32)
    clean_l, clean_G = _rows(S, lo, hi, own, kind, VARIANTS["O"])
    S[row, col] = float("nan")
    loss, G = _rows(S, lo, hi, own, kind, VARIANTS["O"])
    assert torch.isnan(loss[row]) and torch.isnan(G[row]).any()
    others = torch.arange(S.shape[0], device=device) != row
    assert torch.equal(loss[others], clean_l[others]) and torch.equal(G[others], clean_G[others])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind_name,kind", KINDS)
def test_row_losses_and_dS_long_rows(device, dtype, kind_name, kind):
    # many negatives per row: the float partial sums (blocks of 256) must stay accurate
    gen = torch.Generator().manual_seed(5)
    Q, M = 5, 1100
    ref_labels = torch.sort(torch.randint(0, 40, (M,), generator=gen)).values
    q_labels = ref_labels[torch.randint(0, M, (Q,), generator=gen)]
    lo = torch.searchsorted(ref_labels, q_labels, side="left").to(torch.int32)
    hi = torch.searchsorted(ref_labels, q_labels, side="right").to(torch.int32)
    S64 = (_unit_rows(Q, 8, gen) @ _unit_rows(M, 8, gen).t()).float().double()
    own = torch.tensor([-1, 3, 500, 1099, 0], dtype=torch.int32)
    own[1] = lo[1] + 1  # inside its segment
    v = VARIANTS["Dq"]
    S = S64.clone().requires_grad_(True)
    ref = _row_oracle(S, lo, hi, own, kind, v.name, 0.01)
    (ref_dS,) = torch.autograd.grad(ref.sum(), S)
    loss, G = _rows(S64.to(device, dtype), lo, hi, own, kind, v, anneal=0.01)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert _rel(loss, ref) <= tol and _rel(G, ref_dS) <= tol, (_rel(loss, ref), _rel(G, ref_dS))


@pytest.mark.parametrize("device", DEVICES)
def test_row_losses_and_dS_empty_shapes(device):
    for Q, M in ((0, 5), (3, 0), (0, 0)):
        S = torch.zeros(Q, M, device=device)
        z = torch.zeros(Q, dtype=torch.int32, device=device)
        for kind in (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K):
            loss, G = OPS.row_losses_and_dS(S, z, z, z - 1, kind, 0, TAU, 1.0, 2.0, KS, K_TEMPS, True)
            assert loss.shape == (Q,) and G.shape == (Q, M) and (loss == 0).all()


def test_row_losses_and_dS_errors():
    S = torch.randn(4, 4)
    lo = torch.zeros(4, dtype=torch.int32)
    hi = torch.full((4,), 4, dtype=torch.int32)
    own = torch.arange(4, dtype=torch.int32)
    ok = (S, lo, hi, own, LOSS_PNP, 0, 0.1, 1.0, 2.0, KS, K_TEMPS, False)
    OPS.row_losses_and_dS(*ok)
    rk = (4, LOSS_RECALL_AT_K)

    def bad(match, *changes):
        args = list(ok)
        for i, val in changes:
            args[i] = val
        with pytest.raises(RuntimeError, match=match):
            OPS.row_losses_and_dS(*args)

    bad("float32 or float64", (0, S.half()))  # float16 similarities are rejected
    bad("float32 or float64", (0, S.bfloat16()))
    bad("2-D", (0, S[0]))
    bad("columns must be contiguous", (0, S.t().contiguous().t()[:, :3]))
    bad("int32", (1, lo.long()))
    bad("one entry per row", (2, hi[:3]))
    bad("out of range", (2, hi + 1))
    bad("out of range", (1, lo - 1))
    bad("own must be a contiguous int32 vector", (3, own.long()))
    bad("own must be a contiguous int32 vector", (3, own[:3]))
    bad("loss kind must be 0..2", (4, len(LOSS_KINDS)))
    bad("loss kind", (4, -1))
    bad("variant code must be 0..4", (5, len(VARIANTS)))
    bad("anneal must be > 0", (6, 0.0))
    # Recall@k: own columns in [-1, M), and its k values
    bad("own column 4 of row 2 is out of range", rk, (3, torch.tensor([0, 1, 4, 3], dtype=torch.int32)))
    bad("own column -2 of row 0", rk, (3, torch.tensor([-2, 1, 2, 3], dtype=torch.int32)))
    bad("ks must hold at least one k", rk, (9, []), (10, []))
    bad("one entry per k", rk, (10, K_TEMPS[:2]))
    bad("every k in ks must be >= 1", rk, (9, [1.0, 0.5, 2.0, 3.0]))
    bad("every k_temperatures entry must be > 0", rk, (10, [1.0, 0.0, 2.0, 3.0]))
    OPS.row_losses_and_dS(S, lo, hi, own - 10, LOSS_PNP, 0, 0.1, 1.0, 2.0, [], [], False)  # ignored by PNP
    # a segment out of range that is empty is a dropped row, not an error
    for kind in (LOSS_PNP, LOSS_RECALL_AT_K):
        loss, _ = OPS.row_losses_and_dS(S, lo + 9, hi * 0 + 9, own, kind, 0, 0.1, 1.0, 2.0, KS, K_TEMPS, False)
        assert (loss == 0).all()


def test_kernel_level_segment_check_in_subprocess():
    """The op validates a bad segment itself; in a subprocess so that a crash is one failed test."""
    code = (
        "import torch\nfrom pnp_kernels.backends import ext_build as eb\nops = eb.ops()\n"
        "for kind in (0, 1, 2):\n"
        "    try:\n"
        "        ops.row_losses_and_dS(torch.randn(4, 4), torch.zeros(4, dtype=torch.int32),"
        " torch.full((4,), 5, dtype=torch.int32), torch.arange(4, dtype=torch.int32), kind, 0, 0.1, 1.0, 2.0,"
        " [1.0], [1.0], True)\n"
        "    except RuntimeError as e:\n"
        "        assert 'out of range' in str(e), e\n"
        "        print('raised', kind)\n"
    )
    out = _run_python(code)  # loads the build this process made
    assert out.returncode == 0 and all(f"raised {k}" in out.stdout for k in (0, 1, 2)), (
        out.returncode,
        out.stdout,
        out.stderr[-2000:],
    )


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA kernels here")
def test_cuda_bad_segment_gives_nan_row():
    S = torch.randn(3, 6, device="cuda")
    lo = torch.tensor([0, 4, 2], dtype=torch.int32, device="cuda")
    hi = torch.tensor([2, 7, 2], dtype=torch.int32, device="cuda")  # row 1 overruns, row 2 is empty
    own = torch.tensor([5, 4, 2], dtype=torch.int32, device="cuda")
    for kind in (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K):
        loss, G = OPS.row_losses_and_dS(S, lo, hi, own, kind, 0, 0.1, 1.0, 2.0, KS, K_TEMPS, True)
        assert torch.isnan(loss[1]) and torch.isnan(G[1]).all()
        assert torch.isfinite(loss[0]) and loss[2] == 0 and (G[2] == 0).all()
    # Recall@k: an own column out of [-1, M) gives a NaN row too; the other kinds ignore own
    bad_own = torch.tensor([6, -1, -2], dtype=torch.int32, device="cuda")
    hi_ok = torch.tensor([2, 6, 2], dtype=torch.int32, device="cuda")
    loss, G = OPS.row_losses_and_dS(S, lo, hi_ok, bad_own, LOSS_RECALL_AT_K, 0, 0.1, 1.0, 2.0, KS, K_TEMPS, True)
    assert torch.isnan(loss[0]) and torch.isnan(G[0]).all() and torch.isnan(loss[2])
    assert torch.isfinite(loss[1]) and torch.isfinite(G[1]).all()


# ---------------------------------------------------------------------------------------- symmetrize


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 31, 33, 100])
def test_symmetrize_matches_torch(device, dtype, n):
    gen = torch.Generator().manual_seed(n)
    G = torch.randn(n, n, generator=gen, dtype=dtype)
    g = torch.randn(n, generator=gen, dtype=dtype)
    H = OPS.symmetrize(G.to(device), g.to(device))
    D = g[:, None] * G
    ref = D + D.t()
    assert H.dtype == dtype and H.shape == (n, n)
    # two products and a sum per element: exact on the CPU, one rounding apart where the
    # compiler contracts a*b + c*d into a fused multiply-add (nvcc does)
    eps = torch.finfo(dtype).eps
    scale = float(ref.abs().max()) if n else 1.0
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=4 * eps, atol=4 * eps * scale)
    torch.testing.assert_close(H.cpu(), ref, **tol)
    # a row-strided G
    if n:
        big = torch.zeros(n, n + 7, dtype=dtype)
        big[:, :n] = G
        torch.testing.assert_close(OPS.symmetrize(big[:, :n].to(device), g.to(device)).cpu(), ref, **tol)


# ------------------------------------------------------------------------- loss_forward / loss_backward


def _composed_forward(E, labels, kind, variant, cosine, mean):
    """The square pipeline in plain torch around the extension's rows op."""
    cdt = torch.float64 if E.dtype == torch.float64 else torch.float32
    lo, hi, perm = _segments(labels, 2)  # a class of one: empty segment
    Xs = E[perm].to(cdt)
    if cosine:
        denom = torch.linalg.vector_norm(Xs, dim=1).clamp_min(NORM_EPS)
        Xs = Xs / denom[:, None]
    else:
        denom = torch.empty(0, dtype=cdt, device=E.device)
    own = torch.arange(Xs.shape[0], dtype=torch.int32, device=E.device)
    per_row, G = OPS.row_losses_and_dS(
        Xs @ Xs.t(), lo, hi, own, kind, variant.code, TAU, ALPHA, B_IB, KS, K_TEMPS, True
    )
    n_valid = (hi > lo).sum().to(cdt)
    if mean:
        out = per_row.sum() / n_valid.clamp_min(1)
    else:
        out = torch.empty_like(per_row)
        out[perm] = per_row
    return out, n_valid, Xs, perm, lo, hi, denom, G


def _composed_backward(grad_out, n_valid, Xs, perm, lo, hi, denom, G, cosine, mean, out_dtype):
    go = grad_out.to(G.dtype)
    g = (go / n_valid.clamp_min(1)).expand(Xs.shape[0]) if mean else go[perm]
    D = g[:, None] * G
    dXs = (D + D.t()) @ Xs
    if cosine:
        radial = (Xs * dXs).sum(1, keepdim=True) * (denom[:, None] > NORM_EPS)
        dXs = (dXs - Xs * radial) / denom[:, None]
    dE = torch.empty_like(dXs)
    dE[perm] = dXs
    if out_dtype == torch.float16:
        dE = dE.clamp(-HALF_MAX, HALF_MAX)
    return dE.to(out_dtype)


def _batch(device, dtype, seed=21, B=37, D=10):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 9, (B,), generator=gen) * 7 - 20  # arbitrary ids, random order
    labels[:5] = torch.arange(100, 105)  # classes of one: dropped queries
    E = torch.randn(B, D, generator=gen, dtype=torch.float64) * 1.7
    return E.to(device, dtype), labels.to(device), gen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind_name,kind", KINDS)
@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_loss_ops_match_torch_composition(device, kind_name, kind, cosine, mean, dtype):
    E, labels, gen = _batch(device, dtype)
    E[3] = 0  # a zero-norm row: the eps branch of the normalisation
    v = VARIANTS["Dq"] if kind == LOSS_PNP else VARIANTS["O"]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    got = OPS.loss_forward(E, labels, kind, v.code, TAU, ALPHA, B_IB, KS, K_TEMPS, cosine, mean, True)
    ref = _composed_forward(E, labels, kind, v, cosine, mean)
    names = ("out", "n_valid", "Xs", "perm", "lo", "hi", "denom", "G")
    assert len(got) == len(names)
    tol = 1e-12 if cdt == torch.float64 else 1e-6
    for name, a, r in zip(names, got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, (name, a.shape, r.shape, a.dtype, r.dtype)
        if name in ("perm", "lo", "hi"):
            assert torch.equal(a, r), name
        else:
            torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=name)
    counts = torch.unique(labels, return_counts=True)[1]
    assert float(got[1]) == float((got[5] > got[4]).sum()) == float(counts[counts >= 2].sum())
    out_nog = OPS.loss_forward(E, labels, kind, v.code, TAU, ALPHA, B_IB, KS, K_TEMPS, cosine, mean, False)
    assert out_nog[7].shape == (0,) and torch.equal(out_nog[0], got[0])

    grad_out = (torch.rand(got[0].shape, generator=gen, dtype=torch.float64) + 0.5).to(device, cdt)
    dE = OPS.loss_backward(grad_out, *got[1:], cosine, mean, dtype)
    rdE = _composed_backward(grad_out, *ref[1:], cosine, mean, dtype)
    assert dE.dtype == dtype and dE.shape == E.shape and torch.isfinite(dE).all()
    scale = max(float(rdE.double().abs().max()), 1e-30)
    torch.testing.assert_close(
        dE.double(), rdE.double(), rtol=0, atol=scale * (1e-3 if dtype == torch.float16 else tol * 10)
    )
    dE2 = OPS.loss_backward(grad_out, *got[1:], cosine, mean, dtype)
    assert torch.equal(dE, dE2)  # deterministic


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind_name,kind", KINDS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_ops_match_end_to_end_reference(device, kind_name, kind, similarity, reduction):
    """float64 loss_forward + loss_backward against autograd of the Q x M x M references."""
    E, labels, gen = _batch("cpu", torch.float64, seed=5, B=30, D=8)
    if similarity == "dot":
        E = E / E.norm(dim=1, keepdim=True) * 1.3
    cosine, mean = similarity == "cosine", reduction == "mean"
    w = torch.rand(E.shape[0], generator=gen, dtype=torch.float64) + 0.5
    for v in _variants(kind):
        Er = E.clone().requires_grad_(True)
        if kind == LOSS_PNP:
            ref = pnp_loss_reference(
                Er, labels, variant=v.name, anneal=TAU, alpha=ALPHA, b=B_IB, similarity=similarity, reduction=reduction
            )
        elif kind == LOSS_SMOOTH_AP:
            ref = smooth_ap_loss_reference(Er, labels, temperature=TAU, similarity=similarity, reduction=reduction)
        else:
            ks = [int(k) for k in KS]
            ref = recall_at_k_loss_reference(
                Er, labels, k=ks, temperature=TAU, k_temperature=K_TEMPS, similarity=similarity, reduction=reduction
            )
        gw = torch.ones(()) if mean else w
        (ref_dE,) = torch.autograd.grad((ref * gw).sum(), Er)
        got = OPS.loss_forward(
            E.to(device), labels.to(device), kind, v.code, TAU, ALPHA, B_IB, KS, K_TEMPS, cosine, mean, True
        )
        assert _rel(got[0], ref) <= 1e-10, (v.name, got[0], ref)
        grad_out = gw.to(device, torch.float64)
        dE = OPS.loss_backward(grad_out, *got[1:], cosine, mean, torch.float64)
        assert _rel(dE, ref_dE) <= 1e-10, (v.name, _rel(dE, ref_dE))


@pytest.mark.parametrize("device", DEVICES)
def test_loss_forward_no_valid_query(device):
    E = torch.randn(6, 4, device=device)
    labels = torch.arange(6, device=device)  # every class has one member
    for kind in (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K):
        out, n_valid, *_, G = OPS.loss_forward(E, labels, kind, 0, TAU, 1.0, 2.0, KS, K_TEMPS, True, True, True)
        assert float(out) == 0.0 and float(n_valid) == 0.0 and (G == 0).all()


def test_loss_forward_errors():
    E = torch.randn(5, 3)
    labels = torch.zeros(5, dtype=torch.int64)
    k = (KS, K_TEMPS)
    with pytest.raises(RuntimeError, match="2-D"):
        OPS.loss_forward(E[0], labels, 0, 0, TAU, 1.0, 2.0, *k, True, True, True)
    with pytest.raises(RuntimeError, match="int64"):
        OPS.loss_forward(E, labels.int(), 0, 0, TAU, 1.0, 2.0, *k, True, True, True)
    with pytest.raises(RuntimeError, match="loss kind"):
        OPS.loss_forward(E, labels, len(LOSS_KINDS), 0, TAU, 1.0, 2.0, *k, True, True, True)
    with pytest.raises(RuntimeError, match="variant code"):
        OPS.loss_forward(E, labels, 0, 5, TAU, 1.0, 2.0, *k, True, True, True)
    with pytest.raises(RuntimeError, match="loss_forward: ks must hold at least one k"):
        OPS.loss_forward(E, labels, LOSS_RECALL_AT_K, 0, TAU, 1.0, 2.0, [], [], True, True, True)
    with pytest.raises(RuntimeError, match="loss_forward: k_temperatures must have one entry per k"):
        OPS.loss_forward(E, labels, LOSS_RECALL_AT_K, 0, TAU, 1.0, 2.0, [1.0, 2.0], [1.0], True, True, True)


# ------------------------------------------------------------------------------------------ Recall@k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_pos", [16, 17, 1030])
def test_recall_rows_lane_counts(device, dtype, n_pos):
    """Recall@k rows with 16 lanes (the CPU kernel's chunk), 17 (two chunks), and ~1030 lanes: the
    CPU kernel's sigma' scratch (2^20 elements) no longer holds the row's 1030 x 1071, so it sweeps
    twice, and the CUDA kernel's shared-memory lanes (1024) overflow, so its ranks are swept again;
    the own column inside, outside and absent: the float64 oracle, loss and dS."""
    gen = torch.Generator().manual_seed(n_pos)
    lo0, M = 9, n_pos + 1 + 40
    S64 = (_unit_rows(3, 6, gen) @ _unit_rows(M, 6, gen).t()).float().double()
    lo = torch.full((3,), lo0, dtype=torch.int32)
    hi = lo + n_pos + 1
    own = torch.tensor([lo0 + n_pos // 2, -1, M - 1], dtype=torch.int32)  # lanes: n_pos, n_pos + 1, n_pos + 1
    S = S64.clone().requires_grad_(True)
    ref = _row_oracle(S, lo, hi, own, LOSS_RECALL_AT_K, "O", 0.02)
    w = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)
    (ref_dS,) = torch.autograd.grad((ref * w).sum(), S)
    loss, G = _rows(S64.to(device, dtype), lo, hi, own, LOSS_RECALL_AT_K, VARIANTS["O"], anneal=0.02)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert _rel(loss, ref) <= tol and _rel(G.double().cpu() * w[:, None], ref_dS) <= tol, (
        _rel(loss, ref),
        _rel(G.double().cpu() * w[:, None], ref_dS),
    )
    assert (G[0, lo0 + n_pos // 2] == 0) and (G[2, M - 1] == 0)
    loss2, _ = _rows(S64.to(device, dtype), lo, hi, own, LOSS_RECALL_AT_K, VARIANTS["O"], grad=False, anneal=0.02)
    assert torch.equal(loss2, loss)


def test_recall_cases_clip():
    """The k values of these tests clip (s_k >= k) in some rows and not in others, so both
    branches of the Recall@k weights are covered."""
    S64, lo, hi, own = _case("big_class")
    sig = torch.sigmoid((S64[:, None, :] - S64[:, :, None]) / TAU)  # [p, j, m]
    cols = torch.arange(S64.shape[1])
    ranked = cols[None, :] != own[:, None].long()
    pos = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & ranked
    not_self = ~torch.eye(S64.shape[1], dtype=torch.bool)
    r = 1 + (sig * (ranked[:, None, :] & not_self[None])).sum(-1)  # [p, j]
    clipped = []
    for k, t2 in zip(KS, K_TEMPS):
        s_k = (torch.sigmoid((k - r) / t2) * pos).sum(-1)
        clipped.append(s_k >= k)
    clipped = torch.stack(clipped, 1)[pos.any(1)]
    assert clipped.any() and (~clipped).any()
