"""Every backend x variant x similarity x label pattern against the float64 reference.

Loss AND gradient w.r.t. the embeddings, float32 inputs, norm-wise relative error
<= 1e-5 against pnp_loss_reference run on the same inputs upcast to float64
(exact zeros where the reference is 0). Triton runs under the interpreter here:
its shapes stay small (B <= 48, D <= 16).
"""

import pytest
import torch

import pnp_kernels
from pnp_kernels.backends import get_backend
from pnp_kernels.backends.torch_backend import TorchBackend
from pnp_kernels.reference import row_losses_reference
from pnp_kernels.spec import LossSpec
from pnp_kernels.variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP
from pnp_kernels.variants import VARIANTS as VARIANT_TABLE

from conftest import (
    ALL_BACKENDS,
    BATCH_SHAPES,
    PATTERNS,
    SIMILARITIES,
    TOL32,
    VARIANTS,
    assert_close_to_reference,
    batch_shape,
    loss_and_grad,
    make_embeddings,
    make_generator,
    make_labels,
    reference_loss_and_grad,
    rel_err,
    require_backend,
    segments,
)

TOL64 = 1e-10


def _options(variant, similarity, pattern):
    """Non-default options on part of the grid (deterministic, so failures reproduce)."""
    kw = {}
    if variant == "Dq" and similarity == "dot":
        kw["alpha"] = 4.0
    if variant == "Ib" and similarity == "dot":
        kw["b"] = 3.0
    if pattern in ("unequal", "singletons"):
        kw["anneal"] = 0.05
    return kw


def _seed(backend, variant, similarity, pattern):
    return (
        10000
        + 1000 * ALL_BACKENDS.index(backend)
        + 100 * VARIANTS.index(variant)
        + 10 * SIMILARITIES.index(similarity)
        + PATTERNS.index(pattern)
    )


def _run_case(backend, variant, similarity, labels, E, reduction="mean", weights=None, tol=TOL32, **kw):
    out, grad = loss_and_grad(
        lambda x: pnp_kernels.pnp_loss(
            x, labels, variant=variant, similarity=similarity, reduction=reduction, backend=backend, **kw
        ),
        E,
        weights,
    )
    ref_out, ref_grad = reference_loss_and_grad(
        E, labels, weights, variant=variant, similarity=similarity, reduction=reduction, **kw
    )
    assert out.dtype == E.dtype
    assert_close_to_reference(out, grad, ref_out, ref_grad, tol)
    return out, ref_out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_mean(backend, variant, similarity, pattern):
    B, D = batch_shape(backend, pattern)
    gen = make_generator(_seed(backend, variant, similarity, pattern))
    labels = make_labels(pattern, B, gen)
    E = make_embeddings(B, D, similarity, gen)
    out, ref = _run_case(backend, variant, similarity, labels, E, **_options(variant, similarity, pattern))
    assert out.shape == ()
    if pattern in ("one_class", "all_distinct"):
        assert ref.item() == 0.0  # no negatives / no valid query
    else:
        assert ref.item() != 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_reduction_none(backend, variant):
    B, D = BATCH_SHAPES[backend]
    gen = make_generator(500 + VARIANTS.index(variant))
    labels = make_labels("singletons", B, gen)
    E = make_embeddings(B, D, "cosine", gen)
    weights = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    out, ref = _run_case(
        backend, variant, "cosine", labels, E, reduction="none", weights=weights, anneal=0.05, alpha=2.0, b=3.0
    )
    assert out.shape == (B,)
    # the whole vector, and exact zeros at the dropped (singleton) queries
    assert rel_err(out, ref) <= TOL32
    dropped = ref == 0
    assert dropped.any()
    assert torch.all(out[dropped] == 0)


OPTION_CASES = [
    ("Dq", dict(alpha=4.0)),
    ("Dq", dict(alpha=0.5, anneal=0.05)),
    ("Ib", dict(b=3.0)),
    ("Ib", dict(b=0.5, anneal=0.05)),
    ("O", dict(anneal=0.05)),
    ("Ds", dict(anneal=0.1)),
    ("Iu", dict(anneal=0.05)),
]


