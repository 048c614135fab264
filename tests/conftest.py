"""Shared helpers of the test suite.

TRITON_INTERPRET must be set before triton is first imported (the Triton backend
decides at import time whether its kernels can run on the CPU), so it is set here,
at the very top, before anything imports torch, triton or pnp_kernels.

PNP_KERNELS_REQUIRE_BACKENDS (comma-separated names, CI sets "torch,ext,triton"):
a listed backend that is unavailable FAILS the tests that need it instead of
skipping them, so a backend that does not build cannot hide behind a skip.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import pnp_kernels  # noqa: E402
from pnp_kernels.backends import BACKEND_NAMES  # noqa: E402
from pnp_kernels.reference import pnp_loss_reference  # noqa: E402
from pnp_kernels.spec import SIMILARITIES  # noqa: E402, F401
from pnp_kernels.variants import VARIANTS as VARIANT_TABLE  # noqa: E402

VARIANTS = tuple(VARIANT_TABLE)
ALL_BACKENDS = ("torch", "triton", "ext")
assert set(ALL_BACKENDS) == set(BACKEND_NAMES)
REQUIRED_BACKENDS = tuple(b.strip() for b in os.environ.get("PNP_KERNELS_REQUIRE_BACKENDS", "").split(",") if b.strip())

TOL32 = 1e-5  # float32 inputs against the float64 reference: norm-wise relative error
# unit roundoff of each half format: one correct rounding of a result costs at most this (relative)
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# torch.autograd.gradcheck settings of the float64 gradchecks (anneal ~0.1 keeps finite differences informative)
GRADCHECK_TOLS = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
# batch shape (B, D) per backend: the Triton interpreter is slow, so Triton stays small
BATCH_SHAPES = {"torch": (40, 16), "triton": (24, 8), "ext": (40, 16)}

# Label patterns, each given as class sizes (a size-1 class is a singleton) plus
# whether the batch is class-sorted. Labels of unsorted patterns are arbitrary
# integers (negative values, gaps) in random order.
PATTERNS = ("grouped", "unsorted", "unequal", "singletons", "one_class", "all_distinct")


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def device_for(backend: str) -> str:
    """The device a backend's tests run on: CUDA for the Triton and ext backends where there is one."""
    return "cuda" if backend in ("triton", "ext") and torch.cuda.is_available() else "cpu"


def batch_shape(backend: str, pattern: str = "unsorted"):
    """(B, D) of a backend's parity batch; the Triton one-class batch is smaller still."""
    B, D = BATCH_SHAPES[backend]
    if backend == "triton" and pattern == "one_class":
        B = 20  # one class of 20: two positive chunks per row, 20 rows; keeps the interpreter quick
    return B, D


