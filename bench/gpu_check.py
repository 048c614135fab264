"""One-shot GPU check: correctness of every backend and variant, then speed and memory.

Run from the repository root on a CUDA machine:

    PYTHONPATH=. python bench/gpu_check.py [--quick] [--out DIR]

Sections (each one guarded, so a failure is reported and the rest still runs):
  1. parity: triton / torch / ext backends x 5 variants x 2 similarities x label
     patterns vs the float64 B^3 reference (B <= 384), and triton vs the float64
     torch backend at B = 1024; loss and gradient relative errors.
  2. sync-free: a forward+backward under torch.cuda.set_sync_debug_mode("error")
     (triton, and ext when its CUDA kernels are built); ext_guard: the raw CUDA op
     with an out-of-range segment gives a NaN row, not a crash.
  3. CUDA graph: a whole training step (forward, backward, SGD step) captured
     and replayed; the same loss and parameters as eager.
  4. determinism: two runs give bitwise-identical loss and gradient.
  5. speed/memory table (float32, TF32 off, D = 512, 4 per class): ours vs the
     reference (eager; compiled at B = 384) vs the GEMM floor, B = 128 .. 16384;
     then P = 16 and 64; then B = 65536.
Under the Triton interpreter (TRITON_INTERPRET=1, no GPU) it runs a tiny
version of sections 1 and 4 so the script itself can be tested on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
import traceback

import torch

import pnp_kernels
from pnp_kernels import pnp_loss
from pnp_kernels.backends import ext as ext_backend
from pnp_kernels.reference import pnp_loss_reference

VARIANTS = ["O", "Ds", "Dq", "Iu", "Ib"]
EXTRA_PROVIDERS = []  # other backends timed beside triton in the speed table (set in main)
LINES = []


def log(msg=""):
    print(msg, flush=True)
    LINES.append(msg)


def rel_err(a, b):
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


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


def section(name, fn, results):
    log(f"\n=== {name}")
    t0 = time.time()
    try:
        ok = fn()
        results[name] = "PASS" if ok else "FAIL"
    except Exception:
        log(traceback.format_exc())
        results[name] = "ERROR"
    log(f"--- {name}: {results[name]} ({time.time() - t0:.1f} s)")


def parity(device, backends, sizes, big_B):
    ok = True
    gen = torch.Generator().manual_seed(0)
    rows = []
    for backend in backends:
        for B in sizes:
            for pattern in ["grouped", "unsorted", "unequal", "one_class", "distinct"]:
                for sim in ["cosine", "dot"]:
                    worst_l, worst_g = 0.0, 0.0
                    for v in VARIANTS:
                        D = 32
                        E = torch.randn(B, D, generator=gen)
                        if sim == "dot":
                            E = E / D ** 0.5
                        E = E.to(device).requires_grad_()
                        y = labels_for(pattern, B, gen, device)
                        kw = dict(variant=v, alpha=4.0 if v == "Dq" else 1.0, b=3.0 if v == "Ib" else 2.0,
                                  similarity=sim)
                        loss = pnp_loss(E, y, backend=backend, **kw)
                        g, = torch.autograd.grad(loss, E)
                        E64 = E.detach().double().requires_grad_()
                        ref = pnp_loss_reference(E64, y, **kw)
                        g_ref, = torch.autograd.grad(ref, E64)
                        el = rel_err(loss.detach().reshape(1), ref.detach().reshape(1))
                        eg = rel_err(g, g_ref)
                        finite = bool(torch.isfinite(loss).item() and torch.isfinite(g).all().item())
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
            loss = pnp_loss(E, y, variant=v, backend="triton")
            g, = torch.autograd.grad(loss, E)
            E64 = E.detach().double().requires_grad_()
            ref = pnp_loss(E64, y, variant=v, backend="torch")
            g_ref, = torch.autograd.grad(ref, E64)
            el, eg = rel_err(loss.detach().reshape(1), ref.detach().reshape(1)), rel_err(g, g_ref)
            log(f"  triton vs float64 torch backend, B={big_B}, {v}: loss {el:.1e}, grad {eg:.1e}")
            ok &= el <= 1e-5 and eg <= 1e-5
    return ok


def make_batch(B, D, P, device, gen, dtype=torch.float32):
    E = torch.randn(B, D, generator=gen).to(device=device, dtype=dtype)
    y = (torch.arange(B) // P)[torch.randperm(B, generator=gen)].to(device)
    return E, y


def sync_free(device, backends):
    gen = torch.Generator().manual_seed(1)
    E, y = make_batch(384, 512, 4, device, gen)
    E.requires_grad_()
    for backend in backends:
        pnp_loss(E, y, variant="Dq", backend=backend).backward()  # warm-up: compile kernels, allocate
        torch.cuda.synchronize()
        E.grad = None
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = pnp_loss(E, y, variant="Dq", backend=backend)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        E.grad = None
        log(f"  {backend}: forward+backward under set_sync_debug_mode('error'): no sync raised; "
            f"loss {loss.item():.6f}")
    return True


def ext_bad_segment(device):
    """The raw CUDA op with a segment past the row's end: a NaN row, no out-of-bounds access."""
    ops = torch.ops.pnp_kernels_ext
    S = torch.randn(4, 16, device=device)
    lo = torch.tensor([0, 4, 14, 8], dtype=torch.int32, device=device)
    hi = torch.tensor([4, 8, 40, 12], dtype=torch.int32, device=device)  # row 2 ends past column 16
    loss, G = ops.rows_forward(S, lo, hi, 0, 0.05, 1.0, 2.0, True)
    torch.cuda.synchronize()
    ok = bool(torch.isnan(loss[2])) and bool(torch.isnan(G[2]).all()) and bool(torch.isfinite(loss[[0, 1, 3]]).all())
    log(f"  ext CUDA rows_forward with an out-of-range segment: loss {loss.tolist()} -> "
        f"{'NaN row, others finite' if ok else 'UNEXPECTED'}")
    return ok


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
    with torch.no_grad():  # capture ran one step's kernels? no: capture records, does not run
        for p, p0 in zip(model.parameters(), init):
            p.copy_(p0)
    graph_losses = []
    for _ in range(3):
        graph.replay()
        graph_losses.append(static_loss.item())
    graph_params = [p.detach().clone() for p in model.parameters()]
    dl = max(abs(a - b) for a, b in zip(eager_losses, graph_losses))
    dp = max((a - b).abs().max().item() for a, b in zip(eager_params, graph_params))
    log(f"  eager losses {eager_losses}\n  graph losses {graph_losses}\n  max |d loss| {dl:.2e}, max |d param| {dp:.2e}")
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


