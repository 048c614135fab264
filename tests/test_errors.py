"""Bad input raises before any kernel runs, with a message naming the argument."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pnp_kernels
from pnp_kernels.backends.torch_backend import TorchBackend

from conftest import REQUIRED_BACKENDS, make_generator, require_backend


def _E(B=6, D=4, dtype=torch.float32):
    return torch.randn(B, D, generator=make_generator(0)).to(dtype)


def _y(B=6):
    return torch.tensor([0, 0, 1, 1, 2, 2][:B] + [3] * max(0, B - 6))


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail loudly if validation lets a call reach the torch backend's row kernel."""

    def boom(*a, **k):
        raise AssertionError("a kernel ran before the input was validated")

    monkeypatch.setattr(TorchBackend, "row_losses_and_dS", boom)


BAD_INPUTS = [
    # (id, embeddings, labels, kwargs, exception, regex)
    ("emb-1d", torch.randn(6), _y(), {}, ValueError, "embeddings"),
    ("emb-3d", torch.randn(6, 4, 1), _y(), {}, ValueError, "embeddings"),
    ("emb-int", torch.ones(6, 4, dtype=torch.int64), _y(), {}, TypeError, "embeddings"),
    ("emb-bool", torch.ones(6, 4, dtype=torch.bool), _y(), {}, TypeError, "embeddings"),
    ("emb-not-tensor", [[1.0, 2.0]] * 6, _y(), {}, TypeError, "embeddings"),
    ("labels-2d", _E(), _y().reshape(3, 2), {}, ValueError, "labels"),
    ("labels-2d-col", _E(), _y()[:, None], {}, ValueError, "labels"),
    ("labels-float", _E(), _y().float(), {}, TypeError, "labels"),
    ("labels-bool", _E(), _y() > 0, {}, TypeError, "labels"),
    ("labels-not-tensor", _E(), [0, 0, 1, 1, 2, 2], {}, TypeError, "labels"),
    ("length-mismatch", _E(), _y(5), {}, ValueError, "labels"),
    ("empty-batch", torch.randn(0, 4), torch.zeros(0, dtype=torch.int64), {}, ValueError, "empty"),
    ("variant", _E(), _y(), dict(variant="Dx"), ValueError, "variant.*O.*Ds.*Dq.*Iu.*Ib"),
    ("variant-case", _E(), _y(), dict(variant="dq"), ValueError, "variant"),
    ("similarity", _E(), _y(), dict(similarity="euclidean"), ValueError, "similarity.*cosine.*dot"),
    ("reduction", _E(), _y(), dict(reduction="sum"), ValueError, "reduction.*mean.*none"),
    ("backend", _E(), _y(), dict(backend="cuda"), ValueError, "backend.*auto.*triton.*ext.*torch"),
    ("anneal-0", _E(), _y(), dict(anneal=0.0), ValueError, "anneal"),
    ("anneal-neg", _E(), _y(), dict(anneal=-0.01), ValueError, "anneal"),
    ("anneal-nan", _E(), _y(), dict(anneal=float("nan")), ValueError, "anneal"),
    ("anneal-inf", _E(), _y(), dict(anneal=float("inf")), ValueError, "anneal"),
    ("anneal-str", _E(), _y(), dict(anneal="0.01"), TypeError, "anneal"),
    ("b-0", _E(), _y(), dict(b=0), ValueError, r"\bb\b"),
    ("b-neg", _E(), _y(), dict(b=-2.0), ValueError, r"\bb\b"),
    ("b-nan", _E(), _y(), dict(b=math.nan), ValueError, r"\bb\b"),
    ("alpha-0", _E(), _y(), dict(alpha=0), ValueError, "alpha"),
    ("alpha-neg", _E(), _y(), dict(alpha=-1.0), ValueError, "alpha"),
    ("alpha-nan", _E(), _y(), dict(alpha=math.nan), ValueError, "alpha"),
]


