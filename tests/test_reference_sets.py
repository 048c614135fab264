"""Reference sets (``ref_emb``, ``ref_labels``, ``query_ref_index``) in every backend.

Rectangular cases against the float64 brute-force oracle of the same semantics
(pnp_kernels.reference): Q != M, query_ref_index mixing -1 and valid positions, a
query whose only positive is its own copy (dropped), a query with no positive at all,
reference labels absent from the queries, ref_emb with and without grad,
reduction="none"; loss AND gradients (embeddings and ref_emb), float32 within 1e-5.
Also the identity loss(E, y) == loss(E, y, E, y, query_ref_index=arange(B)) in value
and gradient, and gradcheck at small size. Triton runs under the interpreter: small.
"""

import pytest
import torch

import pnp_kernels
from pnp_kernels.reference import pnp_loss_reference, smooth_ap_loss_reference

from conftest import SIMILARITIES, VARIANTS, make_generator, rel_err

TOL32 = 1e-5
SHAPES = {"torch": (14, 40, 16), "ext": (14, 40, 16), "triton": (9, 22, 8)}  # Q, M, D

# (kind, variant) cases: every PNP variant and Smooth-AP
CASES = [("pnp", v) for v in VARIANTS] + [("smooth_ap", None)]
CASE_IDS = [f"pnp-{v}" if k == "pnp" else "smooth_ap" for k, v in CASES]


def _loss(kind, variant, **kw):
    if kind == "pnp":
        opts = dict(variant=variant, anneal=0.05, alpha=2.0, b=3.0)
        return (
            lambda *a, **k: pnp_kernels.pnp_loss(*a, **opts, **kw, **k),
            lambda *a, **k: pnp_loss_reference(*a, **opts, **kw, **k),
        )
    opts = dict(temperature=0.05)
    return (
        lambda *a, **k: pnp_kernels.smooth_ap_loss(*a, **opts, **kw, **k),
        lambda *a, **k: smooth_ap_loss_reference(*a, **opts, **kw, **k),
    )


def rect_case(Q, M, D, similarity, gen, dtype=torch.float32):
    """Queries and a reference set with every special case of the semantics.

    - queries 0..Q-4: labels in 0..4, the first half with their own copy in the reference set;
    - query Q-3: label 30, whose only reference row is its own copy (dropped);
    - query Q-2: label 31, absent from the reference set (no positive: dropped);
    - query Q-1: label 32 with one reference row that is not its copy (valid, single positive);
    - reference labels 20 and 21 appear in no query.
    """
    yq = torch.cat([torch.randint(0, 5, (Q - 3,), generator=gen), torch.tensor([30, 31, 32])])
    n_copies = (Q - 3) // 2
    yr = torch.cat([torch.randint(0, 5, (M - n_copies - 4,), generator=gen), torch.tensor([20, 21, 30, 32])])
    scale = (1.0 / D**0.5) if similarity == "dot" else 1.0
    Eq = torch.randn(Q, D, generator=gen, dtype=torch.float64) * scale
    Er = torch.randn(yr.numel(), D, generator=gen, dtype=torch.float64) * scale
    # the copies: reference rows equal to queries 0..n_copies-1, and query Q-3's copy (label 30)
    Er = torch.cat([Er, Eq[:n_copies]])
    yr = torch.cat([yr, yq[:n_copies]])
    qri = torch.full((Q,), -1, dtype=torch.int64)
    qri[:n_copies] = torch.arange(M - n_copies, M)
    Er[M - n_copies - 2] = Eq[Q - 3]
    qri[Q - 3] = M - n_copies - 2  # the label-30 row
    perm = torch.randperm(M, generator=gen)  # shuffle the reference set; the index follows its rows
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(M)
    Er, yr = Er[perm], yr[perm]
    qri = torch.where(qri >= 0, inv[qri.clamp(min=0)], qri)
    return Eq.to(dtype), yq, Er.to(dtype), yr, qri


def _grads(fn, Eq, yq, Er, yr, qri, weights, ref_grad=True):
    q = Eq.detach().clone().requires_grad_(True)
    r = Er.detach().clone().requires_grad_(ref_grad)
    out = fn(q, yq, r, yr, query_ref_index=qri)
    target = out if weights is None else (out * weights.to(out.dtype)).sum()
    inputs = [q, r] if ref_grad else [q]
    grads = torch.autograd.grad(target, inputs)
    return out.detach(), grads


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("kind,variant", CASES, ids=CASE_IDS)
def test_rectangular_matches_oracle(backend, kind, variant, similarity):
    Q, M, D = SHAPES[backend]
    gen = make_generator(3000 + CASES.index((kind, variant)) * 10 + SIMILARITIES.index(similarity))
    Eq, yq, Er, yr, qri = rect_case(Q, M, D, similarity, gen)
    ours, ref = _loss(kind, variant, similarity=similarity)
    out, (gq, gr) = _grads(lambda *a, **k: ours(*a, backend=backend, **k), Eq, yq, Er, yr, qri, None)
    rout, (rq, rr) = _grads(ref, Eq.double(), yq, Er.double(), yr, qri, None)
    assert out.dtype == torch.float32 and gq.dtype == gr.dtype == torch.float32
    assert rout.item() != 0
    assert rel_err(out, rout) <= TOL32
    assert rel_err(gq, rq) <= TOL32
    assert rel_err(gr, rr) <= TOL32


