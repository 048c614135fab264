"""Bad input raises before any kernel runs, with a message naming the argument."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pnp_kernels
from pnp_kernels.backends import torch as torch_backend

from conftest import ALL_BACKENDS


def _E(B=6, D=4, dtype=torch.float32):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(0)).to(dtype)


def _y(B=6):
    return torch.tensor([0, 0, 1, 1, 2, 2][:B] + [3] * max(0, B - 6))


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail loudly if validation lets a call reach the torch backend's row kernel."""
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the input was validated")
    monkeypatch.setattr(torch_backend, "rows_forward", boom)


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


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_unavailable_backend_is_a_clear_error(name):
    """Asking for a backend that cannot run here names it and says why (RuntimeError),
    instead of failing somewhere inside."""
    if name in pnp_kernels.available_backends():
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=name):
        pnp_kernels.pnp_loss(_E(), _y(), backend=name)


def test_triton_rejects_float64():
    if "triton" not in pnp_kernels.available_backends():
        pytest.skip("triton unavailable")
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
