"""The Triton backend's dense path on float16 / bfloat16 embeddings (pnp_kernels/backends/triton_gemm.py).

* The half rows reach the GEMM kernels as they are: the dense preparation keeps the sorted
  half rows and their float32 norms, and both GEMMs (S and the backward product) run in
  ``triton_gemm`` on them, square mode and a reference set.
* Accuracy against the float64 oracle on the same half values: the loss within 1e-5
  (relative), the gradient within 2x the error of the float32 oracle rounded to the input
  dtype (what one correct rounding of a float32 result costs); PNP, Smooth-AP and Recall@k,
  cosine and dot, reduction "mean" and "none" (weighted), square mode, a reference set with
  query_ref_index, and a memory bank (only the live reference rows get a gradient).
* The launchers against float64: S to float32 accuracy; the backward product with a G whose
  rows sum to zero against rows that share a large common component (heavy cancellation)
  to float32 accuracy, where G rounded to one float16 or bfloat16 term misses the same
  bound by orders of magnitude (the negative control).
* float32 embeddings: the two stages are exactly the torch.mm of the base class (bitwise)
  and the Triton GEMMs are never called.
* The custom ops' fake tensors give the half rows their dtype (opcheck), and torch.compile
  of a float16 step equals eager.
* bfloat16: the same accuracy rule, square and reference set; the three-term split of G
  is checked on a GPU only (the interpreter has no bfloat16 arithmetic: its launchers widen
  bfloat16 rows to float32, exactly).

Under the interpreter the GEMM kernels use 16-wide tiles, so these shapes cover several row
tiles, column tiles, steps over D and slices of D.
"""

import pytest
import torch

import pnp_kernels
from pnp_kernels.backends import get_backend
from pnp_kernels.reference import pnp_loss_reference, recall_at_k_loss_reference, smooth_ap_loss_reference
from pnp_kernels.spec import LossSpec
from pnp_kernels.variants import LOSS_PNP, VARIANTS

from conftest import TOL32, device_for, make_generator, rel_err

pytestmark = pytest.mark.needs_backend("triton")

DEV = device_for("triton")
FLOOR = 1e-6  # absolute floor of the 2x rule, far below any half-precision error
KINDS = [
    ("pnp-Dq", pnp_kernels.pnp_loss, pnp_loss_reference, dict(variant="Dq", anneal=0.1, alpha=2.0)),
    ("smooth_ap", pnp_kernels.smooth_ap_loss, smooth_ap_loss_reference, dict(temperature=0.1)),
    ("recall_at_k", pnp_kernels.recall_at_k_loss, recall_at_k_loss_reference, dict(k=(1, 2, 4), temperature=0.1)),
]
KIND_IDS = [k[0] for k in KINDS]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bfloat16 Triton is a GPU check (no bf16 in the interpreter)"
)


def _tgemm():
    from pnp_kernels.backends import triton_gemm

    return triton_gemm


def _grads(fn, leaves, weights=None):
    """(output, gradients) of fn(*leaves) on fresh leaf copies; backward of out or (w * out).sum()."""
    xs = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*xs)
    (out if weights is None else (out * weights.to(out.dtype)).sum()).backward()
    return out.detach(), [x.grad.detach() for x in xs]


