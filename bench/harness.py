"""Benchmark harness shared by bench_pnp.py, ab_ratio.py and test_bench_micro.py.

* inputs: :class:`Case` (one configuration) and :func:`make_inputs` (embeddings, labels
  and, in reference-set mode, a reference set), fixed seeds;
* timing: :func:`time_host` (perf_counter median), :func:`time_gpu`
  (``triton.testing.do_bench`` median), :func:`measure_times` (fwd, bwd, fwd+bwd of
  one provider) and :func:`interleave` (A/B rounds in rotating order, one process);
* memory: :func:`measure_peak`, CUDA ``max_memory_allocated`` or CPU peak RSS
  (VmHWM reset through /proc/self/clear_refs), and :func:`run_worker`, which runs a
  measurement in a fresh subprocess (CPU isolation, RLIMIT_DATA, OOM as a status);
* machine description: :func:`cpu_model`, :func:`versions`.

Importing this module unsets TRITON_INTERPRET (the Triton interpreter is for
correctness tests only and is never benchmarked) and puts the repository root on
sys.path, so the benchmarks run from a checkout without installing.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    print("bench: unsetting TRITON_INTERPRET (the interpreter is never benchmarked)", file=sys.stderr)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Unavailable(Exception):
    """The provider cannot run here (not installed, no GPU, B over the compile limit...)."""


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Square mode: B embeddings ranked against themselves, P per class. Reference-set
    mode (providers ``refset-*``): B queries against M reference rows (P per class;
    ``M=None`` means 8 B); each query's label is that of a random reference row, so
    every query has P positives in the reference set; the queries have no copy in it.
    The reference set requires grad only with ``ref_grad`` (a memory bank does not).
    """

    B: int = 384
    D: int = 128
    P: int = 4
    dtype: str = "float32"
    M: Optional[int] = None
    ref_grad: bool = False
    sorted_labels: bool = False  # class-sorted labels instead of a random order
    seed: int = 0
    variant: str = "O"
    anneal: float = 0.01
    temperature: float = 0.01
    compile_max_B: int = 512

    @property
    def n_ref(self) -> int:
        return self.M if self.M else 8 * self.B

    def label(self) -> str:
        s = f"B={self.B} D={self.D} P={self.P} {self.dtype}"
        return s + (f" M={self.M}" if self.M else "")


class Inputs(NamedTuple):
    x: torch.Tensor  # (B, D) leaf, requires grad
    labels: torch.Tensor  # (B,) int64
    ref: Optional[torch.Tensor]  # (M, D) or None (built only for reference-set providers)
    ref_labels: Optional[torch.Tensor]


def make_labels(B: int, P: int, device, seed: int = 0, shuffle: bool = True) -> torch.Tensor:
    """P samples per class (the last class smaller when P does not divide B), shuffled
    unless ``shuffle`` is False (then class-sorted: 0,0,0,0,1,1,...)."""
    labels = torch.arange(B, dtype=torch.int64) // P
    if shuffle:
        g = torch.Generator().manual_seed(seed + 1)
        labels = labels[torch.randperm(B, generator=g)]
    return labels.to(device)


