"""Kernel-level tests of the Triton launchers (pnp_kernels/backends/triton_kernels.py).

The row kernel is checked, loss and dS, against the float64 oracle
``row_losses_reference`` differentiated by autograd, for the three loss kinds, every
PNP variant, square and rectangular blocks, segments of length 1, empty segments
(dropped rows), a segment of more than 16 positives (several chunks) and strided rows;
for Recall@k also own columns of -1, inside the segment (first, middle, last lane, in
either chunk) and outside it, a row whose only lane is its own column, and clipped
k. The stages around it are checked against plain torch. Shapes are tiny: under
TRITON_INTERPRET=1 the kernels run on the CPU.
"""

import pytest
import torch
import torch.nn.functional as F

from pnp_kernels.backends import triton_kernels as tk
from pnp_kernels.reference import row_losses_reference
from pnp_kernels.spec import HALF_MAX, LossSpec
from pnp_kernels.variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, VARIANTS

from conftest import rel_err as _rel

pytestmark = pytest.mark.needs_backend("triton")

TOL = 1e-5  # float32 kernel vs float64 oracle, norm-wise relative error


def _segments(labels_q, labels_r):
    """lo, hi of each query against label-sorted reference labels: its positives' columns."""
    lo = torch.searchsorted(labels_r, labels_q, side="left").to(torch.int32)
    hi = torch.searchsorted(labels_r, labels_q, side="right").to(torch.int32)
    return lo, hi