def class_sizes(pattern: str, B: int):
    """Class sizes of a pattern at batch size B (sum(sizes) == B)."""
    if pattern == "grouped":
        assert B % 4 == 0
        return [4] * (B // 4)
    if pattern == "unsorted":
        # mostly 3-4 per class, as a sampler would give, plus a larger class
        sizes = [6] + [3, 4] * ((B - 6) // 7)
        sizes += [2] * ((B - sum(sizes)) // 2)
        sizes += [1] * (B - sum(sizes))
        return sizes
    if pattern == "unequal":
        # includes a class of more than 16 (several positive chunks in the Triton kernel)
        sizes = [17, 2, 5, 3, 9, 2, 8, 4, 12, 6, 2, 7]
        out, tot = [], 0
        for s in sizes:
            s = min(s, B - tot)
            if s <= 0:
                break
            out.append(s)
            tot += s
        if tot < B:
            out.append(B - tot)
        if out[-1] == 1:  # no singletons in this pattern
            out[-2] += 1
            out.pop()
        return out
    if pattern == "singletons":
        n_single = max(3, B // 6)
        rest = B - n_single
        sizes = [3] * (rest // 3)
        sizes[0] += rest - sum(sizes)
        return sizes + [1] * n_single
    if pattern == "one_class":
        return [B]
    if pattern == "all_distinct":
        return [1] * B
    raise ValueError(pattern)


def make_labels(pattern: str, B: int, gen: torch.Generator) -> torch.Tensor:
    """int64 labels of a pattern. "grouped" is class-sorted with labels 0..C-1; every
    other pattern uses arbitrary ids (negative values, gaps) and a random order."""
    sizes = class_sizes(pattern, B)
    assert sum(sizes) == B, (pattern, sizes)
    if pattern == "grouped":
        ids = torch.arange(len(sizes))
        return torch.repeat_interleave(ids, torch.tensor(sizes))
    # distinct arbitrary ids: negative values and gaps, not in size order
    pool = torch.randperm(1000, generator=gen)[: len(sizes)] * 7 - 3000
    labels = torch.repeat_interleave(pool, torch.tensor(sizes))
    return labels[torch.randperm(B, generator=gen)]


def cyclic_labels(B: int, n_classes: int, gen: torch.Generator, step: int, offset: int) -> torch.Tensor:
    """Unsorted labels of n_classes nearly equal classes: randperm(B) % n_classes, mapped to the
    arbitrary ids step * c + offset (negative values and gaps with the steps and offsets used)."""
    return (torch.randperm(B, generator=gen) % n_classes) * step + offset


def valid_queries(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask of the queries whose class has another member (the rest are dropped from the mean)."""
    return torch.tensor([bool((labels == l).sum() >= 2) for l in labels], dtype=torch.bool)


def make_linear(D_in: int, D: int, gen: torch.Generator, bias: bool = True) -> torch.nn.Linear:
    """nn.Linear(D_in, D) with weights drawn from gen (scaled 1/sqrt(D_in)) and, if bias, a small
    bias drawn from gen after them; with bias False the bias keeps torch's default init."""
    lin = torch.nn.Linear(D_in, D)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D, D_in, generator=gen) / D_in**0.5)
        if bias:
            lin.bias.copy_(torch.randn(D, generator=gen) * 0.1)
    return lin


def make_embeddings(B: int, D: int, similarity: str, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random (never zero) embeddings; for "dot", scaled so similarities are O(1)."""
    E = torch.randn(B, D, generator=gen, dtype=torch.float64)
    if similarity == "dot":
        E = E / math.sqrt(D)
    return E.to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b||, computed in float64 on the CPU."""
    a = a.detach().cpu().to(torch.float64)
    b = b.detach().cpu().to(torch.float64)
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def max_abs(a: torch.Tensor) -> float:
    return a.detach().abs().max().item()


def segments(labels: torch.Tensor):
    """(sorted labels, perm, lo, hi) of a label vector, computed independently of the package."""
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, side="left").to(torch.int32)
    hi = torch.searchsorted(sorted_labels, sorted_labels, side="right").to(torch.int32)
    return sorted_labels, perm, lo, hi


def loss_and_grad(fn, E: torch.Tensor, weights: torch.Tensor = None):
    """Run fn(leaf) on a fresh leaf copy of E; backward the output (or (w * out).sum())."""
    x = E.detach().clone().requires_grad_(True)
    out = fn(x)
    target = out if weights is None else (out * weights.to(out.dtype)).sum()
    target.backward()
    return out.detach(), x.grad.detach()


def backend_loss_and_grad(E: torch.Tensor, labels: torch.Tensor, backend: str, weights=None, **kw):
    """pnp_loss(backend=backend, **kw) on the backend's device (device_for); loss and gradient back on the CPU."""
    dev = device_for(backend)
    out, grad = loss_and_grad(
        lambda x: pnp_kernels.pnp_loss(x, labels.to(dev), backend=backend, **kw),
        E.to(dev),
        None if weights is None else weights.to(dev),
    )
    return out.cpu(), grad.cpu()


def reference_loss_and_grad(E32: torch.Tensor, labels: torch.Tensor, weights=None, **kw):
    """The float64 oracle on the (float32) inputs upcast to float64."""
    return loss_and_grad(lambda x: pnp_loss_reference(x, labels, **kw), E32.to(torch.float64), weights)


def assert_close_to_reference(out, grad, ref_out, ref_grad, tol, tol_grad=None):
    """Norm-wise relative error <= tol for the loss and <= tol_grad (default tol) for the gradient;
    exact zeros where the reference is 0. Returns (loss error, gradient error), 0.0 for exact zeros."""
    tol_grad = tol if tol_grad is None else tol_grad
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert out.shape == ref_out.shape
    assert grad.shape == ref_grad.shape
    e_loss = e_grad = 0.0
    if torch.linalg.vector_norm(ref_out.double()) == 0:
        assert max_abs(out) <= 1e-12, f"loss should be 0, got {out}"
    else:
        e_loss = rel_err(out, ref_out)
        assert e_loss <= tol, f"loss rel err {e_loss:.3g} > {tol:g} (got {out}, ref {ref_out})"
    if torch.linalg.vector_norm(ref_grad.double()) == 0:
        assert max_abs(grad) <= 1e-12, f"gradient should be 0, max |g| = {max_abs(grad):.3g}"
    else:
        e_grad = rel_err(grad, ref_grad)
        assert e_grad <= tol_grad, f"gradient rel err {e_grad:.3g} > {tol_grad:g}"
    return e_loss, e_grad


def require_backend(name: str):
    """Skip when backend ``name`` is unavailable here, or fail when PNP_KERNELS_REQUIRE_BACKENDS lists it."""
    if name not in pnp_kernels.available_backends():
        reason = pnp_kernels.backend_status()[name]["reason"]
        msg = f"backend {name!r} unavailable here: {reason}"
        if name in REQUIRED_BACKENDS:
            pytest.fail(msg + " (required by PNP_KERNELS_REQUIRE_BACKENDS)")
        pytest.skip(msg)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_backend(name): skip where backend name is unavailable, fail where it is required"
    )


def pytest_runtest_setup(item):
    for mark in item.iter_markers(name="needs_backend"):
        require_backend(*mark.args)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    require_backend(request.param)
    return request.param