def _randn(n: int, D: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def make_inputs(case: Case, device, with_ref: bool = False) -> Inputs:
    """Embeddings randn(B, D) in the case's dtype (a leaf that requires grad), labels and,
    with ``with_ref``, the reference set of the case (see :class:`Case`)."""
    dtype = DTYPES[case.dtype]
    x = _randn(case.B, case.D, dtype, device, case.seed).requires_grad_(True)
    labels = make_labels(case.B, case.P, device, case.seed, shuffle=not case.sorted_labels)
    if not with_ref:
        return Inputs(x, labels, None, None)
    M = case.n_ref
    ref = _randn(M, case.D, dtype, device, case.seed + 7).requires_grad_(case.ref_grad)
    ref_labels = make_labels(M, case.P, device, case.seed + 7, shuffle=not case.sorted_labels)
    g = torch.Generator().manual_seed(case.seed + 8)
    pick = torch.randint(0, M, (case.B,), generator=g).to(device)
    return Inputs(x, ref_labels[pick].clone(), ref, ref_labels)


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


# --------------------------------------------------------------------------- timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_host(fn: Callable, device, repeats: int, cap: float, budget: float):
    """Median seconds of fn() by perf_counter: 1 warm-up call, then up to ``repeats``.

    Returns (median_s, n_samples, first_call_s). A call longer than ``cap`` ends the
    repeats; so does a total above ``budget``. If the warm-up alone exceeds the cap
    it is the only sample.
    """
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if first > cap:
        return first, 1, first
    samples, total = [], 0.0
    while len(samples) < repeats:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        samples.append(dt)
        total += dt
        if dt > cap or total > budget:
            break
    return statistics.median(samples), len(samples), first


def time_gpu(fn: Callable, device, warmup_ms: int, rep_ms: int, cap: float):
    """Median seconds by triton.testing.do_bench; a single synchronised call when slow.
    Returns (median_s, approximate n_samples, first_call_s)."""
    sync(device)
    t0 = time.perf_counter()
    fn()  # warm-up (and compile)
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    sync(device)
    second = time.perf_counter() - t0
    if second > cap:
        return second, 1, first
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return ms / 1e3, max(1, int(rep_ms / max(second * 1e3, 1e-3))), first


@dataclasses.dataclass
class Timing:
    """How to time one callable: CPU perf_counter repeats, or GPU do_bench."""

    repeats: int = 15
    time_cap: float = 10.0
    budget: float = 20.0
    warmup_ms: int = 25
    rep_ms: int = 100

    def __call__(self, fn: Callable, device):
        if torch.device(device).type == "cuda":
            return time_gpu(fn, device, self.warmup_ms, self.rep_ms, self.time_cap)
        return time_host(fn, device, self.repeats, self.time_cap, self.budget)


def measure_times(steps, device, timing: Timing, derived_bwd: bool = False) -> dict:
    """fwd, bwd and fwd+bwd medians (ms) and sample counts of one provider's ``steps``.

    fwd+bwd runs first, so its first call includes any compilation (``first_s``).
    bwd is ``autograd.grad(retain_graph=True)`` on one fixed forward, or, with
    ``derived_bwd``, fwd+bwd minus fwd (for compiled graphs that refuse retain_graph).
    """
    out = {}
    t, n, first = timing(steps.fwdbwd, device)
    out.update(fwdbwd_ms=t * 1e3, n_fwdbwd=n, first_s=first)
    t, n, _ = timing(steps.fwd, device)
    out.update(fwd_ms=t * 1e3, n_fwd=n)
    if derived_bwd:
        out.update(bwd_ms=max(out["fwdbwd_ms"] - out["fwd_ms"], 0.0), n_bwd=0, note="bwd = fwd+bwd - fwd")
        return out
    bwd = steps.make_bwd()
    t, n, _ = timing(bwd, device)
    out.update(bwd_ms=t * 1e3, n_bwd=n)
    return out


def interleave(steps: Dict[str, Callable], device, rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per call of each callable, ``rounds`` rounds after ``warmup`` calls each;
    every round calls each once, in rotating order, so drift of the machine's speed
    hits all of them alike (synchronised per call on CUDA)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    names = list(steps)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    return samples


def ratio_table(samples: Dict[str, List[float]], unit: float = 1e3, unit_name: str = "ms") -> List[str]:
    """Markdown rows: each entry's median, min, max, and the ratios to the first entry
    (ratio of the medians, and the median of the per-round ratios, over the rounds
    both ran: entries that ran fewer rounds ran the first ones)."""
    names = list(samples)
    base = names[0]
    med = {n: statistics.median(s) for n, s in samples.items()}
    lines = [
        f"| provider | median {unit_name} | min {unit_name} | max {unit_name} | "
        f"{base} median / this median | median of per-round ratios |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        s = samples[name]
        per_round = statistics.median(b / t for b, t in zip(samples[base], s))
        lines.append(
            f"| {name} | {med[name] * unit:.3f} | {min(s) * unit:.3f} | {max(s) * unit:.3f} | "
            f"{med[base] / med[name]:.3f} | {per_round:.3f} |"
        )
    return lines


# --------------------------------------------------------------------------- memory


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.M)
    return int(m.group(1)) if m else -1


def reset_hwm() -> bool:
    """Reset the peak RSS (VmHWM) of this process; False when /proc/self/clear_refs is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_peak(fwdbwd: Callable, device):
    """(bytes, method): peak memory above what is alive before one fwd+bwd, after a warm-up one.

    CUDA: max_memory_allocated after reset_peak_memory_stats minus memory_allocated.
    CPU: VmHWM after clear_refs minus VmRSS (ru_maxrss when clear_refs is not writable;
    then a warm-up peak may be included). Meaningful on the CPU only in a fresh process
    with MALLOC_MMAP_THRESHOLD_ small (see :func:`run_worker`).
    """
    device = torch.device(device)
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
    base = proc_status_kib("VmRSS")
    if reset_hwm():
        r = fwdbwd()
        peak = proc_status_kib("VmHWM") - base
        method = "VmHWM after clear_refs"
    else:
        r = fwdbwd()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        method = "ru_maxrss (no reset: may include the warm-up)"
    del r
    return max(peak, 0) * 1024, method


# --------------------------------------------------------------------------- subprocesses


def _others_load_snapshot():
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        t = os.times()
        return sum(vals[:8]), vals[3] + vals[4], t.user + t.system
    except (OSError, ValueError, IndexError):
        return None


def others_load_since(snap0) -> float:
    """Fraction of all CPUs used by OTHER processes since ``snap0`` (this process's CPU time removed)."""
    snap1 = _others_load_snapshot()
    if snap0 is None or snap1 is None:
        return -1.0
    hz = os.sysconf("SC_CLK_TCK")
    total = max(snap1[0] - snap0[0], 1)
    busy = total - (snap1[1] - snap0[1])
    own = (snap1[2] - snap0[2]) * hz
    return max(busy - own, 0) / total


def load_snapshot():
    """Start of a window for :func:`others_load_since`."""
    return _others_load_snapshot()


def _cpu_busy_fraction(interval: float) -> float:
    def snap():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return sum(vals[:8]), vals[3] + (vals[4] if len(vals) > 4 else 0)

    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(max_wait: float, threshold: float = 0.15) -> str:
    """Wait (up to max_wait s) until other processes leave the CPUs idle; "" when they
    did, else a note for the results."""
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


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            m = re.search(r"^MemAvailable:\s+(\d+)", fh.read(), re.M)
        return int(m.group(1)) / (1 << 20) if m else 0.0
    except OSError:
        return 0.0


RESULT_TAG = "@@RESULT "


def emit_result(res: dict) -> None:
    """What a worker prints for :func:`run_worker` to read back."""
    print(RESULT_TAG + json.dumps(res), flush=True)


def run_worker(
    cmd: List[str], mem: bool, mem_limit_gb: Optional[float], timeout: float, retries: int = 0, wait_idle: float = 0.0
) -> dict:
    """Run ``cmd`` (a worker that calls :func:`emit_result`) in a fresh process.

    Memory runs get MALLOC_MMAP_THRESHOLD_=65536 so every tensor buffer is mmap-ed and
    returned to the OS when freed (no allocator reuse hides the peak). Each worker runs
    under RLIMIT_DATA = ``mem_limit_gb`` so an oversized tensor fails cleanly. A timing
    run during which other processes used > 15% of the CPUs is retried ``retries``
    times and the least contended run is kept. OOM (also a SIGKILL) is a status.
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if mem:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    limit = int(mem_limit_gb * (1 << 30)) if mem_limit_gb and mem_limit_gb > 0 else None

    def preexec():
        if limit is not None:
            try:
                resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
            except (ValueError, OSError):
                pass

    best = None
    for _ in range(1 + (0 if mem else retries)):
        wait_for_idle(wait_idle)
        res = _launch(cmd, env, preexec, timeout)
        load = res.get("other_load", -1.0)
        if best is None or (res.get("status") == "ok" and 0 <= load < best.get("other_load", 2.0)):
            best = res
        if res.get("status") != "ok" or load <= 0.15:
            break
    load = best.get("other_load", -1.0)
    if not mem and load > 0.15:
        note = f"; other processes used {load:.0%} of the CPUs while timing"
        best["note"] = (best.get("note", "") + note).strip("; ")
    return best


def _launch(cmd, env, preexec, timeout) -> dict:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"worker exceeded {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    if proc.returncode in (-9, 137):
        return {"status": "OOM", "note": "worker killed (SIGKILL, likely out of memory)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    if "memory" in tail.lower() and ("alloc" in tail.lower() or "out of" in tail.lower()):
        return {"status": "OOM", "note": tail}
    return {"status": "error", "note": f"worker rc={proc.returncode}: {tail}"}


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def versions() -> str:
    """torch, triton, pytorch-metric-learning and Python versions, and the usable backends."""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not importable"
    try:
        import pytorch_metric_learning

        pml = pytorch_metric_learning.__version__
    except Exception:
        pml = "not installed"
    try:
        import pnp_kernels

        backends = ", ".join(pnp_kernels.available_backends())
    except Exception as exc:
        backends = f"pnp_kernels import failed: {exc!r}"
    return (
        f"torch {torch.__version__}, triton {tv}, pytorch-metric-learning {pml}, "
        f"python {platform.python_version()}; pnp_kernels backends available: {backends}"
    )