def _square_block(sizes, D, seed):
    """S = X X^T of normalised random rows, grouped by class; singletons get an empty segment."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    X = F.normalize(torch.randn(len(y), D, generator=gen, dtype=torch.float64), dim=1)
    lo, hi = _segments(y, y)
    hi = torch.where(hi - lo >= 2, hi, lo)
    return X @ X.T, lo, hi


def _rect_block(seed, D=8):
    """Q = 13 queries against M = 33 label-sorted reference rows (classes of 1, 2, 3, 5, 18 and 4):
    queries with one positive, none (empty segment), several, and more than 16."""
    gen = torch.Generator().manual_seed(seed)
    ref_sizes = [1, 2, 3, 5, 18, 4]
    y_r = torch.repeat_interleave(torch.arange(len(ref_sizes)), torch.tensor(ref_sizes))
    y_q = torch.tensor([4, 0, 9, 1, 4, 2, 3, 0, 5, -1, 3, 1, 4])
    Xq = F.normalize(torch.randn(len(y_q), D, generator=gen, dtype=torch.float64), dim=1)
    Xr = F.normalize(torch.randn(len(y_r), D, generator=gen, dtype=torch.float64), dim=1)
    lo, hi = _segments(y_q, y_r)
    return Xq @ Xr.T, lo, hi


def _spec(kind, variant="O", anneal=0.05, alpha=1.0, b=2.0, ks=(), k_temperatures=()):
    return LossSpec(kind, VARIANTS[variant], anneal, alpha, b, ks=tuple(ks), k_temperatures=tuple(k_temperatures))


def _oracle(S64, lo, hi, own, w, spec):
    S = S64.clone().requires_grad_(True)
    rows = row_losses_reference(
        S,
        lo,
        hi,
        own,
        kind=spec.kind,
        variant=spec.variant.name,
        anneal=spec.anneal,
        alpha=spec.alpha,
        b=spec.b,
        ks=spec.ks,
        k_temperatures=spec.k_temperatures,
    )
    (dS,) = torch.autograd.grad((rows * w).sum(), S)
    return rows.detach(), dS


def _check_spec(S64, lo, hi, spec, own=None, S32=None, tile=None):
    """Kernel vs oracle on one block; the gradient of a weighted row sum checks every row apart."""
    S32 = S64.float() if S32 is None else S32
    w = torch.rand(S64.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    loss, dS = tk.row_losses_and_dS(S32, lo, hi, own, spec, True, tile)
    ref, ref_dS = _oracle(S64, lo, hi, own, w, spec)
    assert loss.dtype == torch.float32 and loss.shape == (S64.shape[0],)
    assert dS.dtype == torch.float32 and dS.shape == S64.shape and dS.is_contiguous()
    assert torch.isfinite(loss).all() and torch.isfinite(dS).all()
    assert _rel(loss, ref) <= TOL, (_rel(loss, ref), loss, ref)
    gw = dS.double() * w[:, None]
    assert _rel(gw, ref_dS) <= TOL, _rel(gw, ref_dS)
    dropped = hi <= lo
    if spec.kind == LOSS_RECALL_AT_K:  # a row whose only lane is its own column is dropped too
        dropped = dropped | ((hi - lo == 1) & (own == lo))
    assert torch.all(loss[dropped] == 0) and torch.all(dS[dropped] == 0)
    return loss, dS


def _check_rows(S64, lo, hi, kind, variant="O", anneal=0.05, alpha=1.0, b=2.0, S32=None, tile=None):
    return _check_spec(S64, lo, hi, _spec(kind, variant, anneal, alpha, b), S32=S32, tile=tile)


# classes: singletons (dropped), pairs, 3-4, 5-8 and 18 (two chunks of positives)
SQUARE_SIZES = [1, 3, 2, 5, 18, 1, 4]


@pytest.mark.parametrize("anneal", [0.05, 0.01])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pnp_rows_square(variant, anneal):
    S64, lo, hi = _square_block(SQUARE_SIZES, 8, seed=1)
    _check_rows(S64, lo, hi, LOSS_PNP, variant, anneal, alpha=0.7, b=1.5)


@pytest.mark.parametrize("anneal", [0.05, 0.01])
def test_smooth_ap_rows_square(anneal):
    S64, lo, hi = _square_block(SQUARE_SIZES, 8, seed=2)
    _check_rows(S64, lo, hi, LOSS_SMOOTH_AP, anneal=anneal)


@pytest.mark.parametrize("kind,variant", [(LOSS_PNP, "O"), (LOSS_PNP, "Dq"), (LOSS_PNP, "Ib"), (LOSS_SMOOTH_AP, "O")])
def test_rows_rectangular(kind, variant):
    S64, lo, hi = _rect_block(seed=4)
    assert S64.shape[0] != S64.shape[1]
    n = hi - lo
    assert (n == 0).any() and (n == 1).any() and (n > 16).any()
    loss, _ = _check_rows(S64, lo, hi, kind, variant, anneal=0.05)
    assert (loss[n == 1] > 0).all()  # a single positive that is not the query's own copy is valid


def test_smooth_ap_rows_rectangular_sharp():
    S64, lo, hi = _rect_block(seed=5)
    _check_rows(S64, lo, hi, LOSS_SMOOTH_AP, anneal=0.01)


def test_smooth_ap_small_tile_multi_block():
    """A 64-element tile: several column blocks per pass and several segment sweeps."""
    S64, lo, hi = _rect_block(seed=6)
    _check_rows(S64, lo, hi, LOSS_SMOOTH_AP, anneal=0.05, tile=64)
    _check_rows(S64, lo, hi, LOSS_PNP, "Ds", anneal=0.05, tile=64)


@pytest.mark.parametrize("kind", [LOSS_PNP, LOSS_SMOOTH_AP])
def test_rows_strided_view(kind):
    """Rows of a wider buffer (row stride != M) are read in place; a transposed S is copied."""
    S64, lo, hi = _rect_block(seed=7)
    Q, M = S64.shape
    buf = torch.full((Q, M + 7), 123.0)
    buf[:, 3 : 3 + M] = S64.float()
    view = buf[:, 3 : 3 + M]
    assert view.stride() == (M + 7, 1)
    _check_rows(S64, lo, hi, kind, "Iu", anneal=0.05, S32=view)
    tview = S64.float().t().contiguous().t()  # column stride != 1
    _check_rows(S64, lo, hi, kind, "Iu", anneal=0.05, S32=tview)


@pytest.mark.parametrize("kind", [LOSS_PNP, LOSS_SMOOTH_AP])
def test_rows_without_grad(kind):
    S64, lo, hi = _square_block([3, 1, 17], 6, seed=8)
    S = S64.float()
    spec = _spec(kind, "Ds")
    loss, dS = tk.row_losses_and_dS(S, lo, hi, None, spec, False)
    assert dS is None
    loss_g, _ = tk.row_losses_and_dS(S, lo, hi, None, spec, True)
    assert torch.equal(loss, loss_g)


def test_rows_all_dropped_and_empty():
    S64, lo, hi = _square_block([1, 1, 1, 1], 4, seed=9)
    own = torch.arange(4, dtype=torch.int32)
    for spec in (_spec(LOSS_SMOOTH_AP, anneal=0.01), _spec(LOSS_RECALL_AT_K, ks=(1, 2), k_temperatures=(1, 2))):
        loss, dS = tk.row_losses_and_dS(S64.float(), lo, hi, own, spec, True)
        assert torch.all(loss == 0) and torch.all(dS == 0)
    z = torch.zeros(0, 5)
    e = torch.zeros(0, dtype=torch.int32)
    for spec in (_spec(LOSS_PNP, anneal=0.01), _spec(LOSS_RECALL_AT_K, ks=(1,), k_temperatures=(1,))):
        loss, dS = tk.row_losses_and_dS(z, e, e, e, spec, True)
        assert loss.shape == (0,) and dS.shape == (0, 5)


def test_rows_rejects_non_float32():
    S64, lo, hi = _square_block([2, 2], 4, seed=10)
    with pytest.raises(TypeError):
        tk.row_losses_and_dS(S64, lo, hi, None, _spec(LOSS_PNP), True)


# ---- Recall@k: the own column, chunked rows, clipped k ----

# The authors' training set of k (tau2_k = k), a mixed set in another order whose k = 2 with
# tau2 = 4 clips (s_k >= k) on the tilted rows of _tilted_rect, and k larger than a row's lanes.
RECALL_SPECS = {
    "paper": dict(ks=(1, 2, 4, 8, 16), k_temperatures=(1, 2, 4, 8, 16)),
    "mixed": dict(ks=(4, 1, 2), k_temperatures=(1.0, 0.5, 4.0)),
    # k above the long rows' 17-18 lanes: the normaliser min(k, n) is n there
    "large_k": dict(ks=(32, 2, 17), k_temperatures=(8.0, 1.0, 2.0)),
}

# own column of each query of _rect_block (segments: class 0 [0, 1), 1 [1, 3), 2 [3, 6), 3 [6, 11),
# 4 [11, 29) of 18 lanes, 5 [29, 33)): -1; inside the segment at its first, a middle or its last lane,
# in the first or the second chunk of 16; outside the segment; the only lane of a segment (dropped).
RECT_OWN = torch.tensor([15, 0, -1, 2, -1, 30, 6, -1, 32, 4, -1, 0, 28], dtype=torch.int32)


def _tilted_rect(seed):
    """_rect_block with every query's positives moved up by 0.4: they rank first, so the small k clip."""
    S64, lo, hi = _rect_block(seed)
    cols = torch.arange(S64.shape[1])
    seg = (cols[None, :] >= lo[:, None].long()) & (cols[None, :] < hi[:, None].long())
    return S64 + 0.4 * seg.double(), lo, hi