def profile_step(device):
    """Where one B = 384 step spends host time, its kernel count, and its time under a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(5)
    E, y = make_batch(384, 512, 4, device, gen)
    E.requires_grad_()

    def step():
        pnp_loss(E, y, variant="Dq").backward()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    host_us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    log(f"  host time per fwd+bwd call (no sync): {host_us:.1f} us; GPU kernels per step: {len(kernels) / 5:.1f}")
    # what one launch costs on this host: a torch op vs a Triton kernel with 1 and with 8 pointer args
    from pnp_kernels.backends import triton as tb
    x = torch.zeros(1024, device=device)

    def host_cost(fn, n=300):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return dt
    lo = torch.zeros(8, dtype=torch.int32, device=device)
    log(f"  host cost per launch: torch x.add_(1) {host_cost(lambda: x.add_(1)):.1f} us; "
        f"triton finalize kernel (6 pointers) {host_cost(lambda: tb.finalize(x[:8], tb.Prep(x, lo.long(), lo, lo, x), True)):.1f} us")
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
    # the opt-in counting-sort prep (one launch instead of torch.sort's): host time and correctness
    from pnp_kernels.backends import triton as tb_mod
    ref_loss = pnp_loss(E.detach(), y, variant="Dq").item()
    saved = tb_mod.COUNT_SORT_MAX_B
    tb_mod.COUNT_SORT_MAX_B = 4096
    try:
        cs_loss = pnp_loss(E.detach(), y, variant="Dq").item()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        cs_us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
    finally:
        tb_mod.COUNT_SORT_MAX_B = saved
    log(f"  counting-sort prep: host time per call {cs_us:.1f} us (torch.sort path {host_us:.1f} us); "
        f"loss {cs_loss:.7f} vs {ref_loss:.7f}")
    # the same step captured in a CUDA graph: GPU time without launch gaps
    ms = graph_ms(step, E, quick=False)
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
        g, = torch.autograd.grad(loss, Eh)
        E64 = Eh.detach().double().requires_grad_()
        ref = pnp_loss_reference(E64, y, variant=v, anneal=0.05)
        g_ref, = torch.autograd.grad(ref, E64)
        Eh2 = Eh.detach().clone().requires_grad_()
        ref_h = pnp_loss_reference(Eh2, y, variant=v, anneal=0.05)
        g_h, = torch.autograd.grad(ref_h, Eh2)
        e_ours = rel_err(g, g_ref)
        e_half = rel_err(g_h, g_ref)
        finite = bool(torch.isfinite(g).all().item() and torch.isfinite(loss).item())
        good = (finite and loss.dtype == torch.float32 and g.dtype == dtype
                and (e_ours <= 2 * e_half + 1e-6 or (not torch.isfinite(g_h).all() and e_ours <= 5e-3)))
        ok &= good
        log(f"  {backend:6s} {str(dtype):15s} {v:2s}: grad err ours {e_ours:.1e}, half reference {e_half:.1e}, "
            f"loss err {rel_err(loss.detach().reshape(1), ref.detach().reshape(1)):.1e} {'ok' if good else 'FAIL'}")
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
    ms = triton.testing.do_bench(graph.replay, warmup=5 if quick else 25, rep=20 if quick else 100,
                                 return_mode="median")
    del graph
    E.grad = None
    torch.cuda.synchronize()
    return ms


def bench_table(device, Bs, P, D=512, with_ref=True, with_compiled=False, quick=False):
    import triton.testing

    gen = torch.Generator().manual_seed(4)
    rows = []
    for B in Bs:
        E, y = make_batch(B, D, P, device, gen)
        E.requires_grad_()
        res = {"B": B, "P": P}

        def run(fn):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100,
                                         grad_to_none=[E], return_mode="median")
            return ms, peak

        def ours(backend):
            def fn():
                pnp_loss(E, y, variant="Dq", backend=backend).backward()
            return fn

        try:
            res["triton"] = run(ours("triton"))
        except torch.OutOfMemoryError:
            res["triton"] = "OOM"
        for other in EXTRA_PROVIDERS:
            if other == "torch" and B > 4096:
                continue
            try:
                res[other] = run(ours(other))
            except torch.OutOfMemoryError:
                res[other] = "OOM"
        if B <= 16384:
            res["graph"] = graph_ms(lambda: pnp_loss(E, y, variant="Dq", backend="triton").backward(), E, quick)
        try:
            res["fwd_only"] = run(lambda: pnp_loss(E.detach(), y, variant="Dq", backend="triton"))
        except torch.OutOfMemoryError:
            res["fwd_only"] = "OOM"
        H = torch.randn(B, B, device=device)
        Xd = E.detach()

        def floor():
            return Xd @ Xd.t(), H @ Xd
        res["floor"] = run(floor)
        H = None  # free the B x B buffer before the reference runs
        if with_ref and B <= 1024:
            try:
                res["ref"] = run(lambda: pnp_loss_reference(E, y, variant="Dq").backward())
            except torch.OutOfMemoryError:
                res["ref"] = "OOM"
        if with_compiled and B == 384:
            t0 = time.time()
            comp = torch.compile(lambda E, y: pnp_loss_reference(E, y, variant="Dq"))
            comp(E, y).backward()
            res["compile_s"] = time.time() - t0
            res["ref_compiled"] = run(lambda: comp(E, y).backward())
        rows.append(res)
        log("  " + json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in res.items()}))
        torch.cuda.empty_cache()
    return rows


def fmt(v):
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return f"{v[0]:.3f} ms, {v[1]:.1f} MiB"


def print_table(rows):
    log("| B | P | ours fwd+bwd (triton) | ours fwd+bwd, CUDA graph | ours fwd only | reference eager | "
        "reference compiled | GEMM floor | ref/ours | compiled/ours | ours/floor | ours graph/floor |"
        + "".join(f" {p} fwd+bwd |" for p in EXTRA_PROVIDERS))
    log("|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(EXTRA_PROVIDERS))
    for r in rows:
        t = r.get("triton")
        tt = t[0] if isinstance(t, tuple) else None

        def ratio(key, inv=False):
            v = r.get(key)
            if tt is None or not isinstance(v, tuple):
                return ""
            return f"{(tt / v[0]) if inv else (v[0] / tt):.1f}x" if not inv else f"{tt / v[0]:.2f}"
        gr = r.get("graph")
        fl = r.get("floor")
        g_txt = f"{gr:.3f} ms" if gr else ""
        g_ratio = f"{gr / fl[0]:.2f}" if gr and isinstance(fl, tuple) else ""
        log(f"| {r['B']} | {r['P']} | {fmt(t)} | {g_txt} | {fmt(r.get('fwd_only'))} | {fmt(r.get('ref'))} | "
            f"{fmt(r.get('ref_compiled'))}{' (compile %.0f s)' % r['compile_s'] if 'compile_s' in r else ''} | "
            f"{fmt(r.get('floor'))} | {ratio('ref')} | {ratio('ref_compiled')} | {ratio('floor', inv=True)} | {g_ratio} |"
            + "".join(f" {fmt(r.get(p))} |" for p in EXTRA_PROVIDERS))


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
    import triton

    log(f"# pnp_kernels gpu_check  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    log(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (TRITON_INTERPRET=' + os.environ.get('TRITON_INTERPRET', '') + ')'}")
    log(f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
        f"pnp_kernels {pnp_kernels.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    status = pnp_kernels.backend_status()
    log(f"backends: {json.dumps(status)}")
    backends = [b for b in ("triton", "torch", "ext") if status[b]["available"]]
    EXTRA_PROVIDERS.extend(b for b in ("ext", "torch") if b in backends)
    results = {}
    # the sync-free backends on CUDA: triton, and ext when its CUDA kernels were built
    cuda_backends = [b for b in ("triton", "ext") if b in backends and (b != "ext" or ext_backend.cuda_status() == "")]
    if not cuda:
        section("parity", lambda: parity(device, [b for b in backends if b != "ext"], [24], 0), results)
        section("determinism", lambda: determinism(device, 24, 8), results)
    else:
        if "parity" not in skip:
            section("parity", lambda: parity(device, backends, [61, 384] if not args.quick else [61], 1024), results)
        if "sync" not in skip:
            section("sync", lambda: sync_free(device, cuda_backends), results)
        if "ext_guard" not in skip and "ext" in cuda_backends:
            section("ext_guard", lambda: ext_bad_segment(device), results)
        if "graph" not in skip:
            section("graph", lambda: cuda_graph_step(device), results)
        if "determinism" not in skip:
            section("determinism", lambda: determinism(device, 2048, 512), results)
        if "profile" not in skip:
            section("profile", lambda: profile_step(device), results)
        if "mixed" not in skip:
            section("mixed", lambda: mixed_precision(device, cuda_backends), results)
        if "compiled_step" not in skip:
            section("compiled_step", lambda: compiled_step(device), results)
        tables = {}
        if "bench" not in skip:
            def bench():
                tables["p4"] = bench_table(device, [128, 384, 1024, 4096, 16384] if not args.quick else [128, 384],
                                           4, with_compiled="compile" not in skip, quick=args.quick)
                print_table(tables["p4"])
                return True
            section("bench", bench, results)
        if "bigP" not in skip:
            def big_p():
                rows = []
                for P in (16, 64):
                    rows += bench_table(device, [384, 4096, 16384], P, with_ref=False, quick=args.quick)
                print_table(rows)
                return True
            section("bigP", big_p, results)
        if "huge" not in skip:
            def huge():
                free, total = torch.cuda.mem_get_info()
                B = 65536
                rows = bench_table(device, [B], 4, with_ref=False, quick=True)
                print_table(rows)
                return True
            section("huge", huge, results)
    log("\n=== summary")
    for k, v in results.items():
        log(f"  {k}: {v}")
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(LINES) + "\n")
    return 0 if all(v == "PASS" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
