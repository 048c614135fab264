"""The Triton memory-efficient kernels (pnp_kernels/backends/triton_tiled.py).

* Kernel level, against the float64 oracle ``row_losses_reference`` (autograd through it
  gives dS, so dXq = diag(g) dS Xr and dXr = (diag(g) dS)^T Xq): every loss kind and PNP
  variant, segments longer than a lane chunk, several row blocks and column tiles, the own
  column inside, outside and absent, empty segments, with and without gradient.
* The live-row mask of the reference gradient (a detached memory bank).
* float16 embeddings stay float16 into the kernels (the preparation keeps the half rows
  and their float32 norms) and meet the half-precision rule: error no worse than 2x that of
  the reference run in float16, both against the float64 oracle on the same half values;
  square mode and a reference set. bfloat16 needs a GPU (the interpreter has no bfloat16
  arithmetic).
* Bitwise determinism of loss and gradients across two runs; the dot precisions chosen
  for each dtype and for torch.backends.cuda.matmul.allow_tf32.

Under the interpreter the kernels use 16 x 16 tiles and lane chunks of 4, so these tiny
shapes cover every loop of the kernels.
"""

import dataclasses

import pytest
import torch

import pnp_kernels
from pnp_kernels.reference import (
    pnp_loss_reference,
    recall_at_k_loss_reference,
    row_losses_reference,
    smooth_ap_loss_reference,
)
from pnp_kernels.spec import LossSpec
from pnp_kernels.variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, VARIANTS

from conftest import TOL32, UNIT_ROUNDOFF, device_for, loss_and_grad, make_generator, rel_err

pytestmark = pytest.mark.needs_backend("triton")

DEV = device_for("triton")
KS = dict(ks=(1.0, 2.0, 4.0), k_temperatures=(1.0, 0.5, 2.0))
SPECS = [(f"pnp-{v}", LossSpec(kind=LOSS_PNP, variant=VARIANTS[v], anneal=0.1, alpha=2.0, b=3.0)) for v in VARIANTS]
SPECS += [
    ("smooth_ap", LossSpec(kind=LOSS_SMOOTH_AP, anneal=0.1)),
    ("recall_at_k", LossSpec(kind=LOSS_RECALL_AT_K, anneal=0.1, **KS)),
]


def _tt():
    from pnp_kernels.backends import triton_tiled

    return triton_tiled


def _problem(seed, Q=19, M=37, D=8):
    """A reference-mode problem: M label-sorted reference rows (classes of 1 to 9, so some
    segments span three lane chunks), Q queries with segments [lo, hi) (one empty) and own
    columns inside the segment, outside it, or absent (-1)."""
    gen = make_generator(seed)
    sizes = [9, 1, 3, 6, 2, 5, 1, 4, 6]
    assert sum(sizes) == M
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
    cls = torch.randint(0, len(sizes), (Q,), generator=gen)
    cls[:3] = torch.tensor([0, 3, 8])  # the longest segments in the first row block
    lo = starts[cls]
    hi = lo + torch.tensor(sizes)[cls]
    hi[5] = lo[5]  # an empty segment: the row is dropped
    own = torch.full((Q,), -1, dtype=torch.int64)
    inside = lo + torch.randint(0, 100, (Q,), generator=gen) % (hi - lo).clamp(min=1)
    own[::2] = inside[::2]
    own[1::4] = torch.randint(0, M, (Q,), generator=gen)[1::4]  # anywhere, inside or outside
    Xq = torch.randn(Q, D, generator=gen, dtype=torch.float64) / D**0.5
    Xr = torch.randn(M, D, generator=gen, dtype=torch.float64) / D**0.5
    g = torch.rand(Q, generator=gen, dtype=torch.float64) + 0.5
    return Xq, Xr, lo.to(torch.int32), hi.to(torch.int32), own.to(torch.int32), g


