"""Mixed precision: float16 / bfloat16 embeddings and torch.autocast.

What every case checks:
- the loss is float32 (and a (B,) float32 vector for reduction="none"), the
  gradient comes back in the embeddings' dtype, nothing is NaN or inf;
- the half-precision accuracy rule: against the float64 reference run on the SAME
  half-rounded inputs (E_half.double()), our error is no worse than 2x the error of
  the reference computed in that same half precision (plus a tiny floor);
- the references' float16 backward is NaN (their exp(clamp(-x/tau, -50, 50))
  overflows float16 and 0 * inf follows), where ours is finite and accurate.

The torch backend runs float16 and bfloat16 on the CPU; the Triton backend runs
float16 under the interpreter (which cannot do bfloat16 arithmetic: Triton's
bfloat16 is covered on a GPU only). Measured bounds are printed (pytest -s).
"""

import pytest
import torch

from pnp_kernels import pnp_loss
from pnp_kernels.reference import pnp_loss_reference

from conftest import (
    ALL_BACKENDS,
    UNIT_ROUNDOFF,
    VARIANTS,
    backend_loss_and_grad,
    cyclic_labels,
    device_for,
    loss_and_grad,
    make_generator,
    make_linear,
    reference_loss_and_grad,
    rel_err,
    require_backend,
)

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FLOOR = 1e-6  # absolute floor of the 2x rule, far below any half-precision error


def _require_half_support(backend, dtype):
    require_backend(backend)
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter cannot do bfloat16 arithmetic; bf16 Triton is a GPU check")


def _labels(B, n_classes, gen):
    """Unsorted labels with arbitrary (negative, gapped) ids and unequal classes."""
    return cyclic_labels(B, n_classes, gen, step=7, offset=-11)


def _finite(t):
    return bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------
# dtypes, finiteness and the 2x accuracy rule
# ---------------------------------------------------------------------------

