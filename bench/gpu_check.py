"""One-shot GPU check: correctness of every backend, loss and mode, then speed and memory.

Run from the repository root on a CUDA machine (about 3-5 minutes on one H200,
including the first build of the ext backend's CUDA kernels):

    PYTHONPATH=. python bench/gpu_check.py --out DIR [--quick] [--skip a,b]

It writes DIR/gpu_check.md (everything printed) and exits 0 when every section
passed (a skipped section does not fail). Sections, each guarded (a failure is
reported and the rest still runs); ``--skip`` takes their names:

  parity          PNP: triton / torch / ext x 5 variants x 2 similarities x 5 label
                  patterns vs the float64 B^3 reference (B = 61, 384), and triton vs
                  the float64 torch backend at B = 1024; loss and gradient rel. errors.
  smooth_ap       Smooth-AP: the same backends, similarities and label patterns, both
                  reductions, vs smooth_ap_loss_reference in float64.
  recall_at_k     the Recall@k surrogate: the same backends, similarities, label
                  patterns and reductions, two K / tau2 settings (one clipped), vs
                  recall_at_k_loss_reference in float64.
  memory_efficient  memory_efficient=True on every backend: PNP (5 variants), Smooth-AP
                  and Recall@k, square and reference set, vs float64.
  refset          reference sets: PNP (5 variants) and Smooth-AP, queries against a
                  reference set with and without query_ref_index (a memory bank that
                  holds the queries), gradients to queries and reference, vs float64.
  sync            forward+backward under torch.cuda.set_sync_debug_mode("error")
                  (triton, and ext when its CUDA kernels are built): square PNP,
                  Smooth-AP, reference set.
  ext_guard       the raw ext CUDA row op with an out-of-range segment: a NaN row.
  device_guard    embeddings on cuda:1 while cuda:0 is current (needs >= 2 GPUs,
                  else skipped with a note), triton / ext / torch, square PNP,
                  Smooth-AP, reference set: result and gradient on cuda:1, the current
                  device unchanged, equal (rel. err <= 1e-6) to the step on cuda:0.
  distributed     distributed=True's collectives in one process (world size 1): NCCL on
                  the GPU (gloo on the CPU): the metadata exchange and its error path,
                  distributed_loss vs the plain loss (PNP, Smooth-AP, a memory; float32
                  1e-5, float64 1e-10), the gather's reduce-scatter backward (counted),
                  and the host syncs of one step (expected 1). Not covered: two or more
                  GPUs, unequal local batches and empty ones on NCCL (the tests run those
                  on gloo).
  opcheck         torch.library.opcheck of pnp_kernels::square_loss_fwd/bwd and
                  reference_loss_fwd/bwd on CUDA tensors (triton, ext), both losses,
                  both similarities, both reductions.
  graph           a training step (forward, backward, SGD) captured in a CUDA graph
                  and replayed: same losses and parameters as eager.
  determinism     two runs give bitwise-identical loss and gradient.
  profile         host time and kernel count of a B = 384 step, launch costs, the
                  counting-sort prep A/B, the step replayed from a CUDA graph.
  mixed           float16 / bfloat16 embeddings and autocast.
  compiled_step   torch.compile(fullgraph=True) of a training step equals eager.
  bench           PNP speed/memory (float32, TF32 off, D = 512, 4 per class, Dq): ours
                  (triton, ext, torch) vs the B^3 reference (eager; compiled at 384)
                  vs the GEMM floor, B = 128 .. 16384.
  smooth_ap_bench Smooth-AP next to PNP (variant O), triton and ext, B = 384, 4096,
                  16384: time, peak memory and the Smooth-AP / PNP ratio.
  refset_bench    a 4096-query batch against a 65536-row memory bank (D = 512, PNP O,
                  queries require grad, the bank does not), triton and ext, time and
                  peak memory, next to the square B = 4096 step and the GEMM floors.
  bigP            PNP at P = 16 and 64, B = 384 .. 16384.
  huge            PNP at B = 65536.
  me_bench        the memory-efficient path (triton) next to dense, PNP Dq, B = 16384,
                  65536, 262144, D = 512, P = 4, float32 and bfloat16: time, peak memory,
                  dense where it fits, agreement of the two, ratio to the bf16 GEMM floor;
                  at this D triton takes strips of rows, and the fused tile kernels are
                  timed beside them (B <= 65536).
  dense_half      the triton dense path on bfloat16 and float16 embeddings vs float32
                  embeddings of the same values, PNP Dq, B = 16384, D = 512: time, peak
                  memory, float32 / half ratio (target: bf16 >= 3x), loss and grad agreement.

Timing: triton.testing.do_bench median (warmup 25 ms, rep 100 ms; --quick: 5/20);
memory: torch.cuda.max_memory_allocated above what is allocated before the step.
Without CUDA (e.g. TRITON_INTERPRET=1 on a CPU machine) it runs tiny versions of the
correctness sections and of the table code with the CPU backends (perf_counter
medians, no memory column), so the script itself can be tested anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

import pnp_kernels
from pnp_kernels import pnp_loss, recall_at_k_loss, smooth_ap_loss
from pnp_kernels.backends import ext_build
from pnp_kernels.reference import pnp_loss_reference, recall_at_k_loss_reference, smooth_ap_loss_reference
from pnp_kernels.spec import LossSpec
from pnp_kernels.variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP
from pnp_kernels.variants import VARIANTS as VARIANT_TABLE

VARIANTS = list(VARIANT_TABLE)
PATTERNS = ["grouped", "unsorted", "unequal", "one_class", "distinct"]
LINES = []


def log(msg=""):
    print(msg, flush=True)
    LINES.append(msg)


def rel_err(a, b, tiny=1e-9):
    """||a - b|| / ||b||, or the absolute error when ||b|| < tiny (e.g. a gradient that is 0 in
    exact arithmetic, such as Smooth-AP's for one class, where the reference leaves roundoff)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den >= tiny else (a - b).norm().item()


def labels_for(pattern, B, gen, device):
    if pattern == "grouped":
        y = torch.arange(B) // 4
    elif pattern == "unsorted":
        y = torch.randint(-7, 40, (B,), generator=gen) * 3
    elif pattern == "unequal":
        sizes = [1, 2, 3, 7, 13]
        y = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes * (B // 26 + 1))])[:B]
        y = y[torch.randperm(B, generator=gen)]
    elif pattern == "one_class":
        y = torch.full((B,), 5)
    elif pattern == "distinct":
        y = torch.randperm(B, generator=gen)
    else:
        raise ValueError(pattern)
    return y.to(device)


def make_batch(B, D, P, device, gen, dtype=torch.float32):
    E = torch.randn(B, D, generator=gen).to(device=device, dtype=dtype)
    y = (torch.arange(B) // P)[torch.randperm(B, generator=gen)].to(device)
    return E, y


def section(name, fn, results):
    log(f"\n=== {name}")
    t0 = time.time()
    try:
        ok = fn()
        results[name] = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    except Exception:
        log(traceback.format_exc())
        results[name] = "ERROR"
    log(f"--- {name}: {results[name]} ({time.time() - t0:.1f} s)")


def compare(ours, ref, leaves, gen, reduction="mean"):
    """(loss rel err, grad rel err over ``leaves``, finite) of ``ours()`` vs ``ref(leaves64)``:
    for "none" the outputs are weighted by a fixed random vector before the gradient."""
    out = ours()
    w = torch.rand(out.shape, generator=gen, dtype=torch.float64) if reduction == "none" else None
    wd = None if w is None else w.to(device=out.device)
    g = torch.autograd.grad(out if wd is None else (out * wd.to(out.dtype)).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    r = ref(leaves64)
    g_ref = torch.autograd.grad(r if wd is None else (r * wd).sum(), leaves64)
    el = rel_err(out.detach().reshape(-1), r.detach().reshape(-1))
    eg = max(rel_err(a, b) for a, b in zip(g, g_ref))
    finite = bool(torch.isfinite(out).all().item()) and all(bool(torch.isfinite(t).all().item()) for t in g)
    return el, eg, finite


# --------------------------------------------------------------------------- correctness


def parity(device, backends, sizes, big_B):
    ok = True
    gen = torch.Generator().manual_seed(0)
    rows = []
    for backend, B, pattern, sim in itertools.product(backends, sizes, PATTERNS, ["cosine", "dot"]):
        worst_l = worst_g = 0.0
        for v in VARIANTS:
            E = torch.randn(B, 32, generator=gen)
            E = (E / 32**0.5 if sim == "dot" else E).to(device).requires_grad_()
            y = labels_for(pattern, B, gen, device)
            kw = dict(variant=v, alpha=4.0 if v == "Dq" else 1.0, b=3.0 if v == "Ib" else 2.0, similarity=sim)
            el, eg, finite = compare(
                lambda: pnp_loss(E, y, backend=backend, **kw), lambda L: pnp_loss_reference(L[0], y, **kw), [E], gen
            )
            if not finite or el > 1e-5 or eg > 1e-5:
                ok = False
                log(f"  FAIL {backend} B={B} {pattern} {sim} {v}: loss err {el:.2e} grad err {eg:.2e} finite={finite}")
            worst_l, worst_g = max(worst_l, el), max(worst_g, eg)
        rows.append((backend, B, pattern, sim, worst_l, worst_g))
    log("| backend | B | labels | similarity | max loss rel err (5 variants) | max grad rel err |")
    log("|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1e} | {r[5]:.1e} |")
    if big_B and "triton" in backends:
        # B^3 float64 is too big here: the float64 torch backend (itself pinned to the reference) is the oracle.
        for v in VARIANTS:
            E = torch.randn(big_B, 128, generator=gen).to(device).requires_grad_()
            y = labels_for("unsorted", big_B, gen, device)
            el, eg, _ = compare(
                lambda: pnp_loss(E, y, variant=v, backend="triton"),
                lambda L: pnp_loss(L[0], y, variant=v, backend="torch"),
                [E],
                gen,
            )
            log(f"  triton vs float64 torch backend, B={big_B}, {v}: loss {el:.1e}, grad {eg:.1e}")
            ok &= el <= 1e-5 and eg <= 1e-5
    return ok


def smooth_ap_parity(device, backends, sizes):
    """Smooth-AP vs smooth_ap_loss_reference in float64, both reductions."""
    ok = True
    gen = torch.Generator().manual_seed(10)
    log("| backend | B | labels | similarity | reduction | loss rel err | grad rel err |")
    log("|---|---|---|---|---|---|---|")
    for backend, B, pattern, sim, red in itertools.product(
        backends, sizes, PATTERNS, ["cosine", "dot"], ["mean", "none"]
    ):
        E = torch.randn(B, 32, generator=gen)
        E = (E / 32**0.5 if sim == "dot" else E).to(device).requires_grad_()
        y = labels_for(pattern, B, gen, device)
        kw = dict(temperature=0.05, similarity=sim, reduction=red)
        el, eg, finite = compare(
            lambda: smooth_ap_loss(E, y, backend=backend, **kw),
            lambda L: smooth_ap_loss_reference(L[0], y, **kw),
            [E],
            gen,
            red,
        )
        good = finite and el <= 1e-5 and eg <= 1e-5
        ok &= good
        log(f"| {backend} | {B} | {pattern} | {sim} | {red} | {el:.1e} | {eg:.1e} |" + ("" if good else " FAIL"))
    return ok


def refset_parity(device, backends, Q=40, M=120):
    """Queries against a reference set (with and without query_ref_index), both losses,
    gradients to the queries and the reference set, vs the float64 references."""
    ok = True
    gen = torch.Generator().manual_seed(11)
    log("| backend | loss | query_ref_index | reduction | loss rel err | grad rel err (queries, reference) |")
    log("|---|---|---|---|---|---|")
    for backend, loss, own, red in itertools.product(backends, ["pnp", "smooth_ap"], [False, True], ["mean", "none"]):
        Eq = torch.randn(Q, 32, generator=gen).to(device).requires_grad_()
        yq = labels_for("unsorted", Q, gen, device)
        bank = torch.randn(M - Q if own else M, 32, generator=gen)
        yb = labels_for("unsorted", bank.shape[0], gen, device)
        if own:  # a memory bank that holds the queries first: each query's own copy is row i
            Er = torch.cat([Eq.detach().cpu(), bank]).to(device).requires_grad_()
            yr = torch.cat([yq, yb])
            qri = torch.arange(Q, device=device)
            qri[::7] = -1  # some queries without a copy
        else:
            Er = bank.to(device).requires_grad_()
            yr, qri = yb, None
        variants = VARIANTS if loss == "pnp" else [None]
        worst_l = worst_g = 0.0
        for v in variants:
            if loss == "pnp":
                kw = dict(variant=v, alpha=4.0 if v == "Dq" else 1.0, b=3.0 if v == "Ib" else 2.0, reduction=red)
                f, f_ref = pnp_loss, pnp_loss_reference
            else:
                kw = dict(temperature=0.05, reduction=red)
                f, f_ref = smooth_ap_loss, smooth_ap_loss_reference
            el, eg, finite = compare(
                lambda: f(Eq, yq, Er, yr, query_ref_index=qri, backend=backend, **kw),
                lambda L: f_ref(L[0], yq, L[1], yr, query_ref_index=qri, **kw),
                [Eq, Er],
                gen,
                red,
            )
            good = finite and el <= 1e-5 and eg <= 1e-5
            ok &= good
            if not good:
                log(f"  FAIL {backend} {loss} {v} own={own} {red}: loss {el:.2e} grad {eg:.2e} finite={finite}")
            worst_l, worst_g = max(worst_l, el), max(worst_g, eg)
        log(
            f"| {backend} | {loss}{' (5 variants)' if loss == 'pnp' else ''} | {'yes' if own else 'no'} | {red} | "
            f"{worst_l:.1e} | {worst_g:.1e} |"
        )
    return ok


def sync_free(device, backends):
    gen = torch.Generator().manual_seed(1)
    E, y = make_batch(384, 512, 4, device, gen)
    R, yr = make_batch(2048, 512, 4, device, gen)
    E.requires_grad_()
    steps = {
        "pnp": lambda b: pnp_loss(E, y, variant="Dq", backend=b),
        "smooth_ap": lambda b: smooth_ap_loss(E, y, backend=b),
        "pnp vs reference set": lambda b: pnp_loss(E, y, R, yr, backend=b),
        "recall@k": lambda b: recall_at_k_loss(E, y, backend=b),
        "pnp memory-efficient": lambda b: pnp_loss(E, y, variant="Dq", backend=b, memory_efficient=True),
        "recall@k memory-efficient, bf16": lambda b: recall_at_k_loss(
            E.bfloat16(), y, backend=b, memory_efficient=True
        ),
        # 4096 rows of one class: more positives than the Triton state keeps at once (128 lanes
        # a row), so its backward also runs windows of recomputed state
        "smooth_ap memory-efficient, one class of 4096": lambda b: smooth_ap_loss(
            E.repeat(11, 1)[:4096], torch.zeros(4096, dtype=y.dtype, device=y.device), backend=b, memory_efficient=True
        ),
    }
    for backend, (what, step) in itertools.product(backends, steps.items()):
        step(backend).backward()  # warm-up: compile kernels, allocate
        torch.cuda.synchronize()
        E.grad = None
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = step(backend)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        E.grad = None
        log(
            f"  {backend} {what}: forward+backward under set_sync_debug_mode('error'): no sync raised; "
            f"loss {loss.item():.6f}"
        )
    return True


def ext_bad_segment(device):
    """The raw CUDA op with a segment past the row's end: a NaN row, no out-of-bounds access."""
    ops = ext_build.ops()
    S = torch.randn(4, 16, device=device)
    lo = torch.tensor([0, 4, 14, 8], dtype=torch.int32, device=device)
    hi = torch.tensor([4, 8, 40, 12], dtype=torch.int32, device=device)  # row 2 ends past column 16
    own = lo.clone()  # own columns at the segments' starts (Recall@k leaves them out)
    ok = True
    for kind in (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K):
        # row_losses_and_dS(S, lo, hi, own, kind, variant, anneal, alpha, b, ks, k_temperatures, compute_grad)
        loss, G = ops.row_losses_and_dS(S, lo, hi, own, kind, 0, 0.05, 1.0, 2.0, [1.0, 2.0], [1.0, 2.0], True)
        torch.cuda.synchronize()
        good = (
            bool(torch.isnan(loss[2])) and bool(torch.isnan(G[2]).all()) and bool(torch.isfinite(loss[[0, 1, 3]]).all())
        )
        ok &= good
        log(
            f"  ext CUDA row_losses_and_dS, kind {kind}, out-of-range segment: loss {loss.tolist()} -> "
            f"{'NaN row, others finite' if good else 'UNEXPECTED'}"
        )
    return ok


def device_guard(backends):
    """Embeddings on cuda:1 while cuda:0 is current: everything on cuda:1, equal to cuda:0's result."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        log(f"  skipped: {n} CUDA device(s) visible, the check needs 2")
        return None
    gen = torch.Generator().manual_seed(12)
    E0, y0 = make_batch(256, 64, 4, "cpu", gen)
    R0, yr0 = make_batch(512, 64, 4, "cpu", gen)
    ok = True
    with torch.cuda.device(0):
        for backend, what in itertools.product(backends, ["pnp", "smooth_ap", "refset"]):
            got = []
            for dev in ("cuda:0", "cuda:1"):
                E = E0.to(dev).requires_grad_()
                y, R, yr = y0.to(dev), R0.to(dev), yr0.to(dev)
                if what == "pnp":
                    loss = pnp_loss(E, y, variant="Dq", backend=backend)
                elif what == "smooth_ap":
                    loss = smooth_ap_loss(E, y, backend=backend)
                else:
                    loss = pnp_loss(E, y, R, yr, backend=backend)
                (g,) = torch.autograd.grad(loss, E)
                torch.cuda.synchronize(dev)
                got.append((loss, g))
            (l0, g0), (l1, g1) = got
            placed = l1.device == torch.device("cuda:1") and g1.device == torch.device("cuda:1")
            bitwise = torch.equal(l0.cpu(), l1.cpu()) and torch.equal(g0.cpu(), g1.cpu())
            err = max(rel_err(l1.cpu().reshape(1), l0.cpu().reshape(1)), rel_err(g1.cpu(), g0.cpu()))
            current = torch.cuda.current_device() == 0
            good = placed and current and err <= 1e-6
            ok &= good
            log(
                f"  {backend} {what}: output on {l1.device}, grad on {g1.device}, current device still "
                f"{torch.cuda.current_device()}; vs cuda:0: rel err {err:.1e}, bitwise equal {bitwise} "
                f"{'ok' if good else 'FAIL'}"
            )
    return ok


RECALL_SETTINGS = [dict(k=(1, 2, 4, 8, 16), temperature=0.05), dict(k=2, temperature=0.05, k_temperature=0.5)]


def recall_at_k_parity(device, backends, sizes):
    """Recall@k vs recall_at_k_loss_reference in float64: patterns, similarities, reductions, K settings."""
    ok = True
    gen = torch.Generator().manual_seed(14)
    log("| backend | B | labels | similarity | reduction | K | loss rel err | grad rel err |")
    log("|---|---|---|---|---|---|---|---|")
    for backend, B, pattern, sim, red, setting in itertools.product(
        backends, sizes, PATTERNS, ["cosine", "dot"], ["mean", "none"], range(len(RECALL_SETTINGS))
    ):
        E = torch.randn(B, 32, generator=gen)
        E = (E / 32**0.5 if sim == "dot" else E).to(device).requires_grad_()
        y = labels_for(pattern, B, gen, device)
        kw = dict(similarity=sim, reduction=red, **RECALL_SETTINGS[setting])
        el, eg, finite = compare(
            lambda: recall_at_k_loss(E, y, backend=backend, **kw),
            lambda L: recall_at_k_loss_reference(L[0], y, **kw),
            [E],
            gen,
            red,
        )
        good = finite and el <= 1e-5 and eg <= 1e-5
        ok &= good
        log(
            f"| {backend} | {B} | {pattern} | {sim} | {red} | {setting} | {el:.1e} | {eg:.1e} |"
            + ("" if good else " FAIL")
        )
    return ok


def memory_efficient_parity(device, backends, B=61, Q=40, M=120):
    """memory_efficient=True vs the float64 oracles: every kind, square and reference set."""
    ok = True
    gen = torch.Generator().manual_seed(15)
    kinds = [(f"pnp-{v}", pnp_loss, pnp_loss_reference, dict(variant=v, anneal=0.05, alpha=2.0)) for v in VARIANTS]
    kinds += [
        ("smooth_ap", smooth_ap_loss, smooth_ap_loss_reference, dict(temperature=0.05)),
        ("recall_at_k", recall_at_k_loss, recall_at_k_loss_reference, dict(k=(1, 2, 4), temperature=0.05)),
    ]
    log("| backend | loss | mode | loss rel err | grad rel err |")
    log("|---|---|---|---|---|")
    for backend, (name, fn, ref_fn, kw) in itertools.product(backends, kinds):
        E = torch.randn(B, 32, generator=gen).to(device).requires_grad_()
        y = labels_for("unequal", B, gen, device)
        el, eg, finite = compare(
            lambda: fn(E, y, backend=backend, memory_efficient=True, **kw),
            lambda L: ref_fn(L[0], y, **kw),
            [E],
            gen,
        )
        good = finite and el <= 1e-5 and eg <= 1e-5
        ok &= good
        log(f"| {backend} | {name} | square | {el:.1e} | {eg:.1e} |" + ("" if good else " FAIL"))
        Eq = torch.randn(Q, 32, generator=gen).to(device).requires_grad_()
        Er = torch.randn(M, 32, generator=gen).to(device).requires_grad_()
        yq = torch.randint(0, 6, (Q,), generator=gen).to(device)
        yr = torch.randint(0, 6, (M,), generator=gen).to(device)
        qri = torch.where(torch.arange(Q) % 2 == 0, torch.arange(Q) * 2, -1).to(device)
        el, eg, finite = compare(
            lambda: fn(Eq, yq, Er, yr, query_ref_index=qri, backend=backend, memory_efficient=True, **kw),
            lambda L: ref_fn(L[0], yq, L[1], yr, query_ref_index=qri, **kw),
            [Eq, Er],
            gen,
        )
        good = finite and el <= 1e-5 and eg <= 1e-5
        ok &= good
        log(f"| {backend} | {name} | reference set | {el:.1e} | {eg:.1e} |" + ("" if good else " FAIL"))
    return ok


def opcheck(device, backends):
    """torch.library.opcheck of the package's four custom ops (argument lists of tests/test_opcheck.py)."""
    gen = torch.Generator().manual_seed(13)
    n = 0
    for backend, kind, cosine, mean in itertools.product(
        backends, (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K), (True, False), (True, False)
    ):
        ks = (2.0, 1.0) if kind == LOSS_RECALL_AT_K else ()
        flat = LossSpec(kind, VARIANT_TABLE["Dq"], 0.05, 2.0, 3.0, cosine, mean, ks=ks, k_temperatures=ks).flat()
        E = torch.randn(10, 4, generator=gen).to(device).requires_grad_(True)
        y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4], device=device)
        args = (E, y, *flat, backend, True)
        torch.library.opcheck(torch.ops.pnp_kernels.square_loss_fwd.default, args)
        out = torch.ops.pnp_kernels.square_loss_fwd(*args)
        bwd = (torch.ones_like(out[0]), *[t.detach() for t in out[1:]], *flat, E.dtype, backend)
        torch.library.opcheck(torch.ops.pnp_kernels.square_loss_bwd.default, bwd)
        Eq = torch.randn(6, 4, generator=gen).to(device).requires_grad_(True)
        yq = torch.tensor([0, 0, 1, 2, 3, 9], device=device)
        Er = torch.randn(9, 4, generator=gen).to(device).requires_grad_(True)
        yr = torch.tensor([0, 1, 1, 2, 2, 3, 3, 5, 0], device=device)
        qri = torch.tensor([0, -1, 2, 3, 5, -1], device=device)
        args = (Eq, yq, Er, yr, qri, *flat, backend, True, -1)
        torch.library.opcheck(torch.ops.pnp_kernels.reference_loss_fwd.default, args)
        out = torch.ops.pnp_kernels.reference_loss_fwd(*args)
        bwd = (
            torch.ones_like(out[0]),
            *[t.detach() for t in out[1:]],
            *flat,
            Eq.dtype,
            Er.dtype,
            backend,
            True,
            True,
            -1,
        )
        torch.library.opcheck(torch.ops.pnp_kernels.reference_loss_bwd.default, bwd)
        n += 4
    log(
        f"  opcheck passed: {n} op checks on {device} ({', '.join(backends)} x 3 losses x 2 similarities "
        f"x 2 reductions x square/reference fwd/bwd)"
    )
    return True


def cuda_graph_step(device):
    gen = torch.Generator().manual_seed(2)
    B, D_in, D = 384, 64, 128
    x, y = make_batch(B, D_in, 4, device, gen)
    model = torch.nn.Linear(D_in, D).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    init = [p.detach().clone() for p in model.parameters()]

    def step():
        opt.zero_grad(set_to_none=False)
        loss = pnp_loss(model(x), y, variant="Dq", alpha=2.0)
        loss.backward()
        opt.step()
        return loss

    # eager reference: 3 steps
    eager_losses = [step().item() for _ in range(3)]
    eager_params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), init):
            p.copy_(p0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), init):
            p.copy_(p0)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = step()
    with torch.no_grad():  # capture records the kernels without running them: start the replays from init
        for p, p0 in zip(model.parameters(), init):
            p.copy_(p0)
    graph_losses = []
    for _ in range(3):
        graph.replay()
        graph_losses.append(static_loss.item())
    graph_params = [p.detach().clone() for p in model.parameters()]
    dl = max(abs(a - b) for a, b in zip(eager_losses, graph_losses))
    dp = max((a - b).abs().max().item() for a, b in zip(eager_params, graph_params))
    log(f"  eager losses {eager_losses}\n  graph losses {graph_losses}")
    log(f"  max |d loss| {dl:.2e}, max |d param| {dp:.2e}")
    return dl <= 1e-6 and dp <= 1e-6


