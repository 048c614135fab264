"""The ext backend's memory-efficient stage: the ops tiled_rows / tiled_grads (csrc/pnp_tiled.cpp)
and ``ExtBackend.tiled_rows`` / ``tiled_grads``.

* The ops against the float64 oracle ``reference.row_losses_reference`` (dS by autograd, then
  dXq = diag(g) dS Xr and dXr = (diag(g) dS)^T Xq): every loss kind and PNP variant, float32
  (1e-5) and float64 (1e-9), a square block and a reference set with own columns inside,
  outside and absent, strips from one row high to the automatic height.
* The same rows as the dense ext path (row_losses_and_dS on the whole S).
* The backend methods: the "mean" state (the unit-weight gradient, finished in the forward)
  scaled by equal weights, the recomputation for unequal ones, r_rows; end to end against
  the float64 oracles (square, reference set, "none", cosine and dot) and against the dense
  path (odd inputs, CrossBatchMemory).
* Bitwise determinism; odd shapes; errors naming the argument.
* Memory (subprocess): the peak RSS growth of a memory-efficient forward+backward stays
  under 3/4 of Q M float32 elements, while the dense path's is over 1.5 times that.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pnp_kernels
from pnp_kernels.backends import ext_build, get_backend
from pnp_kernels.reference import (
    pnp_loss_reference,
    recall_at_k_loss_reference,
    row_losses_reference,
    smooth_ap_loss_reference,
)
from pnp_kernels.spec import LossSpec
from pnp_kernels.variants import LOSS_KINDS, LOSS_PNP, LOSS_RECALL_AT_K, VARIANTS

from conftest import assert_close_to_reference, loss_and_grad, make_embeddings, make_generator, make_labels

pytestmark = pytest.mark.needs_backend("ext")

KINDS = tuple(LOSS_KINDS.items())  # (name, code)
TAU, ALPHA, B_IB = 0.05, 1.5, 2.0
KS, K_TEMPS = [4.0, 1.0, 2.0, 8.0], [2.0, 0.25, 8.0, 4.0]
TOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def _ops():
    return ext_build.ops()


def _variants(kind):
    return tuple(VARIANTS.values()) if kind == LOSS_PNP else (VARIANTS["O"],)


def _unit_rows(n, D, gen):
    return torch.nn.functional.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=1)


@functools.cache
def _case(name):
    """(Xq, Xr, lo, hi, own) in float64, exactly representable in float32."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "square":  # a batch against itself, classes of 1-5 (a class of one: empty segment)
        B = 44
        labels = torch.sort(torch.randint(0, 14, (B,), generator=gen)).values
        lo = torch.searchsorted(labels, labels, side="left", out_int32=True)
        hi = torch.searchsorted(labels, labels, side="right", out_int32=True)
        hi = torch.where(hi - lo >= 2, hi, lo)
        Xq = Xr = _unit_rows(B, 12, gen)
        own = torch.arange(B, dtype=torch.int32)
    elif name == "rect":  # queries against a reference set: single-positive rows, empty rows
        Q, M = 27, 61
        ref_labels = torch.sort(torch.cat([torch.randint(0, 10, (M - 3,), generator=gen), torch.tensor([20, 21, 22])]))
        ref_labels = ref_labels.values
        q_labels = torch.randint(0, 12, (Q,), generator=gen)  # 10, 11: no positive
        q_labels[:5] = torch.tensor([20, 21, 22, 11, 10])
        lo = torch.searchsorted(ref_labels, q_labels, side="left").to(torch.int32)
        hi = torch.searchsorted(ref_labels, q_labels, side="right").to(torch.int32)
        Xq, Xr = _unit_rows(Q, 12, gen), _unit_rows(M, 12, gen)
        # own columns: on a single positive (Recall@k drops the row), at the start, end and
        # middle of the segment, outside it, none
        pick = torch.randint(0, 1 << 20, (Q,), generator=gen)
        own = (lo + pick % (hi - lo).clamp(min=1)).to(torch.int32)
        own[:2] = lo[:2]
        own[5::5] = lo[5::5]
        own[6::5] = (hi[6::5] - 1).clamp(min=0)
        own[7::5] = (hi[7::5] % M).to(torch.int32)
        own[8::5] = -1
    else:
        raise ValueError(name)
    return Xq.float().double(), Xr.float().double(), lo, hi, own


