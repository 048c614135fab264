"""Smooth-AP on every backend: exact for any labels, against the float64 brute-force oracle.

Loss AND gradient, float32 inputs, norm-wise relative error <= 1e-5 against
``smooth_ap_loss_reference`` on the same inputs in float64, over the label patterns
of conftest (grouped, unsorted with negative ids, unequal classes, singletons, one
class, all distinct), cosine and dot, two temperatures. Also: pytorch-metric-learning's
SmoothAPLoss on square sorted batches (where it is right) and its deviation on a
non-square batch, gradcheck, half precision (the 2x rule), torch.compile(fullgraph).
"""

import pytest
import torch

import pnp_kernels
from pnp_kernels import smooth_ap_loss
from pnp_kernels.reference import smooth_ap_loss_reference

from conftest import (
    PATTERNS,
    SIMILARITIES,
    assert_close_to_reference,
    loss_and_grad,
    make_embeddings,
    make_generator,
    make_labels,
    rel_err,
)

TOL32 = 1e-5
SHAPES = {"torch": (40, 16), "triton": (24, 8), "ext": (40, 16)}
TEMPERATURES = (0.01, 0.1)


def _run(backend, labels, E, weights=None, tol=TOL32, **kw):
    out, grad = loss_and_grad(lambda x: smooth_ap_loss(x, labels, backend=backend, **kw), E, weights)
    ref_out, ref_grad = loss_and_grad(lambda x: smooth_ap_loss_reference(x, labels, **kw), E.double(), weights)
    assert_close_to_reference(out, grad, ref_out, ref_grad, tol)
    return out, ref_out


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_parity(backend, similarity, pattern, temperature):
    B, D = SHAPES[backend]
    if backend == "triton" and pattern == "one_class":
        B = 20
    gen = make_generator(
        5000 + 10 * PATTERNS.index(pattern) + SIMILARITIES.index(similarity) + 100 * TEMPERATURES.index(temperature)
    )
    labels = make_labels(pattern, B, gen)
    E = make_embeddings(B, D, similarity, gen)
    kw = dict(similarity=similarity, temperature=temperature)
    if pattern == "one_class":
        # no negatives: AP = 1 exactly, so loss and gradient are exactly 0 (neg_j is summed
        # directly, nothing cancels); the oracle's gradient is 0 up to its rounding
        out, grad = loss_and_grad(lambda x: smooth_ap_loss(x, labels, backend=backend, **kw), E)
        ref, ref_grad = loss_and_grad(lambda x: smooth_ap_loss_reference(x, labels, **kw), E.double())
        assert out.item() == 0.0 and ref.item() == 0.0
        assert torch.all(grad == 0) and ref_grad.abs().max().item() < 1e-9
        return
    out, ref = _run(backend, labels, E, **kw)
    assert out.dtype == torch.float32 and out.shape == ()
    if pattern == "all_distinct":
        assert ref.item() == 0.0 and out.item() == 0.0  # no valid query
    else:
        assert ref.item() != 0.0


def test_reduction_none(backend):
    B, D = SHAPES[backend]
    gen = make_generator(5200)
    labels = make_labels("singletons", B, gen)
    E = make_embeddings(B, D, "cosine", gen)
    w = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    out, ref = _run(backend, labels, E, weights=w, reduction="none", temperature=0.05)
    assert out.shape == (B,)
    dropped = ref == 0
    assert dropped.any() and torch.all(out[dropped] == 0)


@pytest.mark.parametrize("name", ["torch", "ext"])
def test_float64(name):
    from conftest import require_backend

    require_backend(name)
    gen = make_generator(5300)
    labels = make_labels("unequal", 36, gen)
    E = make_embeddings(36, 8, "dot", gen, dtype=torch.float64)
    out, _ = _run(name, labels, E, tol=1e-10, similarity="dot", temperature=0.05)
    assert out.dtype == torch.float64


def test_gradcheck():
    gen = make_generator(5400)
    labels = torch.tensor([3, 1, 3, 7, 1, 3, 9, 7])
    E = torch.randn(8, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: smooth_ap_loss(x, labels, temperature=0.1, backend="torch"), (E,), eps=1e-6, atol=1e-7, rtol=1e-5
    )


def test_module_equals_function():
    gen = make_generator(5500)
    labels = make_labels("unsorted", 20, gen)
    E = make_embeddings(20, 8, "cosine", gen)
    mod = pnp_kernels.SmoothAPLoss(temperature=0.05, backend="torch")
    assert torch.equal(mod(E, labels), smooth_ap_loss(E, labels, temperature=0.05, backend="torch"))
    assert "temperature=0.05" in repr(mod)