def determinism(device, B, D):
    gen = torch.Generator().manual_seed(3)
    ok = True
    for v in VARIANTS:
        for P in (4, 16):
            E, y = make_batch(B, D, P, device, gen)
            outs = []
            for _ in range(2):
                Ei = E.clone().requires_grad_()
                loss = pnp_loss(Ei, y, variant=v)
                loss.backward()
                outs.append((loss.detach().clone(), Ei.grad.clone()))
            same = torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
            ok &= same
            if not same:
                log(f"  NOT bitwise identical: {v} P={P}")
    log(f"  two runs bitwise identical for all variants at B={B}, P=4 and 16: {ok}")
    return ok


def profile_step(device, cuda_backends):
    """Where one B = 384 step spends host time, its kernel count, and its time under a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    from pnp_kernels.backends import triton_kernels as tk

    gen = torch.Generator().manual_seed(5)
    E, y = make_batch(384, 512, 4, device, gen)
    E.requires_grad_()
    n = 200

    def host_us_per_step(step):
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dt = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return dt

    def step():
        pnp_loss(E, y, variant="Dq", backend="triton").backward()

    host_us = host_us_per_step(step)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    log(
        f"  triton: host time per fwd+bwd call (no sync): {host_us:.1f} us; GPU kernels per step: "
        f"{len(kernels) / 5:.1f}"
    )
    if "ext" in cuda_backends:
        ext_us = host_us_per_step(lambda: pnp_loss(E, y, variant="Dq", backend="ext").backward())
        log(f"  ext: host time per fwd+bwd call (no sync): {ext_us:.1f} us")
    # what one launch costs on this host: a torch op vs a Triton kernel with 5 pointer args
    x = torch.zeros(1024, device=device)
    lo = torch.zeros(8, dtype=torch.int32, device=device)
    log(
        f"  host cost per launch: torch x.add_(1) {host_us_per_step(lambda: x.add_(1)):.1f} us; "
        f"triton reduce kernel (5 pointers) {host_us_per_step(lambda: tk.reduce(x[:8], lo, lo, None, True)):.1f} us"
    )
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
    # the opt-in counting-sort prep (one launch instead of torch.sort's): host time and correctness
    ref_loss = pnp_loss(E.detach(), y, variant="Dq", backend="triton").item()
    saved = tk.COUNT_SORT_MAX_B
    tk.COUNT_SORT_MAX_B = 4096
    try:
        cs_loss = pnp_loss(E.detach(), y, variant="Dq", backend="triton").item()
        cs_us = host_us_per_step(step)
    finally:
        tk.COUNT_SORT_MAX_B = saved
    log(
        f"  counting-sort prep: host time per call {cs_us:.1f} us (torch.sort path {host_us:.1f} us); "
        f"loss {cs_loss:.7f} vs {ref_loss:.7f}"
    )
    ms = graph_ms(step, E, quick=False)  # GPU time without launch gaps
    log(f"  B=384 fwd+bwd replayed from a CUDA graph: {ms * 1000:.1f} us")
    return abs(cs_loss - ref_loss) <= 1e-6 * abs(ref_loss)


def mixed_precision(device, backends):
    """float16/bfloat16 embeddings and autocast on the GPU: finite, float32 loss, grads in the
    input dtype, error <= 2x that of the reference computed in the same half precision."""
    gen = torch.Generator().manual_seed(6)
    ok = True
    for backend, dtype, v in itertools.product(backends, (torch.float16, torch.bfloat16), VARIANTS):
        E32 = torch.randn(96, 64, generator=gen)
        y = (torch.arange(96) // 4)[torch.randperm(96, generator=gen)].to(device)
        Eh = E32.to(device=device, dtype=dtype).requires_grad_()
        loss = pnp_loss(Eh, y, variant=v, anneal=0.05, backend=backend)
        (g,) = torch.autograd.grad(loss, Eh)
        E64 = Eh.detach().double().requires_grad_()
        ref = pnp_loss_reference(E64, y, variant=v, anneal=0.05)
        (g_ref,) = torch.autograd.grad(ref, E64)
        Eh2 = Eh.detach().clone().requires_grad_()
        ref_h = pnp_loss_reference(Eh2, y, variant=v, anneal=0.05)
        (g_h,) = torch.autograd.grad(ref_h, Eh2)
        e_ours = rel_err(g, g_ref)
        e_half = rel_err(g_h, g_ref)
        finite = bool(torch.isfinite(g).all().item() and torch.isfinite(loss).item())
        good = (
            finite
            and loss.dtype == torch.float32
            and g.dtype == dtype
            and (e_ours <= 2 * e_half + 1e-6 or (not torch.isfinite(g_h).all() and e_ours <= 5e-3))
        )
        ok &= good
        log(
            f"  {backend:6s} {str(dtype):15s} {v:2s}: grad err ours {e_ours:.1e}, half reference {e_half:.1e}, "
            f"loss err {rel_err(loss.detach().reshape(1), ref.detach().reshape(1)):.1e} {'ok' if good else 'FAIL'}"
        )
    x = torch.randn(128, 32, device=device)
    y = (torch.arange(128) // 4).to(device)
    lin = torch.nn.Linear(32, 64).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = pnp_loss(lin(x), y, variant="Dq")
    loss.backward()
    good = loss.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all().item()
    log(f"  autocast(bfloat16) Linear -> pnp_loss: loss {loss.item():.6f} ({loss.dtype}), finite grads: {good}")
    return ok and good


def compiled_step(device):
    """torch.compile(fullgraph=True) of a training step with the triton backend equals eager."""
    import torch._dynamo

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 32, generator=gen).to(device)
    y = (torch.arange(256) // 4)[torch.randperm(256, generator=gen)].to(device)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        lin = torch.nn.Linear(32, 64).to(device)

        def fwd(inp, lab):
            return pnp_loss(lin(inp), lab, variant="Dq", backend="triton")

        f = torch.compile(fwd, fullgraph=True) if compiled else fwd
        loss = f(x, y)
        loss.backward()
        results.append((loss.detach(), lin.weight.grad.clone()))
    dl = (results[0][0] - results[1][0]).abs().item()
    dg = rel_err(results[1][1], results[0][1])
    log(f"  compiled (fullgraph) vs eager: |d loss| {dl:.1e}, grad rel diff {dg:.1e}")
    return dl <= 1e-5 and dg <= 1e-4


def graph_ms(step, E, quick):
    """Median time of ``step`` replayed from a CUDA graph: GPU time without host launch gaps."""
    import triton.testing

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            E.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    E.grad = None
    with torch.cuda.graph(graph):
        step()
    ms = triton.testing.do_bench(
        graph.replay, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median"
    )
    del graph
    E.grad = None
    torch.cuda.synchronize()
    return ms


def measure(fn, device, quick, grad_to_none=()):
    """(median ms, peak MiB above what is allocated before the call; None on the CPU)."""
    if device.type != "cuda":  # the CPU smoke run: perf_counter median, no memory column
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, None
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(
        fn, warmup=5 if quick else 25, rep=20 if quick else 100, grad_to_none=list(grad_to_none), return_mode="median"
    )
    return ms, peak


def guarded(fn):
    """measure's result, or "OOM"."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def fmt(v):
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return f"{v[0]:.3f} ms" + (f", {v[1]:.1f} MiB" if v[1] is not None else "")


