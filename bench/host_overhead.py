"""Host (Python) overhead of one loss step: an older pnp_kernels vs this checkout, A/B in one process.

At B = 8, D = 16 on the CPU the kernels take a few microseconds, so the time of one
``pnp_loss`` forward+backward (``torch.autograd.grad``) is the Python and dispatch
overhead of the interface: validation, backend lookup, autograd Function or custom
op, the stages. Both packages run the same step on the same inputs (torch backend,
variant O, cosine, mean); every round times ``--inner`` consecutive steps of each,
in alternating order, and the table gives the median per-step time of each and the
ratios (old / new > 1: the new code is faster).

The old package is imported under another name, so both live in one process:

    git -C . archive <commit> pnp_kernels | tar -x -C /tmp/oldsrc    # read-only export
    python bench/host_overhead.py --old /tmp/oldsrc [--rounds 200 --inner 20]

``--old`` is a directory that contains the old ``pnp_kernels`` package (a checkout or
an export like the above); it is copied to a temporary directory as
``pnp_kernels_old``, which works because the package's own imports are relative.
Only its torch backend is used. Its torch.library custom ops must not share names
with the current ones (the current package registers ``pnp_kernels::square_loss_*``
and ``reference_loss_*``; versions before the backend interface registered
``pnp_kernels::pnp_loss_fwd/bwd``).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import harness  # noqa: E402  (puts the repository root on sys.path)


def load_old(path: str, name: str = "pnp_kernels_old"):
    """Import ``path``/pnp_kernels as the module ``name`` (copied to a temporary directory)."""
    src = os.path.join(path, "pnp_kernels")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        raise SystemExit(f"host_overhead: {src} is not a pnp_kernels package")
    tmp = tempfile.mkdtemp(prefix="pnp_old_")
    atexit.register(shutil.rmtree, tmp, True)
    shutil.copytree(
        src, os.path.join(tmp, name), symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc")
    )  # csrc: ext only
    sys.path.insert(0, tmp)
    return importlib.import_module(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="directory containing the old pnp_kernels package")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--D", type=int, default=16)
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--inner", type=int, default=20, help="steps per timed sample")
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args(argv)

    import pnp_kernels as new

    old = load_old(args.old)
    case = harness.Case(B=args.B, D=args.D, P=args.P)
    inp = harness.make_inputs(case, "cpu")
    x, y = inp.x, inp.labels

    def stepper(pkg):
        def one():
            return torch.autograd.grad(pkg.pnp_loss(x, y, backend="torch"), x)

        def many():
            for _ in range(args.inner):
                one()

        return one, many

    old_one, old_many = stepper(old)
    new_one, new_many = stepper(new)
    (g_old,), (g_new,) = old_one(), new_one()
    lo, ln = old.pnp_loss(x, y, backend="torch").item(), new.pnp_loss(x, y, backend="torch").item()
    samples = harness.interleave({"old": old_many, "new": new_many}, "cpu", args.rounds, args.warmup // args.inner + 1)
    per_step = {k: [t / args.inner for t in v] for k, v in samples.items()}

    print(
        f"# host overhead A/B, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {harness.cpu_model()}, "
        f"torch {torch.__version__}, python {platform.python_version()}, threads {torch.get_num_threads()}"
    )
    print(
        f"old: {old.__file__} (version {getattr(old, '__version__', '?')}); new: {new.__file__} "
        f"(version {new.__version__})"
    )
    print(
        f"pnp_loss(backend='torch') forward + autograd.grad, B = {args.B}, D = {args.D}, P = {args.P}, float32; "
        f"{args.rounds} rounds of {args.inner} steps each, alternating order"
    )
    print(f"same result: loss old {lo:.7f} new {ln:.7f}, max |grad diff| {(g_old - g_new).abs().max().item():.2e}")
    print()
    print("\n".join(harness.ratio_table(per_step, unit=1e6, unit_name="us")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
