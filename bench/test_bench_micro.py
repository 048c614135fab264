"""pytest-benchmark micro-benchmarks of the PNP loss (fwd+bwd of one step).

Not collected by the default ``pytest`` (pyproject: testpaths = ["tests"]). Run:

    pytest bench --benchmark-only                 # CPU sizes; GPU sizes too when CUDA is present
    pytest bench --benchmark-only -k cpu          # only the CPU ones

CPU: PNP and Smooth-AP with the torch (and ext, when available) backend and the
GEMM floor at B = 384, PNP against a 2048-row reference set (256 queries), the B^3
reference and pytorch-metric-learning at B = 128. GPU (skipped without CUDA):
triton / torch / ext backends, reference and GEMM floor at B = 384 and larger.
Every benchmarked callable is a fwd+bwd step from bench/providers.py (synchronised
on CUDA). Inputs are bench/harness.py's: randn embeddings, 4 samples per class,
shuffled labels.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import harness  # noqa: E402  (unsets TRITON_INTERPRET before pnp_kernels loads triton)
import providers  # noqa: E402

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _step(name, case, device):
    """One fwd+bwd of provider ``name``; synchronises on CUDA so the timer sees the whole step."""
    why = providers.why_unavailable(name, device)
    if why:
        pytest.skip(f"{name} unavailable: {why}")
    inp = harness.make_inputs(case, device, with_ref=providers.uses_reference_set(name))
    fwdbwd = providers.build(name, inp, case).fwdbwd

    def run():
        out = fwdbwd()
        harness.sync(device)
        return out

    return run


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------- CPU


CPU = torch.device("cpu")
B384 = harness.Case(B=384, D=128, P=4)
B128 = harness.Case(B=128, D=128, P=4)


@pytest.mark.parametrize("name", ["torch", "ext", "smooth-ap-torch", "smooth-ap-ext", "gemm-floor"])
def test_cpu_B384(benchmark, name):
    benchmark.group = "cpu B=384 D=128"
    benchmark(_step(name, B384, CPU))


@pytest.mark.parametrize("name", ["torch", "refset-torch", "refset-ext"])
def test_cpu_reference_set_M2048(benchmark, name):
    # the square 2048 batch vs 256 queries against 2048 reference rows
    case = harness.Case(B=2048 if name == "torch" else 256, D=128, P=4, M=2048)
    benchmark.group = "cpu reference set M=2048 D=128"
    benchmark.pedantic(_step(name, case, CPU), rounds=5, iterations=1, warmup_rounds=1)


def test_cpu_torch_backend_B128(benchmark):
    benchmark.group = "cpu B=128 D=128"
    benchmark(_step("torch", B128, CPU))


@pytest.mark.parametrize("name", ["reference", "pml"])
def test_cpu_oracles_B128(benchmark, name):
    benchmark.group = "cpu B=128 D=128"
    benchmark.pedantic(_step(name, B128, CPU), rounds=10, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------- GPU


GPU_SIZES = [384, 4096]
GPU = torch.device("cuda")


@needs_cuda
@pytest.mark.parametrize("B", GPU_SIZES)
@pytest.mark.parametrize("name", ["triton", "torch", "ext", "smooth-ap-triton", "smooth-ap-ext", "gemm-floor"])
def test_gpu(benchmark, name, B):
    benchmark.group = f"gpu B={B} D=512"
    benchmark(_step(name, harness.Case(B=B, D=512, P=4), GPU))


@needs_cuda
def test_gpu_reference_B384(benchmark):
    benchmark.group = "gpu B=384 D=512"
    benchmark(_step("reference", harness.Case(B=384, D=512, P=4), GPU))