@pytest.mark.parametrize("E,labels,kw,exc,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_pnp_loss_rejects(no_kernel, E, labels, kw, exc, match):
    with pytest.raises(exc, match=match):
        pnp_kernels.pnp_loss(E, labels, backend=kw.pop("backend", "torch"), **kw)


def test_valid_input_reaches_the_kernel(no_kernel):
    """Guard for the fixture: a valid call does reach the (patched) kernel."""
    with pytest.raises(AssertionError, match="kernel ran"):
        pnp_kernels.pnp_loss(_E(), _y(), backend="torch")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_integer_label_dtypes_accepted(dtype):
    E = _E()
    ref = pnp_kernels.pnp_loss(E, _y(), backend="torch")
    out = pnp_kernels.pnp_loss(E, _y().to(dtype), backend="torch")
    assert torch.equal(out, ref)


BAD_MODULE_ARGS = [
    ("variant", dict(variant="PNP"), ValueError, "variant"),
    ("anneal", dict(anneal=0.0), ValueError, "anneal"),
    ("anneal-nan", dict(anneal=float("nan")), ValueError, "anneal"),
    ("alpha", dict(alpha=-1), ValueError, "alpha"),
    ("b", dict(b=0.0), ValueError, r"\bb\b"),
    ("similarity", dict(similarity="l2"), ValueError, "similarity.*cosine.*dot"),
    ("reduction", dict(reduction="sum"), ValueError, "reduction.*mean.*none"),
    ("backend", dict(backend="numpy"), ValueError, "backend"),
]


@pytest.mark.parametrize("kw,exc,match", [c[1:] for c in BAD_MODULE_ARGS], ids=[c[0] for c in BAD_MODULE_ARGS])
def test_module_constructor_validates(kw, exc, match):
    with pytest.raises(exc, match=match):
        pnp_kernels.PNPLoss(**kw)


def test_module_forward_validates_inputs(no_kernel):
    mod = pnp_kernels.PNPLoss(backend="torch")
    with pytest.raises(ValueError, match="labels"):
        mod(_E(), _y(5))


def test_unavailable_backend_is_a_clear_error():
    """Asking for a backend that cannot run here (ext, switched off by PNP_KERNELS_NO_EXT in a
    fresh process) raises a RuntimeError that names it and says why, before any kernel runs;
    backend_status() reports the same one-line reason."""
    script = textwrap.dedent(
        """
        import torch, pnp_kernels
        st = pnp_kernels.backend_status()["ext"]
        assert not st["available"] and "PNP_KERNELS_NO_EXT" in st["reason"], st
        assert "ext" not in pnp_kernels.available_backends()
        try:
            pnp_kernels.pnp_loss(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), backend="ext")
        except RuntimeError as exc:
            print("MSG:", exc)
        else:
            raise SystemExit("no error raised")
        """
    )
    env = dict(os.environ, PNP_KERNELS_NO_EXT="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    msg = proc.stdout.split("MSG:", 1)[1]
    assert "ext" in msg and "PNP_KERNELS_NO_EXT" in msg


@pytest.mark.parametrize("name", REQUIRED_BACKENDS or ["torch"])
def test_required_backends_are_available(name):
    """Every backend listed in PNP_KERNELS_REQUIRE_BACKENDS (CI: torch, ext, triton) is usable."""
    st = pnp_kernels.backend_status()[name]
    assert st["available"], f"backend {name!r} is required but unavailable: {st['reason']}"


def _R(M=5, D=4, dtype=torch.float32):
    return torch.randn(M, D, generator=make_generator(1)).to(dtype)


def _ry(M=5):
    return torch.tensor([0, 1, 2, 9, 9][:M] + [7] * max(0, M - 5))


BAD_REFERENCE = [
    # (id, kwargs, exception, regex)
    ("ref-1d", dict(ref_emb=torch.randn(5), ref_labels=_ry()), ValueError, "ref_emb"),
    ("ref-dim", dict(ref_emb=_R(D=3), ref_labels=_ry()), ValueError, "ref_emb.*dimension"),
    ("ref-int", dict(ref_emb=torch.ones(5, 4, dtype=torch.int32), ref_labels=_ry()), TypeError, "ref_emb"),
    ("ref-empty", dict(ref_emb=_R(M=0), ref_labels=_ry(0)), ValueError, "ref_emb.*empty"),
    ("ref-float64", dict(ref_emb=_R(dtype=torch.float64), ref_labels=_ry()), TypeError, "ref_emb.*float64"),
    ("ref-device", dict(ref_emb=_R().to("meta"), ref_labels=_ry()), ValueError, "ref_emb.*meta"),
    ("ref-not-tensor", dict(ref_emb=[[0.0] * 4] * 5, ref_labels=_ry()), TypeError, "ref_emb"),
    ("ref-labels-missing", dict(ref_emb=_R()), ValueError, "ref_labels.*required"),
    ("ref-labels-length", dict(ref_emb=_R(), ref_labels=_ry(4)), ValueError, "ref_labels.*length"),
    ("ref-labels-float", dict(ref_emb=_R(), ref_labels=_ry().float()), TypeError, "ref_labels"),
    ("ref-labels-alone", dict(ref_labels=_ry()), ValueError, "ref_labels.*without ref_emb"),
    ("index-alone", dict(query_ref_index=torch.arange(6)), ValueError, "query_ref_index.*without ref_emb"),
    (
        "index-shape",
        dict(ref_emb=_R(), ref_labels=_ry(), query_ref_index=torch.arange(5)),
        ValueError,
        "query_ref_index.*shape",
    ),
    ("index-float", dict(ref_emb=_R(), ref_labels=_ry(), query_ref_index=torch.zeros(6)), TypeError, "query_ref_index"),
    (
        "index-bool",
        dict(ref_emb=_R(), ref_labels=_ry(), query_ref_index=torch.zeros(6, dtype=torch.bool)),
        TypeError,
        "query_ref_index",
    ),
    (
        "index-high",
        dict(ref_emb=_R(), ref_labels=_ry(), query_ref_index=torch.tensor([0, 1, 2, 3, 4, 5])),
        ValueError,
        "query_ref_index.*entry 5 is 5",
    ),
    (
        "index-low",
        dict(ref_emb=_R(), ref_labels=_ry(), query_ref_index=torch.tensor([0, -2, 2, 3, 4, -1])),
        ValueError,
        "query_ref_index.*entry 1 is -2",
    ),
    (
        "index-list",
        dict(ref_emb=_R(), ref_labels=_ry(), query_ref_index=[0, 1, 2, 3, 4, -1]),
        TypeError,
        "query_ref_index",
    ),
]


@pytest.mark.parametrize("loss", ["pnp", "smooth_ap"])
@pytest.mark.parametrize("kw,exc,match", [c[1:] for c in BAD_REFERENCE], ids=[c[0] for c in BAD_REFERENCE])
def test_reference_set_rejects(no_kernel, loss, kw, exc, match):
    fn = pnp_kernels.pnp_loss if loss == "pnp" else pnp_kernels.smooth_ap_loss
    with pytest.raises(exc, match=match):
        fn(_E(), _y(), backend="torch", **kw)


def test_valid_reference_call_reaches_the_kernel(no_kernel):
    with pytest.raises(AssertionError, match="kernel ran"):
        pnp_kernels.pnp_loss(
            _E(), _y(), _R(), _ry(), query_ref_index=torch.tensor([0, 1, 2, 3, 4, -1]), backend="torch"
        )


BAD_SMOOTH_AP = [
    ("temperature-0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature-nan", dict(temperature=math.nan), ValueError, "temperature"),
    ("temperature-str", dict(temperature="0.1"), TypeError, "temperature"),
    ("similarity", dict(similarity="l2"), ValueError, "similarity"),
    ("reduction", dict(reduction="sum"), ValueError, "reduction"),
    ("backend", dict(backend="numpy"), ValueError, "backend"),
]


@pytest.mark.parametrize("kw,exc,match", [c[1:] for c in BAD_SMOOTH_AP], ids=[c[0] for c in BAD_SMOOTH_AP])
def test_smooth_ap_rejects(no_kernel, kw, exc, match):
    with pytest.raises(exc, match=match):
        pnp_kernels.smooth_ap_loss(_E(), _y(), **kw)
    with pytest.raises(exc, match=match):
        pnp_kernels.SmoothAPLoss(**kw)


def test_distributed_rejects_query_ref_index(no_kernel):
    with pytest.raises(ValueError, match="query_ref_index.*distributed"):
        pnp_kernels.pnp_loss(
            _E(), _y(), _R(), _ry(), query_ref_index=torch.full((6,), -1), distributed=True, backend="torch"
        )


def test_cross_batch_memory_rejects():
    with pytest.raises(ValueError, match="memory_size"):
        pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(), 4, 0)
    with pytest.raises(ValueError, match="embedding_size"):
        pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(), 0, 8)
    xbm = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(backend="torch"), 4, 8)
    with pytest.raises(ValueError, match="embedding_size"):
        xbm(torch.randn(6, 5), _y())


