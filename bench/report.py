"""Reporting of bench_pnp.py rows: ratios, one line per row, markdown, CSV and a PNG.

A row is a dict with provider, B, D, P, M (reference rows, "" in square mode), dtype,
status ("ok", "skipped", "OOM", "error", "timeout"), the fwd/bwd/fwd+bwd medians in
ms and their sample counts, peak_mib, compile_s, other_load and note.
Ratios (fwd+bwd, same B/D/P/M/dtype): "x ref" = reference time / this time,
"x pml" = pml time / this time, "/ floor" = this time / gemm-floor time.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import shlex
import sys

CSV_FIELDS = [
    "provider",
    "B",
    "D",
    "P",
    "M",
    "dtype",
    "status",
    "fwd_ms",
    "bwd_ms",
    "fwdbwd_ms",
    "n_fwd",
    "n_bwd",
    "n_fwdbwd",
    "peak_mib",
    "compile_s",
    "x_ref",
    "x_pml",
    "per_floor",
    "other_load",
    "note",
]
_RATIOS = (
    ("x_ref", "x ref", "reference", True),
    ("x_pml", "x pml", "pml", True),
    ("per_floor", "/ floor", "gemm-floor", False),
)


def fmt(v, spec=".3g"):
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def ms(v):
    if v is None or v == "":
        return ""
    return f"{v:.3f}" if v < 10 else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _key(r):
    return r["B"], r["D"], r["P"], r.get("M", ""), r["dtype"]


def add_ratios(rows: list) -> None:
    """Fill x_ref, x_pml and per_floor of every row from the rows of the same configuration."""
    index = {(r["provider"],) + _key(r): r for r in rows}
    for r in rows:
        t = r.get("fwdbwd_ms")
        for col, _, other, invert in _RATIOS:
            o = index.get((other,) + _key(r))
            if r["status"] != "ok" or t is None or o is None or o.get("status") != "ok" or o.get("fwdbwd_ms") is None:
                r[col] = None
                continue
            r[col] = (o["fwdbwd_ms"] / t) if invert else (t / o["fwdbwd_ms"])


def _config(r) -> str:
    m = f" M={r['M']:<6}" if r.get("M") else ""
    return f"B={r['B']:<6} D={r['D']:<4} P={r['P']:<3}{m} {r['dtype']:<8}"


def row_line(r: dict) -> str:
    """One row as it is printed while the sweep runs (no ratios: they need the whole group)."""
    head = f"{r['provider']:>19} {_config(r)}"
    if r["status"] != "ok":
        return f"{head} {r['status']}" + (f" ({r['note']})" if r.get("note") else "")
    s = (
        f"{head} fwd {ms(r.get('fwd_ms')):>8} ms  bwd {ms(r.get('bwd_ms')):>8} ms  "
        f"fwd+bwd {ms(r.get('fwdbwd_ms')):>8} ms  peak {fmt(r.get('peak_mib'), '.1f'):>8} MiB"
    )
    if r.get("compile_s"):
        s += f"  (compile+first call {r['compile_s']:.1f} s)"
    if r.get("note"):
        s += f"  [{r['note']}]"
    return s


def markdown_table(rows: list) -> str:
    hdr = [
        "provider",
        "B",
        "D",
        "P",
        "M",
        "dtype",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "n",
        "peak MiB",
        "x ref",
        "x pml",
        "/ floor",
        "note",
    ]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        ok = r["status"] == "ok"
        note = r.get("note") or ""
        if r.get("compile_s"):
            note = (note + "; " if note else "") + f"compile+first call {r['compile_s']:.1f} s"
        n = "/".join(str(r.get(k, "")) for k in ("n_fwd", "n_bwd", "n_fwdbwd")) if ok else ""
        cells = [
            r["provider"],
            str(r["B"]),
            str(r["D"]),
            str(r["P"]),
            str(r.get("M") or ""),
            r["dtype"],
            ms(r.get("fwd_ms")) if ok else r["status"],
            ms(r.get("bwd_ms")) if ok else "",
            ms(r.get("fwdbwd_ms")) if ok else "",
            n,
            fmt(r.get("peak_mib"), ".1f"),
            fmt(r.get("x_ref"), ".3g"),
            fmt(r.get("x_pml"), ".3g"),
            fmt(r.get("per_floor"), ".3g"),
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_lines(title: str, facts: list) -> list:
    """The title with a timestamp, the given facts, and the command line."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return [f"# {title}, {now}"] + list(facts) + ["command: python " + shlex.join(sys.argv)]


def write_outputs(rows: list, header: list, out_dir: str, tag: str = "") -> list:
    """bench_<tag>.csv, .md and (when matplotlib imports) .png of fwd+bwd time and peak
    memory vs B on log axes, in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = tag or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"bench_{stamp}")
    with open(base + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(header[:1]) + "\n\n" + "\n".join(f"- {h}" for h in header[1:]) + "\n\n")
        fh.write(markdown_table(rows) + "\n")
    written = [base + ".csv", base + ".md"]
    png = _plot(rows, header, base + ".png")
    if png:
        written.append(png)
    return written


def _plot(rows: list, header: list, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for r in rows:
        if r["status"] == "ok":
            series.setdefault((r["provider"], r["D"], r["P"], r.get("M") or "", r["dtype"]), []).append(r)
    multi = len({k[1:] for k in series}) > 1
    for key, rs in series.items():
        rs = sorted(rs, key=lambda r: r["B"])
        label = key[0] + (f" D={key[1]} P={key[2]}{' M=' + str(key[3]) if key[3] else ''} {key[4]}" if multi else "")
        ax_t.plot([r["B"] for r in rs], [r["fwdbwd_ms"] for r in rs], marker="o", label=label)
        mem = [(r["B"], r["peak_mib"]) for r in rs if r.get("peak_mib")]
        if mem:
            ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=label)
    for ax, yl in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (queries)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(header[1][:110] if len(header) > 1 else "", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