def _soft_counts(S64, lo, hi, own, spec):
    """(rows, |K|) s_k of each row and its active-lane count, in float64 (to tell clipped k apart)."""
    out, n_act = [], []
    for p in range(S64.shape[0]):
        lanes = torch.tensor([j for j in range(int(lo[p]), int(hi[p])) if j != int(own[p])], dtype=torch.long)
        ranked = torch.arange(S64.shape[1]) != int(own[p])
        sig = torch.sigmoid((S64[p][None, :] - S64[p, lanes][:, None]) / spec.anneal)  # (lanes, M)
        other = ranked[None, :] & (torch.arange(S64.shape[1])[None, :] != lanes[:, None])
        rt = 1.0 + (sig * other).sum(dim=1)
        out.append([torch.sigmoid((k - rt) / t).sum().item() for k, t in zip(spec.ks, spec.k_temperatures)])
        n_act.append(len(lanes))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(n_act)


def _recall_spec(name, anneal=0.05):
    return _spec(LOSS_RECALL_AT_K, anneal=anneal, **RECALL_SPECS[name])


@pytest.mark.parametrize("anneal", [0.05, 0.01])
@pytest.mark.parametrize("ks", list(RECALL_SPECS))
def test_recall_rows_square(ks, anneal):
    """Square mode: own[p] = p, inside every segment; the class of 18 runs the chunked path."""
    S64, lo, hi = _square_block(SQUARE_SIZES, 8, seed=21)
    own = torch.arange(S64.shape[0], dtype=torch.int32)
    assert ((hi - lo) > 16).any()
    loss, _ = _check_spec(S64, lo, hi, _recall_spec(ks, anneal), own=own)
    assert (loss[hi > lo] > 0).all()