def _oracle(Xq, Xr, lo, hi, own, g, spec):
    """(row_loss, dXq, dXr) in float64 from row_losses_reference and autograd."""
    S = (Xq @ Xr.t()).requires_grad_(True)
    loss = row_losses_reference(
        S,
        lo,
        hi,
        own,
        kind=spec.kind,
        variant=spec.variant.name,
        anneal=spec.anneal,
        alpha=spec.alpha,
        b=spec.b,
        ks=spec.ks,
        k_temperatures=spec.k_temperatures,
    )
    (dS,) = torch.autograd.grad((loss * g).sum(), S)
    return loss.detach(), dS @ Xr, dS.t() @ Xq


def _to_dev(*ts):
    return [t.to(DEV) for t in ts]


@pytest.mark.parametrize("name,spec", SPECS, ids=[s[0] for s in SPECS])
def test_kernels_match_float64_oracle(name, spec):
    tt = _tt()
    Xq, Xr, lo, hi, own, g = _problem(100 + [s[0] for s in SPECS].index(name))
    ref_loss, ref_dq, ref_dr = _oracle(Xq, Xr, lo, hi, own, g, spec)
    xq, xr, lo_d, hi_d, own_d, g_d = _to_dev(Xq.float(), Xr.float(), lo, hi, own, g.float())
    loss, state = tt.tiled_rows(xq, xr, lo_d, hi_d, own_d, spec, True)
    n_cap = tt.lane_capacity(Xq.shape[0], Xr.shape[0], Xr.shape[0], tt.STATE_BUDGET_BYTES, tt.config().block_p)
    assert n_cap >= Xr.shape[0]  # the whole row fits: one window
    assert state.shape == (Xq.shape[0], n_cap + tt._k_slots(spec), tt.STATE_SLOTS)
    dq, dr = tt.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d, spec, True, True)
    assert rel_err(loss, ref_loss) <= TOL32
    assert rel_err(dq, ref_dq) <= TOL32 and rel_err(dr, ref_dr) <= TOL32
    assert loss[5].item() == 0.0 and torch.all(dq[5] == 0)  # the dropped row
    loss_ng, state_ng = tt.tiled_rows(xq, xr, lo_d, hi_d, own_d, spec, False)
    assert state_ng is None and torch.equal(loss_ng, loss)  # the same sums without gradient


WINDOW_SPECS = ["pnp-Dq", "smooth_ap", "recall_at_k"]


@pytest.mark.parametrize("name", WINDOW_SPECS)
def test_lanes_beyond_the_state_in_windows(name, monkeypatch):
    """States of one lane chunk (4 lanes a row, as M / 32 allows): segments of up to 9 lanes need the
    backward's windows of recomputed state (lanes 4-7 and 8), and the windows 12 .. 36 that no
    row reaches are launched and skipped; loss and gradients still equal the oracle, and the
    live-row mask still holds."""
    tt = _tt()
    spec = dict(SPECS)[name]
    Xq, Xr, lo, hi, own, g = _problem(300 + WINDOW_SPECS.index(name))
    Q, M = Xq.shape[0], Xr.shape[0]
    block_p = tt.config().block_p
    monkeypatch.setattr(tt, "MIN_LANES", block_p)
    assert tt.lane_capacity(Q, M, M, tt.STATE_BUDGET_BYTES, block_p) == block_p < int((hi - lo).max())
    ref_loss, ref_dq, ref_dr = _oracle(Xq, Xr, lo, hi, own, g, spec)
    xq, xr, lo_d, hi_d, own_d, g_d = _to_dev(Xq.float(), Xr.float(), lo, hi, own, g.float())
    loss, state = tt.tiled_rows(xq, xr, lo_d, hi_d, own_d, spec, True)
    assert state.shape == (Q, block_p + tt._k_slots(spec), tt.STATE_SLOTS)
    dq, dr = tt.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d, spec, True, True)
    assert rel_err(loss, ref_loss) <= TOL32
    assert rel_err(dq, ref_dq) <= TOL32 and rel_err(dr, ref_dr) <= TOL32
    live = torch.zeros(M, dtype=torch.bool)
    live[:9] = True  # the first class's columns, the longest segment
    r_rows = torch.nonzero(live)[:, 0].to(DEV)
    _, dr_live = tt.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d, spec, False, True, r_rows)
    blocks = torch.arange(M) // tt.config().cols_mn[1]
    kept = torch.isin(blocks, blocks[live])
    assert rel_err(dr_live[kept], ref_dr[kept]) <= TOL32 and torch.all(dr_live[~kept] == 0)