# ---------------------------------------------------------------------------
# pytorch-metric-learning's SmoothAPLoss
# ---------------------------------------------------------------------------


def _pml():
    return pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning not installed")


@pytest.mark.parametrize("n_classes", [2, 4])
def test_matches_pml_on_square_sorted_batches(n_classes):
    """Class-sorted batches of n classes x n samples, where PML's reshape is right: same loss and
    gradient (PML keeps AP in float32, hence the float32-level tolerance)."""
    losses = _pml()
    gen = make_generator(5600 + n_classes)
    labels = torch.arange(n_classes).repeat_interleave(n_classes)
    E = torch.randn(n_classes * n_classes, 8, generator=gen, dtype=torch.float64)
    ours, g_ours = loss_and_grad(lambda x: smooth_ap_loss(x, labels, temperature=0.1, backend="torch"), E)
    pml, g_pml = loss_and_grad(lambda x: losses.SmoothAPLoss(temperature=0.1)(x, labels), E)
    assert abs(ours.item() - pml.item()) <= 1e-6
    assert rel_err(g_pml, g_ours) <= 1e-5


def test_pml_deviates_on_non_square_batches():
    """3 classes x 2 samples: PML reshapes the batch as (samples, classes) instead of
    (classes, samples), so it ranks the wrong groups; ours equals the definition."""
    losses = _pml()
    gen = make_generator(5700)
    labels = torch.arange(3).repeat_interleave(2)
    worst = 0.0
    for _ in range(5):
        E = torch.randn(6, 8, generator=gen, dtype=torch.float64)
        ours = smooth_ap_loss(E, labels, temperature=0.1, backend="torch").item()
        exact = smooth_ap_loss_reference(E, labels, temperature=0.1).item()
        pml = losses.SmoothAPLoss(temperature=0.1)(E, labels).item()
        assert abs(ours - exact) <= 1e-12
        worst = max(worst, abs(pml - exact))
    assert worst > 1e-2, f"PML agreed with the exact loss on every batch (max deviation {worst:.2e})"


# ---------------------------------------------------------------------------
# half precision, compile
# ---------------------------------------------------------------------------

HALF_CASES = [
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
    ("ext", torch.float16),
    ("ext", torch.bfloat16),
    ("triton", torch.float16),
]


UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("temperature", [0.5, 0.05])
@pytest.mark.parametrize("name,dtype", HALF_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in HALF_CASES])
def test_half_precision_within_twice_the_reference_error(name, dtype, temperature):
    """Finite, and against float64 on the same rounded inputs, no worse than 2x the error of the
    reference computed in that half precision (loss and gradient). At temperature 0.05 the
    reference's float16 backward is NaN (its exp overflows): there ours stays finite and its
    gradient is off by the final rounding to the half dtype only."""
    from conftest import require_backend

    require_backend(name)
    gen = make_generator(5800)
    labels = make_labels("unsorted", 24, gen)
    E = make_embeddings(24, 8, "cosine", gen).to(dtype)
    kw = dict(temperature=temperature)
    out, grad = loss_and_grad(lambda x: smooth_ap_loss(x, labels, backend=name, **kw), E)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    exact, g_exact = loss_and_grad(lambda x: smooth_ap_loss_reference(x, labels, **kw), E.double())
    half, g_half = loss_and_grad(lambda x: smooth_ap_loss_reference(x, labels, **kw), E)
    floor = 1e-6
    if torch.isfinite(half).all():
        assert rel_err(out, exact) <= 2 * rel_err(half, exact) + floor
    else:
        assert rel_err(out, exact) <= TOL32
    if torch.isfinite(g_half).all():
        assert rel_err(grad, g_exact) <= 2 * rel_err(g_half, g_exact) + floor
    else:
        assert dtype == torch.float16 and temperature < 0.5
        assert rel_err(grad, g_exact) <= 2 * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_compile_fullgraph(compiler):
    torch._dynamo.reset()
    gen = make_generator(5900)
    labels = make_labels("unsorted", 24, gen)
    E = make_embeddings(24, 8, "cosine", gen)
    R = make_embeddings(30, 8, "cosine", gen)
    yr = make_labels("unsorted", 30, gen)

    def f(x, y):
        return smooth_ap_loss(x, y, temperature=0.05) + smooth_ap_loss(x, y, R, yr, temperature=0.1)

    compiled = torch.compile(f, backend=compiler, fullgraph=True)
    out_c, g_c = loss_and_grad(lambda x: compiled(x, labels), E)
    out_e, g_e = loss_and_grad(lambda x: f(x, labels), E)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_c, g_e, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()