@pytest.mark.parametrize("tile", [None, 64])
@pytest.mark.parametrize("ks", list(RECALL_SPECS))
def test_recall_rows_rectangular_own_columns(ks, tile):
    """Own columns -1, inside (either chunk of the 18-lane segment, first/middle/last lane), outside,
    and the only lane of a segment; tile 64: several column blocks per pass."""
    S64, lo, hi = _rect_block(seed=22)
    own = RECT_OWN
    inside = (own >= lo) & (own < hi)
    long_rows = (hi - lo) > 16
    assert (long_rows & inside & (own - lo >= 16)).any() and (long_rows & inside & (own - lo < 16)).any()
    assert (long_rows & (own == -1)).any() and ((hi > lo) & (own >= 0) & ~inside).any()
    loss, _ = _check_spec(S64, lo, hi, _recall_spec(ks), own=own, tile=tile)
    only_own = (hi - lo == 1) & (own == lo)
    assert only_own.any() and (loss[(hi > lo) & ~only_own] > 0).all()


def test_recall_own_column_changes_the_row():
    """The own column is excluded wherever it lies: moving it changes the row as the oracle says,
    and own = -1 on a long row differs from own inside it."""
    S64, lo, hi = _rect_block(seed=23)
    spec = _recall_spec("mixed")
    base, _ = _check_spec(S64, lo, hi, spec, own=RECT_OWN)
    moved = RECT_OWN.clone()
    moved[0] = -1  # long row: own inside -> none
    moved[5] = 12  # own outside the segment, elsewhere
    moved[3] = -1  # one positive left -> two
    other, _ = _check_spec(S64, lo, hi, spec, own=moved)
    changed = torch.tensor([0, 3, 5])
    assert (other[changed] != base[changed]).all()
    keep = torch.ones(len(lo), dtype=torch.bool)
    keep[changed] = False
    assert torch.equal(other[keep], base[keep])


@pytest.mark.parametrize("tile", [None, 64])
def test_recall_rows_clipped(tile):
    """Rows where some k clip (s_k >= k: no gradient through that k) and others do not."""
    S64, lo, hi = _tilted_rect(seed=24)
    spec = _recall_spec("mixed", anneal=0.05)
    s, n_act = _soft_counts(S64, lo, hi, RECT_OWN, spec)
    k = torch.tensor(spec.ks, dtype=torch.float64)
    clipped = (s >= k[None, :]) & (n_act[:, None] > 0)
    assert clipped.any() and ((~clipped) & (n_act[:, None] > 0)).any()
    assert clipped[(hi - lo) > 16].any()  # on the chunked path too
    _check_spec(S64, lo, hi, spec, own=RECT_OWN, tile=tile)


def test_recall_rows_without_grad_and_deterministic():
    S64, lo, hi = _rect_block(seed=25)
    S = S64.float()
    spec = _recall_spec("paper", anneal=0.01)
    loss, dS = tk.row_losses_and_dS(S, lo, hi, RECT_OWN, spec, False)
    assert dS is None
    loss_g, G = tk.row_losses_and_dS(S, lo, hi, RECT_OWN, spec, True)
    loss_g2, G2 = tk.row_losses_and_dS(S, lo, hi, RECT_OWN.long(), spec, True)
    assert torch.equal(loss, loss_g)
    assert torch.equal(loss_g, loss_g2) and torch.equal(G, G2)


