"""The memory-efficient path (``memory_efficient=True``): same values and gradients as the
dense path, no Q x M buffer, and the auto rule.

* Parity: every backend, loss kind and PNP variant, both similarities, the square mode,
  reference sets with ``query_ref_index``, ``reduction="none"``: float32 within 1e-5 of
  the float64 oracle; float64 (torch, ext) within 1e-9.
* Odd inputs behave as on the dense path (singletons, one class, no valid query, NaN in,
  zero-norm rows); results are bitwise reproducible.
* ``memory_efficient=None`` picks the dense path unless 8 Q M bytes exceed
  ``PNP_KERNELS_DENSE_MAX_BYTES`` (read at each call); anything but True/False/None is a
  TypeError naming the argument.
* Memory: every tensor allocated during forward+backward at Q = M = 8192 stays below
  Q M / 8 elements (square mode and a reference set), recorded by a dispatch mode in a
  subprocess; the same probe sees the dense path allocate Q x M.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pnp_kernels
from pnp_kernels.reference import pnp_loss_reference, recall_at_k_loss_reference, smooth_ap_loss_reference
from pnp_kernels.spec import LossSpec

from conftest import (
    SIMILARITIES,
    VARIANTS,
    assert_close_to_reference,
    device_for,
    loss_and_grad,
    make_embeddings,
    make_generator,
    make_labels,
)

TOL32 = 1e-5
TOL64 = 1e-9
SHAPES = {"torch": (36, 12), "triton": (20, 8), "ext": (36, 12)}

# (name, functional, oracle, options)
KINDS = [
    (f"pnp-{v}", pnp_kernels.pnp_loss, pnp_loss_reference, dict(variant=v, anneal=0.05, alpha=2.0, b=3.0))
    for v in VARIANTS
] + [
    ("smooth_ap", pnp_kernels.smooth_ap_loss, smooth_ap_loss_reference, dict(temperature=0.05)),
    (
        "recall_at_k",
        pnp_kernels.recall_at_k_loss,
        recall_at_k_loss_reference,
        dict(k=(1, 2, 4), temperature=0.05, k_temperature=(1.0, 0.5, 2.0)),
    ),
]
KIND_IDS = [k[0] for k in KINDS]


def _case(backend, kind, E, labels, dtype=torch.float32, weights=None, ref_args=(), **kw):
    """The memory-efficient path of ``backend`` against the float64 oracle and against its own dense path."""
    name, fn, oracle, opts = kind
    dev = device_for(backend)
    dev_ref = [t.to(device=dev, dtype=dtype) if t.is_floating_point() else t.to(dev) for t in ref_args]
    dev_kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    w = None if weights is None else weights.to(dev)
    results = {}
    for me in (True, False):
        results[me] = loss_and_grad(
            lambda x: fn(x, labels.to(dev), *dev_ref, backend=backend, memory_efficient=me, **opts, **dev_kw),
            E.to(device=dev, dtype=dtype),
            w,
        )
    ref64 = [t.double() if t.is_floating_point() else t for t in ref_args]
    ref_out, ref_grad = loss_and_grad(lambda x: oracle(x, labels, *ref64, **opts, **kw), E.double(), weights)
    tol = TOL64 if dtype == torch.float64 else TOL32
    out, grad = results[True]
    assert out.dtype == results[False][0].dtype
    assert_close_to_reference(out.cpu(), grad.cpu(), ref_out, ref_grad, tol)
    assert_close_to_reference(results[False][0].cpu(), results[False][1].cpu(), ref_out, ref_grad, tol)
    return out.cpu(), grad.cpu()


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_square(backend, kind, similarity):
    B, D = SHAPES[backend]
    gen = make_generator(8000 + KIND_IDS.index(kind[0]) + 50 * SIMILARITIES.index(similarity))
    labels = make_labels("unequal" if backend != "triton" else "unsorted", B, gen)
    E = make_embeddings(B, D, similarity, gen)
    out, _ = _case(backend, kind, E, labels, similarity=similarity)
    assert out.item() != 0.0


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_reference_set_none(backend, kind):
    """Queries against a reference set with mixed query_ref_index, reduction="none", weighted."""
    Q, M, D = (8, 12, 8) if backend == "triton" else (14, 26, 8)
    gen = make_generator(8100 + KIND_IDS.index(kind[0]))
    Er = make_embeddings(M, D, "cosine", gen)
    yr = torch.randint(0, 4, (M,), generator=gen) * 3 - 5
    qri = torch.full((Q,), -1, dtype=torch.int64)
    qri[: Q // 2] = torch.randperm(M, generator=gen)[: Q // 2]
    Eq = make_embeddings(Q, D, "cosine", gen)
    yq = torch.randint(0, 4, (Q,), generator=gen) * 3 - 5
    Eq[: Q // 2] = Er[qri[: Q // 2]]
    yq[: Q // 2] = yr[qri[: Q // 2]]
    w = torch.rand(Q, generator=gen, dtype=torch.float64) + 0.5
    _case(backend, kind, Eq, yq, weights=w, ref_args=(Er, yr), query_ref_index=qri, reduction="none")


F64_BACKENDS = ("torch", "ext")


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("name", F64_BACKENDS)
def test_float64(name, kind):
    from conftest import require_backend

    require_backend(name)
    gen = make_generator(8200 + KIND_IDS.index(kind[0]))
    labels = make_labels("singletons", 30, gen)
    E = make_embeddings(30, 6, "dot", gen, dtype=torch.float64)
    out, _ = _case(name, kind, E, labels, dtype=torch.float64, similarity="dot")
    assert out.dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS[:1] + KINDS[-2:], ids=KIND_IDS[:1] + KIND_IDS[-2:])
def test_odd_inputs_as_dense(backend, kind):
    """One class, all distinct, NaN in one row and a zero-norm row: the same result as dense."""
    name, fn, _, opts = kind
    dev = device_for(backend)
    gen = make_generator(8300)
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
        got = {}
        for me in (True, False):
            got[me] = loss_and_grad(lambda x: fn(x, y.to(dev), backend=backend, memory_efficient=me, **opts), E.to(dev))
        (o1, g1), (o0, g0) = got[True], got[False]
        if label == "nan_row":
            assert torch.isnan(o1).all() and torch.isnan(o0).all(), label
            assert torch.isnan(g1).any() and torch.isnan(g0).any(), label
            continue
        assert torch.isfinite(o1).all() and torch.isfinite(g1).all(), label
        assert torch.allclose(o1, o0, rtol=1e-5, atol=1e-7), (label, o1, o0)
        assert torch.allclose(g1, g0, rtol=1e-4, atol=1e-6), label
        if label == "all_distinct":
            assert o1.item() == 0.0 and torch.all(g1 == 0)


def test_deterministic(backend):
    B, D = SHAPES[backend]
    dev = device_for(backend)
    gen = make_generator(8400)
    labels = make_labels("unsorted", B, gen).to(dev)
    E = make_embeddings(B, D, "cosine", gen).to(dev)
    runs = [
        loss_and_grad(lambda x: pnp_kernels.smooth_ap_loss(x, labels, backend=backend, memory_efficient=True), E)
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.needs_backend("triton")
@pytest.mark.parametrize("kind", KINDS[:1] + KINDS[-2:], ids=KIND_IDS[:1] + KIND_IDS[-2:])
def test_triton_strips_stage(kind, monkeypatch):
    """The Triton backend's stage for wide rows (strips of query rows; forced here, D > 128 takes
    it on a GPU): the square mode against the oracle, the odd inputs as dense, deterministic."""
    monkeypatch.setenv("PNP_KERNELS_TRITON_TILED", "strips")
    test_square("triton", kind, "cosine")
    test_odd_inputs_as_dense("triton", kind)
    if kind[0] == "smooth_ap":
        test_deterministic("triton")


@pytest.mark.needs_backend("torch")
def test_cross_batch_memory_same_as_dense():
    D = 8
    gen = make_generator(8500)
    batches = [(make_embeddings(10, D, "cosine", gen), torch.randint(0, 4, (10,), generator=gen)) for _ in range(3)]
    losses = {}
    for me in (True, False):
        xbm = pnp_kernels.CrossBatchMemory(
            pnp_kernels.PNPLoss(variant="Dq", memory_efficient=me, backend="torch"), D, 16
        )
        losses[me] = [loss_and_grad(lambda x: xbm(x, y), E) for E, y in batches]
    for (o1, g1), (o0, g0) in zip(losses[True], losses[False]):
        assert torch.allclose(o1, o0, rtol=1e-6) and torch.allclose(g1, g0, rtol=1e-5, atol=1e-8)


# ---- the auto rule and the option check ------------------------------------------------


def test_auto_threshold(monkeypatch):
    monkeypatch.delenv("PNP_KERNELS_DENSE_MAX_BYTES", raising=False)
    spec = LossSpec()
    assert spec.resolved(32768, 32768).memory_efficient is True  # 8 GiB of S and G > 4 GiB
    assert spec.resolved(384, 384).memory_efficient is False
    assert spec.resolved(16384, 16384).memory_efficient is False  # exactly 2 GiB
    monkeypatch.setenv("PNP_KERNELS_DENSE_MAX_BYTES", "1000")
    assert spec.resolved(12, 12).memory_efficient is True  # 8 * 144 bytes > 1000
    assert spec.resolved(11, 11).memory_efficient is False
    assert LossSpec(memory_efficient=False).resolved(10**6, 10**6).memory_efficient is False


@pytest.mark.needs_backend("torch")
def test_auto_reads_the_variable_at_each_call(monkeypatch):
    """With the threshold lowered, auto takes the memory-efficient stage (observed by a spy)."""
    from pnp_kernels.backends.torch_backend import TorchBackend

    calls = []
    orig = TorchBackend.tiled_rows

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(TorchBackend, "tiled_rows", spy)
    E = torch.randn(12, 4)
    y = torch.arange(12) % 3
    monkeypatch.delenv("PNP_KERNELS_DENSE_MAX_BYTES", raising=False)
    dense = pnp_kernels.pnp_loss(E, y, backend="torch")
    assert calls == []
    monkeypatch.setenv("PNP_KERNELS_DENSE_MAX_BYTES", "100")
    tiled = pnp_kernels.pnp_loss(E, y, backend="torch")
    assert calls == [1]
    assert torch.allclose(dense, tiled, rtol=1e-6)


@pytest.mark.parametrize("bad", ["yes", 1, 0, 1.0, "auto"])
def test_memory_efficient_type_error(bad):
    E = torch.randn(8, 4)
    y = torch.arange(4).repeat(2)
    for fn in (pnp_kernels.pnp_loss, pnp_kernels.smooth_ap_loss, pnp_kernels.recall_at_k_loss):
        with pytest.raises(TypeError, match="memory_efficient"):
            fn(E, y, backend="torch", memory_efficient=bad)
    for cls in (pnp_kernels.PNPLoss, pnp_kernels.SmoothAPLoss):
        with pytest.raises(TypeError, match="memory_efficient"):
            cls(memory_efficient=bad)


# ---- the memory probe ----------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import pnp_kernels

    class Largest(TorchDispatchMode):
        # the largest tensor any op returns (every allocation of forward and backward goes through here)
        def __init__(self):
            super().__init__()
            self.largest = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    Q, mode, me = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    D = 16
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(Q, D, generator=gen).requires_grad_(True)
    y = (torch.arange(Q) // 4)[torch.randperm(Q, generator=gen)]
    kw = dict(backend="torch", memory_efficient=me)
    with Largest() as probe:
        if mode == "square":
            loss = pnp_kernels.smooth_ap_loss(E, y, **kw)
        else:  # a reference set of M = Q rows (a gallery that also needs a gradient)
            R = torch.randn(Q, D, generator=gen).requires_grad_(True)
            yr = (torch.arange(Q) // 4)[torch.randperm(Q, generator=gen)]
            loss = pnp_kernels.pnp_loss(E, y, R, yr, variant="Dq", **kw)
        loss.backward()
    print(json.dumps({"largest": probe.largest, "loss": loss.item(),
                      "grad_ok": bool(torch.isfinite(E.grad).all() and (E.grad != 0).any())}))
    """
)


def _probe(Q, mode, memory_efficient):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(Q), mode, "1" if memory_efficient else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.needs_backend("torch")
def test_no_q_by_m_tensor():
    """Q = M = 8192: the memory-efficient path never allocates a tensor of Q M / 8 elements or
    more (square and reference modes); the dense path does allocate Q x M (same probe, smaller Q)."""
    Q = 8192
    for mode in ("square", "reference"):
        res = _probe(Q, mode, True)
        print(f"memory-efficient, {mode}, Q = M = {Q}: largest tensor {res['largest']} elements")
        assert res["grad_ok"]
        assert res["largest"] < Q * Q // 8
    q_dense = 1024
    res = _probe(q_dense, "square", False)
    assert res["largest"] >= q_dense * q_dense  # the probe sees the dense path's B x B buffers