def _rounded(t, dtype):
    """t (float32) rounded to dtype as the kernels write it: to nearest, except bfloat16 under
    the interpreter, whose float32 -> bfloat16 stores truncate toward zero."""
    if dtype == torch.bfloat16 and DEV == "cpu":
        return (t.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return t.to(dtype)


def _check(fn, oracle, leaves, weights=None):
    """Ours (leaves as given, on DEV) against the float64 oracle on the same half values: loss
    within TOL32, each gradient within 2x the error of the float32 oracle rounded to the
    leaves' dtype. Returns the measured errors."""
    dtype = leaves[0].dtype
    w = None if weights is None else weights.to(DEV)
    out, grads = _grads(fn, [x.to(DEV) for x in leaves], w)
    assert out.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    o64, g64 = _grads(oracle, [x.double() for x in leaves], weights)
    _, g32 = _grads(oracle, [x.float() for x in leaves], weights)
    e_loss = rel_err(out, o64)
    assert e_loss <= TOL32, (e_loss, out, o64)
    errs = [e_loss]
    for ours, exact, single in zip(grads, g64, g32):
        e, e_round = rel_err(ours, exact), rel_err(_rounded(single, dtype), exact)
        assert e <= 2 * e_round + FLOOR, (e, e_round)
        errs += [e, e_round]
    print(f"\n[dense half] {dtype}: loss err {e_loss:.1e}; grad err, rounded float32 err: {errs[1:]}")
    return errs


def _square_case(seed, similarity, dtype=torch.float16, B=20, D=24):
    gen = make_generator(seed)
    E = torch.randn(B, D, generator=gen) / (1.0 if similarity == "cosine" else D**0.5)
    y = torch.randint(0, 4, (B,), generator=gen) * 5 - 3
    y[0] = 97  # a singleton: dropped from the mean, a zero in "none"
    return E.to(dtype), y, torch.rand(B, generator=gen) + 0.5


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("name,fn,oracle,opts", KINDS, ids=KIND_IDS)
def test_float16_square_dense(name, fn, oracle, opts, similarity, reduction):
    E, y, w = _square_case(600 + KIND_IDS.index(name), similarity)
    kw = dict(opts, similarity=similarity, reduction=reduction)
    _check(
        lambda x: fn(x, y.to(DEV), backend="triton", memory_efficient=False, **kw),
        lambda x: oracle(x, y, **kw),
        [E],
        w if reduction == "none" else None,
    )


def _reference_case(seed, dtype=torch.float16, D=24):
    """Queries (10) against a reference set (23 rows), six queries with their own copy in it."""
    gen = make_generator(seed)
    Er = torch.randn(23, D, generator=gen)
    yr = torch.randint(0, 3, (23,), generator=gen)
    qri = torch.tensor([4, -1, 9, -1, 17, 0, -1, 22, 3, 11])
    Eq = torch.randn(10, D, generator=gen)
    yq = torch.randint(0, 3, (10,), generator=gen)
    Eq[qri >= 0] = Er[qri[qri >= 0]]
    yq[qri >= 0] = yr[qri[qri >= 0]]
    return Eq.to(dtype), yq, Er.to(dtype), yr, qri, torch.rand(10, generator=gen) + 0.5


@pytest.mark.parametrize(
    "name,similarity,reduction",
    [("pnp-Dq", "cosine", "mean"), ("smooth_ap", "cosine", "none"), ("recall_at_k", "dot", "mean")],
)
def test_float16_reference_set_dense(name, similarity, reduction):
    _, fn, oracle, opts = KINDS[KIND_IDS.index(name)]
    Eq, yq, Er, yr, qri, w = _reference_case(610 + KIND_IDS.index(name))
    if similarity == "dot":
        Eq, Er = (Eq.float() / 24**0.5).half(), (Er.float() / 24**0.5).half()
    kw = dict(opts, similarity=similarity, reduction=reduction)
    _check(
        lambda q, r: fn(
            q, yq.to(DEV), r, yr.to(DEV), query_ref_index=qri.to(DEV), backend="triton", memory_efficient=False, **kw
        ),
        lambda q, r: oracle(q, yq, r, yr, query_ref_index=qri, **kw),
        [Eq, Er],
        w if reduction == "none" else None,
    )


def test_float16_memory_bank_live_rows():
    """CrossBatchMemory in float16: the second step ranks the batch against (batch, memory) and
    only the batch's reference rows get a gradient (G^T read through a column selection)."""
    D, B = 24, 8
    loss = pnp_kernels.PNPLoss(variant="Dq", alpha=2.0, anneal=0.1, backend="triton", memory_efficient=False)
    xbm = pnp_kernels.CrossBatchMemory(loss, D, 16).half().to(DEV)
    gen = make_generator(620)
    mem_e, mem_y = torch.zeros(0, D, dtype=torch.float16), torch.zeros(0, dtype=torch.int64)
    for _step in range(2):
        E = torch.randn(B, D, generator=gen).half()
        y = torch.randint(0, 3, (B,), generator=gen)
        mem, my = mem_e.clone(), mem_y.clone()

        def oracle(x, y=y, mem=mem, my=my):
            ref = torch.cat([x, mem.to(x.dtype)])
            return pnp_loss_reference(
                x, y, ref, torch.cat([y, my]), query_ref_index=torch.arange(B), variant="Dq", alpha=2.0, anneal=0.1
            )

        _check(lambda x, y=y: xbm(x, y.to(DEV)), oracle, [E])
        mem_e, mem_y = torch.cat([mem_e, E]), torch.cat([mem_y, y])
    assert xbm.embedding_memory.dtype == torch.float16 and xbm.filled == 2 * B


# ---- what reaches the kernels -------------------------------------------------------------------


def test_half_rows_reach_the_dense_kernels_unrounded(monkeypatch):
    """The dense preparation keeps the sorted half rows and float32 norms, and both GEMMs of
    the forward and backward run in triton_gemm on those half rows (square and reference)."""
    impl = get_backend("triton")
    gen = make_generator(630)
    E = torch.randn(12, 24, generator=gen).half().to(DEV)
    y = (torch.arange(12) % 4).to(DEV)
    prep = impl.prepare(E, y, LossSpec(memory_efficient=False))
    assert prep.Xs.dtype == torch.float16 and torch.equal(prep.Xs, E[prep.perm])
    assert prep.denom.dtype == torch.float32
    assert torch.allclose(prep.denom, E.float().norm(dim=1)[prep.perm], rtol=1e-6)
    rp = impl.prepare_reference(E[:5], y[:5], E, y, None, LossSpec(memory_efficient=False))
    assert rp.Xq.dtype == rp.Xr.dtype == torch.float16 and torch.equal(rp.Xr, E[rp.perm_r])
    assert impl.rows_dtype(torch.bfloat16) == torch.bfloat16
    assert impl.rows_dtype(torch.float16, torch.bfloat16) == torch.float32  # mixed: float32 rows

    tg = _tgemm()
    seen = []
    for fname in ("similarity", "grad_product"):
        orig = getattr(tg, fname)

        def spy(*a, _orig=orig, _name=fname, **k):
            seen.append((_name, a[1].dtype))
            return _orig(*a, **k)

        monkeypatch.setattr(tg, fname, spy)
    x = E.detach().clone().requires_grad_(True)
    pnp_kernels.pnp_loss(x, y, backend="triton", memory_efficient=False).backward()
    assert seen == [("similarity", torch.float16), ("grad_product", torch.float16)]
    seen.clear()
    q, r = x[:5].detach().requires_grad_(True), x.detach().clone().requires_grad_(True)
    pnp_kernels.smooth_ap_loss(q, y[:5], r, y, backend="triton", memory_efficient=False).backward()
    assert sorted(seen) == [("grad_product", torch.float16)] * 2 + [("similarity", torch.float16)]


def test_float32_stages_are_torch_mm_bitwise(monkeypatch):
    """float32 rows: the backend's two stages return exactly the base class's torch.mm results
    and the Triton GEMMs are never called (a whole dense step included)."""
    impl = get_backend("triton")
    tg = _tgemm()

    def forbidden(*a, **k):
        raise AssertionError("triton_gemm called on float32 rows")

    monkeypatch.setattr(tg, "similarity", forbidden)
    monkeypatch.setattr(tg, "grad_product", forbidden)
    gen = make_generator(640)
    X = torch.randn(20, 24, generator=gen).to(DEV)
    Xr = torch.randn(13, 24, generator=gen).to(DEV)
    G = torch.randn(20, 13, generator=gen).to(DEV)
    g = (torch.rand(20, generator=gen) + 0.5).to(DEV)
    d = X.norm(dim=1)
    for spec in (LossSpec(), LossSpec(cosine=False)):
        assert torch.equal(impl.similarity(X, d, Xr, Xr.norm(dim=1), spec), torch.mm(X, Xr.t()))
        assert torch.equal(impl.grad_product(G, Xr, d, spec, row_scale=g), torch.mm(G, Xr).mul_(g[:, None]))
        assert torch.equal(impl.grad_product(G.t(), X, d, spec, col_scale=g), torch.mm(G.t(), X * g[:, None]))
        assert torch.equal(impl.grad_product(G.t(), X, d, spec), torch.mm(G.t(), X))
    x = X.clone().requires_grad_(True)
    pnp_kernels.pnp_loss(x, torch.arange(20).to(DEV) % 5, backend="triton", memory_efficient=False).backward()
    assert torch.isfinite(x.grad).all()


# ---- the launchers against float64 --------------------------------------------------------------


def _cancelling(seed, Q, K, D, dtype, common=100.0):
    """(G float32 with rows summing to ~0, X rows = a common vector of norm ~common + unit noise,
    in dtype): G X cancels, |G X| ~ |G| |noise| << |G| |X|."""
    gen = make_generator(seed)
    G = torch.randn(Q, K, generator=gen, dtype=torch.float64)
    G = (G - G.mean(dim=1, keepdim=True)).float()
    c = torch.randn(D, generator=gen) * (common / D**0.5)
    X = (c[None, :] + torch.randn(K, D, generator=gen)).to(dtype)
    return G, X


def _product64(G, X, col=None, row=None):
    Gd = G.double() * (1.0 if col is None else col.double()[None, :])
    out = Gd @ X.double()
    return out if row is None else out * row.double()[:, None]


def test_similarity_matches_float64():
    tg = _tgemm()
    gen = make_generator(650)
    Xq = torch.randn(37, 40, generator=gen).half()
    Xr = torch.randn(29, 40, generator=gen).half()
    iq = 1.0 / Xq.float().norm(dim=1)
    ir = 1.0 / Xr.float().norm(dim=1)
    S = tg.similarity(Xq.to(DEV), Xr.to(DEV), iq.to(DEV), ir.to(DEV)).cpu()
    exact = (Xq.double() @ Xr.double().t()) * iq.double()[:, None] * ir.double()[None, :]
    assert S.dtype == torch.float32 and S.shape == (37, 29)
    assert (S.double() - exact).abs().max() <= 1e-6
    Xd = Xq.to(DEV)
    SS = tg.similarity(Xd, Xd).cpu()  # X X^T, "dot"
    assert rel_err(SS, Xq.double() @ Xq.double().t()) <= 1e-7
    with pytest.raises(ValueError, match="iq, ir"):
        tg.similarity(Xd, Xd, iq.to(DEV))
    with pytest.raises(TypeError, match="Xq, Xr"):
        tg.similarity(Xd, Xd.float())
    assert tg.similarity(Xd[:, :0], Xd[:, :0]).abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
def test_grad_product_cancellation_matches_float64(dtype):
    """diag(r) G diag(c) X and G^T (a strided view) X to float32 accuracy under heavy
    cancellation; G rounded to one half term (the negative control) is far outside the bound."""
    tg = _tgemm()
    gen = make_generator(660)
    G, X = _cancelling(661, 37, 29, 40, dtype)
    col = torch.rand(29, generator=gen) + 0.5
    row = torch.rand(37, generator=gen) + 0.5
    bound = 1e-4
    for out, exact in (
        (tg.grad_product(G.to(DEV), X.to(DEV)), _product64(G, X)),
        (tg.grad_product(G.to(DEV), X.to(DEV), col.to(DEV), row.to(DEV)), _product64(G, X, col, row)),
    ):
        assert out.dtype == torch.float32 and out.shape == (37, 40)
        assert rel_err(out, exact) <= bound
    # the transposed product reads G^T in place: the rows of G^T (columns of G) sum to ~0 too here
    Gt, Xq = _cancelling(662, 29, 37, 40, dtype)
    GtT = Gt.t().contiguous()  # (37, 29) storage, passed as its (29, 37) transposed view
    assert rel_err(tg.grad_product(GtT.to(DEV).t(), Xq.to(DEV)), _product64(Gt, Xq)) <= bound
    # negative control: G rounded to a single float16 / bfloat16 term misses the bound
    for single in (torch.float16, torch.bfloat16):
        assert rel_err(_product64(G.to(single).float(), X), _product64(G, X)) > 20 * bound
    e_ours = rel_err(tg.grad_product(G.to(DEV), X.to(DEV)), _product64(G, X))
    print(f"\n[grad_product {dtype}] rel err {e_ours:.1e} (G split), control: see the asserts")


def test_grad_product_arguments():
    tg = _tgemm()
    G = torch.randn(5, 7).to(DEV)
    X = torch.randn(7, 3).half().to(DEV)
    with pytest.raises(ValueError, match="G, X"):
        tg.grad_product(G, X[:6])
    with pytest.raises(TypeError, match="G: "):
        tg.grad_product(G.half(), X)
    with pytest.raises(ValueError, match="col_scale"):
        tg.grad_product(G, X, torch.ones(6).to(DEV))
    assert tg.grad_product(G[:, :0], X[:0]).abs().sum() == 0


# ---- custom ops and torch.compile --------------------------------------------------------------


def test_opcheck_half_rows():
    """The fake tensors of the custom ops give Xs / Xq / Xr the half dtype the backend keeps."""
    flat = LossSpec(LOSS_PNP, VARIANTS["Dq"], 0.1, 2.0, 3.0, True, True).flat()
    gen = make_generator(670)
    E = torch.randn(10, 16, generator=gen).half().to(DEV).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4], device=DEV)
    torch.library.opcheck(torch.ops.pnp_kernels.square_loss_fwd.default, (E, y, *flat, "triton", True))
    Er = torch.randn(9, 16, generator=gen).half().to(DEV).requires_grad_(True)
    yr = torch.tensor([0, 1, 1, 2, 2, 3, 3, 5, 0], device=DEV)
    args = (E[:6].detach().requires_grad_(True), y[:6], Er, yr, None, *flat, "triton", True, -1)
    torch.library.opcheck(torch.ops.pnp_kernels.reference_loss_fwd.default, args)


