"""Benchmark sweep of the losses: pnp_kernels backends vs the B^3 formulation and pml.

Run from the repository root, e.g.

    python bench/bench_pnp.py --B 128 384 512 --D 128 --P 4 --providers torch reference pml   # CPU
    python bench/bench_pnp.py --device cuda --B 384 1024 4096 --D 512                          # GPU
    python bench/bench_pnp.py --B 256 --M 2048 --providers refset-torch refset-ext            # reference set

Providers (``--providers``, default: the square PNP ones usable here): see
bench/providers.py (``python bench/bench_pnp.py --list``). Inputs (bench/harness.py):
embeddings randn(B, D) in --dtype, P samples per class in a random order (class-sorted
with --sorted-labels, or when pml-smooth-ap runs), fixed seed; reference-set
providers rank the B queries against M reference rows (--M, default 8 B).

What is measured, per (provider, B, D, P, M, dtype):

  fwd      the forward call, grad enabled on a leaf that requires grad (for
           pnp_kernels this includes computing what backward needs).
  bwd      torch.autograd.grad(loss, x, retain_graph=True) on ONE fixed forward
           (reference-compiled: fwd+bwd minus fwd, as its compiled backward
           refuses retain_graph).
  fwd+bwd  forward then torch.autograd.grad(loss, x): one training step of the loss.
  peak     memory above the inputs during one fwd+bwd, after one warm-up fwd+bwd:
           GPU: max_memory_allocated() after reset_peak_memory_stats(), minus
           memory_allocated() with only the inputs alive. CPU: peak RSS (VmHWM reset
           through /proc/self/clear_refs) minus the RSS before the step, in a fresh
           subprocess with MALLOC_MMAP_THRESHOLD_=65536 (every buffer is returned to
           the OS when freed, so allocator reuse hides nothing).

Timing: GPU: triton.testing.do_bench median. CPU: perf_counter median of up to
--repeats calls after one warm-up, each provider/config in a fresh subprocess that
starts once the CPUs are idle (--wait-idle) and is retried when other processes
used > 15% of the CPUs while it ran (--retries). A call longer than --time-cap ends
the repeats; so does a total above --budget. Separate processes drift on a shared
VM: for a speed RATIO of providers use bench/ab_ratio.py (interleaved, one process).

Out of memory is recorded as OOM (larger B of the same provider are then skipped);
CPU workers run under RLIMIT_DATA = --cpu-mem-limit-gb (default 85% of MemAvailable).

Outputs: one line per configuration as it runs, a markdown table with the ratios
(x ref, x pml = their fwd+bwd time / this one; / floor = this one / the GEMM floor's),
and CSV, markdown and a PNG in --out (default bench/out/, git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import harness  # noqa: E402  (unsets TRITON_INTERPRET before pnp_kernels loads triton)
import providers  # noqa: E402
import report  # noqa: E402

SQUARE_PNP = ["gemm-floor", "reference", "reference-compiled", "pml", "torch", "triton", "ext"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for exactly what is measured.",
    )
    p.add_argument("--list", action="store_true", help="list the providers and exit")
    p.add_argument("--B", type=int, nargs="+", default=[128, 384, 512], help="batch sizes (queries)")
    p.add_argument("--D", type=int, nargs="+", default=[128])
    p.add_argument("--P", type=int, nargs="+", default=[4], help="samples per class")
    p.add_argument(
        "--M",
        type=int,
        nargs="+",
        default=[0],
        help="reference rows for the refset-* providers (0: 8 B); ignored by the others",
    )
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=list(harness.DTYPES))
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        choices=providers.NAMES,
        help="default: the square PNP providers usable on the device",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--variant", default="O")
    p.add_argument("--anneal", type=float, default=0.01)
    p.add_argument("--temperature", type=float, default=0.01, help="Smooth-AP temperature")
    p.add_argument("--sorted-labels", action="store_true", help="class-sorted labels instead of shuffled")
    p.add_argument("--ref-grad", action="store_true", help="refset-*: the reference set requires grad too")
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
    p.add_argument(
        "--memory-efficient",
        action="store_true",
        help="add a memory_efficient=True row (provider NAME-me) next to every pnp_kernels provider",
    )
    p.add_argument("--in-process", action="store_true", help="CPU: measure in this process (no subprocess isolation)")
    p.add_argument(
        "--cpu-mem-limit-gb",
        type=float,
        default=None,
        help="CPU workers: RLIMIT_DATA in GiB (default 85%% of MemAvailable; 0 = none)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="CPU: wait up to this many seconds for idle CPUs before each measurement (0 = never)",
    )
    p.add_argument("--retries", type=int, default=1, help="CPU: re-time a contended configuration this many times")
    p.add_argument("--worker-timeout", type=float, default=1800.0, help="CPU: seconds before a worker is killed")
    p.add_argument("--out", default=os.path.join(harness.HERE, "out"))
    p.add_argument("--tag", default=None, help="output file stem (default: a timestamp)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", choices=["time", "mem"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _case(args, B, D, P, M, dtype) -> harness.Case:
    return harness.Case(
        B=B,
        D=D,
        P=P,
        dtype=dtype,
        M=M or None,
        ref_grad=args.ref_grad,
        sorted_labels=args.sorted_labels,
        seed=args.seed,
        variant=args.variant,
        anneal=args.anneal,
        temperature=args.temperature,
        compile_max_B=args.compile_max_B,
    )


def _timing(args) -> harness.Timing:
    return harness.Timing(args.repeats, args.time_cap, args.budget, args.warmup_ms, args.rep_ms)


def measure(kind: str, name: str, case: harness.Case, device, args) -> dict:
    """One measurement ("time" or "mem") in this process; errors and OOM become a status."""
    try:
        inp = harness.make_inputs(case, device, with_ref=providers.uses_reference_set(name))
        steps = providers.build(name, inp, case)
        if kind == "time":
            load0 = harness.load_snapshot() if device.type == "cpu" else None
            res = harness.measure_times(steps, device, _timing(args), providers.get(name).derived_bwd)
            first = res.pop("first_s")
            if name == "reference-compiled":
                res["compile_s"] = first
            if load0 is not None:
                res["other_load"] = harness.others_load_since(load0)
        else:
            peak, method = harness.measure_peak(steps.fwdbwd, device)
            res = {"peak_bytes": peak, "mem_method": method}
        res["status"] = "ok"
    except harness.Unavailable as exc:
        res = {"status": "skipped", "note": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures
        if harness.is_oom(exc):
            res = {"status": "OOM", "note": type(exc).__name__}
        else:
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            res = {"status": "error", "note": f"{type(exc).__name__}: {msg}"}
            if args.verbose:
                traceback.print_exc()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _worker_cmd(kind, name, case: harness.Case, device, args) -> list:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--device",
        str(device),
        "--B",
        str(case.B),
        "--D",
        str(case.D),
        "--P",
        str(case.P),
        "--M",
        str(case.M or 0),
        "--dtype",
        case.dtype,
        "--providers",
        name,
    ]
    for k in (
        "variant",
        "anneal",
        "temperature",
        "seed",
        "repeats",
        "time_cap",
        "budget",
        "compile_max_B",
        "warmup_ms",
        "rep_ms",
        "threads",
    ):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    for flag, on in (
        ("--tf32", args.tf32),
        ("--verbose", args.verbose),
        ("--ref-grad", case.ref_grad),
        ("--sorted-labels", case.sorted_labels),
    ):
        if on:
            cmd.append(flag)
    return cmd


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
    if args.list:
        for p in providers.PROVIDERS.values():
            print(f"{p.name:>20}  {p.help}")
        return []
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup_torch(args, device)
    if args.worker:
        name = args.providers[0]
        case = _case(args, args.B[0], args.D[0], args.P[0], args.M[0], args.dtype[0])
        harness.emit_result(measure(args.worker, name, case, device, args))
        return []
    if args.cpu_mem_limit_gb is None:
        args.cpu_mem_limit_gb = round(0.85 * harness.mem_available_gb(), 1)
    isolate = device.type == "cpu" and not args.in_process
    names = args.providers or [p for p in SQUARE_PNP if not providers.why_unavailable(p, device)]
    if args.memory_efficient:
        names = list(names) + [
            n + "-me" for n in names if providers.get(n).backend and n + "-me" in providers.PROVIDERS
        ]
    names = sorted(dict.fromkeys(names), key=providers.NAMES.index)  # floor and references first
    if any(providers.get(n).sorted_labels for n in names):
        args.sorted_labels = True
    mem_method = (
        "skipped"
        if args.no_mem
        else "VmHWM (clear_refs) minus RSS, fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536"
        if isolate
        else "cuda max_memory_allocated above the inputs"
        if device.type == "cuda"
        else "VmHWM/ru_maxrss in-process (allocator reuse may hide part of the peak)"
    )
    timing = (
        "triton.testing.do_bench median"
        if device.type == "cuda"
        else f"perf_counter median, 1 warm-up + up to {args.repeats} calls, "
        + ("fresh subprocess per provider/config" if isolate else "in-process")
    )
    header = report.header_lines(
        "Loss benchmark",
        [
            f"device: {harness.device_name(device)}",
            harness.versions(),
            f"TF32 {'on' if args.tf32 else 'off'}, variant {args.variant}, anneal {args.anneal}, Smooth-AP temperature "
            f"{args.temperature}, cosine similarity, labels: P per class, "
            f"{'class-sorted' if args.sorted_labels else 'shuffled'}, seed {args.seed}",
            f"timing: {timing}; peak: {mem_method}",
        ],
    )
    print("\n".join(header), flush=True)

    rows, oom_at = [], {}
    for dtype, D, P, B in ((t, d, p, b) for t in args.dtype for d in args.D for p in args.P for b in sorted(args.B)):
        for name in names:
            refset = providers.uses_reference_set(name)
            for M in args.M if refset else [0]:
                case = _case(args, B, D, P, M, dtype)
                case = dataclasses.replace(case, M=case.n_ref if refset else None)
                r = {"provider": name, "B": B, "D": D, "P": P, "M": case.M or "", "dtype": dtype, "status": "ok"}
                key = (name, D, P, M, dtype)
                why = providers.why_unavailable(name, device)
                if why:
                    r.update(status="skipped", note=why)
                elif key in oom_at:
                    r.update(status="OOM", note=f"skipped: OOM at B={oom_at[key]}")
                else:
                    r.update(_run("time", name, case, device, args, isolate))
                    if r["status"] == "ok" and not args.no_mem:
                        m = _run("mem", name, case, device, args, isolate)
                        if m.get("status") == "ok":
                            r["peak_mib"] = m["peak_bytes"] / 2**20
                        else:
                            note = f" memory run: {m.get('status')} {m.get('note', '')}"
                            r["note"] = (r.get("note", "") + note).strip()
                    if r["status"] == "OOM":
                        oom_at[key] = B
                rows.append(r)
                print(report.row_line(r), flush=True)
    report.add_ratios(rows)
    print("\n" + report.markdown_table(rows))
    if not args.no_write:
        print("wrote: " + ", ".join(report.write_outputs(rows, header, args.out, args.tag or "")))
    return rows


def _run(kind, name, case, device, args, isolate) -> dict:
    if not isolate:
        return measure(kind, name, case, device, args)
    return harness.run_worker(
        _worker_cmd(kind, name, case, device, args),
        kind == "mem",
        args.cpu_mem_limit_gb,
        args.worker_timeout,
        args.retries,
        args.wait_idle,
    )


if __name__ == "__main__":
    main()
