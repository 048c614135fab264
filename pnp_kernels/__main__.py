"""``python -m pnp_kernels``: a short self-check and timing on the available device.

Prints one line per backend (available, or the first line of why not and, for the
C++ extension, the path of its full build log). Then every available backend runs
the same random batch; its loss and gradient are compared with the float64
brute-force reference, and its forward+backward is timed. ``--loss`` picks PNP,
Smooth-AP or Recall@k; ``--memory-efficient`` runs the losses on the path that stores
no Q x M buffer.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Optional

import torch

from . import __version__, backend_status, pnp_loss, recall_at_k_loss, smooth_ap_loss
from .reference import pnp_loss_reference, recall_at_k_loss_reference, smooth_ap_loss_reference


def _time_ms(fn, device, repeats):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pnp_kernels", description=__doc__)
    ap.add_argument("--batch", type=int, default=128, help="batch size B (default 128)")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension D (default 64)")
    ap.add_argument("--per-class", type=int, default=4, help="samples per class (default 4)")
    ap.add_argument("--loss", choices=("pnp", "smooth-ap", "recall-at-k"), default="pnp", help="the loss (default pnp)")
    ap.add_argument("--variant", default="Dq", help="PNP variant (default Dq)")
    ap.add_argument(
        "--memory-efficient",
        action="store_true",
        help="run the losses with memory_efficient=True (no Q x M buffer; same values)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    me: Optional[bool] = True if args.memory_efficient else None  # None: the automatic choice
    if args.loss == "pnp":
        ours = lambda x, y, **k: pnp_loss(x, y, variant=args.variant, memory_efficient=me, **k)  # noqa: E731
        oracle = lambda x, y: pnp_loss_reference(x, y, variant=args.variant)  # noqa: E731
        what = f"PNP variant {args.variant}"
    elif args.loss == "smooth-ap":
        ours = lambda x, y, **k: smooth_ap_loss(x, y, memory_efficient=me, **k)  # noqa: E731
        oracle = lambda x, y: smooth_ap_loss_reference(x, y)  # noqa: E731
        what = "Smooth-AP"
    else:
        ours = lambda x, y, **k: recall_at_k_loss(x, y, memory_efficient=me, **k)  # noqa: E731
        oracle = lambda x, y: recall_at_k_loss_reference(x, y)  # noqa: E731
        what = "Recall@k (k = 1, 2, 4, 8, 16)"
    if args.memory_efficient:
        what += ", memory-efficient path"
    status = backend_status()
    print(
        f"pnp_kernels {__version__}, torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    for name, st in status.items():
        print(f"  backend {name:7s} {'available' if st['available'] else 'unavailable: ' + st['reason']}")

    gen = torch.Generator().manual_seed(0)
    B, D = args.batch, args.dim
    E = torch.randn(B, D, generator=gen).to(device)
    y = (torch.arange(B) // args.per_class)[torch.randperm(B, generator=gen)].to(device)
    E64 = E.double().requires_grad_()
    ref = oracle(E64, y)
    (g_ref,) = torch.autograd.grad(ref, E64)

    rows, ok = [], True
    for name, st in status.items():
        if not st["available"]:
            continue
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not timing
        Ei = E.clone().requires_grad_()
        loss = ours(Ei, y, backend=name)
        (g,) = torch.autograd.grad(loss, Ei)
        loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-30)
        grad_err = ((g.double() - g_ref).norm() / g_ref.norm().clamp_min(1e-30)).item()
        good = torch.isfinite(loss).item() and loss_err <= 1e-5 and grad_err <= 1e-5
        ok &= bool(good)

        def step():
            ours(Ei, y, backend=name).backward()
            Ei.grad = None

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize()
            mem = f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:.1f} MiB above inputs"
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            step()
            mem = f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024:.1f} MiB peak RSS growth"
        ms = _time_ms(step, device, args.repeats)
        rows.append((name, loss.item(), loss_err, grad_err, ms, mem, "ok" if good else "MISMATCH"))

    ref_ms = _time_ms(lambda: oracle(E.clone().requires_grad_(), y).backward(), device, max(1, args.repeats // 2))
    print(
        f"\nB={B}, D={D}, {args.per_class} per class, {what}; "
        f"float64 reference loss {ref.item():.8f}; float32 reference fwd+bwd {ref_ms:.2f} ms"
    )
    print("| backend | loss | loss rel err | grad rel err | fwd+bwd ms (median) | memory | check |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.8f} | {r[2]:.1e} | {r[3]:.1e} | {r[4]:.3f} | {r[5]} | {r[6]} |")
    return 0 if ok and rows else 1


if __name__ == "__main__":
    sys.exit(main())