@pytest.mark.parametrize("stage", ["fused", "strips"])
def test_no_host_read(stage, monkeypatch):
    """Forward and backward never read a device value on the host (what would synchronise on
    a GPU): every way a tensor reaches a Python value raises inside the two calls."""
    stage_module = _tt() if stage == "fused" else _ts()
    spec = dict(SPECS)["recall_at_k"]
    Xq, Xr, lo, hi, own, g = _problem(500)
    args = _to_dev(Xq.float(), Xr.float(), lo, hi, own)
    block_p = _tt().config().block_p
    monkeypatch.setattr(_tt(), "MIN_LANES", block_p)  # the fused stage's windows too

    def host_read(*_a, **_k):
        raise AssertionError("a device value was read on the host")

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, attr, host_read)
        with pytest.raises(AssertionError, match="read on the host"):  # the probe itself works
            int(args[3].max())
        loss, state = stage_module.tiled_rows(*args, spec, True)
        dq, dr = stage_module.tiled_grads(*args, state, g.float().to(DEV), spec, True, True)
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dr).all()


def test_wide_rows_several_d_steps_and_slices():
    """D = 70: five BLOCK_D steps in every S tile and two slices of D in the backward grid."""
    tt = _tt()
    spec = dict(SPECS)["recall_at_k"]
    Xq, Xr, lo, hi, own, g = _problem(9, Q=10, M=37, D=70)
    ref_loss, ref_dq, ref_dr = _oracle(Xq, Xr, lo, hi, own, g, spec)
    xq, xr, lo_d, hi_d, own_d, g_d = _to_dev(Xq.float(), Xr.float(), lo, hi, own, g.float())
    loss, state = tt.tiled_rows(xq, xr, lo_d, hi_d, own_d, spec, True)
    dq, dr = tt.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d, spec, True, True)
    assert rel_err(loss, ref_loss) <= TOL32
    assert rel_err(dq, ref_dq) <= TOL32 and rel_err(dr, ref_dr) <= TOL32


def test_live_rows_of_the_reference_gradient():
    """r_rows: dXr of the live reference rows as without the mask; a column tile with no
    live row is skipped (left 0)."""
    tt = _tt()
    spec = SPECS[2][1]
    Xq, Xr, lo, hi, own, g = _problem(7)
    xq, xr, lo_d, hi_d, own_d, g_d = _to_dev(Xq.float(), Xr.float(), lo, hi, own, g.float())
    _, state = tt.tiled_rows(xq, xr, lo_d, hi_d, own_d, spec, True)
    _, full = tt.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d, spec, False, True)
    live = torch.zeros(Xr.shape[0], dtype=torch.bool)
    live[[2, 3, 11]] = True  # all in the first 16-column tile
    r_rows = torch.tensor([11, 2, 3]).to(DEV)  # any order
    dq, part = tt.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d, spec, False, True, r_rows)
    assert dq is None
    assert torch.equal(part[live.to(DEV)], full[live.to(DEV)])
    assert torch.all(part[16:] == 0) and torch.any(full[16:] != 0)


# ---- float16 embeddings ---------------------------------------------------------------------

HALF_KINDS = [
    ("pnp-Dq", pnp_kernels.pnp_loss, pnp_loss_reference, dict(variant="Dq", anneal=0.25, alpha=2.0)),
    ("smooth_ap", pnp_kernels.smooth_ap_loss, smooth_ap_loss_reference, dict(temperature=0.25)),
    ("recall_at_k", pnp_kernels.recall_at_k_loss, recall_at_k_loss_reference, dict(k=(1, 2, 4), temperature=0.25)),
]


