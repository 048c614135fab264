"""The Recall@k surrogate on every backend, against the float64 brute-force oracle.

Loss AND gradient, float32 inputs, norm-wise relative error <= 1e-5 against
``recall_at_k_loss_reference`` on the same inputs in float64: the label patterns of
conftest (grouped, unsorted with negative ids, unequal classes, singletons, one class,
all distinct), cosine and dot, several K and tau2 settings (a clipped case where
|P_q| > k), reference sets with mixed ``query_ref_index``, ``reduction="none"``, the
dense and the memory-efficient path, CrossBatchMemory, gradcheck in float64, the
option errors, and the difference from the authors' convention (query in its own
gallery).
"""

import pytest
import torch

import pnp_kernels
from pnp_kernels import recall_at_k_loss
from pnp_kernels.reference import recall_at_k_loss_reference

from conftest import (
    GRADCHECK_TOLS,
    PATTERNS,
    SIMILARITIES,
    assert_close_to_reference,
    device_for,
    loss_and_grad,
    make_embeddings,
    make_generator,
    make_labels,
)

TOL32 = 1e-5
SHAPES = {"torch": (40, 16), "triton": (24, 8), "ext": (40, 16)}
# (k, temperature, k_temperature): the authors' defaults; one k that clips in classes of
# > 2 (|P_q| > k) with one tau2 for all; unsorted k with one tau2 each.
SETTINGS = {
    "default": dict(k=(1, 2, 4, 8, 16), temperature=0.05),
    "clipped": dict(k=2, temperature=0.05, k_temperature=0.5),
    "mixed": dict(k=(4, 1, 3), temperature=0.1, k_temperature=(2.0, 0.25, 1.0)),
}


def _run(backend, labels, E, weights=None, tol=TOL32, ref_args=(), **kw):
    dev = device_for(backend)
    dev_ref = tuple(t.to(dev) for t in ref_args)
    out, grad = loss_and_grad(
        lambda x: recall_at_k_loss(x, labels.to(dev), *dev_ref, backend=backend, **kw),
        E.to(dev),
        None if weights is None else weights.to(dev),
    )
    kw.pop("memory_efficient", None)
    ref_out, ref_grad = loss_and_grad(
        lambda x: recall_at_k_loss_reference(
            x, labels, *[t.double() if t.is_floating_point() else t for t in ref_args], **kw
        ),
        E.double(),
        weights,
    )
    assert_close_to_reference(out.cpu(), grad.cpu(), ref_out, ref_grad, tol)
    return out.cpu(), ref_out


def _parity_cases():
    """Every backend x similarity x pattern x setting, except that the Triton interpreter (slow)
    runs the "default" and "clipped" settings on the two richest patterns only."""
    cases = []
    for backend in SHAPES:
        for similarity in SIMILARITIES:
            for pattern in PATTERNS:
                for setting in SETTINGS:
                    if backend == "triton" and setting != "mixed" and pattern not in ("unequal", "unsorted"):
                        continue
                    cases.append(
                        pytest.param(
                            backend,
                            similarity,
                            pattern,
                            setting,
                            marks=pytest.mark.needs_backend(backend),
                            id=f"{backend}-{similarity}-{pattern}-{setting}",
                        )
                    )
    return cases