def ratio(a, b, digits=2):
    """a's time / b's time, or "" when either is missing."""
    if not (isinstance(a, tuple) and isinstance(b, tuple)):
        return ""
    return f"{a[0] / b[0]:.{digits}f}"


def bench_table(device, Bs, P, extra, D=512, with_ref=True, with_compiled=False, quick=False):
    """PNP (Dq) fwd+bwd: triton, the ``extra`` backends, the CUDA-graph replay, the forward
    alone, the GEMM floor and the B^3 reference (B <= 1024)."""
    gen = torch.Generator().manual_seed(4)
    cuda = device.type == "cuda"
    rows = []
    for B in Bs:
        E, y = make_batch(B, D, P, device, gen)
        E.requires_grad_()
        res = {"B": B, "P": P}

        def ours(backend):
            return lambda: pnp_loss(E, y, variant="Dq", backend=backend).backward()

        main = "triton" if cuda else extra[0]
        res["ours"] = guarded(lambda: measure(ours(main), device, quick, [E]))
        for other in extra:
            if other != main and not (other == "torch" and B > 4096):
                res[other] = guarded(lambda: measure(ours(other), device, quick, [E]))
        if cuda and B <= 16384:
            res["graph"] = graph_ms(ours("triton"), E, quick)
        res["fwd_only"] = guarded(
            lambda: measure(lambda: pnp_loss(E.detach(), y, variant="Dq", backend=main), device, quick)
        )
        H = torch.randn(B, B, device=device)
        Xd = E.detach()
        res["floor"] = measure(lambda: (Xd @ Xd.t(), H @ Xd), device, quick)
        H = None  # free the B x B buffer before the reference runs
        if with_ref and B <= 1024:
            res["ref"] = guarded(
                lambda: measure(lambda: pnp_loss_reference(E, y, variant="Dq").backward(), device, quick, [E])
            )
        if with_compiled and B == 384:
            t0 = time.time()
            comp = torch.compile(lambda E, y: pnp_loss_reference(E, y, variant="Dq"))
            comp(E, y).backward()
            res["compile_s"] = time.time() - t0
            res["ref_compiled"] = measure(lambda: comp(E, y).backward(), device, quick, [E])
        rows.append(res)
        log("  " + json.dumps(res))
        if cuda:
            torch.cuda.empty_cache()
    return rows


