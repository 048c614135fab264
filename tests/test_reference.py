"""The B^3 reference (the oracle of every other test) pinned down independently.

1. A tiny hand example computed by scalar Python loops with math.exp (no torch).
2. The authors' formulation (class-sorted, equal classes, "dot"), written here from
   the definitions in docs/semantics.md: it must agree with the reference.
3. reduction="none" semantics; 4. all-distinct labels; 5. variant aliases.
"""

import math

import pytest
import torch

import pnp_kernels
from pnp_kernels.reference import pnp_loss_reference

from conftest import (
    ALL_BACKENDS,
    SIMILARITIES,
    VARIANTS,
    loss_and_grad,
    make_embeddings,
    make_generator,
    make_labels,
    rel_err,
    require_backend,
    valid_queries,
)

# ---------------------------------------------------------------------------
# 1. hand example
# ---------------------------------------------------------------------------


def hand_pnp(E, y, variant, tau, alpha=1.0, b=2.0, cosine=False):
    """The PNP definition of docs/semantics.md by explicit scalar loops over Python floats."""
    n = len(E)
    if cosine:
        E = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in E]
    S = [[sum(E[i][d] * E[j][d] for d in range(len(E[i]))) for j in range(n)] for i in range(n)]
    total, n_valid = 0.0, 0
    for i in range(n):
        pos = [j for j in range(n) if y[j] == y[i]]
        neg = [k for k in range(n) if y[k] != y[i]]
        if len(pos) < 2:
            continue
        n_valid += 1
        acc = 0.0
        for j in pos:
            R = 0.0
            for k in neg:
                R += 1.0 / (1.0 + math.exp(-(S[i][k] - S[i][j]) / tau))
            if variant == "O":
                f = R
            elif variant == "Ds":
                f = math.log(1.0 + R)
            elif variant == "Dq":
                f = (1.0 + R) ** (-alpha)
            elif variant == "Iu":
                f = (1.0 + R) * math.log(1.0 + R)
            elif variant == "Ib":
                f = (b * R - math.log(1.0 + b * R)) / (b * b)
            else:
                raise ValueError(variant)
            acc += f
        total += acc / len(pos)
    loss = total / n_valid if n_valid else 0.0
    return 1.0 - loss if variant == "Dq" else loss


def hand_grad(E, y, h=1e-6, **kw):
    """Central finite differences of hand_pnp, in pure Python."""
    g = [[0.0] * len(E[0]) for _ in E]
    for i in range(len(E)):
        for d in range(len(E[0])):
            Ep = [row[:] for row in E]
            Em = [row[:] for row in E]
            Ep[i][d] += h
            Em[i][d] -= h
            g[i][d] = (hand_pnp(Ep, y, **kw) - hand_pnp(Em, y, **kw)) / (2 * h)
    return g


HAND_CASES = [
    # (name, E, labels, variant, similarity, tau, alpha, b)
    ("O-dot-B4D1", [[0.9], [0.2], [-0.4], [0.6]], [0, 0, 1, 1], "O", "dot", 0.5, 1.0, 2.0),
    (
        "O-dot-B5D2",
        [[0.5, -0.3], [0.1, 0.8], [-0.6, 0.2], [0.3, 0.3], [-0.2, -0.7]],
        [3, 3, 7, 7, 7],
        "O",
        "dot",
        0.25,
        1.0,
        2.0,
    ),
    (
        "Dq-dot-B5D2",
        [[0.5, -0.3], [0.1, 0.8], [-0.6, 0.2], [0.3, 0.3], [-0.2, -0.7]],
        [3, 7, 3, 7, 7],
        "Dq",
        "dot",
        0.25,
        1.0,
        2.0,
    ),
    (
        "Dq-dot-alpha3-B4D2",
        [[1.0, 0.2], [0.4, -0.5], [-0.3, 0.9], [0.7, 0.7]],
        [1, 2, 1, 2],
        "Dq",
        "dot",
        0.4,
        3.0,
        2.0,
    ),
    ("Ds-dot-B4D2", [[1.0, 0.2], [0.4, -0.5], [-0.3, 0.9], [0.7, 0.7]], [1, 2, 1, 2], "Ds", "dot", 0.4, 1.0, 2.0),
    ("Iu-dot-B4D2", [[1.0, 0.2], [0.4, -0.5], [-0.3, 0.9], [0.7, 0.7]], [1, 2, 1, 2], "Iu", "dot", 0.4, 1.0, 2.0),
    ("Ib-dot-B4D2", [[1.0, 0.2], [0.4, -0.5], [-0.3, 0.9], [0.7, 0.7]], [1, 2, 1, 2], "Ib", "dot", 0.4, 1.0, 3.0),
    # cosine, with a singleton (label 9) that is only a negative for the others
    (
        "O-cos-B5D2",
        [[0.5, -0.3], [0.1, 0.8], [-0.6, 0.2], [0.3, 0.3], [-0.2, -0.7]],
        [0, 0, 1, 1, 9],
        "O",
        "cosine",
        0.3,
        1.0,
        2.0,
    ),
    (
        "Dq-cos-B5D2",
        [[0.5, -0.3], [0.1, 0.8], [-0.6, 0.2], [0.3, 0.3], [-0.2, -0.7]],
        [0, 1, 1, 0, 0],
        "Dq",
        "cosine",
        0.3,
        2.0,
        2.0,
    ),
]


