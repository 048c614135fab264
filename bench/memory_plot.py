"""Peak memory of one forward+backward against the batch size: dense, memory-efficient and
pytorch-metric-learning, on the CPU, as a table and a PNG.

    python bench/memory_plot.py                                  # defaults below
    python bench/memory_plot.py --providers ext ext-me pml --B 512 2048 8192 32768

Each point runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536``, so every freed
buffer goes back to the OS) and reports the peak RSS growth of one forward+backward of
the PNP loss (variant O, cosine, D = --D, P = --P per class, shuffled labels) after a
warm-up one: VmHWM after clear_refs minus the RSS before the step (bench/harness.py,
``measure_peak``). A provider stops at its --max-B cap, or after its first failure (out
of memory) or a point slower than --time-cap seconds. Providers are those of
bench/providers.py; the dense path is the plain name (e.g. ``ext``), the memory-efficient
one ``NAME-me``.

Writes a markdown table to stdout and, unless --no-plot, the PNG (default
docs/memory_cpu.png) with matplotlib.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

WORKER = """
import json, sys, time
sys.path.insert(0, {here!r})
import torch
import harness, providers
name, B, D, P = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads({threads})
case = harness.Case(B=B, D=D, P=P)
inp = harness.make_inputs(case, "cpu")
steps = providers.build(name, inp, case)
t0 = time.perf_counter()
peak, method = harness.measure_peak(steps.fwdbwd, "cpu")
print(json.dumps({{"peak_bytes": peak, "method": method, "seconds": (time.perf_counter() - t0) / 2}}))
"""

DEFAULT_PROVIDERS = ["pml", "torch", "torch-me", "ext", "ext-me"]
DEFAULT_B = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
# largest B per provider by default: pml's B^3 tensor (4.6 s and 4.9 GB at B = 512), the dense
# path's two B x B float32 buffers (8 GiB at 32768 on a 24 GB machine), the torch backend's
# tiled path (pure PyTorch: minutes past 8192 on 2 cores)
DEFAULT_MAX_B = {"pml": 768, "torch": 16384, "ext": 16384, "torch-me": 8192}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", nargs="+", default=DEFAULT_PROVIDERS)
    p.add_argument("--B", type=int, nargs="+", default=DEFAULT_B)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--P", type=int, default=4)
    p.add_argument("--max-B", nargs="*", default=[], help=f"NAME=B caps (defaults: {DEFAULT_MAX_B})")
    p.add_argument("--time-cap", type=float, default=300.0, help="stop a provider after a point this slow (s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "memory_cpu.png"))
    p.add_argument("--json", default=None, help="also write the points to this JSON file")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def measure(name: str, B: int, D: int, P: int, threads: int, timeout: float):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    code = WORKER.format(here=HERE, threads=threads)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, name, str(B), str(D), str(P)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    caps = dict(DEFAULT_MAX_B)
    for item in args.max_B:
        k, _, v = item.partition("=")
        caps[k] = int(v)
    import torch

    print(
        f"# peak RSS growth of one fwd+bwd, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
        f"D = {args.D}, P = {args.P}, PNP variant O, cosine"
    )
    points = {}
    for name in args.providers:
        points[name] = []
        for B in args.B:
            if B > caps.get(name, 1 << 40):
                break
            t0 = time.perf_counter()
            res = measure(name, B, args.D, args.P, args.threads, timeout=4 * args.time_cap)
            wall = time.perf_counter() - t0
            if "error" in res:
                print(f"  {name:>10} B = {B:>6}: {res['error']}")
                break
            points[name].append((B, res["peak_bytes"], res["seconds"]))
            print(f"  {name:>10} B = {B:>6}: {res['peak_bytes'] / 2**20:10.1f} MiB, {res['seconds']:.2f} s per step")
            if wall > args.time_cap:
                break
    Bs = sorted({B for pts in points.values() for B, _, _ in pts})
    print("\n| B | " + " | ".join(f"{n} MiB" for n in points) + " |")
    print("|---|" + "---|" * len(points))
    for B in Bs:
        row = []
        for n in points:
            hit = [p for b, p, _ in points[n] if b == B]
            row.append(f"{hit[0] / 2**20:.1f}" if hit else "")
        print(f"| {B} | " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(points, fh, indent=1)
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for n, pts in points.items():
            if pts:
                ax.plot([b for b, _, _ in pts], [max(p, 1) / 2**20 for _, p, _ in pts], marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("peak RSS growth of one fwd+bwd (MiB)")
        ax.set_title(f"PNP loss on the CPU, D = {args.D}, {args.P} per class")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"\nwrote {args.out}")
    return points


if __name__ == "__main__":
    main()