def print_table(rows, extra, main="triton"):
    others = [p for p in extra if p != main]
    log(
        f"| B | P | ours fwd+bwd ({main}) | ours fwd+bwd, CUDA graph | ours fwd only | reference eager | "
        "reference compiled | GEMM floor | ref/ours | compiled/ours | ours/floor | ours graph/floor |"
        + "".join(f" {p} fwd+bwd |" for p in others)
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(others))
    for r in rows:
        ours, gr, fl = r.get("ours"), r.get("graph"), r.get("floor")
        comp = f" (compile {r['compile_s']:.0f} s)" if "compile_s" in r else ""
        log(
            f"| {r['B']} | {r['P']} | {fmt(ours)} | {f'{gr:.3f} ms' if gr else ''} | {fmt(r.get('fwd_only'))} | "
            f"{fmt(r.get('ref'))} | {fmt(r.get('ref_compiled'))}{comp} | {fmt(fl)} | "
            f"{ratio(r.get('ref'), ours, 1)} | {ratio(r.get('ref_compiled'), ours, 1)} | {ratio(ours, fl)} | "
            f"{ratio((gr, None), fl) if gr else ''} |" + "".join(f" {fmt(r.get(p))} |" for p in others)
        )


def smooth_ap_table(device, backends, Bs, D=512, P=4, quick=False):
    """Smooth-AP next to PNP (variant O), per backend: time, memory, Smooth-AP / PNP."""
    gen = torch.Generator().manual_seed(14)
    log("| B | backend | PNP (O) fwd+bwd | Smooth-AP fwd+bwd | Smooth-AP / PNP time |")
    log("|---|---|---|---|---|")
    for B in Bs:
        E, y = make_batch(B, D, P, device, gen)
        E.requires_grad_()
        for backend in backends:
            pnp = guarded(lambda: measure(lambda: pnp_loss(E, y, backend=backend).backward(), device, quick, [E]))
            sap = guarded(lambda: measure(lambda: smooth_ap_loss(E, y, backend=backend).backward(), device, quick, [E]))
            log(f"| {B} | {backend} | {fmt(pnp)} | {fmt(sap)} | {ratio(sap, pnp)} |")
        E = y = None  # free before the next size
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return True