def test_recall_k_params_cached_and_checked():
    spec = _recall_spec("mixed")
    kp, num_k, k_block = tk.recall_k_params(spec, torch.device("cpu"))
    assert (num_k, k_block) == (3, 4) and kp.dtype == torch.float32
    assert torch.equal(kp, torch.tensor([[4.0, 1.0, 2.0], [1.0, 0.5, 4.0]]))
    assert tk.recall_k_params(spec, torch.device("cpu"))[0] is kp  # made once, then reused
    S64, lo, hi = _rect_block(seed=26)
    with pytest.raises(ValueError, match="ks"):
        tk.row_losses_and_dS(S64.float(), lo, hi, RECT_OWN, _spec(LOSS_RECALL_AT_K), False)
    with pytest.raises(ValueError, match="own"):
        tk.row_losses_and_dS(S64.float(), lo, hi, None, spec, False)
    with pytest.raises(ValueError, match="tile"):
        tk.row_losses_and_dS(S64.float(), lo, hi, RECT_OWN, spec, False, tile=96)


@pytest.mark.parametrize("kind", [LOSS_PNP, LOSS_SMOOTH_AP])
def test_pnp_and_smooth_ap_ignore_own(kind):
    """PNP and Smooth-AP count the own copy as a positive: the own column changes nothing."""
    S64, lo, hi = _rect_block(seed=27)
    spec = _spec(kind, "Dq")
    a = tk.row_losses_and_dS(S64.float(), lo, hi, None, spec, True)
    b = tk.row_losses_and_dS(S64.float(), lo, hi, RECT_OWN, spec, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- the stages around the row kernel ----


def _torch_prep(E, labels, cosine):
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo, hi = _segments(sorted_labels, sorted_labels)
    hi = torch.where(hi - lo >= 2, hi, lo)
    X = E[perm].float()
    denom = X.norm(dim=1).clamp_min(1e-12) if cosine else X.new_empty(0)
    return (X / denom[:, None] if cosine else X), perm, lo, hi, denom


@pytest.mark.parametrize("count_sort", [False, True])
@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prepare(monkeypatch, count_sort, cosine, dtype):
    gen = torch.Generator().manual_seed(11)
    labels = torch.tensor([7, -3, 7, 100, 5, -3, 7, 42, 5, 9, 9, 9, 0])  # singletons 100, 42, 0
    E = torch.randn(len(labels), 5, generator=gen).to(dtype)
    E[4] = 0  # a zero-norm row: denom eps
    monkeypatch.setattr(tk, "COUNT_SORT_MAX_B", 4096 if count_sort else 0)
    Xs, perm, lo, hi, denom = tk.prepare(E, labels, cosine)
    X_ref, perm_ref, lo_ref, hi_ref, denom_ref = _torch_prep(E, labels, cosine)
    assert perm.dtype == torch.int64 and lo.dtype == torch.int32 and hi.dtype == torch.int32
    assert Xs.dtype == torch.float32 and denom.dtype == torch.float32
    assert torch.equal(perm, perm_ref)
    assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)
    singles = torch.isin(labels[perm], torch.tensor([100, 42, 0]))
    assert torch.all(hi[singles] == lo[singles]) and torch.all(hi[~singles] - lo[~singles] >= 2)
    torch.testing.assert_close(Xs, X_ref, rtol=1e-6, atol=1e-7)
    assert denom.shape == denom_ref.shape
    torch.testing.assert_close(denom, denom_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("with_perm", [True, False])
def test_reduce(mean, with_perm):
    gen = torch.Generator().manual_seed(12)
    n = 21
    row_loss = torch.rand(n, generator=gen)
    lo = torch.randint(0, 10, (n,), generator=gen, dtype=torch.int32)
    hi = lo + torch.randint(0, 3, (n,), generator=gen, dtype=torch.int32)  # some empty segments
    perm = torch.randperm(n, generator=gen) if with_perm else None
    out, n_valid = tk.reduce(row_loss, lo, hi, perm, mean)
    valid = hi > lo
    assert 0 < valid.sum() < n
    assert n_valid.shape == () and n_valid.dtype == torch.float32 and n_valid.item() == valid.sum().item()
    v = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    if mean:
        assert out.shape == () and out.dtype == torch.float32
        torch.testing.assert_close(out, v.sum() / valid.sum(), rtol=1e-6, atol=0)
    else:
        expect = torch.empty_like(v)
        if with_perm:
            expect[perm] = v
        else:
            expect = v
        assert torch.equal(out, expect)


def test_reduce_no_valid_row():
    lo = torch.arange(5, dtype=torch.int32)
    out, n_valid = tk.reduce(torch.rand(5), lo, lo.clone(), None, True)
    assert out.item() == 0 and n_valid.item() == 0
    out, n_valid = tk.reduce(torch.rand(5), lo, lo.clone(), torch.arange(5), False)
    assert torch.all(out == 0) and n_valid.item() == 0


def test_symmetrize():
    gen = torch.Generator().manual_seed(13)
    n = 37  # two blocks of 32 under the interpreter
    G = torch.randn(n, n, generator=gen)
    g = torch.randn(n, generator=gen)
    H = tk.symmetrize(G, g)
    A = g[:, None] * G
    torch.testing.assert_close(H, A + A.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "none", "none_identity"])