@pytest.mark.parametrize("backend,similarity,pattern,setting", _parity_cases())
def test_parity(backend, similarity, pattern, setting):
    B, D = SHAPES[backend]
    if backend == "triton" and pattern == "one_class":
        B = 20
    gen = make_generator(
        7000 + 10 * PATTERNS.index(pattern) + SIMILARITIES.index(similarity) + 100 * list(SETTINGS).index(setting)
    )
    labels = make_labels(pattern, B, gen)
    E = make_embeddings(B, D, similarity, gen)
    out, ref = _run(backend, labels, E, similarity=similarity, **SETTINGS[setting])
    assert out.dtype == torch.float32 and out.shape == ()
    if pattern == "all_distinct":
        assert ref.item() == 0.0 and out.item() == 0.0  # no valid query
    else:
        assert 0.0 < ref.item() < 1.0


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_reduction_none_and_paths(backend, memory_efficient):
    B, D = SHAPES[backend]
    gen = make_generator(7400)
    labels = make_labels("singletons", B, gen)
    E = make_embeddings(B, D, "cosine", gen)
    w = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    out, ref = _run(
        backend, labels, E, weights=w, reduction="none", memory_efficient=memory_efficient, **SETTINGS["mixed"]
    )
    assert out.shape == (B,)
    dropped = ref == 0
    assert dropped.any() and torch.all(out[dropped] == 0)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_reference_set(backend, memory_efficient):
    """Queries against a reference set holding some of their own copies (mixed query_ref_index),
    gradients to both; a query whose only positive is its own copy is dropped."""
    Q, M, D = (10, 14, 8) if backend == "triton" else (16, 30, 12)
    gen = make_generator(7500)
    yq = torch.randint(0, 4, (Q,), generator=gen) * 5 - 3
    Er = make_embeddings(M, D, "cosine", gen)
    yr = torch.randint(0, 4, (M,), generator=gen) * 5 - 3
    Eq = make_embeddings(Q, D, "cosine", gen)
    qri = torch.full((Q,), -1, dtype=torch.int64)
    qri[: Q // 2] = torch.randperm(M, generator=gen)[: Q // 2]
    Eq[: Q // 2] = Er[qri[: Q // 2]]  # those queries are in the reference set
    yq[: Q // 2] = yr[qri[: Q // 2]]
    yq[Q - 1] = 999  # no positive at all
    dev = device_for(backend)
    kw = dict(query_ref_index=qri, memory_efficient=memory_efficient, **SETTINGS["default"])
    Eq_, Er_ = Eq.to(dev).detach().requires_grad_(True), Er.to(dev).detach().requires_grad_(True)
    out = recall_at_k_loss(Eq_, yq.to(dev), Er_, yr.to(dev), backend=backend, **{**kw, "query_ref_index": qri.to(dev)})
    out.backward()
    Eq64, Er64 = Eq.double().requires_grad_(True), Er.double().requires_grad_(True)
    assert Eq64.is_leaf and Er64.is_leaf
    kw.pop("memory_efficient")
    ref = recall_at_k_loss_reference(Eq64, yq, Er64, yr, **kw)
    ref.backward()
    assert_close_to_reference(out.detach().cpu(), Eq_.grad.cpu(), ref.detach(), Eq64.grad, TOL32)
    assert_close_to_reference(out.detach().cpu(), Er_.grad.cpu(), ref.detach(), Er64.grad, TOL32)


@pytest.mark.needs_backend("torch")
def test_own_copy_is_not_ranked():
    """Ours follows the paper: the query is not in its own gallery. The authors' code ranks it
    (its own similarity, ~1 for cosine, is one more item above every positive), which is our
    loss on a reference set that holds the query without marking it as its own copy."""
    gen = make_generator(7600)
    labels = torch.arange(8).repeat_interleave(4)
    E = make_embeddings(32, 8, "cosine", gen)
    ours = recall_at_k_loss(E, labels, backend="torch")
    same_ref = recall_at_k_loss(E, labels, E, labels, query_ref_index=torch.arange(32), backend="torch")
    authors = recall_at_k_loss(E, labels, E, labels, backend="torch")  # query ranked in its gallery
    assert torch.allclose(ours, same_ref, rtol=1e-6, atol=0)
    # authors' convention: the query is a positive ranked first, so Recall@k is higher, the loss lower
    assert authors.item() < ours.item()


@pytest.mark.needs_backend("torch")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_gradcheck(reduction, memory_efficient):
    gen = make_generator(7700)
    E = make_embeddings(10, 4, "cosine", gen, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([5, -2, 5, 7, -2, 5, 7, 30, -2, 7])

    def fn(x):
        return recall_at_k_loss(
            x,
            labels,
            k=(1, 2),
            temperature=0.2,
            k_temperature=(0.5, 1.0),
            reduction=reduction,
            memory_efficient=memory_efficient,
            backend="torch",
        )

    out = fn(E)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert torch.autograd.gradcheck(fn, (E,), **GRADCHECK_TOLS)


def test_cross_batch_memory(backend):
    """CrossBatchMemory(RecallAtKLoss): each step equals the loss against cat(batch, memory)."""
    B, D = (12, 8) if backend == "triton" else (16, 8)
    dev = device_for(backend)
    gen = make_generator(7800)
    loss_mod = pnp_kernels.RecallAtKLoss(k=(1, 2, 4), temperature=0.05, backend=backend)
    xbm = pnp_kernels.CrossBatchMemory(loss_mod, D, memory_size=20)
    mem_E = torch.zeros(0, D, dtype=torch.float64)
    mem_y = torch.zeros(0, dtype=torch.int64)
    for step in range(3):
        E = make_embeddings(B, D, "cosine", gen)
        y = torch.randint(0, 5, (B,), generator=gen)
        x = E.detach().clone().to(dev).requires_grad_(True)
        out = xbm(x, y.to(dev))
        out.backward()
        x64 = E.double().requires_grad_(True)
        ref = recall_at_k_loss_reference(
            x64,
            y,
            torch.cat([x64, mem_E]),
            torch.cat([y, mem_y]),
            query_ref_index=torch.arange(B),
            k=(1, 2, 4),
            temperature=0.05,
        )
        ref.backward()
        assert_close_to_reference(out.detach().cpu(), x.grad.cpu(), ref.detach(), x64.grad, TOL32)
        mem_E = torch.cat([mem_E, E.double()])[-20:]  # the ring keeps the newest 20 rows
        mem_y = torch.cat([mem_y, y])[-20:]
        assert step < 2 or xbm.filled == 20


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(k=0), ValueError, "k"),
        (dict(k=(1, 2, 2)), ValueError, "k"),
        (dict(k=()), ValueError, "k"),
        (dict(k=(1, 2.5)), ValueError, "k"),
        (dict(k="1"), ValueError, "k"),
        (dict(k=(1, 2), k_temperature=(1.0,)), ValueError, "k_temperature"),
        (dict(k_temperature=0.0), ValueError, "k_temperature"),
        (dict(k_temperature=(1.0, 1.0, -1.0, 1.0, 1.0)), ValueError, "k_temperature"),
        (dict(k_temperature="a"), ValueError, "k_temperature"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(memory_efficient="yes"), TypeError, "memory_efficient"),
        (dict(memory_efficient=1), TypeError, "memory_efficient"),
    ],
)
def test_option_errors(kw, exc, match):
    E = torch.randn(8, 4)
    y = torch.arange(4).repeat(2)
    with pytest.raises(exc, match=match):
        recall_at_k_loss(E, y, backend="torch", **kw)
    with pytest.raises(exc, match=match):
        pnp_kernels.RecallAtKLoss(**kw)


@pytest.mark.needs_backend("torch")
def test_k_taken_literally():
    """k larger than the batch is not capped: with |P_q| < k the normaliser is |P_q|, and the
    loss is the mean over k of 1 - min(sum_j sigma((k - r_j)/tau2), k) / |P_q|."""
    gen = make_generator(7900)
    labels = torch.arange(3).repeat_interleave(3)
    E = make_embeddings(9, 4, "cosine", gen)
    big = recall_at_k_loss(E, labels, k=100, k_temperature=1.0, backend="torch")
    ref = recall_at_k_loss_reference(E.double(), labels, k=100, k_temperature=1.0)
    # every positive is ranked far above k = 100 (r <= 9): sigma((100 - r)/1) = 1, R_k = 2/2
    assert abs(big.item()) < 1e-6 and abs(ref.item()) < 1e-12