def test_compiled_float16_step_equals_eager():
    torch._dynamo.reset()
    try:
        E, y, _ = _square_case(680, "cosine", B=16, D=16)
        E, y = E.to(DEV), y.to(DEV)

        def f(x, labels):
            return pnp_kernels.pnp_loss(x, labels, variant="Dq", anneal=0.1, backend="triton", memory_efficient=False)

        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        out_c, (grad_c,) = _grads(lambda x: compiled(x, y), [E])
        out_e, (grad_e,) = _grads(lambda x: f(x, y), [E])
        assert grad_c.dtype == torch.float16
        assert torch.equal(out_c, out_e) and torch.equal(grad_c, grad_e)
    finally:
        torch._dynamo.reset()


# ---- bfloat16 -----------------------------------------------------------------------------------
# On a GPU the GEMMs take the bfloat16 rows into tl.dot and split G into three bfloat16 terms.
# The interpreter has no bfloat16 arithmetic, so there the launchers widen the rows to float32
# (exactly) and these cases check the rest of the pipeline (bfloat16 rows kept, their norms,
# the way back; the interpreter's bfloat16 stores truncate, see _rounded); the split itself is
# checked on a GPU only (test_grad_product_cancellation_matches_float64).


def _bf16_shape():
    return (64, 32) if torch.cuda.is_available() else (20, 24)


@pytest.mark.parametrize("name,fn,oracle,opts", KINDS, ids=KIND_IDS)
def test_bfloat16_square_dense(name, fn, oracle, opts):
    B, D = _bf16_shape()
    E, y, _ = _square_case(690 + KIND_IDS.index(name), "cosine", dtype=torch.bfloat16, B=B, D=D)
    _check(
        lambda x: fn(x, y.to(DEV), backend="triton", memory_efficient=False, **opts),
        lambda x: oracle(x, y, **opts),
        [E],
    )


def test_bfloat16_reference_set_dense():
    _, fn, oracle, opts = KINDS[0]
    Eq, yq, Er, yr, qri, _ = _reference_case(695, dtype=torch.bfloat16, D=_bf16_shape()[1])
    _check(
        lambda q, r: fn(
            q, yq.to(DEV), r, yr.to(DEV), query_ref_index=qri.to(DEV), backend="triton", memory_efficient=False, **opts
        ),
        lambda q, r: oracle(q, yq, r, yr, query_ref_index=qri, **opts),
        [Eq, Er],
    )