def _half_case(fn, oracle, opts, E, y, ref=(), **kw):
    """(loss error, grad error) of the memory-efficient Triton path on float16 inputs and of the
    reference run in float16, both against the float64 oracle on the same half values."""
    leaf_dev = lambda x: fn(x, y.to(DEV), *_to_dev(*ref), backend="triton", memory_efficient=True, **opts, **kw)  # noqa: E731
    out, grad = loss_and_grad(leaf_dev, E.to(DEV))
    assert out.dtype == torch.float32 and grad.dtype == E.dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    ref64 = [t.double() if t.is_floating_point() else t for t in ref]
    o64, g64 = loss_and_grad(lambda x: oracle(x, y, *ref64, **opts, **kw), E.double())
    o16, g16 = loss_and_grad(lambda x: oracle(x, y, *ref, **opts, **kw), E)
    ours, half_ref = (rel_err(out, o64), rel_err(grad, g64)), (rel_err(o16, o64), rel_err(g16, g64))
    errs = ", ".join(f"{e:.2e}" for e in ours + half_ref)
    print(f"\n[half bound] {E.dtype}: loss, grad err ours and float16 reference: {errs}")
    return ours, half_ref


def _assert_2x(ours, half_ref, u=UNIT_ROUNDOFF[torch.float16]):
    """The 2x rule of tests/test_mixed_precision.py. Where the float16 reference is not finite
    (its exponentials overflow), ours must be float32-accurate (loss) or within one rounding
    to float16 (gradient: computed in float32 and rounded once)."""
    for e, h, fallback in zip(ours, half_ref, (TOL32, u)):
        assert e <= (2 * h + 1e-6 if h == h else fallback), (ours, half_ref)


@pytest.mark.parametrize("stage,similarity", [("fused", "cosine"), ("fused", "dot"), ("strips", "cosine")])
@pytest.mark.parametrize("name,fn,oracle,opts", HALF_KINDS, ids=[k[0] for k in HALF_KINDS])
def test_float16_square_within_2x_of_half_reference(name, fn, oracle, opts, similarity, stage, monkeypatch):
    monkeypatch.setenv("PNP_KERNELS_TRITON_TILED", stage)
    gen = make_generator(300 + 7 * [k[0] for k in HALF_KINDS].index(name))
    E = (torch.randn(20, 8, generator=gen) / (1.0 if similarity == "cosine" else 8**0.5)).half()
    y = torch.randint(0, 4, (20,), generator=gen) * 5 - 3
    ours, half_ref = _half_case(fn, oracle, opts, E, y, similarity=similarity)
    _assert_2x(ours, half_ref)


@pytest.mark.parametrize("stage", ["fused", "strips"])
def test_float16_reference_set_within_2x_of_half_reference(stage, monkeypatch):
    monkeypatch.setenv("PNP_KERNELS_TRITON_TILED", stage)
    gen = make_generator(310)
    Er = torch.randn(23, 8, generator=gen).half()
    yr = torch.randint(0, 3, (23,), generator=gen)
    qri = torch.tensor([4, -1, 9, -1, 17, 0, -1, 22, 3, -1])
    Eq = torch.randn(10, 8, generator=gen).half()
    yq = torch.randint(0, 3, (10,), generator=gen)
    Eq[qri >= 0] = Er[qri[qri >= 0]]
    yq[qri >= 0] = yr[qri[qri >= 0]]
    name, fn, oracle, opts = HALF_KINDS[1]
    ours, half_ref = _half_case(fn, oracle, opts, Eq, yq, ref=(Er, yr), query_ref_index=qri.to(DEV))
    _assert_2x(ours, half_ref)