def test_symmetric_grad(mode):
    gen = torch.Generator().manual_seed(14)
    n = 37
    G = torch.randn(n, n, generator=gen)
    perm = None if mode == "none_identity" else torch.randperm(n, generator=gen)
    n_valid = torch.tensor(29.0)
    if mode == "mean":
        grad_out = torch.tensor(1.7)
        g = torch.full((n,), 1.7 / 29.0)
    else:
        grad_out = torch.randn(n, generator=gen)
        g = grad_out if perm is None else grad_out[perm]
    H = tk.symmetric_grad(G, grad_out, perm, n_valid, mode == "mean")
    A = g[:, None] * G
    torch.testing.assert_close(H, A + A.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("with_perm", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_unprepare(cosine, with_perm, out_dtype):
    """dE of sum(dX * normalize(E)[perm]) by autograd, scattered back through the permutation."""
    gen = torch.Generator().manual_seed(15)
    n, D = 13, 6
    E = torch.randn(n, D, generator=gen, dtype=torch.float64)
    E[5] = 0  # zero-norm row: gradient dX / eps (saturates in float16)
    perm = torch.randperm(n, generator=gen) if with_perm else None
    p = torch.arange(n) if perm is None else perm
    dX = torch.randn(n, D, generator=gen)
    E_leaf = E.clone().requires_grad_(True)
    Xs64 = F.normalize(E_leaf[p], dim=1, eps=1e-12) if cosine else E_leaf[p]
    (ref,) = torch.autograd.grad((Xs64 * dX.double()).sum(), E_leaf)
    Xs = Xs64.detach().float()
    denom = E[p].norm(dim=1).clamp_min(1e-12).float() if cosine else torch.empty(0)
    dE = tk.unprepare(dX, Xs, denom, perm, cosine, out_dtype)
    assert dE.dtype == out_dtype and dE.shape == (n, D)
    if out_dtype == torch.float16:
        ref = ref.clamp(-HALF_MAX, HALF_MAX)
        assert torch.isfinite(dE).all()
        torch.testing.assert_close(dE.double(), ref, rtol=1e-3, atol=1e-3)
    else:
        big = (ref.abs() > 1e6).any(dim=1)  # the zero-norm row: ~1e12, relative check only
        torch.testing.assert_close(dE[~big].double(), ref[~big], rtol=1e-5, atol=1e-6)
        if big.any():
            assert _rel(dE[big], ref[big]) <= 1e-6


def test_device_guard_is_free_on_cpu():
    import contextlib

    assert isinstance(tk._on_device(torch.zeros(1)), contextlib.nullcontext)


def test_check_device_names_backend(monkeypatch):
    monkeypatch.setattr(tk, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        tk.check_device(torch.zeros(1))