# (backend, dtype name, anneal). float16 at anneal 0.25 is where the reference's own
# float16 backward is still finite (exp(2/0.25) = 2981 < 65504), so the 2x rule applies
# to gradients too; at anneal 0.05 the float16 reference gradient is NaN and the rule
# falls back to "ours finite and within one half rounding". bfloat16 has float32's range:
# its reference never overflows.
ACCURACY_CASES = [
    ("torch", "float16", 0.25),
    ("torch", "float16", 0.05),
    ("torch", "bfloat16", 0.05),
    ("torch", "bfloat16", 0.25),
    ("triton", "float16", 0.25),
    ("triton", "float16", 0.05),
    ("triton", "bfloat16", 0.05),  # GPU only
    ("ext", "float16", 0.05),
    ("ext", "bfloat16", 0.25),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend,dtype_name,anneal", ACCURACY_CASES)
def test_half_precision_dtypes_finite_and_within_2x_of_half_reference(backend, dtype_name, anneal, variant):
    """Half embeddings: float32 loss, gradient in the input dtype, finite, and
    err(ours) <= 2 * err(reference in that half precision) + 1e-6, both errors
    measured against the float64 reference on the same half-rounded inputs."""
    dtype = HALF[dtype_name]
    _require_half_support(backend, dtype)
    B, D = (24, 8)
    gen = make_generator(500 + 10 * VARIANTS.index(variant) + int(anneal * 100))
    E = torch.randn(B, D, generator=gen).to(dtype)  # half-rounded inputs: every run sees these values
    labels = _labels(B, 5, gen)
    kw = dict(variant=variant, anneal=anneal, alpha=1.5, b=2.0)

    out, grad = backend_loss_and_grad(E, labels, backend, **kw)
    assert out.dtype == torch.float32 and out.shape == ()
    assert grad.dtype == dtype and grad.shape == E.shape
    assert _finite(out) and _finite(grad), f"non-finite output: loss {out}, grad has NaN/inf"

    oracle_out, oracle_grad = reference_loss_and_grad(E, labels, **kw)
    half_out, half_grad = loss_and_grad(lambda x: pnp_loss_reference(x, labels, **kw), E)

    err_out, err_grad = rel_err(out, oracle_out), rel_err(grad, oracle_grad)
    half_err_out = rel_err(half_out, oracle_out) if _finite(half_out) else float("nan")
    half_err_grad = rel_err(half_grad, oracle_grad) if _finite(half_grad) else float("nan")
    print(
        f"\n[half bound] {backend} {dtype_name} tau={anneal} {variant}: "
        f"loss err ours {err_out:.2e} vs half-ref {half_err_out:.2e}; "
        f"grad err ours {err_grad:.2e} vs half-ref {half_err_grad:.2e}"
    )

    u = UNIT_ROUNDOFF[dtype]
    if half_err_out == half_err_out:  # finite reference loss: the 2x rule
        assert err_out <= 2 * half_err_out + FLOOR, (err_out, half_err_out)
    else:  # the loss is float32: it must be float32-accurate
        assert err_out <= 1e-5, err_out
    if half_err_grad == half_err_grad:
        assert err_grad <= 2 * half_err_grad + FLOOR, (err_grad, half_err_grad)
    else:
        # The half reference has no finite gradient to compare with. Ours is computed in
        # float32 and rounded once to the half dtype, so it is within one unit roundoff
        # (observed about 0.4 u); 1e-4 would be below what the rounding alone costs.
        assert err_grad <= u, (err_grad, u)


@pytest.mark.parametrize(
    "backend,dtype_name",
    [
        ("torch", "float16"),
        ("torch", "bfloat16"),
        ("triton", "float16"),
        ("triton", "bfloat16"),
        ("ext", "float16"),
        ("ext", "bfloat16"),
    ],
)
def test_half_precision_reduction_none_is_float32_vector(backend, dtype_name):
    """reduction="none" on half embeddings: a (B,) float32 vector, finite, matching the float64
    reference per query (float32 accuracy: the inputs are exact in float32), gradient in the half dtype."""
    dtype = HALF[dtype_name]
    _require_half_support(backend, dtype)
    B, D = 20, 8
    gen = make_generator(77)
    E = torch.randn(B, D, generator=gen).to(dtype)
    labels = _labels(B, 4, gen)
    labels[0] = 999  # a singleton: its entry is exactly 0
    w = torch.rand(B, generator=gen) + 0.5
    out, grad = backend_loss_and_grad(E, labels, backend, weights=w, variant="Ds", anneal=0.1, reduction="none")
    assert out.dtype == torch.float32 and out.shape == (B,)
    assert grad.dtype == dtype
    assert _finite(out) and _finite(grad)
    assert out[0].item() == 0.0
    ref_out, ref_grad = reference_loss_and_grad(E, labels, w, variant="Ds", anneal=0.1, reduction="none")
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(grad, ref_grad) <= UNIT_ROUNDOFF[dtype]


# ---------------------------------------------------------------------------
# the references' float16 backward is NaN; ours is not
# ---------------------------------------------------------------------------


def test_float16_exp_overflow_mechanism():
    """The reference's clamp at 50 does not save float16: exp(50) = 5.2e21 > 65504 is inf, and
    the backward of exp multiplies the incoming gradient (0 where masked) by inf -> NaN."""
    x = torch.tensor([50.0], dtype=torch.float16, requires_grad=True)
    y = torch.exp(x)
    assert torch.isinf(y).all()
    (y * 0).sum().backward()
    assert torch.isnan(x.grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("anneal", [0.01, 0.05])
def test_reference_float16_backward_is_nan_where_ours_is_finite(backend, anneal):
    """Float16 inputs, default-like anneal: pnp_loss_reference's gradient is NaN (its loss is
    finite), ours is finite and within one float16 rounding of the float64 oracle."""
    require_backend(backend)
    B, D = 16, 8
    gen = make_generator(31)
    E = torch.randn(B, D, generator=gen).to(torch.float16)
    labels = _labels(B, 4, gen)
    ref_out, ref_grad = loss_and_grad(lambda x: pnp_loss_reference(x, labels, anneal=anneal), E)
    assert _finite(ref_out), "the reference's float16 forward is finite (1 / (1 + inf) = 0)"
    assert not _finite(ref_grad), "expected the reference's float16 gradient to contain NaN/inf"
    n_nan = int(torch.isnan(ref_grad).sum())
    print(f"\n[fp16 reference] tau={anneal}: {n_nan}/{ref_grad.numel()} gradient entries NaN")

    out, grad = backend_loss_and_grad(E, labels, backend, anneal=anneal)
    assert _finite(out) and _finite(grad)
    oracle_out, oracle_grad = reference_loss_and_grad(E, labels, anneal=anneal)
    assert rel_err(out, oracle_out) <= 1e-5
    assert rel_err(grad, oracle_grad) <= UNIT_ROUNDOFF[torch.float16]


# ---------------------------------------------------------------------------
# torch.autocast
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("variant,similarity", [("O", "cosine"), ("Dq", "cosine"), ("Ib", "dot")])
def test_autocast_bfloat16_linear_embeddings(variant, similarity, backend):
    """float32 inputs through nn.Linear inside torch.autocast("cpu", bfloat16): the embeddings are
    bfloat16, the loss float32, their gradient bfloat16, the Linear's gradients float32, all finite,
    and loss/gradient match the float64 reference on the same bfloat16 embeddings."""
    require_backend(backend)
    gen = make_generator(2024)
    B, D_in, D = 24, 12, 8
    lin = make_linear(D_in, D, gen)
    inputs = torch.randn(B, D_in, generator=gen)
    labels = _labels(B, 6, gen)
    kw = dict(variant=variant, similarity=similarity, anneal=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = lin(inputs)
        emb.retain_grad()
        loss = pnp_loss(emb, labels, backend=backend, **kw)
    assert emb.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    loss.backward()
    assert emb.grad.dtype == torch.bfloat16
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32
    for t in (loss, emb.grad, lin.weight.grad, lin.bias.grad):
        assert _finite(t)
    assert torch.linalg.vector_norm(lin.weight.grad.double()) > 0

    oracle_out, oracle_grad = reference_loss_and_grad(emb.detach(), labels, **kw)
    assert rel_err(loss, oracle_out) <= 1e-5
    assert rel_err(emb.grad, oracle_grad) <= UNIT_ROUNDOFF[torch.bfloat16]


def test_autocast_float16_triton_interpreter():
    """Same under torch.autocast("cpu", float16) with the Triton backend (float16 is fine in the
    interpreter): float32 loss, float16 embedding gradient, finite and close to the oracle."""
    require_backend("triton")
    dev = device_for("triton")
    gen = make_generator(7)
    B, D_in, D = 16, 8, 8
    lin = make_linear(D_in, D, gen, bias=False).to(dev)
    inputs = torch.randn(B, D_in, generator=gen).to(dev)
    labels = _labels(B, 4, gen)
    with torch.autocast(dev, dtype=torch.float16):
        emb = lin(inputs)
        emb.retain_grad()
        loss = pnp_loss(emb, labels.to(dev), variant="Dq", anneal=0.05, backend="triton")
    assert emb.dtype == torch.float16 and loss.dtype == torch.float32
    loss.backward()
    assert emb.grad.dtype == torch.float16 and lin.weight.grad.dtype == torch.float32
    assert _finite(loss) and _finite(emb.grad) and _finite(lin.weight.grad)
    oracle_out, oracle_grad = reference_loss_and_grad(emb.detach().cpu(), labels, variant="Dq", anneal=0.05)
    assert rel_err(loss, oracle_out) <= 1e-5
    assert rel_err(emb.grad, oracle_grad) <= UNIT_ROUNDOFF[torch.float16]
