"""pytest-benchmark micro-benchmarks of the PNP loss (fwd+bwd of one step).

Not collected by the default ``pytest`` (pyproject: testpaths = ["tests"]). Run:

    pytest bench --benchmark-only                 # CPU sizes; GPU sizes too when CUDA is present
    pytest bench --benchmark-only -k cpu          # only the CPU ones

CPU: torch backend at B = 384 (the DESIGN.md section 4 CPU target size), GEMM
floor at B = 384, the B^3 reference and pytorch-metric-learning at B = 128.
GPU (skipped without CUDA): triton / torch backends, reference and GEMM floor at
B = 384 and larger. Every benchmarked callable synchronises on CUDA. Inputs are
those of bench_pnp.py: randn embeddings, 4 samples per class, shuffled labels.
"""
from __future__ import annotations

import os
import sys

import pytest

# The interpreter is for correctness tests (tests/conftest.py); never benchmark it.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pnp import make_inputs  # noqa: E402

import pnp_kernels  # noqa: E402
from pnp_kernels import pnp_loss  # noqa: E402
from pnp_kernels.reference import pnp_loss_reference  # noqa: E402

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _backend_ok(name):
    return name in pnp_kernels.available_backends()


def _step(loss_fn, x, device):
    """One fwd+bwd; synchronises on CUDA so the timer sees the whole step."""

    def run():
        g = torch.autograd.grad(loss_fn(x), x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return g

    return run


def _floor(x, device):
    X = x.detach()
    B = X.shape[0]
    H = torch.randn(B, B, device=X.device, dtype=torch.float32).to(X.dtype)

    def run():
        S = torch.mm(X, X.t())
        out = torch.mm(H, X)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return S, out

    return run


def _package(backend):
    return lambda labels: (lambda t: pnp_loss(t, labels, backend=backend))


def _reference(labels):
    return lambda t: pnp_loss_reference(t, labels)


def _pml(labels):
    from pytorch_metric_learning.losses import PNPLoss

    mod = PNPLoss()
    return lambda t: mod(t, labels)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------- CPU


CPU = torch.device("cpu")


def test_cpu_torch_backend_B384(benchmark):
    x, y = make_inputs(384, 128, 4, torch.float32, CPU)
    benchmark.group = "cpu B=384 D=128"
    benchmark(_step(_package("torch")(y), x, CPU))


def test_cpu_gemm_floor_B384(benchmark):
    x, _ = make_inputs(384, 128, 4, torch.float32, CPU)
    benchmark.group = "cpu B=384 D=128"
    benchmark(_floor(x, CPU))


def test_cpu_torch_backend_B128(benchmark):
    x, y = make_inputs(128, 128, 4, torch.float32, CPU)
    benchmark.group = "cpu B=128 D=128"
    benchmark(_step(_package("torch")(y), x, CPU))


def test_cpu_reference_B128(benchmark):
    x, y = make_inputs(128, 128, 4, torch.float32, CPU)
    benchmark.group = "cpu B=128 D=128"
    benchmark.pedantic(_step(_reference(y), x, CPU), rounds=10, iterations=1, warmup_rounds=1)


def test_cpu_pml_B128(benchmark):
    pytest.importorskip("pytorch_metric_learning")
    x, y = make_inputs(128, 128, 4, torch.float32, CPU)
    benchmark.group = "cpu B=128 D=128"
    benchmark.pedantic(_step(_pml(y), x, CPU), rounds=10, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------- GPU


GPU_SIZES = [384, 4096]


@needs_cuda
@pytest.mark.parametrize("B", GPU_SIZES)
@pytest.mark.parametrize("backend", ["triton", "torch", "ext"])
def test_gpu_package(benchmark, backend, B):
    if not _backend_ok(backend):
        pytest.skip(f"backend {backend} unavailable: {pnp_kernels.backend_status()[backend]['reason']}")
    dev = torch.device("cuda")
    x, y = make_inputs(B, 512, 4, torch.float32, dev)
    benchmark.group = f"gpu B={B} D=512"
    benchmark(_step(_package(backend)(y), x, dev))


@needs_cuda
@pytest.mark.parametrize("B", GPU_SIZES)
def test_gpu_gemm_floor(benchmark, B):
    dev = torch.device("cuda")
    x, _ = make_inputs(B, 512, 4, torch.float32, dev)
    benchmark.group = f"gpu B={B} D=512"
    benchmark(_floor(x, dev))


@needs_cuda
def test_gpu_reference_B384(benchmark):
    dev = torch.device("cuda")
    x, y = make_inputs(384, 512, 4, torch.float32, dev)
    benchmark.group = "gpu B=384 D=512"
    benchmark(_step(_reference(y), x, dev))
