"""Interleaved A/B timing of forward+backward: the speed ratio of providers in one process.

    python bench/ab_ratio.py --providers torch ext --B 384 --D 128 --P 4 [--rounds 60]

bench_pnp.py times each provider in its own fresh subprocess, one after the other,
which is right for memory and isolation, but on a shared 2-core VM the machine's
speed drifts between those processes (the same torch-backend step measured 4.4 ms
in one process and 9 ms in the next). Here every round runs one forward+backward
of each provider on the same inputs, in rotating order, so drift hits all of them
alike; it prints each provider's median and the ratios of the medians to the first
provider, and the median of the per-round ratios. Uses bench_pnp's inputs and
steps (same labels, variant, anneal), CPU or CUDA (synchronised per call).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pnp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", nargs="+", default=["torch", "ext"], help="the first is the baseline")
    ap.add_argument("--B", type=int, default=384)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", default="O")
    ap.add_argument("--anneal", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-max-B", type=int, default=512)
    args = ap.parse_args(argv)
    if len(args.providers) < 2:
        ap.error("--providers: give at least two (the first is the baseline)")
    device = torch.device(args.device)
    x, labels = bench_pnp.make_inputs(args.B, args.D, args.P, torch.float32, device, args.seed)
    steps = {}
    for name in args.providers:
        _, _, fwdbwd = bench_pnp.build_steps(name, x, labels, args, args.B)
        steps[name] = fwdbwd

    def timed(fn):
        bench_pnp._sync(device)
        t0 = time.perf_counter()
        fn()
        bench_pnp._sync(device)
        return time.perf_counter() - t0

    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    samples = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for i in range(len(names)):  # rotate the order: no provider always runs first
            name = names[(r + i) % len(names)]
            samples[name].append(timed(steps[name]))

    base = names[0]
    print(f"# A/B fwd+bwd, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
          f"{bench_pnp.cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
          f"torch {torch.__version__}, python {platform.python_version()}, threads {torch.get_num_threads()}")
    print(f"B = {args.B}, D = {args.D}, P = {args.P}, float32, variant {args.variant}, "
          f"anneal {args.anneal}, {args.rounds} interleaved rounds after {args.warmup} warm-ups")
    print(f"\n| provider | median ms | min ms | max ms | {base} median / this median | median of per-round ratios |")
    print("|---|---|---|---|---|---|")
    med = {n: statistics.median(s) for n, s in samples.items()}
    for name in names:
        s = samples[name]
        per_round = statistics.median(b / t for b, t in zip(samples[base], s))
        print(f"| {name} | {med[name] * 1e3:.3f} | {min(s) * 1e3:.3f} | {max(s) * 1e3:.3f} | "
              f"{med[base] / med[name]:.2f} | {per_round:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