def test_half_rows_reach_the_kernels_unrounded():
    """The memory-efficient preparation keeps the sorted half rows and float32 norms (never
    normalised half vectors); the dense path prepares the same (tests/test_triton_half_dense.py)."""
    from pnp_kernels.backends import get_backend

    impl = get_backend("triton")
    gen = make_generator(320)
    E = torch.randn(12, 8, generator=gen).half().to(DEV)
    y = (torch.arange(12) % 4).to(DEV)
    prep = impl.prepare(E, y, LossSpec(memory_efficient=True))
    assert prep.Xs.dtype == torch.float16 and torch.equal(prep.Xs, E[prep.perm])
    assert prep.denom.dtype == torch.float32
    assert torch.allclose(prep.denom, E.float().norm(dim=1)[prep.perm], rtol=1e-6)
    dense = impl.prepare(E, y, LossSpec(memory_efficient=False))
    assert torch.equal(dense.Xs, prep.Xs) and torch.equal(dense.perm, prep.perm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 Triton is a GPU check (no bf16 in the interpreter)")
def test_bfloat16_square_within_2x_of_half_reference():
    gen = make_generator(330)
    E = torch.randn(64, 32, generator=gen).bfloat16()
    y = torch.randint(0, 8, (64,), generator=gen)
    for _name, fn, oracle, opts in HALF_KINDS:
        ours, half_ref = _half_case(fn, oracle, opts, E, y)
        _assert_2x(ours, half_ref, UNIT_ROUNDOFF[torch.bfloat16])


# ---- determinism and precision choices -------------------------------------------------------


@pytest.mark.parametrize("name", ["smooth_ap", "recall_at_k"])
def test_bitwise_deterministic(name):
    spec = dict(SPECS)[name]
    tt = _tt()
    Xq, Xr, lo, hi, own, g = _problem(400)
    args = _to_dev(Xq.float(), Xr.float(), lo, hi, own)
    runs = []
    for _ in range(2):
        loss, state = tt.tiled_rows(*args, spec, True)
        dq, dr = tt.tiled_grads(*args, state, g.float().to(DEV), spec, True, True)
        runs.append((loss, state, dq, dr))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dot_precisions():
    """float32 tiles in TF32 only when allowed (else tf32x3); the backward product is never a
    single TF32 or half term: tf32x3 for float32 and float16 rows, a 3-term split for bfloat16."""
    tt = _tt()
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert tt._precisions(torch.float32) == (tt.FLOAT32_DOT, 0, "tf32x3")
        matmul.allow_tf32 = True
        assert tt._precisions(torch.float32) == ("tf32", 0, "tf32x3")
    finally:
        matmul.allow_tf32 = before
    assert tt._precisions(torch.float16)[1:] == (0, "tf32x3")
    assert tt._precisions(torch.bfloat16)[1] == 3
    assert tt.FLOAT32_DOT in ("tf32x3", "ieee")


@pytest.mark.parametrize("name,fn,oracle,opts", [HALF_KINDS[2]], ids=["recall_at_k"])
def test_square_batch_with_a_class_beyond_the_state(name, fn, oracle, opts, monkeypatch):
    """End to end, square mode: a class of 13 rows against a state of 4 lanes a row (the backward's windows),
    "none" reduction with weights; loss and gradient equal the float64 oracle."""
    tt = _tt()
    monkeypatch.setattr(tt, "MIN_LANES", tt.config().block_p)
    gen = make_generator(77)
    y = torch.cat([torch.zeros(13, dtype=torch.long), torch.arange(1, 12).repeat_interleave(2)])
    E = torch.randn(y.shape[0], 8, generator=gen, dtype=torch.float64)
    w = torch.rand(y.shape[0], generator=gen, dtype=torch.float64)
    kw = dict(opts, reduction="none")
    ref, ref_g = loss_and_grad(lambda x: oracle(x, y, **kw), E, w)
    out, grad = loss_and_grad(
        lambda x: fn(x, y.to(DEV), backend="triton", memory_efficient=True, **kw).cpu(), E.float().to(DEV), w
    )
    assert rel_err(out, ref) <= TOL32 and rel_err(grad.cpu(), ref_g) <= TOL32


# ---- strips of rows (triton_strips): the stage for rows wider than a fused backward program ----


def _ts():
    from pnp_kernels.backends import triton_strips

    return triton_strips


STRIP_SPECS = ["pnp-Dq", "smooth_ap", "recall_at_k"]


# "mean" finishes the gradient in the forward, "none" recomputes it in the backward
@pytest.mark.parametrize("name,mean", [("pnp-Dq", True), ("smooth_ap", False), ("recall_at_k", True)])
def test_strips_match_float64_oracle(name, mean):
    """Strips of 2 rows (10 strips): the loss, the forward-finished gradient ("mean": scaled by an
    expanded weight), the recomputed one (any weights), and dXr of selected rows only."""
    ts = _ts()
    spec = dataclasses.replace(dict(SPECS)[name], mean=mean)
    Xq, Xr, lo, hi, own, g = _problem(600 + STRIP_SPECS.index(name))
    Q, M = Xq.shape[0], Xr.shape[0]
    assert ts.strip_rows(Q, M) == 2
    xq, xr, lo_d, hi_d, own_d, g_d = _to_dev(Xq.float(), Xr.float(), lo, hi, own, g.float())
    ref_loss, ref_dq, ref_dr = _oracle(Xq, Xr, lo, hi, own, g, spec)
    loss, state = ts.tiled_rows(xq, xr, lo_d, hi_d, own_d, spec, True)
    assert rel_err(loss, ref_loss) <= TOL32
    assert state.shape == ((Q + M, Xq.shape[1]) if mean else (0, Xq.shape[1]))
    dq, dr = ts.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d, spec, True, True)
    assert rel_err(dq, ref_dq) <= TOL32 and rel_err(dr, ref_dr) <= TOL32
    ones = torch.ones(1, dtype=torch.float64).expand(Q)
    _, unit_dq, unit_dr = _oracle(Xq, Xr, lo, hi, own, ones, spec)
    dq1, dr1 = ts.tiled_grads(xq, xr, lo_d, hi_d, own_d, state, g_d.new_ones(1).expand(Q), spec, True, True)
    assert rel_err(dq1, unit_dq) <= TOL32 and rel_err(dr1, unit_dr) <= TOL32
    rows = torch.tensor([30, 2, 11])
    _, state_r = ts.tiled_rows(xq, xr, lo_d, hi_d, own_d, spec, True, rows.to(DEV))
    for w, ref in ((g_d, ref_dr), (g_d.new_ones(1).expand(Q), unit_dr)):
        dq_r, dr_r = ts.tiled_grads(xq, xr, lo_d, hi_d, own_d, state_r, w, spec, False, True, rows.to(DEV))
        kept = torch.zeros(M, dtype=torch.bool)
        kept[rows] = True
        assert dq_r is None and rel_err(dr_r[kept], ref[kept]) <= TOL32 and torch.all(dr_r[~kept] == 0)