@pytest.mark.parametrize("case", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_reference_matches_hand_computation(case):
    _, E, y, variant, sim, tau, alpha, b = case
    kw = dict(variant=variant, tau=tau, alpha=alpha, b=b, cosine=(sim == "cosine"))
    expected = hand_pnp(E, y, **kw)
    expected_grad = torch.tensor(hand_grad(E, y, **kw), dtype=torch.float64)
    assert expected != 0.0
    Et = torch.tensor(E, dtype=torch.float64)
    yt = torch.tensor(y)
    opts = dict(variant=variant, anneal=tau, alpha=alpha, b=b, similarity=sim)
    out, grad = loss_and_grad(lambda x: pnp_loss_reference(x, yt, **opts), Et)
    assert out.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert rel_err(grad, expected_grad) <= 1e-7
    # and the package itself (torch backend, float64) on the same example
    out2, grad2 = loss_and_grad(lambda x: pnp_kernels.pnp_loss(x, yt, backend="torch", **opts), Et)
    assert out2.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert rel_err(grad2, expected_grad) <= 1e-7


def test_hand_example_is_not_trivial():
    """Guard: the hand function itself distinguishes variants and similarities."""
    E = HAND_CASES[1][1]
    y = HAND_CASES[1][2]
    vals = {v: hand_pnp(E, y, v, 0.25) for v in VARIANTS}
    assert len(set(round(x, 12) for x in vals.values())) == 5
    assert hand_pnp(E, y, "O", 0.25) != hand_pnp(E, y, "O", 0.25, cosine=True)


# ---------------------------------------------------------------------------
# 2. the authors' formulation on grouped batches
# ---------------------------------------------------------------------------


def _authors_sigmoid(x, temp):
    exponent = torch.clamp(-x / temp, min=-50, max=50)
    return 1.0 / (1.0 + torch.exp(exponent))


def authors_pnp(E, batch_size, group, variant, anneal, alpha, b):
    """The authors' formulation: class-sorted batch of batch_size // group classes of
    `group` samples each, similarity = raw dot products."""
    sim = E @ E.t()
    mask = 1.0 - torch.eye(batch_size, dtype=E.dtype)
    for c in range(batch_size // group):
        mask[c * group : (c + 1) * group, c * group : (c + 1) * group] = 0.0
    mask = mask.unsqueeze(0).repeat(batch_size, 1, 1)  # [i, j, k] = mask[j, k]
    sim_repeat = sim.unsqueeze(1).repeat(1, batch_size, 1)  # [i, j, k] = S_ik
    sim_diff = sim_repeat - sim_repeat.permute(0, 2, 1)  # [i, j, k] = S_ik - S_ij
    sim_sg = _authors_sigmoid(sim_diff, anneal) * mask
    rk = sim_sg.sum(dim=-1)  # [i, j]
    if variant == "O":
        f = rk
    elif variant == "Ds":
        f = torch.log(1 + rk)
    elif variant == "Dq":
        f = 1 / (1 + rk) ** alpha
    elif variant == "Iu":
        f = (1 + rk) * torch.log(1 + rk)
    elif variant == "Ib":
        f = 1 / b**2 * (b * rk - torch.log(1 + b * rk))
    else:
        raise ValueError(variant)
    loss = torch.zeros((), dtype=E.dtype)
    for c in range(batch_size // group):
        block = f[c * group : (c + 1) * group, c * group : (c + 1) * group]
        loss = loss + torch.sum(block / group)
    loss = loss / batch_size
    return 1 - loss if variant == "Dq" else loss


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B,group,anneal", [(12, 3, 0.01), (24, 4, 0.05), (20, 5, 0.2)])
def test_reference_equals_authors_formulation(variant, B, group, anneal):
    gen = make_generator(100 + B + group)
    E = make_embeddings(B, 8, "dot", gen, dtype=torch.float64)
    labels = torch.arange(B) // group
    alpha, b = (4.0, 2.0) if variant == "Dq" else (1.0, 3.0)
    ref, ref_g = loss_and_grad(
        lambda x: pnp_loss_reference(x, labels, variant=variant, anneal=anneal, alpha=alpha, b=b, similarity="dot"), E
    )
    auth, auth_g = loss_and_grad(lambda x: authors_pnp(x, B, group, variant, anneal, alpha, b), E)
    assert ref.item() == pytest.approx(auth.item(), rel=1e-12, abs=1e-14)
    assert rel_err(ref_g, auth_g) <= 1e-10


# ---------------------------------------------------------------------------
# 3. reduction="none"
# ---------------------------------------------------------------------------

NONE_PATTERNS = ("unsorted", "singletons", "unequal")


def _none_vs_mean(fn, labels):
    vec = fn("none")
    mean = fn("mean")
    return vec, mean, valid_queries(labels)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pattern", NONE_PATTERNS)
def test_reference_reduction_none(variant, pattern):
    gen = make_generator(7)
    B = 30
    E = make_embeddings(B, 6, "cosine", gen, dtype=torch.float64)
    labels = make_labels(pattern, B, gen)
    vec, mean, valid = _none_vs_mean(
        lambda r: pnp_loss_reference(E, labels, variant=variant, reduction=r, anneal=0.05), labels
    )
    assert vec.shape == (B,)
    assert torch.all(vec[~valid] == 0)
    assert torch.all(vec[valid] != 0)
    assert vec[valid].mean().item() == pytest.approx(mean.item(), rel=1e-12)
    if pattern == "singletons":
        assert (~valid).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_package_reduction_none_semantics(variant):
    gen = make_generator(8)
    B = 30
    E = make_embeddings(B, 6, "cosine", gen, dtype=torch.float64)
    labels = make_labels("singletons", B, gen)
    vec, mean, valid = _none_vs_mean(
        lambda r: pnp_kernels.pnp_loss(E, labels, variant=variant, reduction=r, anneal=0.05, backend="torch"), labels
    )
    assert (~valid).any()
    assert torch.all(vec[~valid] == 0)
    assert torch.all(vec[valid] != 0)
    assert vec[valid].mean().item() == pytest.approx(mean.item(), rel=1e-12)
    # the gradient of mean == gradient of sum(vec) / |V|
    _, g_mean = loss_and_grad(
        lambda x: pnp_kernels.pnp_loss(x, labels, variant=variant, anneal=0.05, backend="torch"), E
    )
    _, g_vec = loss_and_grad(
        lambda x: pnp_kernels.pnp_loss(x, labels, variant=variant, anneal=0.05, reduction="none", backend="torch"),
        E,
        weights=valid.double() / valid.sum(),
    )
    assert rel_err(g_vec, g_mean) <= 1e-12


# ---------------------------------------------------------------------------
# 4. all-distinct labels: loss 0, gradient 0, still differentiable
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_reference_all_distinct_is_zero_with_zero_grad(variant, similarity):
    gen = make_generator(9)
    E = make_embeddings(10, 4, similarity, gen, dtype=torch.float64)
    labels = torch.randperm(10, generator=gen) * 3 - 11
    x = E.clone().requires_grad_(True)
    out = pnp_loss_reference(x, labels, variant=variant, similarity=similarity)
    assert out.requires_grad
    out.backward()
    assert out.item() == 0.0
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_package_all_distinct_is_zero_with_zero_grad(variant, reduction, backend_name):
    require_backend(backend_name)
    gen = make_generator(10)
    E = make_embeddings(8, 4, "cosine", gen)
    labels = torch.randperm(8, generator=gen) - 4
    x = E.clone().requires_grad_(True)
    out = pnp_kernels.pnp_loss(x, labels, variant=variant, reduction=reduction, backend=backend_name)
    assert out.requires_grad, "the zero loss must still be part of the graph"
    out.sum().backward()
    assert torch.all(out == 0)
    assert x.grad is not None and torch.all(x.grad == 0)


# ---------------------------------------------------------------------------
# 5. aliases
# ---------------------------------------------------------------------------

ALIASES = {"PNP-O": "O", "PNP-D_s": "Ds", "PNP-D_q": "Dq", "PNP-I_u": "Iu", "PNP-I_b": "Ib"}


@pytest.mark.parametrize("alias,short", sorted(ALIASES.items()))
def test_aliases_identical_to_short_names(alias, short):
    gen = make_generator(11)
    E = make_embeddings(16, 5, "cosine", gen)
    labels = make_labels("unsorted", 16, gen)
    kw = dict(anneal=0.05, alpha=2.0, b=3.0)
    for fn in (
        lambda x, v: pnp_loss_reference(x, labels, variant=v, **kw),
        lambda x, v: pnp_kernels.pnp_loss(x, labels, variant=v, backend="torch", **kw),
        lambda x, v: pnp_kernels.PNPLoss(variant=v, backend="torch", **kw)(x, labels),
    ):
        a, ga = loss_and_grad(lambda x: fn(x, alias), E)
        s, gs = loss_and_grad(lambda x: fn(x, short), E)
        assert torch.equal(a, s)
        assert torch.equal(ga, gs)
    # different variants really differ (the comparison above is not vacuous)
    other = "O" if short != "O" else "Ds"
    o, _ = loss_and_grad(lambda x: pnp_loss_reference(x, labels, variant=other, **kw), E)
    s, _ = loss_and_grad(lambda x: pnp_loss_reference(x, labels, variant=short, **kw), E)
    assert not torch.equal(o, s)
