"""Benchmark sweep of the PNP loss: pnp_kernels backends vs the B^3 formulation.

Run from the repository root, e.g.

    python bench/bench_pnp.py --B 128 384 512 --D 128 --P 4 --providers torch reference pml   # CPU
    python bench/bench_pnp.py --device cuda --B 384 1024 4096 --D 512                          # GPU

Providers (``--providers``, default: every one usable here):

  gemm-floor          the GEMMs alone, in the benchmark dtype: forward S = X X^T,
                      backward H X with H a B x B matrix (float32 for float32 inputs,
                      else cast to the input dtype once, outside the timing).
                      The floor any exact implementation pays. Note that pnp_kernels
                      computes S in float32 for every input dtype.
  reference           pnp_kernels.reference.pnp_loss_reference, eager, B x B x B.
  reference-compiled  torch.compile of the reference (only for B <= --compile-max-B,
                      default 512: compiling takes minutes at larger B); the
                      compile time (first call) is reported separately.
  torch / triton / ext  pnp_kernels.pnp_loss(backend=...), when in available_backends()
                      (triton: GPU only, the interpreter is never benchmarked).
  pml                 pytorch_metric_learning.losses.PNPLoss, when installed.

All losses use variant --variant (default "O"), anneal 0.01, cosine similarity.
Inputs: embeddings randn(B, D) in --dtype, labels with P samples per class
(classes = ceil(B / P)) in a random order (a random permutation), fixed seed.

What is measured, per (provider, B, D, P, dtype):

  fwd      the forward call, grad enabled on a leaf that requires grad (for
           pnp_kernels this includes computing what backward needs).
  bwd      torch.autograd.grad(loss, x, retain_graph=True) on ONE fixed forward
           (measured directly, not as fwd+bwd minus fwd).
  fwd+bwd  forward then torch.autograd.grad(loss, x): one training step of the loss.
  peak     memory above the inputs during one fwd+bwd, after one warm-up fwd+bwd:
           GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
                minus memory_allocated() with only the inputs alive.
           CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs)
                minus the RSS just before the step, in a fresh subprocess per
                provider/config with MALLOC_MMAP_THRESHOLD_=65536, so that every
                tensor buffer is mmap-ed and given back to the OS when freed (no
                allocator reuse hides the peak). Falls back to ru_maxrss minus the
                RSS before the step when clear_refs is not writable (then a
                warm-up peak may be included; the header says which method ran).

Timing: GPU: triton.testing.do_bench(fn, warmup, rep, return_mode="median") in ms
(it synchronises). CPU: time.perf_counter around each call, one warm-up call, then
up to --repeats calls; the median. Every CPU timing also runs in a fresh
subprocess per provider/config (isolation from allocator state and from OOM).
Time cap: when one call takes longer than --time-cap seconds the remaining repeats
are skipped (the median of what ran is reported, n says how many), and a
measurement stops once its calls add up to --budget seconds.

Out of memory (torch.OutOfMemoryError, RuntimeError "out of memory" / "not enough
memory", MemoryError, or a CPU worker killed) is recorded as OOM, not a crash,
and larger B of the same provider/D/P/dtype are then skipped. On the CPU each
worker runs under RLIMIT_DATA = --cpu-mem-limit-gb (default 85% of MemAvailable)
so that an oversized B^3 tensor fails cleanly instead of waking the OOM killer.

Ratios (fwd+bwd): "x ref" = reference time / provider time (speed-up over the
eager B^3 formulation); "x pml" likewise against pytorch-metric-learning;
"/ floor" = provider time / gemm-floor time (1.0 = as fast as the GEMMs alone).

Outputs: one line per configuration as it runs, then a markdown table; CSV, markdown
and (when matplotlib imports) a PNG of fwd+bwd time and peak memory vs B on log
axes, written to --out (default bench/out/, git-ignored).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback

# The Triton interpreter (tests/conftest.py sets it) is for correctness tests only.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    print("bench_pnp: unsetting TRITON_INTERPRET (the interpreter is never benchmarked)", file=sys.stderr)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _ROOT)

ALL_PROVIDERS = ["gemm-floor", "reference", "reference-compiled", "pml", "torch", "triton", "ext"]
PKG_PROVIDERS = ("torch", "triton", "ext")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CSV_FIELDS = [
    "provider", "B", "D", "P", "dtype", "status",
    "fwd_ms", "bwd_ms", "fwdbwd_ms", "n_fwd", "n_bwd", "n_fwdbwd",
    "peak_mib", "compile_s", "x_ref", "x_pml", "per_floor", "other_load", "note",
]


class Unavailable(Exception):
    """The provider cannot run here (not installed, no GPU, B over the compile limit...)."""


# --------------------------------------------------------------------------- inputs


def make_labels(B: int, P: int, device, seed: int = 0) -> torch.Tensor:
    """P samples per class (the last class smaller when P does not divide B), shuffled."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(B, dtype=torch.int64) // P
    return labels[torch.randperm(B, generator=g)].to(device)