def _spec_args(kind, variant):
    return (kind, variant.code, TAU, ALPHA, B_IB, KS, K_TEMPS)


@functools.cache
def _oracle(name, kind, variant_name):
    """(row loss, dS) of the float64 oracle on S = Xq Xr^T (dS of the plain sum of the rows)."""
    Xq, Xr, lo, hi, own = _case(name)
    S = (Xq @ Xr.t()).requires_grad_(True)
    loss = row_losses_reference(
        S, lo, hi, own, kind=kind, variant=variant_name, anneal=TAU, alpha=ALPHA, b=B_IB, ks=KS, k_temperatures=K_TEMPS
    )
    (dS,) = torch.autograd.grad(loss.sum(), S)
    return loss.detach(), dS


def _rel(a, r):
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm().clamp_min(1e-300))


def _weights(Q):
    return torch.rand(Q, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5


# --------------------------------------------------------------------------------- the ops vs the oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind_name,kind", KINDS)
@pytest.mark.parametrize("case", ["square", "rect"])
@pytest.mark.parametrize("block_rows", [1, 5, 0])
def test_ops_match_oracle(dtype, kind_name, kind, case, block_rows):
    Xq64, Xr64, lo, hi, own = _case(case)
    Xq, Xr = Xq64.to(dtype), Xr64.to(dtype)
    Q, M = Xq.shape[0], Xr.shape[0]
    g = _weights(Q)
    tol = TOL[dtype]
    for v in _variants(kind):
        ref_loss, dS = _oracle(case, kind, v.name)
        loss, grad = _ops().tiled_rows(Xq, Xr, lo, hi, own, None, *_spec_args(kind, v), True, block_rows)
        assert loss.dtype == dtype and grad.shape == (Q + M, Xq.shape[1])
        assert _rel(loss, ref_loss) <= tol, (v.name, _rel(loss, ref_loss))
        # the unit-weight gradient: [dS Xr; dS^T Xq]
        assert _rel(grad[:Q], dS @ Xr64) <= tol, v.name
        assert _rel(grad[Q:], dS.t() @ Xq64) <= tol, v.name
        loss2, empty = _ops().tiled_rows(Xq, Xr, lo, hi, own, None, *_spec_args(kind, v), False, block_rows)
        assert empty.shape == (0,) and torch.equal(loss2, loss)  # the same rows with or without the gradient
        # weighted rows, recomputed
        dXq, dXr = _ops().tiled_grads(
            Xq, Xr, lo, hi, own, g.to(dtype), None, *_spec_args(kind, v), True, True, block_rows
        )
        dSw = dS * g[:, None]
        assert _rel(dXq, dSw @ Xr64) <= tol, v.name
        assert _rel(dXr, dSw.t() @ Xq64) <= tol, v.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind_name,kind", KINDS)
def test_ops_match_dense_ext_path(dtype, kind_name, kind):
    """The same rows as row_losses_and_dS on the whole S (its row kernel runs on each strip)."""
    Xq64, Xr64, lo, hi, own = _case("rect")
    Xq, Xr = Xq64.to(dtype), Xr64.to(dtype)
    Q = Xq.shape[0]
    v = _variants(kind)[-1]
    dense_loss, G = _ops().row_losses_and_dS(Xq @ Xr.t(), lo, hi, own, *_spec_args(kind, v), True)
    loss, grad = _ops().tiled_rows(Xq, Xr, lo, hi, own, None, *_spec_args(kind, v), True, 4)
    tol = 1e-6 if dtype == torch.float32 else 1e-13  # the strips' GEMMs may round differently
    assert _rel(loss, dense_loss) <= tol
    assert _rel(grad[:Q], G @ Xr) <= tol and _rel(grad[Q:], G.t() @ Xq) <= tol
    dropped = dense_loss == 0
    assert dropped.any() and (loss[dropped] == 0).all() and (grad[:Q][dropped] == 0).all()


def test_ops_forward_r_rows():
    """tiled_rows with r_rows: the finished gradient holds G^T Xq for those rows only, in their order; errors
    name r_rows."""
    Xq, Xr, lo, hi, own = _case("rect")
    Q = Xq.shape[0]
    args = _spec_args(LOSS_KINDS["pnp"], VARIANTS["Dq"])
    loss, full = _ops().tiled_rows(Xq, Xr, lo, hi, own, None, *args, True, 0)
    rows = torch.tensor([40, 3, 17, 60])
    loss2, part = _ops().tiled_rows(Xq, Xr, lo, hi, own, rows, *args, True, 0)
    assert torch.equal(loss2, loss) and part.shape == (Q + 4, Xq.shape[1])
    torch.testing.assert_close(part[:Q], full[:Q], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(part[Q:], full[Q:][rows], rtol=1e-12, atol=1e-15)
    _, none = _ops().tiled_rows(Xq, Xr, lo, hi, own, torch.zeros(0, dtype=torch.int64), *args, True, 0)
    assert none.shape == (Q, Xq.shape[1])
    with pytest.raises(RuntimeError, match="r_rows must hold row indices of Xr in 0..60, got 61"):
        _ops().tiled_rows(Xq, Xr, lo, hi, own, torch.tensor([61]), *args, True, 0)


def test_ops_r_rows_and_need_flags():
    Xq, Xr, lo, hi, own = _case("rect")
    Q, M = Xq.shape[0], Xr.shape[0]
    g = _weights(Q)
    args = _spec_args(LOSS_KINDS["smooth_ap"], VARIANTS["O"])
    dXq, dXr = _ops().tiled_grads(Xq, Xr, lo, hi, own, g, None, *args, True, True, 0)
    rows = torch.randperm(M, generator=torch.Generator().manual_seed(2))[:9]  # distinct, any order
    live = torch.zeros(M, dtype=torch.bool)
    live[rows] = True
    q2, r2 = _ops().tiled_grads(Xq, Xr, lo, hi, own, g, rows, *args, False, True, 0)
    assert q2.shape == (0,) and r2.shape == (M, Xq.shape[1])
    assert (r2[~live] == 0).all()
    torch.testing.assert_close(r2[live], dXr[live], rtol=1e-12, atol=1e-15)
    q3, r3 = _ops().tiled_grads(Xq, Xr, lo, hi, own, g, rows, *args, True, False, 0)
    assert r3.shape == (0,) and torch.equal(q3, dXq)
    q4, r4 = _ops().tiled_grads(Xq, Xr, lo, hi, own, g, None, *args, False, False, 0)
    assert q4.shape == (0,) and r4.shape == (0,)


def test_ops_deterministic():
    """Bitwise equal across runs, with several strips spread over the threads."""
    gen = torch.Generator().manual_seed(11)
    B = 300
    labels = torch.sort(torch.randint(0, 75, (B,), generator=gen)).values
    lo = torch.searchsorted(labels, labels, side="left", out_int32=True)
    hi = torch.searchsorted(labels, labels, side="right", out_int32=True)
    X = _unit_rows(B, 16, gen).float()
    own = torch.arange(B, dtype=torch.int32)
    g = _weights(B).float()
    for kind in LOSS_KINDS.values():
        args = _spec_args(kind, VARIANTS["Dq"])
        runs = [
            (
                _ops().tiled_rows(X, X, lo, hi, own, None, *args, True, 0),
                _ops().tiled_grads(X, X, lo, hi, own, g, None, *args, True, True, 0),
            )
            for _ in range(2)
        ]
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), kind


def test_ops_odd_shapes():
    ops = _ops()
    args = _spec_args(LOSS_PNP, VARIANTS["O"])
    i32 = dict(dtype=torch.int32)
    X = torch.randn(5, 4)
    # no query
    loss, grad = ops.tiled_rows(
        X[:0], X, torch.zeros(0, **i32), torch.zeros(0, **i32), torch.zeros(0, **i32), None, *args, True, 0
    )
    assert loss.shape == (0,) and grad.shape == (5, 4) and (grad == 0).all()
    # no reference row: every segment empty
    z = torch.zeros(5, **i32)
    loss, grad = ops.tiled_rows(X, X[:0], z, z, z - 1, None, *args, True, 0)
    assert (loss == 0).all() and grad.shape == (5, 4) and (grad == 0).all()
    # no feature: S = 0
    lo = torch.tensor([0, 0, 2, 2, 4], **i32)
    hi = torch.tensor([2, 2, 4, 4, 4], **i32)
    loss, grad = ops.tiled_rows(X[:, :0], X[:, :0], lo, hi, torch.arange(5, **i32), None, *args, True, 0)
    assert torch.isfinite(loss).all() and grad.shape == (10, 0)


def test_ops_nan_row():
    """A NaN query row gives that row a NaN loss; the other rows are unaffected."""
    Xq, Xr, lo, hi, own = _case("rect")
    Xq = Xq.clone()
    Xq[9, 3] = float("nan")
    args = _spec_args(LOSS_KINDS["smooth_ap"], VARIANTS["O"])
    loss, _ = _ops().tiled_rows(Xq, Xr, lo, hi, own, None, *args, False, 4)
    clean, _ = _ops().tiled_rows(_case("rect")[0], Xr, lo, hi, own, None, *args, False, 4)
    assert torch.isnan(loss[9]) and hi[9] > lo[9]
    keep = torch.arange(Xq.shape[0]) != 9
    assert torch.equal(loss[keep], clean[keep])


def test_ops_errors():
    ops = _ops()
    Xq, Xr, lo, hi, own = _case("rect")
    args = _spec_args(LOSS_PNP, VARIANTS["O"])
    bad = hi.clone()
    bad[3] = Xr.shape[0] + 2
    with pytest.raises(RuntimeError, match=r"segment .* of row 3 is out of range"):
        ops.tiled_rows(Xq, Xr, lo, bad, own, None, *args, True, 0)
    with pytest.raises(RuntimeError, match="Xr must have Xq's dtype"):
        ops.tiled_rows(Xq, Xr.float(), lo, hi, own, None, *args, True, 0)
    with pytest.raises(RuntimeError, match="same number of columns"):
        ops.tiled_rows(Xq, Xr[:, :5], lo, hi, own, None, *args, True, 0)
    with pytest.raises(RuntimeError, match="own must be a contiguous int32"):
        ops.tiled_rows(Xq, Xr, lo, hi, own.long(), None, *args, True, 0)
    with pytest.raises(RuntimeError, match="block_rows must be >= 0"):
        ops.tiled_rows(Xq, Xr, lo, hi, own, None, *args, True, -1)
    rargs = (LOSS_RECALL_AT_K, 0, TAU, ALPHA, B_IB, [], [])
    with pytest.raises(RuntimeError, match="ks must hold at least one k"):
        ops.tiled_rows(Xq, Xr, lo, hi, own, None, *rargs, True, 0)
    bad_own = own.clone()
    bad_own[4] = Xr.shape[0]
    with pytest.raises(RuntimeError, match="own column .* of row 4 is out of range"):
        ops.tiled_rows(Xq, Xr, lo, hi, bad_own, None, LOSS_RECALL_AT_K, 0, TAU, ALPHA, B_IB, KS, K_TEMPS, True, 0)
    g = _weights(Xq.shape[0])
    with pytest.raises(RuntimeError, match="g must be a vector"):
        ops.tiled_grads(Xq, Xr, lo, hi, own, g[:-1], None, *args, True, True, 0)
    with pytest.raises(RuntimeError, match="r_rows must be an int64 vector"):
        ops.tiled_grads(Xq, Xr, lo, hi, own, g, torch.ones(Xr.shape[0], dtype=torch.bool), *args, True, True, 0)
    with pytest.raises(RuntimeError, match="r_rows must hold row indices of Xr in 0..60, got 61"):
        ops.tiled_grads(Xq, Xr, lo, hi, own, g, torch.tensor([3, 61]), *args, True, True, 0)
    with pytest.raises(RuntimeError, match="r_rows must hold distinct row indices, 3 repeats"):
        ops.tiled_grads(Xq, Xr, lo, hi, own, g, torch.tensor([3, 5, 3]), *args, True, True, 0)


# --------------------------------------------------------------------------------- the backend methods


@pytest.mark.parametrize("kind_name,kind", KINDS)
@pytest.mark.parametrize("case", ["square", "rect"])
def test_backend_state_equal_and_unequal_weights(kind_name, kind, case):
    """With "mean" the state is the forward's unit-weight gradient, scaled by an expanded (equal) weight (with
    r_rows, of those reference rows only); any other weight vector is recomputed from the strips. "none":
    nothing kept, recomputed."""
    be = get_backend("ext")
    Xq, Xr, lo, hi, own = _case(case)
    Q, M = Xq.shape[0], Xr.shape[0]
    ref_loss, dS = _oracle(case, kind, "O")
    live = torch.arange(M) % 3 == 1  # r_rows: the rows whose dXr is needed
    r_rows = live.nonzero()[:, 0].flip(0)  # any order
    for mean in (True, False):
        spec = LossSpec(
            kind=kind,
            anneal=TAU,
            alpha=ALPHA,
            b=B_IB,
            mean=mean,
            ks=tuple(KS),
            k_temperatures=tuple(K_TEMPS),
            memory_efficient=True,
        )
        loss, state = be.tiled_rows(Xq, Xr, lo, hi, own, spec, True)
        assert _rel(loss, ref_loss) <= 1e-12
        assert state.shape == ((Q + M, Xq.shape[1]) if mean else (0,))
        for g in (torch.tensor([0.7], dtype=torch.float64).expand(Q), _weights(Q)):
            dXq, dXr = be.tiled_grads(Xq, Xr, lo, hi, own, state, g, spec, True, True)
            dSw = dS * g[:, None]
            assert _rel(dXq, dSw @ Xr) <= 1e-12 and _rel(dXr, dSw.t() @ Xq) <= 1e-12
        _, state = be.tiled_rows(Xq, Xr, lo, hi, own, spec, True, r_rows)
        assert state.shape == ((Q + int(live.sum()), Xq.shape[1]) if mean else (0,))
        for g in (torch.tensor([0.7], dtype=torch.float64).expand(Q), _weights(Q)):
            dXq, dXr = be.tiled_grads(Xq, Xr, lo, hi, own, state, g, spec, False, True, r_rows)
            assert dXq is None and dXr.shape == Xr.shape and (dXr[~live] == 0).all()
            assert _rel(dXr[live], ((dS * g[:, None]).t() @ Xq)[live]) <= 1e-12
        _, none_state = be.tiled_rows(Xq, Xr, lo, hi, own, spec, False)
        assert none_state is None


KIND_FNS = [
    ("pnp-Dq", pnp_kernels.pnp_loss, pnp_loss_reference, dict(variant="Dq", anneal=0.05, alpha=2.0)),
    ("pnp-Ib", pnp_kernels.pnp_loss, pnp_loss_reference, dict(variant="Ib", anneal=0.05, b=3.0)),
    ("smooth_ap", pnp_kernels.smooth_ap_loss, smooth_ap_loss_reference, dict(temperature=0.05)),
    (
        "recall_at_k",
        pnp_kernels.recall_at_k_loss,
        recall_at_k_loss_reference,
        dict(k=(1, 2, 4), temperature=0.05, k_temperature=(1.0, 0.5, 2.0)),
    ),
]


def _end_to_end(fn, oracle, opts, E, labels, dtype, weights=None, ref_args=(), **kw):
    ref = [t.to(dtype) if t.is_floating_point() else t for t in ref_args]
    out, grad = loss_and_grad(
        lambda x: fn(x, labels, *ref, backend="ext", memory_efficient=True, **opts, **kw), E.to(dtype), weights
    )
    ref64 = [t.double() if t.is_floating_point() else t for t in ref_args]
    ref_out, ref_grad = loss_and_grad(lambda x: oracle(x, labels, *ref64, **opts, **kw), E.double(), weights)
    assert out.dtype == dtype
    assert_close_to_reference(out, grad, ref_out, ref_grad, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("name,fn,oracle,opts", KIND_FNS, ids=[k[0] for k in KIND_FNS])
def test_end_to_end_square(dtype, similarity, name, fn, oracle, opts):
    gen = make_generator(9100 + len(name))
    B = 30
    labels = make_labels("unequal", B, gen)
    E = make_embeddings(B, 8, similarity, gen).to(dtype).double()
    _end_to_end(fn, oracle, opts, E, labels, dtype, similarity=similarity)
    w = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    _end_to_end(fn, oracle, opts, E, labels, dtype, weights=w, similarity=similarity, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name,fn,oracle,opts", KIND_FNS, ids=[k[0] for k in KIND_FNS])
def test_end_to_end_reference_set(reduction, name, fn, oracle, opts):
    Q, M, D = 14, 26, 8
    gen = make_generator(9200 + len(name))
    Er = make_embeddings(M, D, "cosine", gen).float().double()
    yr = torch.randint(0, 4, (M,), generator=gen) * 3 - 5
    qri = torch.full((Q,), -1, dtype=torch.int64)
    qri[: Q // 2] = torch.randperm(M, generator=gen)[: Q // 2]
    Eq = make_embeddings(Q, D, "cosine", gen).float().double()
    yq = torch.randint(0, 4, (Q,), generator=gen) * 3 - 5
    Eq[: Q // 2] = Er[qri[: Q // 2]]
    yq[: Q // 2] = yr[qri[: Q // 2]]
    w = torch.rand(Q, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    _end_to_end(
        fn, oracle, opts, Eq, yq, torch.float32, weights=w, ref_args=(Er, yr), query_ref_index=qri, reduction=reduction
    )


@pytest.mark.parametrize("name,fn,oracle,opts", KIND_FNS[::2], ids=[k[0] for k in KIND_FNS[::2]])
def test_odd_inputs_as_dense(name, fn, oracle, opts):
    """One class, all distinct, a zero-norm row, a NaN: what the dense ext path gives."""
    gen = make_generator(9300)
    B, D = 12, 6
    cases = {
        "one_class": (make_embeddings(B, D, "cosine", gen), torch.zeros(B, dtype=torch.int64)),
        "all_distinct": (make_embeddings(B, D, "cosine", gen), torch.arange(B)),
        "zero_row": (make_embeddings(B, D, "cosine", gen), torch.arange(B) % 3),
        "nan_row": (make_embeddings(B, D, "cosine", gen), torch.arange(B) % 3),
    }
    cases["zero_row"][0][4] = 0.0
    cases["nan_row"][0][2, 1] = float("nan")
    for label, (E, y) in cases.items():
        for red in ("mean", "none"):
            got = {
                me: loss_and_grad(
                    lambda x: fn(x, y, backend="ext", memory_efficient=me, reduction=red, **opts),
                    E,
                    None if red == "mean" else torch.linspace(0.5, 1.5, B, dtype=torch.float64),
                )
                for me in (True, False)
            }
            (o1, g1), (o0, g0) = got[True], got[False]
            if label == "nan_row":
                assert torch.isnan(o1).any() and torch.isnan(g1).any(), label
                assert torch.equal(torch.isnan(o1), torch.isnan(o0)), label
                continue
            assert torch.isfinite(o1).all() and torch.isfinite(g1).all(), label
            torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
            if label == "all_distinct":
                assert (o1 == 0).all() and (g1 == 0).all()


def test_end_to_end_deterministic():
    gen = make_generator(9400)
    labels = make_labels("unsorted", 40, gen)
    E = make_embeddings(40, 16, "cosine", gen).float()
    for red in ("mean", "none"):
        runs = [
            loss_and_grad(
                lambda x: pnp_kernels.recall_at_k_loss(x, labels, backend="ext", memory_efficient=True, reduction=red),
                E,
                None if red == "mean" else torch.linspace(0.5, 1.5, 40),
            )
            for _ in range(2)
        ]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_batch_memory_same_as_dense(dtype, reduction):
    """CrossBatchMemory (the batch ranked against a detached memory): the same as dense."""
    D = 8
    gen = make_generator(9500)
    batches = [
        (make_embeddings(10, D, "cosine", gen).to(dtype), torch.randint(0, 4, (10,), generator=gen)) for _ in range(3)
    ]
    losses = {}
    for me in (True, False):
        loss = pnp_kernels.SmoothAPLoss(memory_efficient=me, backend="ext", reduction=reduction)
        xbm = pnp_kernels.CrossBatchMemory(loss, D, 16)
        w = None if reduction == "mean" else torch.linspace(0.5, 1.5, 10, dtype=torch.float64)
        losses[me] = [loss_and_grad(lambda x: xbm(x, y), E, w) for E, y in batches]
    tol = TOL[dtype]  # two paths, each within TOL of the exact value
    for (o1, g1), (o0, g0) in zip(losses[True], losses[False]):
        assert o1.dtype == dtype and _rel(o1, o0) <= tol and _rel(g1, g0) <= tol


# --------------------------------------------------------------------------------- memory


_MEMORY_PROBE = """
import json, re, sys, torch, pnp_kernels
from pnp_kernels.backends import ext_build
ext_build.ops()
B, D = 3072, 8
gen = torch.Generator().manual_seed(0)
E = torch.randn(B, D, generator=gen)
y = torch.randperm(B, generator=gen) % (B // 4)
def rss_peak():  # bytes; VmHWM, reset by writing 5 to clear_refs
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
def step(x, me, ref):
    x = x.clone().requires_grad_()
    n = x.shape[0]
    if ref:  # half the rows as queries against all of them
        loss = pnp_kernels.pnp_loss(x[: n // 2], y[: n // 2], x, y[:n], backend="ext", memory_efficient=me)
    else:
        loss = pnp_kernels.pnp_loss(x, y[:n], backend="ext", memory_efficient=me)
    loss.backward()
for me in (True, False):  # warm up (library, threads) on a small batch
    step(E[:256], me, False)
out = {}
for label in sys.argv[1:]:
    me, ref = label != "dense", label == "me_reference"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_peak()
    step(E, me, ref)
    out[label] = (rss_peak() - base) / (B * (B // 2 if ref else B) * 4)
print(json.dumps(out))
"""


def test_peak_memory_under_q_by_m():
    """Peak RSS growth per Q M float32 elements: under 3/4 for the memory-efficient path (square
    and a reference set), over 1.5 for the dense path (S and G), in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEMORY_PROBE), "me_square", "me_reference", "dense"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth["me_square"] < 0.75 and growth["me_reference"] < 0.75, growth
    assert growth["dense"] > 1.5, growth