def test_strips_chosen_for_wide_rows(monkeypatch):
    """Strips when the fused backward would split D; the variable names the stage; anything else is
    an error naming it. A strips state and a fused state go back to their own backward."""
    ts, tt = _ts(), _tt()
    block_do = tt.config().block_do
    monkeypatch.delenv("PNP_KERNELS_TRITON_TILED", raising=False)
    assert not ts.use_strips(block_do) and ts.use_strips(block_do + 1)
    monkeypatch.setenv("PNP_KERNELS_TRITON_TILED", "strips")
    assert ts.use_strips(8)
    monkeypatch.setenv("PNP_KERNELS_TRITON_TILED", "fused")
    assert not ts.use_strips(4096)
    monkeypatch.setenv("PNP_KERNELS_TRITON_TILED", "yes")
    with pytest.raises(ValueError, match="PNP_KERNELS_TRITON_TILED"):
        ts.use_strips(8)


def test_strips_match_the_fused_stage_end_to_end(monkeypatch):
    """The public API on either stage, a reference set with query_ref_index and "none": the same
    loss and gradient."""
    gen = make_generator(88)
    y = torch.arange(20) % 6
    E = torch.randn(20, 8, generator=gen)
    R = torch.randn(13, 8, generator=gen)
    yr = torch.arange(13) % 6
    qri = torch.tensor([3, -1, 7] + [-1] * 17)
    w = torch.rand(20, generator=gen)

    def step(stage):
        monkeypatch.setenv("PNP_KERNELS_TRITON_TILED", stage)
        x = E.to(DEV).requires_grad_(True)
        loss = pnp_kernels.recall_at_k_loss(
            x, y.to(DEV), R.to(DEV), yr.to(DEV), query_ref_index=qri.to(DEV), k=(1, 2), temperature=0.25,
            reduction="none", backend="triton", memory_efficient=True,
        )  # fmt: skip
        torch.autograd.backward(loss, w.to(DEV))
        return loss.detach(), x.grad

    fused, strips = step("fused"), step("strips")
    assert rel_err(strips[0], fused[0]) <= TOL32 and rel_err(strips[1], fused[1]) <= TOL32
