"""Interleaved A/B timing of forward+backward: the speed ratio of providers in one process.

    python bench/ab_ratio.py --providers torch ext --B 384 --D 128 --P 4 [--rounds 60]
    python bench/ab_ratio.py --providers smooth-ap-torch torch pml-smooth-ap --B 384
    python bench/ab_ratio.py --providers torch:B=2048 refset-torch:B=256 --M 2048

Every round runs one forward+backward of each provider, in rotating order, so drift
of the machine's speed (large on a shared VM: the same step measured 4.4 ms in one
process and 9 ms in the next) hits all of them alike. It prints each provider's
median, min and max, the ratio of the first provider's median to each median, and
the median of the per-round ratios. CPU or CUDA (synchronised per call).

Providers (the first is the baseline):
  torch, triton, ext                         pnp_loss(backend=...), square batch
  smooth-ap-torch, smooth-ap-triton, smooth-ap-ext
                                             smooth_ap_loss(backend=...), square batch
  refset-torch, refset-triton, refset-ext    pnp_loss against a reference set: B
                                             queries vs M reference rows (--M; 0: 8 B)
  pml, pml-smooth-ap                         pytorch-metric-learning PNPLoss,
                                             SmoothAPLoss (class-sorted labels: when it
                                             runs, every provider gets class-sorted labels)
  reference, reference-compiled, reference-smooth-ap
                                             the B^3 autograd formulations
  gemm-floor                                 the GEMMs alone
A provider may override the configuration: NAME:key=value[,key=value] with keys
B, D, P, M (e.g. torch:B=2048 for the square case next to refset-torch:B=256).
Providers with the same configuration share one set of inputs. A provider may also
run its own number of rounds (key rounds, e.g. pml-smooth-ap:rounds=3, for one that
takes seconds); it then takes part in the first that many rounds only, and its
per-round ratios use those rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import harness  # noqa: E402
import providers  # noqa: E402

_KEYS = {"B", "D", "P", "M", "rounds"}


def parse_provider(spec: str):
    """'name[:k=v,...]' -> (name, overrides dict)."""
    name, _, rest = spec.partition(":")
    over = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in _KEYS or not v.isdigit():
            raise ValueError(f"--providers {spec!r}: expected NAME:key=int[,key=int] with keys {sorted(_KEYS)}")
        over[k] = int(v)
    if name not in providers.PROVIDERS:
        raise ValueError(f"--providers: unknown provider {name!r}; known: {', '.join(providers.NAMES)}")
    return name, over


def run(args) -> dict:
    """{label: samples in seconds} of the interleaved rounds, and prints the table."""
    device = torch.device(args.device)
    specs = [parse_provider(s) for s in args.providers]
    base = harness.Case(
        B=args.B,
        D=args.D,
        P=args.P,
        M=args.M or None,
        seed=args.seed,
        variant=args.variant,
        anneal=args.anneal,
        temperature=args.temperature,
        compile_max_B=args.compile_max_B,
        sorted_labels=args.sorted_labels,
    )
    base = providers.case_for([n for n, _ in specs], base)
    inputs, steps, rounds, cases = {}, {}, {}, {}
    for spec, (name, over) in zip(args.providers, specs):
        why = providers.why_unavailable(name, device)
        if why:
            raise SystemExit(f"ab_ratio: provider {name} is unavailable here: {why}")
        case = dataclasses.replace(base, **{k: v for k, v in over.items() if k != "rounds"})
        if over.get("M") == 0:
            case = dataclasses.replace(case, M=None)
        refset = providers.uses_reference_set(name)
        key = (case, refset)
        if key not in inputs:
            inputs[key] = harness.make_inputs(case, device, with_ref=refset)
        steps[spec] = providers.build(name, inputs[key], case).fwdbwd
        rounds[spec] = min(over.get("rounds", args.rounds), args.rounds)
        cases[spec] = case

    samples = {s: [] for s in steps}
    warm = {s: min(args.warmup, rounds[s]) for s in steps}
    for s, fn in steps.items():
        for _ in range(warm[s]):
            fn()
    for r in range(args.rounds):
        live = [s for s in steps if r < rounds[s]]
        got = harness.interleave({s: steps[s] for s in live[r % len(live) :] + live[: r % len(live)]}, device, 1, 0)
        for s, v in got.items():
            samples[s] += v

    who = harness.cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"# A/B fwd+bwd, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {who}, "
        f"torch {torch.__version__}, python {platform.python_version()}, threads {torch.get_num_threads()}"
    )
    print(
        f"{base.dtype}, variant {args.variant}, anneal {args.anneal}, temperature {args.temperature}, labels "
        f"{'class-sorted' if base.sorted_labels else 'shuffled'}, {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-ups"
    )
    for s in steps:
        c = cases[s]
        m = f", M = {c.n_ref}" if providers.uses_reference_set(parse_provider(s)[0]) else ""
        extra = f", {rounds[s]} rounds" if rounds[s] != args.rounds else ""
        print(f"  {s}: B = {c.B}, D = {c.D}, P = {c.P}{m}{extra}")
    print()
    print("\n".join(harness.ratio_table(samples)))
    return samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--providers",
        nargs="+",
        default=["torch", "ext"],
        help="two or more NAME[:key=value,...]; the first is the baseline",
    )
    ap.add_argument("--B", type=int, default=384, help="batch size (queries in reference-set mode)")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--P", type=int, default=4, help="samples per class")
    ap.add_argument("--M", type=int, default=0, help="reference rows of the refset-* providers (0: 8 B)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", default="O")
    ap.add_argument("--anneal", type=float, default=0.01)
    ap.add_argument("--temperature", type=float, default=0.01, help="Smooth-AP temperature")
    ap.add_argument("--sorted-labels", action="store_true", help="class-sorted labels instead of shuffled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-max-B", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.providers) < 2:
        ap.error("--providers: give at least two (the first is the baseline)")
    try:
        run(args)
    except ValueError as exc:
        ap.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