def test_triton_rejects_float64():
    require_backend("triton")
    with pytest.raises(TypeError, match="embeddings"):
        pnp_kernels.pnp_loss(_E(dtype=torch.float64), _y(), backend="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """Without TRITON_INTERPRET, backend="triton" on CPU tensors raises a RuntimeError that
    says what to do, and backend="auto" falls back to torch on the CPU."""
    script = textwrap.dedent(
        """
        import torch, pnp_kernels
        E = torch.randn(6, 4); y = torch.tensor([0, 0, 1, 1, 2, 2])
        assert "triton" not in pnp_kernels.available_backends() or torch.cuda.is_available()
        auto = pnp_kernels.pnp_loss(E, y)
        assert torch.equal(auto, pnp_kernels.pnp_loss(E, y, backend="torch"))
        try:
            pnp_kernels.pnp_loss(E, y, backend="triton")
        except RuntimeError as exc:
            print("MSG:", exc)
        else:
            raise SystemExit("no error raised")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    msg = proc.stdout.split("MSG:", 1)[1]
    assert "triton" in msg and "TRITON_INTERPRET" in msg and "torch" in msg


def test_backward_without_grad_forward():
    """Backward through an output computed without grad is impossible (no graph)."""
    E = _E().requires_grad_(True)
    with torch.no_grad():
        out = pnp_kernels.pnp_loss(E, _y(), backend="torch")
    assert not out.requires_grad
    with pytest.raises(RuntimeError):
        out.backward()