@pytest.mark.parametrize("kind,variant", CASES, ids=CASE_IDS)
def test_rectangular_reduction_none_and_dropped_queries(backend, kind, variant):
    Q, M, D = SHAPES[backend]
    gen = make_generator(3100 + CASES.index((kind, variant)))
    Eq, yq, Er, yr, qri = rect_case(Q, M, D, "cosine", gen)
    ours, ref = _loss(kind, variant, reduction="none")
    w = torch.rand(Q, generator=gen, dtype=torch.float64) + 0.5
    out, (gq, gr) = _grads(lambda *a, **k: ours(*a, backend=backend, **k), Eq, yq, Er, yr, qri, w)
    rout, (rq, rr) = _grads(ref, Eq.double(), yq, Er.double(), yr, qri, w)
    assert out.shape == (Q,)
    assert rel_err(out, rout) <= TOL32
    assert rel_err(gq, rq) <= TOL32 and rel_err(gr, rr) <= TOL32
    # the own-copy-only query and the query without positives are dropped; the single positive is not
    assert out[Q - 3] == 0 and out[Q - 2] == 0 and rout[Q - 3] == 0 and rout[Q - 2] == 0
    assert out[Q - 1] != 0


@pytest.mark.parametrize("kind,variant", [("pnp", "Dq"), ("smooth_ap", None)], ids=["pnp-Dq", "smooth_ap"])
def test_reference_without_grad_and_without_index(backend, kind, variant):
    """A detached reference set (a memory bank) and query_ref_index=None (no copies)."""
    Q, M, D = SHAPES[backend]
    gen = make_generator(3200 + (kind == "pnp"))
    Eq, yq, Er, yr, _ = rect_case(Q, M, D, "cosine", gen)
    ours, ref = _loss(kind, variant)
    out, (gq,) = _grads(lambda *a, **k: ours(*a, backend=backend, **k), Eq, yq, Er, yr, None, None, ref_grad=False)
    rout, (rq,) = _grads(ref, Eq.double(), yq, Er.double(), yr, None, None, ref_grad=False)
    assert rel_err(out, rout) <= TOL32 and rel_err(gq, rq) <= TOL32


@pytest.mark.parametrize("kind,variant", CASES, ids=CASE_IDS)
def test_square_equals_reference_with_itself(backend, kind, variant):
    """loss(E, y) == loss(E, y, E, y, query_ref_index=arange(B)): value and gradient (autograd
    sums the query and reference paths)."""
    B, _, D = SHAPES[backend]
    B = 2 * B
    gen = make_generator(3300 + CASES.index((kind, variant)))
    y = torch.randint(0, 6, (B,), generator=gen)
    y[0] = 99  # a singleton: dropped in both forms
    E = torch.randn(B, D, generator=gen)
    ours, _ = _loss(kind, variant)
    x1 = E.clone().requires_grad_(True)
    a = ours(x1, y, backend=backend)
    (g1,) = torch.autograd.grad(a, x1)
    x2 = E.clone().requires_grad_(True)
    b = ours(x2, y, x2, y, query_ref_index=torch.arange(B), backend=backend)
    (g2,) = torch.autograd.grad(b, x2)
    assert rel_err(b, a) <= 1e-6
    assert rel_err(g2, g1) <= 1e-6


@pytest.mark.parametrize("kind", ["pnp", "smooth_ap"])
def test_gradcheck_reference_set(kind):
    gen = make_generator(3400)
    Eq, yq, Er, yr, qri = rect_case(7, 13, 4, "cosine", gen, dtype=torch.float64)
    ours, _ = _loss(kind, "Dq")
    q = Eq.clone().requires_grad_(True)
    r = Er.clone().requires_grad_(True)
    fn = lambda a, c: ours(a, yq, c, yr, query_ref_index=qri, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, r), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reference_set_on_another_dtype_family_keeps_each_gradient_dtype():
    """float16 queries against a float32 reference: both compute in float32; each gradient
    comes back in its own input's dtype."""
    gen = make_generator(3500)
    Eq, yq, Er, yr, qri = rect_case(10, 20, 8, "cosine", gen)
    q = Eq.half().requires_grad_(True)
    r = Er.clone().requires_grad_(True)
    out = pnp_kernels.pnp_loss(q, yq, r, yr, query_ref_index=qri, backend="torch")
    out.backward()
    assert out.dtype == torch.float32 and q.grad.dtype == torch.float16 and r.grad.dtype == torch.float32
    assert torch.isfinite(q.grad).all() and torch.isfinite(r.grad).all()