def make_inputs(B: int, D: int, P: int, dtype: torch.dtype, device, seed: int = 0):
    """Embeddings randn(B, D) in ``dtype`` (a leaf that requires grad) and shuffled labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    return x, make_labels(B, P, device, seed)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_cls = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in msg for s in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")
    )


# --------------------------------------------------------------------------- providers


def provider_available(name: str, device: torch.device):
    """(ok, reason) without running anything."""
    if name in ("gemm-floor", "reference", "reference-compiled"):
        return True, ""
    if name == "pml":
        try:
            import pytorch_metric_learning.losses  # noqa: F401
        except Exception as exc:
            return False, f"pytorch-metric-learning not importable ({type(exc).__name__})"
        return True, ""
    if name in PKG_PROVIDERS:
        if name == "triton" and device.type != "cuda":
            return False, "triton needs a GPU (the interpreter is not benchmarked)"
        import pnp_kernels

        if name not in pnp_kernels.available_backends():
            reason = pnp_kernels.backend_status().get(name, {}).get("reason", "unavailable")
            return False, str(reason)
        return True, ""
    return False, f"unknown provider {name!r}"


def build_steps(name: str, x: torch.Tensor, labels: torch.Tensor, args, B: int):
    """Return (fwd, make_bwd, fwdbwd) callables for one provider on fixed inputs.

    ``make_bwd()`` runs one forward and returns a callable that only runs the
    backward of that forward (retain_graph=True).
    """
    kw = dict(variant=args.variant, anneal=args.anneal)
    if name == "gemm-floor":
        X = x.detach()
        H = torch.randn(B, B, device=X.device, dtype=torch.float32)
        H = H if X.dtype == torch.float32 else H.to(X.dtype)

        def fwd():
            return torch.mm(X, X.t())

        def make_bwd():
            return lambda: torch.mm(H, X)

        def fwdbwd():
            S = torch.mm(X, X.t())
            return S, torch.mm(H, X)

        return fwd, make_bwd, fwdbwd

    if name == "reference":
        from pnp_kernels.reference import pnp_loss_reference

        def loss_fn(t):
            return pnp_loss_reference(t, labels, **kw)

    elif name == "reference-compiled":
        if B > args.compile_max_B:
            raise Unavailable(f"B > --compile-max-B {args.compile_max_B}")
        from pnp_kernels.reference import pnp_loss_reference

        torch._dynamo.reset()
        compiled = torch.compile(pnp_loss_reference, dynamic=False)

        def loss_fn(t):
            return compiled(t, labels, **kw)

    elif name == "pml":
        from pytorch_metric_learning.losses import PNPLoss

        mod = PNPLoss(anneal=args.anneal, variant=args.variant)

        def loss_fn(t):
            return mod(t, labels)

    elif name in PKG_PROVIDERS:
        from pnp_kernels import pnp_loss

        def loss_fn(t):
            return pnp_loss(t, labels, backend=name, **kw)

    else:
        raise Unavailable(f"unknown provider {name!r}")

    def fwd():
        return loss_fn(x)

    def make_bwd():
        loss = loss_fn(x)
        return lambda: torch.autograd.grad(loss, x, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(loss_fn(x), x)

    return fwd, make_bwd, fwdbwd


# --------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_host(fn, device, repeats: int, cap: float, budget: float):
    """Median seconds of fn() by perf_counter: 1 warm-up call, then up to ``repeats``.

    Returns (median_s, n_samples, first_call_s). A call longer than ``cap`` ends the
    repeats; so does a total above ``budget``. If the warm-up alone exceeds the cap
    it is the only sample.
    """
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first > cap:
        return first, 1, first
    samples, total = [], 0.0
    while len(samples) < repeats:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        samples.append(dt)
        total += dt
        if dt > cap or total > budget:
            break
    return statistics.median(samples), len(samples), first


def time_gpu(fn, device, args):
    """Median seconds by triton.testing.do_bench; a single synchronised call when slow."""
    _sync(device)
    t0 = time.perf_counter()
    fn()  # warm-up (and compile)
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    _sync(device)
    second = time.perf_counter() - t0
    if second > args.time_cap:
        return second, 1, first
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
    n = max(1, int(args.rep_ms / max(second * 1e3, 1e-3)))
    return ms / 1e3, n, first


def measure_times(name: str, B: int, D: int, P: int, dtype, device, args) -> dict:
    x, labels = make_inputs(B, D, P, dtype, device, args.seed)
    fwd, make_bwd, fwdbwd = build_steps(name, x, labels, args, B)
    timer = (lambda f: time_gpu(f, device, args)) if device.type == "cuda" else (
        lambda f: time_host(f, device, args.repeats, args.time_cap, args.budget)
    )
    out = {}
    # fwd+bwd first: its first call includes any compilation, reported as compile_s.
    t, n, first = timer(fwdbwd)
    out.update(fwdbwd_ms=t * 1e3, n_fwdbwd=n)
    if name == "reference-compiled":
        out["compile_s"] = first
    t, n, _ = timer(fwd)
    out.update(fwd_ms=t * 1e3, n_fwd=n)
    if name == "reference-compiled":
        # AOTAutograd donates saved buffers to the compiled backward, which then
        # refuses retain_graph=True; turning donation off would change the memory
        # we report, so the backward is derived instead.
        out.update(bwd_ms=max(out["fwdbwd_ms"] - out["fwd_ms"], 0.0), n_bwd=0,
                   note="bwd = fwd+bwd - fwd")
        return out
    bwd = make_bwd()
    t, n, _ = timer(bwd)
    out.update(bwd_ms=t * 1e3, n_bwd=n)
    del bwd
    return out


# --------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.M)
    return int(m.group(1)) if m else -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_peak(name: str, B: int, D: int, P: int, dtype, device, args):
    """Peak bytes above the inputs during one fwd+bwd (after one warm-up fwd+bwd), and the method."""
    x, labels = make_inputs(B, D, P, dtype, device, args.seed)
    _, _, fwdbwd = build_steps(name, x, labels, args, B)
    r = fwdbwd()  # warm-up (compiles, initialises lazy state)
    del r
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        r = fwdbwd()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del r
        return peak, "cuda max_memory_allocated"
    base = _proc_status_kib("VmRSS")
    if _reset_hwm():
        r = fwdbwd()
        peak = _proc_status_kib("VmHWM") - base
        method = "VmHWM after clear_refs"
    else:
        r = fwdbwd()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        method = "ru_maxrss (no reset: may include the warm-up)"
    del r
    return max(peak, 0) * 1024, method


# --------------------------------------------------------------------------- workers


def run_in_process(kind: str, name: str, B, D, P, dtype_name, device, args) -> dict:
    """Run one measurement here; errors and OOM become a status."""
    dtype = DTYPES[dtype_name]
    try:
        if kind == "time":
            load0 = _others_load_snapshot() if device.type == "cpu" else None
            res = measure_times(name, B, D, P, dtype, device, args)
            if load0 is not None:
                res["other_load"] = _others_load_since(load0)
        else:
            peak, method = measure_peak(name, B, D, P, dtype, device, args)
            res = {"peak_bytes": peak, "mem_method": method}
        res["status"] = "ok"
    except Unavailable as exc:
        res = {"status": "skipped", "note": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - a benchmark records failures
        if isinstance(exc, KeyboardInterrupt):
            raise
        if is_oom(exc):
            res = {"status": "OOM", "note": f"{type(exc).__name__}"}
        else:
            res = {"status": "error", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            if args.verbose:
                traceback.print_exc()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _worker_args(args) -> list:
    keep = ["variant", "anneal", "seed", "repeats", "time_cap", "budget", "compile_max_B",
            "warmup_ms", "rep_ms", "threads"]
    out = []
    for k in keep:
        v = getattr(args, k)
        if v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    if args.tf32:
        out.append("--tf32")
    if args.verbose:
        out.append("--verbose")
    return out


def _cpu_busy_fraction(interval: float) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle

    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def _others_load_snapshot():
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        t = os.times()
        return sum(vals[:8]), vals[3] + vals[4], t.user + t.system
    except (OSError, ValueError, IndexError):
        return None


def _others_load_since(snap0) -> float:
    """Fraction of all CPUs used by OTHER processes since ``snap0`` (this process's CPU time removed)."""
    snap1 = _others_load_snapshot()
    if snap0 is None or snap1 is None:
        return -1.0
    hz = os.sysconf("SC_CLK_TCK")
    total = max(snap1[0] - snap0[0], 1)
    busy = total - (snap1[1] - snap0[1])
    own = (snap1[2] - snap0[2]) * hz
    return max(busy - own, 0) / total


def wait_for_idle(max_wait: float, threshold: float = 0.15) -> str:
    """CPU: wait (up to max_wait s) until other processes leave the CPUs idle.

    The parent is idle while it waits, so what is busy is someone else. Returns
    "" when the machine was idle, else a note for the results.
    """
    if max_wait <= 0:
        return ""
    try:
        deadline = time.monotonic() + max_wait
        busy = _cpu_busy_fraction(0.5)
        while busy > threshold:
            if time.monotonic() > deadline:
                return f"CPU {busy:.0%} busy with other work when it started"
            time.sleep(2.0)
            busy = _cpu_busy_fraction(0.5)
        return ""
    except (OSError, ValueError, IndexError):
        return ""


def run_in_subprocess(kind: str, name: str, B, D, P, dtype_name, device, args) -> dict:
    """CPU: one fresh Python process per measurement (see module docstring)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--device", str(device),
           "--B", str(B), "--D", str(D), "--P", str(P), "--dtype", dtype_name,
           "--providers", name] + _worker_args(args)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if kind == "mem":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    limit = int(args.cpu_mem_limit_gb * (1 << 30)) if args.cpu_mem_limit_gb and args.cpu_mem_limit_gb > 0 else None

    def preexec():
        if limit is not None:
            try:
                resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
            except (ValueError, OSError):
                pass

    best = None
    for attempt in range(1 + (args.retries if kind == "time" else 0)):
        wait_for_idle(args.wait_idle)
        res = _launch(cmd, env, preexec, args)
        load = res.get("other_load", -1.0)
        if best is None or (res.get("status") == "ok" and 0 <= load < best.get("other_load", 2.0)):
            best = res
        if res.get("status") != "ok" or load <= 0.15:
            break
    load = best.get("other_load", -1.0)
    if kind == "time" and load > 0.15:
        best["note"] = (best.get("note", "") + f"; other processes used {load:.0%} of the CPUs while timing").strip("; ")
    return best


def _launch(cmd, env, preexec, args) -> dict:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.worker_timeout, preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"worker exceeded {args.worker_timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    if proc.returncode in (-9, 137):
        return {"status": "OOM", "note": "worker killed (SIGKILL, likely out of memory)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    if "memory" in tail.lower() and ("alloc" in tail.lower() or "out of" in tail.lower()):
        return {"status": "OOM", "note": tail}
    return {"status": "error", "note": f"worker rc={proc.returncode}: {tail}"}


def worker_main(args) -> None:
    device = torch.device(args.device)
    res = run_in_process(args.worker, args.providers[0], args.B[0], args.D[0], args.P[0], args.dtype[0], device, args)
    print("@@RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- reporting


def _fmt(v, spec=".3g"):
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ms(v):
    if v is None or v == "":
        return ""
    return f"{v:.3f}" if v < 10 else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def add_ratios(rows: list) -> None:
    index = {(r["provider"], r["B"], r["D"], r["P"], r["dtype"]): r for r in rows}
    for r in rows:
        key = (r["B"], r["D"], r["P"], r["dtype"])
        t = r.get("fwdbwd_ms")
        for col, other, invert in (("x_ref", "reference", True), ("x_pml", "pml", True), ("per_floor", "gemm-floor", False)):
            o = index.get((other,) + key)
            if r["status"] != "ok" or t is None or o is None or o.get("status") != "ok" or o.get("fwdbwd_ms") is None:
                r[col] = None
                continue
            r[col] = (o["fwdbwd_ms"] / t) if invert else (t / o["fwdbwd_ms"])


def row_line(r: dict) -> str:
    head = f"{r['provider']:>18} B={r['B']:<6} D={r['D']:<4} P={r['P']:<3} {r['dtype']:<8}"
    if r["status"] != "ok":
        return f"{head} {r['status']}" + (f" ({r['note']})" if r.get("note") else "")
    s = (f"{head} fwd {_ms(r.get('fwd_ms')):>8} ms  bwd {_ms(r.get('bwd_ms')):>8} ms  "
         f"fwd+bwd {_ms(r.get('fwdbwd_ms')):>8} ms  peak {_fmt(r.get('peak_mib'), '.1f'):>8} MiB")
    for col, lab, other in (("x_ref", "x ref", "reference"), ("x_pml", "x pml", "pml"),
                            ("per_floor", "/ floor", "gemm-floor")):
        if r.get(col) is not None and r["provider"] != other:
            s += f"  {lab} {r[col]:.3g}"
    if r.get("compile_s"):
        s += f"  (compile+first call {r['compile_s']:.1f} s)"
    if r.get("note"):
        s += f"  [{r['note']}]"
    return s


def markdown_table(rows: list) -> str:
    hdr = ["provider", "B", "D", "P", "dtype", "fwd ms", "bwd ms", "fwd+bwd ms", "n", "peak MiB",
           "x ref", "x pml", "/ floor", "note"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        ok = r["status"] == "ok"
        note = r.get("note") or ""
        if r.get("compile_s"):
            note = (note + "; " if note else "") + f"compile+first call {r['compile_s']:.1f} s"
        n = "/".join(str(r.get(k, "")) for k in ("n_fwd", "n_bwd", "n_fwdbwd")) if ok else ""
        cells = [
            r["provider"], str(r["B"]), str(r["D"]), str(r["P"]), r["dtype"],
            _ms(r.get("fwd_ms")) if ok else r["status"], _ms(r.get("bwd_ms")) if ok else "",
            _ms(r.get("fwdbwd_ms")) if ok else "", n,
            _fmt(r.get("peak_mib"), ".1f"),
            _fmt(r.get("x_ref"), ".3g"), _fmt(r.get("x_pml"), ".3g"), _fmt(r.get("per_floor"), ".3g"), note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_lines(args, device, mem_method: str) -> list:
    lines = []
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not importable"
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        dev = f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    try:
        import pnp_kernels

        backends = ", ".join(pnp_kernels.available_backends())
    except Exception as exc:
        backends = f"pnp_kernels import failed: {exc!r}"
    try:
        import pytorch_metric_learning

        pml = pytorch_metric_learning.__version__
    except Exception:
        pml = "not installed"
    lines.append(f"# PNP loss benchmark, {now}")
    lines.append(f"device: {dev}")
    lines.append(f"torch {torch.__version__}, triton {tv}, pytorch-metric-learning {pml}, python {platform.python_version()}")
    lines.append(f"pnp_kernels backends available: {backends}")
    tf32 = "on" if args.tf32 else "off"
    lines.append(f"TF32 {tf32} (torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}), "
                 f"variant {args.variant}, anneal {args.anneal}, cosine similarity, labels: P per class, shuffled, seed {args.seed}")
    if device.type == "cuda":
        lines.append(f"timing: triton.testing.do_bench median (warmup {args.warmup_ms} ms, rep {args.rep_ms} ms); "
                     f"peak: max_memory_allocated above inputs")
    else:
        lines.append(f"timing: perf_counter median, 1 warm-up + up to {args.repeats} calls, cap {args.time_cap} s per call, "
                     f"budget {args.budget} s per measurement, fresh subprocess per provider/config, "
                     f"each started once the CPUs are idle (wait up to {args.wait_idle} s); "
                     f"peak: {mem_method}")
        try:
            lines.append(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
        except OSError:
            pass
    lines.append("bwd = autograd.grad(retain_graph=True) on one fixed forward; ratios on fwd+bwd: "
                 "x ref/x pml = their time / this time, / floor = this time / GEMM-floor time")
    lines.append("command: python " + shlex.join(sys.argv))
    return lines


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def write_outputs(rows, header, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    stamp = args.tag or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"bench_{stamp}")
    with open(base + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(header[:1]) + "\n\n" + "\n".join(f"- {h}" for h in header[1:]) + "\n\n")
        fh.write(markdown_table(rows) + "\n")
    written = [base + ".csv", base + ".md"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        plt = None
    if plt is not None:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        series = {}
        for r in rows:
            if r["status"] == "ok":
                series.setdefault((r["provider"], r["D"], r["P"], r["dtype"]), []).append(r)
        multi = len({k[1:] for k in series}) > 1
        for key, rs in series.items():
            rs = sorted(rs, key=lambda r: r["B"])
            label = key[0] + (f" D={key[1]} P={key[2]} {key[3]}" if multi else "")
            Bs = [r["B"] for r in rs]
            ax_t.plot(Bs, [r["fwdbwd_ms"] for r in rs], marker="o", label=label)
            mem = [(r["B"], r["peak_mib"]) for r in rs if r.get("peak_mib")]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=label)
        for ax, yl in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(header[1][:110], fontsize=9)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=120)
        plt.close(fig)
        written.append(base + ".png")
    print("wrote: " + ", ".join(written))


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for exactly what is measured.")
    p.add_argument("--B", type=int, nargs="+", default=[128, 384, 512])
    p.add_argument("--D", type=int, nargs="+", default=[128])
    p.add_argument("--P", type=int, nargs="+", default=[4], help="samples per class")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    p.add_argument("--providers", nargs="+", default=None, choices=ALL_PROVIDERS,
                   help="default: every provider usable on the device")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--variant", default="O")
    p.add_argument("--anneal", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default off)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=15, help="CPU: timed calls after the warm-up")
    p.add_argument("--time-cap", type=float, default=10.0, help="skip remaining repeats once one call exceeds this (s)")
    p.add_argument("--budget", type=float, default=20.0, help="CPU: stop repeating once calls add up to this (s)")
    p.add_argument("--warmup-ms", type=int, default=25, help="GPU: do_bench warmup (ms)")
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench rep (ms)")
    p.add_argument("--compile-max-B", type=int, default=512, help="reference-compiled only up to this B")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--in-process", action="store_true", help="CPU: measure in this process (no subprocess isolation)")
    p.add_argument("--cpu-mem-limit-gb", type=float, default=None,
                   help="CPU workers: RLIMIT_DATA in GiB (default 85%% of MemAvailable; 0 = none)")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="CPU: before each measurement wait up to this many seconds for other processes "
                        "to leave the CPUs idle (0 = never wait); a contended start is noted")
    p.add_argument("--retries", type=int, default=1,
                   help="CPU: re-time a configuration this many times when other processes used > 15%% "
                        "of the CPUs during its timing (the least contended run is kept)")
    p.add_argument("--worker-timeout", type=float, default=1800.0, help="CPU: seconds before a worker is killed")
    p.add_argument("--out", default=os.path.join(_HERE, "out"))
    p.add_argument("--tag", default=None, help="output file stem (default: a timestamp)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", choices=["time", "mem"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            m = re.search(r"^MemAvailable:\s+(\d+)", fh.read(), re.M)
        return int(m.group(1)) / (1 << 20) if m else 0.0
    except OSError:
        return 0.0


def setup_torch(args, device) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    if device.type == "cuda":
        torch.cuda.set_device(device)


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup_torch(args, device)
    if args.worker:
        worker_main(args)
        return []
    if args.cpu_mem_limit_gb is None:
        args.cpu_mem_limit_gb = round(0.85 * _mem_available_gb(), 1)
    isolate = device.type == "cpu" and not args.in_process
    providers = args.providers or [p for p in ALL_PROVIDERS if provider_available(p, device)[0]]
    providers = sorted(dict.fromkeys(providers), key=ALL_PROVIDERS.index)  # floor and reference first
    mem_method = ("skipped" if args.no_mem else
                  "VmHWM (clear_refs) minus RSS, fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536"
                  if isolate else "VmHWM/ru_maxrss in-process (allocator reuse may hide part of the peak)")
    header = header_lines(args, device, mem_method)
    print("\n".join(header), flush=True)
    if device.type == "cpu" and isolate:
        print(f"CPU workers: RLIMIT_DATA {args.cpu_mem_limit_gb} GiB", flush=True)

    rows, oom_at = [], {}
    for dtype_name in args.dtype:
        for D in args.D:
            for P in args.P:
                for B in sorted(args.B):
                    done = {}
                    for name in providers:
                        r = {"provider": name, "B": B, "D": D, "P": P, "dtype": dtype_name, "status": "ok"}
                        ok, why = provider_available(name, device)
                        key = (name, D, P, dtype_name)
                        if not ok:
                            r.update(status="skipped", note=why)
                        elif key in oom_at:
                            r.update(status="OOM", note=f"skipped: OOM at B={oom_at[key]}")
                        else:
                            runner = run_in_subprocess if isolate else run_in_process
                            res = runner("time", name, B, D, P, dtype_name, device, args)
                            r.update(res)
                            if r["status"] == "ok" and not args.no_mem:
                                m = runner("mem", name, B, D, P, dtype_name, device, args)
                                if m.get("status") == "ok":
                                    r["peak_mib"] = m["peak_bytes"] / 2**20
                                    if not isolate and m.get("mem_method") and "mem_method" not in r:
                                        r["mem_method"] = m["mem_method"]
                                else:
                                    r["note"] = (r.get("note", "") + f" memory run: {m.get('status')} {m.get('note', '')}").strip()
                            if r["status"] == "OOM":
                                oom_at[key] = B
                        done[name] = r
                        rows.append(r)
                        add_ratios(rows)
                        print(row_line(r), flush=True)
    add_ratios(rows)
    print()
    print(markdown_table(rows))
    if device.type == "cpu":
        try:
            print(f"\nload average at end: {open('/proc/loadavg').read().split()[:3]}")
            header.append(f"load average at end: {open('/proc/loadavg').read().split()[:3]}")
        except OSError:
            pass
    if not args.no_write:
        write_outputs(rows, header, args)
    return rows


if __name__ == "__main__":
    main()