@pytest.mark.parametrize("variant,kw", OPTION_CASES, ids=[f"{v}-{k}" for v, k in OPTION_CASES])
def test_parity_options(backend, variant, kw):
    B, D = BATCH_SHAPES[backend]
    gen = make_generator(600 + len(str(kw)))
    labels = make_labels("unsorted", B, gen)
    E = make_embeddings(B, D, "dot", gen)
    _run_case(backend, variant, "dot", labels, E, **kw)


def test_parity_largest_triton_batch(backend):
    """B = 48 with a class of 17 and a class of 24 (several positive chunks per row)."""
    B, D = 48, 16
    gen = make_generator(700)
    sizes = [24, 17, 4, 2, 1]
    ids = torch.tensor([-5, 12, 40, 3, 0])
    labels = torch.repeat_interleave(ids, torch.tensor(sizes))[torch.randperm(B, generator=gen)]
    E = make_embeddings(B, D, "cosine", gen)
    _run_case(backend, "Ds", "cosine", labels, E, anneal=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_parity_half_precision_inputs(backend, dtype):
    """Half-precision inputs: finite loss and a gradient in the input dtype; the kernels
    compute in float32, so against the float64 reference on the same (rounded) inputs the
    loss is float32-accurate and the gradient is off by its final rounding only."""
    B, D = 24, 8
    gen = make_generator(800)
    labels = make_labels("unsorted", B, gen)
    E = make_embeddings(B, D, "cosine", gen).to(dtype)
    ref_out, ref_grad = reference_loss_and_grad(E, labels, variant="Dq", anneal=0.05)
    out, grad = loss_and_grad(lambda x: pnp_kernels.pnp_loss(x, labels, variant="Dq", anneal=0.05, backend=backend), E)
    assert out.dtype == torch.float32
    assert grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert rel_err(out, ref_out) <= TOL32
    assert rel_err(grad, ref_grad) <= (1e-3 if dtype == torch.float16 else 8e-3)


# ---------------------------------------------------------------------------
# small-R regime: well separated classes (late in training), losses near 0
# ---------------------------------------------------------------------------


def _separated(B, D, P, gen):
    """Class-sorted batch; "dot" embeddings = orthonormal class direction + small noise,
    so S ~ 1 for positives and ~ 0 for negatives."""
    C = B // P
    Q, _ = torch.linalg.qr(torch.randn(D, C, generator=gen, dtype=torch.float64))
    labels = torch.arange(B) // P
    E = Q.t()[labels] + 0.03 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    return labels, E.float()


@pytest.mark.parametrize("anneal", [0.12, 0.1, 0.06])
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_well_separated_small_R(backend, variant, anneal):
    """Well separated classes (late in training): a gap of ~1 between positive and negative
    similarities, so R ~ n_neg * exp(-1/anneal) (~1e-2 at anneal 0.12, ~1e-3 at 0.1, ~1e-6 at 0.06) and the
    loss is small. f(R) is then in its small-argument regime (log(1+R), bR - log(1+bR),
    1 - (1+R)^-alpha), where float32 loses digits to cancellation unless log1p / expm1
    forms are used. The float32 target (rel err <= 1e-5) holds there too."""
    B, D = 32, 16
    gen = make_generator(900 + VARIANTS.index(variant))
    labels, E = _separated(B, D, 4, gen)
    out, ref = _run_case(backend, variant, "dot", labels, E, anneal=anneal, alpha=1.0, b=2.0)
    assert 0 < abs(ref.item()) < 1e-2  # really the small-loss regime


# ---------------------------------------------------------------------------
# larger batches (torch backend); float64 (backends that compute in it)
# ---------------------------------------------------------------------------


LARGE_CASES = [("O", "cosine"), ("Ds", "dot"), ("Dq", "cosine"), ("Iu", "dot"), ("Ib", "cosine"), ("Dq", "dot")]


@pytest.mark.parametrize("variant,similarity", LARGE_CASES, ids=[f"{v}-{s}" for v, s in LARGE_CASES])
def test_torch_backend_large_batch(variant, similarity):
    B, D = 200, 32
    gen = make_generator(1000 + 10 * VARIANTS.index(variant) + SIMILARITIES.index(similarity))
    pattern = "unequal" if similarity == "cosine" else "singletons"
    labels = make_labels(pattern, B, gen)
    E = make_embeddings(B, D, similarity, gen)
    _run_case("torch", variant, similarity, labels, E, **_options(variant, similarity, pattern))


F64_BACKENDS = ("torch", "ext")  # the backends that compute in float64 for float64 input


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pattern", ["grouped", "unsorted", "singletons", "one_class", "all_distinct"])
@pytest.mark.parametrize("name", F64_BACKENDS)
def test_float64(name, variant, pattern):
    require_backend(name)
    B, D = 36, 8
    gen = make_generator(1100 + 10 * VARIANTS.index(variant) + PATTERNS.index(pattern))
    labels = make_labels(pattern, B, gen)
    E = make_embeddings(B, D, "cosine", gen, dtype=torch.float64)
    out, _ = _run_case(name, variant, "cosine", labels, E, tol=TOL64, anneal=0.05, alpha=2.0, b=3.0)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", F64_BACKENDS)
def test_float64_none(name, variant):
    require_backend(name)
    B, D = 36, 8
    gen = make_generator(1200 + VARIANTS.index(variant))
    labels = make_labels("unequal", B, gen)
    E = make_embeddings(B, D, "dot", gen, dtype=torch.float64)
    weights = torch.randn(B, generator=gen, dtype=torch.float64)
    _run_case(name, variant, "dot", labels, E, reduction="none", weights=weights, tol=TOL64)


# ---------------------------------------------------------------------------
# kernel level: the row functions themselves
# ---------------------------------------------------------------------------


def _random_S(B, gen, dtype=torch.float32):
    X = torch.randn(B, 8, generator=gen, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    return (X @ X.t()).to(dtype)


# class sizes: 2..4, 5..8, > 16 (chunked), a singleton
KERNEL_SIZES = [3, 2, 7, 1, 18, 4]


def _kernel_segments():
    """Segments of KERNEL_SIZES with the preparation's rule (a class of one gets an empty
    segment) and own columns: each row's own copy, except a few rows that have none (-1)."""
    labels = torch.repeat_interleave(torch.arange(len(KERNEL_SIZES)), torch.tensor(KERNEL_SIZES))
    _, _, lo, hi = segments(labels)
    own = torch.arange(labels.numel(), dtype=torch.int32)
    own[[1, 6, 20]] = -1
    return labels, lo, torch.where(hi - lo >= 2, hi, lo), own


def _spec(kind, variant):
    if kind == "smooth_ap":
        return LossSpec(LOSS_SMOOTH_AP, VARIANT_TABLE["O"], 0.05)
    if kind == "recall_at_k":  # k = 2 clips in the classes of 7 and 18; tau2 mixed
        return LossSpec(LOSS_RECALL_AT_K, VARIANT_TABLE["O"], 0.05, ks=(4.0, 1.0, 2.0), k_temperatures=(4.0, 0.5, 1.0))
    return LossSpec(LOSS_PNP, VARIANT_TABLE[variant], 0.05, 2.0, 3.0)


ROW_CASES = [("pnp", v) for v in VARIANTS] + [("smooth_ap", "O"), ("recall_at_k", "O")]
ROW_IDS = [f"{k}-{v}" if k == "pnp" else k for k, v in ROW_CASES]


@pytest.mark.parametrize("kind,variant", ROW_CASES, ids=ROW_IDS)
@pytest.mark.parametrize("max_tile_elems", [1, 64, 1000])
def test_torch_row_stage_chunking(kind, variant, max_tile_elems):
    """Tiny tile budgets (one row per chunk, a few rows) give the same per-row loss and G."""
    gen = make_generator(1300 + ROW_CASES.index((kind, variant)))
    labels, lo, hi, own = _kernel_segments()
    S = _random_S(labels.numel(), gen)
    spec = _spec(kind, variant)
    l0, G0 = TorchBackend().row_losses_and_dS(S, lo, hi, own, spec, True)
    small = TorchBackend(max_tile_elems=max_tile_elems)
    l1, G1 = small.row_losses_and_dS(S, lo, hi, own, spec, True)
    assert l0.abs().sum() > 0 and G0.abs().sum() > 0
    assert torch.allclose(l1, l0, rtol=1e-6, atol=0)
    assert rel_err(G1, G0) <= 1e-6
    # without gradient: same loss, no G
    l2, G2 = small.row_losses_and_dS(S, lo, hi, own, spec, False)
    assert G2 is None
    assert torch.allclose(l2, l0, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind,variant", ROW_CASES, ids=ROW_IDS)
def test_torch_row_stage_matches_row_oracle(kind, variant):
    """The torch backend's row stage in float64 against the brute-force row oracle, loss and dS."""
    gen = make_generator(1350 + ROW_CASES.index((kind, variant)))
    labels, lo, hi, own = _kernel_segments()
    S = _random_S(labels.numel(), gen, torch.float64).requires_grad_(True)
    spec = _spec(kind, variant)
    loss, G = TorchBackend().row_losses_and_dS(S.detach(), lo, hi, own, spec, True)
    ref = row_losses_reference(
        S,
        lo,
        hi,
        own,
        kind=spec.kind,
        variant=variant,
        anneal=0.05,
        alpha=2.0,
        b=3.0,
        ks=spec.ks,
        k_temperatures=spec.k_temperatures,
    )
    w = torch.rand(ref.shape, generator=gen, dtype=torch.float64)
    ref_G = torch.autograd.grad((ref * w).sum(), S)[0]
    assert rel_err(loss, ref) <= 1e-12
    assert rel_err(G * w[:, None], ref_G) <= 1e-12


KERNEL_CASES = (
    [("triton", k, v, False) for k, v in ROW_CASES]
    + [("triton", "pnp", "O", True), ("triton", "pnp", "Ib", True), ("triton", "smooth_ap", "O", True)]
    + [("triton", "recall_at_k", "O", True)]
    + [("ext", k, v, False) for k, v in ROW_CASES]
)


@pytest.mark.parametrize(
    "name,kind,variant,small_tiles",
    KERNEL_CASES,
    ids=[f"{n}-{k}-{v}-{'small_tiles' if t else 'default'}" for n, k, v, t in KERNEL_CASES],
)
def test_backend_row_stage_matches_torch(name, kind, variant, small_tiles):
    """Kernel level: a backend's row stage (float32) against the torch backend's in float64
    on the same S / segments (classes of 2-4, 5-8, > 16 positives and a dropped singleton),
    and its symmetrise stage against the torch one."""
    require_backend(name)
    impl = get_backend(name)
    gen = make_generator(1400 + ROW_CASES.index((kind, variant)))
    labels, lo, hi, own = _kernel_segments()
    S = _random_S(labels.numel(), gen)
    spec = _spec(kind, variant)
    if small_tiles:  # the smallest tiles the Triton launcher allows: multi-chunk paths
        from pnp_kernels.backends import triton_kernels

        def rows(S, lo, hi, own, spec, grad):
            return triton_kernels.row_losses_and_dS(S, lo, hi, own, spec, grad, tile=128)
    else:
        rows = impl.row_losses_and_dS
    lt, Gt = rows(S, lo, hi, own, spec, True)
    l64, G64 = TorchBackend().row_losses_and_dS(S.double(), lo, hi, own, spec, True)
    assert lt.dtype == torch.float32 and Gt.dtype == torch.float32
    assert rel_err(lt, l64) <= TOL32
    assert rel_err(Gt, G64) <= TOL32
    dropped = hi == lo
    assert dropped.any() and torch.all(lt[dropped] == 0) and torch.all(Gt[dropped] == 0)
    # symmetrise of both backends
    g = torch.randn(labels.numel(), generator=gen)
    Ht = impl.symmetrize(Gt, g)
    Hr = TorchBackend().symmetrize(Gt, g)
    assert torch.allclose(Ht, Hr, rtol=1e-6, atol=1e-7)
    assert torch.allclose(Ht, Ht.t())
    if small_tiles or name != "triton":
        # no-gradient launch: same losses
        ln, Gn = rows(S, lo, hi, own, spec, False)
        assert Gn is None
        assert torch.allclose(ln, lt, rtol=1e-6, atol=0)