def refset_table(device, backends, Q, M, D=512, P=4, quick=False):
    """Q queries against an M-row memory bank (the bank does not require grad) next to the
    square B = Q step, PNP O: time and peak memory, with the GEMM floors of both shapes."""
    gen = torch.Generator().manual_seed(15)
    Eq, _ = make_batch(Q, D, P, device, gen)
    bank, yb = make_batch(M, D, P, device, gen)
    yq = yb[torch.randint(0, M, (Q,), generator=gen).to(device)]  # every query has P positives in the bank
    Eq.requires_grad_()
    ys = (torch.arange(Q) // P).to(device)
    log(f"| mode | backend | fwd+bwd | vs square B = {Q} time | vs GEMM floor of its shape |")
    log("|---|---|---|---|---|")
    G = torch.randn(Q, M, device=device)
    Xq = Eq.detach()
    floor_ref = measure(lambda: (Xq @ bank.t(), G @ bank), device, quick)
    G = None  # free the Q x M buffer
    H = torch.randn(Q, Q, device=device)
    floor_sq = measure(lambda: (Xq @ Xq.t(), H @ Xq), device, quick)
    H = None
    log(f"| GEMM floor, {Q} x {M} | - | {fmt(floor_ref)} | | |")
    log(f"| GEMM floor, {Q} x {Q} | - | {fmt(floor_sq)} | | |")
    for backend in backends:
        sq = guarded(lambda: measure(lambda: pnp_loss(Eq, ys, backend=backend).backward(), device, quick, [Eq]))
        ref = guarded(
            lambda: measure(lambda: pnp_loss(Eq, yq, bank, yb, backend=backend).backward(), device, quick, [Eq])
        )
        log(f"| square B = {Q} | {backend} | {fmt(sq)} | 1 | {ratio(sq, floor_sq)} |")
        log(f"| {Q} queries vs {M}-row bank | {backend} | {fmt(ref)} | {ratio(ref, sq)} | {ratio(ref, floor_ref)} |")
    return True


def distributed_nccl(device):
    """distributed=True's collectives in one process (world size 1): NCCL on CUDA, gloo on the CPU.

    With one process distributed=True is the plain loss, so this calls the distributed path's
    pieces directly: the metadata exchange (pnp_kernels.distributed.agree, and its error path),
    then distributed_loss with the sizes it returns, against the plain loss. On NCCL the
    gather's backward takes the reduce-scatter path (counted), and one forward + backward is
    run under set_sync_debug_mode("warn") to count host syncs (expected: 1, reading back the
    exchanged sizes). Unverified here: two or more GPUs, unequal local batches on NCCL (the
    padded reduce-scatter layout; the tests run it on gloo), empty local batches.
    """
    import socket
    import warnings

    import torch.distributed as dist

    import pnp_kernels.distributed as dm
    from pnp_kernels.functional import pnp_spec, smooth_ap_spec

    cuda = device.type == "cuda"
    pg_backend = "nccl" if cuda else "gloo"
    if not dist.is_available() or (cuda and not dist.is_nccl_available()):
        log(f"  torch.distributed / {pg_backend} not available: skipped")
        return None
    if dist.is_initialized():
        log("  a process group is already initialised: skipped")
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if cuda:
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    real_rs, count = dm._reduce_scatter, [0]

    def counting_rs(out, inp, group):
        count[0] += 1
        real_rs(out, inp, group)

    dm._reduce_scatter = counting_rs
    ok = True
    try:
        expect_rs = dm.uses_reduce_scatter(device)
        ok &= expect_rs == cuda
        log(f"  {pg_backend}, world size 1; the gather's backward: {'reduce-scatter' if expect_rs else 'all-reduce'}")
        gen = torch.Generator().manual_seed(5)
        kernel = "triton" if cuda else "torch"
        cases = [  # (what, spec, loss kwargs, memory rows, backend, dtype, tolerance)
            ("pnp Dq", pnp_spec("Dq", 0.05, 2.0), dict(variant="Dq", anneal=0.05, alpha=2.0), 0, kernel),
            ("smooth_ap", smooth_ap_spec(0.05), dict(temperature=0.05), 0, kernel),
            ("pnp Dq + memory", pnp_spec("Dq", 0.05, 2.0), dict(variant="Dq", anneal=0.05, alpha=2.0), 50, kernel),
            ("pnp Ds float64", pnp_spec("Ds", 0.05), dict(variant="Ds", anneal=0.05), 0, "torch"),
        ]
        for what, spec, kw, m, backend in cases:
            dtype, tol = (torch.float64, 1e-10) if "float64" in what else (torch.float32, 1e-5)
            E = torch.randn(37, 64, generator=gen, dtype=dtype).to(device)
            y = torch.randint(0, 6, (37,), generator=gen).to(device)
            R = torch.randn(m, 64, generator=gen, dtype=dtype).to(device) if m else None
            yr = torch.randint(0, 6, (m,), generator=gen).to(device) if m else None
            fn = smooth_ap_loss if "temperature" in kw else pnp_loss
            x0, x1 = E.clone().requires_grad_(True), E.clone().requires_grad_(True)
            if m:  # one process: the batch heads its own reference set, as the gathered batch does
                index = torch.arange(37, device=device)
                plain = fn(x0, y, torch.cat([x0, R]), torch.cat([y, yr]), query_ref_index=index, backend=backend, **kw)
            else:
                plain = fn(x0, y, backend=backend, **kw)
            plain.backward()
            before = count[0]
            sizes = dm.agree(x1, R, spec, True, None)
            out = dm.distributed_loss(x1, y, R, yr, spec, backend, None, sizes)[0]
            out.backward()
            el, eg, rs = rel_err(out.detach(), plain.detach()), rel_err(x1.grad, x0.grad), count[0] - before
            good = el <= tol and eg <= tol and sizes == [37] and rs == int(expect_rs)
            ok &= good
            log(
                f"  {what} ({backend}): loss rel err {el:.2e}, grad rel err {eg:.2e} (tol {tol:g}), "
                f"reduce-scatters {rs}: {'ok' if good else 'FAIL'}"
            )
        # a local error: raised with the rank named, after the error path's second exchange
        try:
            dm.agree(E, None, None, True, TypeError("labels: expected an integer dtype, got torch.float32"))
            log("  a local error was not raised: FAIL")
            ok = False
        except TypeError as exc:
            good = str(exc).startswith("labels (rank 0): expected an integer dtype")
            ok &= good
            log(f"  a local error, raised as: TypeError: {exc}: {'ok' if good else 'FAIL'}")
        if cuda:
            spec = pnp_spec("Dq", 0.05, 2.0)
            x = torch.randn(37, 64, generator=gen).to(device).requires_grad_(True)
            y = torch.randint(0, 6, (37,), generator=gen).to(device)

            def step():
                sizes = dm.agree(x, None, spec, True, None)
                dm.distributed_loss(x, y, None, None, spec, "triton", None, sizes)[0].backward()

            step()  # warm-up
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            good = len(syncs) == 1
            ok &= good
            log(f"  host syncs of one step (triton): {len(syncs)}, expected 1: {'ok' if good else 'FAIL'}")
            for line in syncs:
                log(f"    {line}")
    finally:
        dm._reduce_scatter = real_rs
        dist.destroy_process_group()
    return ok


def memory_efficient_table(device, backend, Bs, dtypes, D=512, P=4, quick=False):
    """The memory-efficient path next to dense: PNP (Dq) forward+backward of B x D embeddings in
    float32 and bfloat16 (P per class), time and peak memory above the inputs, the dense path
    where its two B x B float32 buffers fit, agreement of the two (loss and gradient), and the
    time over the bf16 GEMM floor: 2 GEMMs of 2 B^2 D flop at the bf16 rate measured here (a
    B x B product does not fit at the largest B, so the floor is computed from the rate)."""
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(16)
    # the bf16 GEMM rate: one (n x D) (D x n) product, median time
    n = 16384 if cuda else 256
    X = torch.randn(n, D, generator=gen).to(device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    t_gemm = measure(lambda: X @ X.t(), device, quick)[0]
    rate = 2 * n * n * D / (t_gemm * 1e-3)
    X = None
    log(f"  GEMM rate ({'bf16' if cuda else 'float32, CPU'}, {n} x {D} x {n}): {rate / 1e12:.1f} TFLOP/s")
    free = torch.cuda.mem_get_info()[0] if cuda else 0
    log(
        "| B | dtype | dense fwd+bwd | memory-efficient fwd+bwd | me / dense time | bf16 GEMM floor | me / floor "
        "| me vs dense loss, grad rel. err | triton fused tiles fwd+bwd |"
    )
    log("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for B in Bs:
        y = (torch.arange(B) // P)[torch.randperm(B, generator=gen)].to(device)
        for dt in dtypes:
            E = torch.randn(B, D, generator=gen).to(device=device, dtype=dt).requires_grad_()

            def step(me):
                return lambda: pnp_loss(E, y, variant="Dq", backend=backend, memory_efficient=me).backward()

            me = guarded(lambda: measure(step(True), device, quick, [E]))
            # the triton stage not chosen by default at this D: the fused tile kernels (D <= 128
            # takes them anyway), up to B = 65536
            fused = "-"
            if backend == "triton" and D > 128 and B <= 65536:
                os.environ["PNP_KERNELS_TRITON_TILED"] = "fused"
                try:
                    fused = guarded(lambda: measure(step(True), device, quick, [E]))
                finally:
                    del os.environ["PNP_KERNELS_TRITON_TILED"]
            # dense keeps S and G (8 B^2 bytes) next to the inputs
            fits = (not cuda and B <= 4096) or (cuda and 8 * B * B < 0.8 * free)
            dense = guarded(lambda: measure(step(False), device, quick, [E])) if fits else "does not fit"
            agree = ""
            if isinstance(dense, tuple) and isinstance(me, tuple):
                res = {}
                for flag in (True, False):
                    E.grad = None
                    out = pnp_loss(E, y, variant="Dq", backend=backend, memory_efficient=flag)
                    out.backward()
                    res[flag] = (out.detach().float(), E.grad.float())
                el, eg = rel_err(res[True][0], res[False][0]), rel_err(res[True][1], res[False][1])
                agree = f"{el:.1e}, {eg:.1e}"
                ok &= el <= (1e-5 if dt == torch.float32 else 1e-3) and eg <= (1e-4 if dt == torch.float32 else 1e-2)
                E.grad = None
            floor_ms = 2 * 2 * B * B * D / rate * 1e3
            name = str(dt).replace("torch.", "")
            log(
                f"| {B} | {name} | {fmt(dense)} | {fmt(me)} | {ratio(me, dense)} | {floor_ms:.3f} ms | "
                f"{ratio(me, (floor_ms, None))} | {agree} | {fmt(fused)} |"
            )
            ok &= isinstance(me, tuple)
            E = None
            if cuda:
                torch.cuda.empty_cache()
    return ok


def dense_half_table(device, B, D=512, P=4, quick=False):
    """The triton backend's dense path on half embeddings next to float32 embeddings of the same
    values (bfloat16-rounded, exact in float16 and float32): PNP (Dq) forward+backward, median
    time, peak memory above the inputs, the float32 / half time ratio, and the agreement of loss
    and gradient with the float32 step (the gradient differs by its rounding to the half dtype).
    The target (reported, not a failure): bfloat16 at least 3x faster than float32."""
    gen = torch.Generator().manual_seed(17)
    E32 = torch.randn(B, D, generator=gen).bfloat16().float().to(device)
    y = (torch.arange(B) // P)[torch.randperm(B, generator=gen)].to(device)
    log("| B | D | dtype | dense fwd+bwd (triton) | float32 / this time | loss, grad rel. err vs float32 |")
    log("|---|---|---|---|---|---|")
    res, ok = {}, True
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        E = E32.to(dt, copy=True).requires_grad_()

        def step(E=E):
            return pnp_loss(E, y, variant="Dq", backend="triton", memory_efficient=False)

        res[dt] = guarded(lambda: measure(lambda: step().backward(), device, quick, [E]))
        E.grad = None
        out = step()
        out.backward()
        vals = (out.detach().float(), E.grad.float())
        agree = ""
        if dt == torch.float32:
            ref = vals
        else:
            el, eg = rel_err(vals[0], ref[0]), rel_err(vals[1], ref[1])
            agree = f"{el:.1e}, {eg:.1e}"
            ok &= el <= 1e-5 and eg <= (8e-3 if dt == torch.bfloat16 else 1e-3)
        name = str(dt).replace("torch.", "")
        log(f"| {B} | {D} | {name} | {fmt(res[dt])} | {ratio(res[torch.float32], res[dt])} | {agree} |")
        ok &= isinstance(res[dt], tuple)
        E = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    speedup = ratio(res[torch.float32], res[torch.bfloat16])
    log(f"  bfloat16 dense speed-up over float32: {speedup or 'n/a'} (target >= 3 at B = 16384, D = 512)")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--skip", default="", help="comma-separated section names to skip")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t_start = time.time()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - reported, the CPU sections still run
        triton_version = f"not importable ({exc!r})"

    log(f"# pnp_kernels gpu_check  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    interp = os.environ.get("TRITON_INTERPRET", "")
    log(
        f"device: {torch.cuda.get_device_name() if cuda else f'cpu (TRITON_INTERPRET={interp})'}"
        + (f", {torch.cuda.device_count()} visible" if cuda else "")
    )
    log(
        f"torch {torch.__version__}, triton {triton_version}, python {platform.python_version()}, "
        f"pnp_kernels {pnp_kernels.__version__}"
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    status = pnp_kernels.backend_status()
    log(f"backends: {json.dumps(status)}")
    backends = [b for b in ("triton", "torch", "ext") if status[b]["available"]]
    results = {}

    def run(name, fn):
        if name not in skip:
            section(name, fn, results)

    if not cuda:
        # A smoke run of the script on the CPU: tiny correctness sections with the CPU backends
        # (triton only under the interpreter), opcheck and the table code with the torch and ext backends.
        cpu_backends = [b for b in backends if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
        table_backends = [b for b in ("torch", "ext") if b in backends]
        run("parity", lambda: parity(device, cpu_backends, [24], 0))
        run("smooth_ap", lambda: smooth_ap_parity(device, cpu_backends, [24]))
        run("recall_at_k", lambda: recall_at_k_parity(device, cpu_backends, [24]))
        run("memory_efficient", lambda: memory_efficient_parity(device, cpu_backends, B=20, Q=10, M=24))
        run("refset", lambda: refset_parity(device, cpu_backends, Q=12, M=30))
        run("device_guard", lambda: device_guard(cpu_backends))
        run("distributed", lambda: distributed_nccl(device))
        run("opcheck", lambda: opcheck(device, table_backends))
        run("determinism", lambda: determinism(device, 24, 8))
        run(
            "bench",
            lambda: (
                print_table(
                    bench_table(device, [32], 4, table_backends, D=16, quick=True), table_backends, table_backends[0]
                )
                or True
            ),
        )
        run("smooth_ap_bench", lambda: smooth_ap_table(device, table_backends, [32], D=16, quick=True))
        run("refset_bench", lambda: refset_table(device, table_backends, 16, 128, D=16, quick=True))
        run(
            "me_bench",
            lambda: memory_efficient_table(device, table_backends[0], [64], [torch.float32], D=16, quick=True),
        )
        if "triton" in cpu_backends:
            run("dense_half", lambda: dense_half_table(device, 32, D=16, quick=True))
    else:
        # the sync-free backends on CUDA: triton, and ext when its CUDA kernels were built
        cuda_backends = [b for b in ("triton", "ext") if b in backends and (b != "ext" or not ext_build.cuda_status())]
        extra = [b for b in ("triton", "ext", "torch") if b in backends]
        run("parity", lambda: parity(device, backends, [61] if args.quick else [61, 384], 1024))
        run("smooth_ap", lambda: smooth_ap_parity(device, backends, [61] if args.quick else [61, 384]))
        run("recall_at_k", lambda: recall_at_k_parity(device, backends, [61] if args.quick else [61, 384]))
        run("memory_efficient", lambda: memory_efficient_parity(device, backends))
        run("refset", lambda: refset_parity(device, backends))
        run("sync", lambda: sync_free(device, cuda_backends))
        if "ext" in cuda_backends:
            run("ext_guard", lambda: ext_bad_segment(device))
        run("device_guard", lambda: device_guard(cuda_backends + ["torch"]))
        run("distributed", lambda: distributed_nccl(device))
        run("opcheck", lambda: opcheck(device, cuda_backends))
        run("graph", lambda: cuda_graph_step(device))
        run("determinism", lambda: determinism(device, 2048, 512))
        run("profile", lambda: profile_step(device, cuda_backends))
        run("mixed", lambda: mixed_precision(device, cuda_backends))
        run("compiled_step", lambda: compiled_step(device))
        sizes = [128, 384] if args.quick else [128, 384, 1024, 4096, 16384]
        run(
            "bench",
            lambda: (
                print_table(
                    bench_table(device, sizes, 4, extra, with_compiled="compile" not in skip, quick=args.quick), extra
                )
                or True
            ),
        )
        run(
            "smooth_ap_bench",
            lambda: smooth_ap_table(
                device, cuda_backends, [384, 4096] if args.quick else [384, 4096, 16384], quick=args.quick
            ),
        )
        run("refset_bench", lambda: refset_table(device, cuda_backends, 4096, 65536, quick=args.quick))
        run(
            "bigP",
            lambda: (
                print_table(
                    [
                        r
                        for P in (16, 64)
                        for r in bench_table(device, [384, 4096, 16384], P, [], with_ref=False, quick=args.quick)
                    ],
                    [],
                )
                or True
            ),
        )
        run("huge", lambda: print_table(bench_table(device, [65536], 4, [], with_ref=False, quick=True), []) or True)
        run(
            "me_bench",
            lambda: memory_efficient_table(
                device, "triton", [16384, 65536, 262144], [torch.float32, torch.bfloat16], quick=args.quick
            ),
        )
        if "triton" in backends:
            run("dense_half", lambda: dense_half_table(device, 16384, quick=args.quick))
    log("\n=== summary")
    for k, v in results.items():
        log(f"  {k}: {v}")
    log(f"  total {time.time() - t_start:.0f} s")
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(LINES) + "\n")
    return 0 if all(v in ("PASS", "SKIP") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
