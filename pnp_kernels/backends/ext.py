"""Loader of the optional C++/CUDA extension (sources in ``csrc/``), and the ext backend.

Nothing is built at import. The first call of :func:`is_available`,
:func:`why_unavailable` (``available_backends()`` calls them) or of a kernel
JIT-builds the extension with ``torch.utils.cpp_extension.load`` (ninja) and
loads it as a plain shared library whose ops live in ``torch.ops.pnp_kernels_ext``
(registered with ``TORCH_LIBRARY``, no pybind11: the library does not depend on
the Python version, and the CPU build compiles in well under a minute).

The backend offers the per-stage kernels (``rows_forward``, ``symmetric_grad``) and
the whole pipeline as one C++ op each way (``loss_forward``, ``loss_backward``,
csrc/pnp_pipeline.cpp), which ``autograd.forward_impl``/``backward_impl`` use: an
eager step is two calls from Python.

* Sources are found in, first match wins: ``$PNP_KERNELS_CSRC``,
  ``<package>/csrc``, ``<package>/_csrc`` (an installed wheel) and
  ``<package>/../csrc`` (a checkout or editable install).
* Build directory: ``$PNP_KERNELS_EXT_DIR``, else ``$TORCH_EXTENSIONS_DIR/pnp_kernels``,
  else ``$XDG_CACHE_HOME/pnp_kernels`` (``~/.cache/pnp_kernels``), with one
  subdirectory per key = hash(sources, flags, torch version, CUDA version, CPU/CUDA),
  so a rebuild happens only when one of them changes; ninja makes a second
  process's load a no-op check, and torch's file lock serialises concurrent builds.
* The CUDA kernels are compiled only when ``torch.cuda.is_available()`` and nvcc
  is found (``CUDA_HOME``); if that build fails, a CPU-only build is made and
  CUDA tensors get an error that carries the CUDA build's reason.
* ``PNP_KERNELS_NO_EXT=1`` disables the extension; ``PNP_KERNELS_EXT_VERBOSE=1``
  shows the build.
* The outcome (success or failure) is cached for the life of the process.

``python -m pnp_kernels.backends.ext`` prints the build status and a parity check
against the torch backend on every available device.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..pipeline import Prep
from ..variants import Variant

__all__ = [
    "loss_forward",
    "loss_backward",
    "rows_forward",
    "symmetric_grad",
    "is_available",
    "why_unavailable",
    "cuda_status",
    "build_info",
    "source_dir",
]

_SOURCES = ("pnp_common.h", "pnp_cpu.cpp", "pnp_pipeline.cpp", "pnp_cuda.cu")
_CXX_FLAGS = ["-O3", "-std=c++17", "-fno-trapping-math"]  # lets GCC if-convert (vectorise) the selects
# The library is built on the machine that runs it, so it may use that CPU's vector units
# (AVX2/AVX-512: 2-4x the SSE2 baseline in the sigmoid loop). The CPU model and flags are
# part of the cache key; PNP_KERNELS_EXT_PORTABLE=1 builds for the x86-64 baseline.
_NATIVE_FLAGS = ["-march=native", "-ffp-contract=off"]  # no FMA contraction: same rounding as the baseline build
_CUDA_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
_NAMESPACE = "pnp_kernels_ext"
_BUILD_LOG_LINES = 25

_lock = threading.Lock()
_state: Optional[dict] = None  # set once per process: {"ok", "reason", "cuda", "cuda_reason", ...}


def _pkg_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def source_dir() -> Optional[Path]:
    """Where the extension's sources are, or None when they did not travel with this install."""
    candidates: List[Path] = []
    env = os.environ.get("PNP_KERNELS_CSRC")
    if env:
        candidates.append(Path(env))
    pkg = _pkg_dir()
    candidates += [pkg / "csrc", pkg / "_csrc", pkg.parent / "csrc"]
    for c in candidates:
        if all((c / f).is_file() for f in ("pnp_common.h", "pnp_cpu.cpp", "pnp_pipeline.cpp")):
            return c
    return None


def _cache_root() -> Path:
    env = os.environ.get("PNP_KERNELS_EXT_DIR")
    if env:
        return Path(env)
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env) / "pnp_kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pnp_kernels"


def _openmp_flags() -> List[str]:
    # at::parallel_for runs serially unless the extension is compiled with OpenMP
    # when torch itself uses OpenMP (torch's own libgomp is reused at load time).
    try:
        if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
            return ["-fopenmp"]
    except Exception:
        pass
    return ["-fopenmp-simd"] if sys.platform.startswith("linux") else []


def _tail(text: str, n: int = _BUILD_LOG_LINES) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _quick_reason(src: Optional[Path]) -> str:
    """Reasons that need no compiler run (the fast failure path)."""
    if os.environ.get("PNP_KERNELS_NO_EXT", "0") not in ("", "0"):
        return "disabled by PNP_KERNELS_NO_EXT"
    if src is None:
        return "extension sources (csrc/) not found next to the package"
    try:
        from torch.utils import cpp_extension  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken torch install
        return f"torch.utils.cpp_extension failed to import: {exc!r}"
    if not cpp_extension.is_ninja_available():
        return "ninja not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; set CXX)"
    return ""


def _cuda_wanted() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


def _native_flags() -> List[str]:
    if os.environ.get("PNP_KERNELS_EXT_PORTABLE", "0") not in ("", "0"):
        return []
    import platform

    return list(_NATIVE_FLAGS) if platform.machine() in ("x86_64", "AMD64") else []


def _cpu_signature() -> str:
    """The CPU model and feature flags: a -march=native build is only valid on such a CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
        return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]
    except OSError:
        import platform

        return platform.processor()


def _build(src: Path, with_cuda: bool) -> str:
    """JIT-build and load the library; returns the build directory."""
    from torch.utils.cpp_extension import load

    sources = [src / "pnp_cpu.cpp", src / "pnp_pipeline.cpp"] + ([src / "pnp_cuda.cu"] if with_cuda else [])
    cflags = _CXX_FLAGS + _openmp_flags() + _native_flags()
    cuda_flags = list(_CUDA_FLAGS)
    h = hashlib.sha256()
    for f in _SOURCES:
        p = src / f
        if p.is_file():
            h.update(f.encode() + b"\0" + p.read_bytes() + b"\0")
    key_parts = [
        torch.__version__,
        str(torch.version.cuda),
        str(with_cuda),
        " ".join(cflags),
        " ".join(cuda_flags) if with_cuda else "",
        os.environ.get("CXX", "c++"),
        os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        _cpu_signature() if _native_flags() else "",
    ]
    h.update("|".join(key_parts).encode())
    digest = h.hexdigest()[:16]
    name = f"pnp_kernels_ext_{digest}"
    tag = f"torch{torch.__version__.split('+')[0]}-{'cuda' if with_cuda else 'cpu'}"
    build_dir = _cache_root() / f"{tag}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("PNP_KERNELS_EXT_VERBOSE", "0") not in ("", "0")
    load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags if with_cuda else None,
        extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else None,
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    return str(build_dir)


def _ops_loaded() -> bool:
    try:
        ns = getattr(torch.ops, _NAMESPACE)
        return all(hasattr(ns, op) for op in ("rows_forward", "symmetric_grad", "loss_forward", "loss_backward"))
    except Exception:
        return False


def _ensure() -> dict:
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        src = source_dir()
        st = {"ok": False, "reason": "", "cuda": False, "cuda_reason": "", "build_dir": None,
              "source_dir": str(src) if src else None, "build_s": 0.0}
        reason = _quick_reason(src)
        if reason:
            st["reason"] = reason
            _state = st
            return st
        want_cuda, cuda_reason = _cuda_wanted()
        t0 = time.perf_counter()
        if want_cuda:
            try:
                st["build_dir"] = _build(src, with_cuda=True)
                st["ok"], st["cuda"] = True, True
            except Exception as exc:
                cuda_reason = "CUDA build failed:\n" + _tail(exc)
        if not st["ok"]:
            st["cuda_reason"] = cuda_reason
            try:
                st["build_dir"] = _build(src, with_cuda=False)
                st["ok"] = True
            except Exception as exc:
                st["reason"] = "C++ extension build failed:\n" + _tail(exc)
        if st["ok"] and not _ops_loaded():
            st["ok"] = False
            st["reason"] = f"the built library did not register torch.ops.{_NAMESPACE}"
        st["build_s"] = time.perf_counter() - t0
        _state = st
        return st


def is_available() -> bool:
    """True when the extension is built and loaded (builds it on the first call)."""
    return _ensure()["ok"]


def why_unavailable() -> str:
    """"" when available; otherwise why not (builds on the first call)."""
    st = _ensure()
    return "" if st["ok"] else st["reason"]


def cuda_status() -> str:
    """"" when the CUDA kernels are built in; otherwise why not."""
    st = _ensure()
    if not st["ok"]:
        return st["reason"]
    return "" if st["cuda"] else st["cuda_reason"]


def build_info() -> dict:
    """The cached build outcome: ok, reason, cuda, cuda_reason, build_dir, source_dir, build_s."""
    return dict(_ensure())


def _ops():
    st = _ensure()
    if not st["ok"]:
        raise RuntimeError(f"backend='ext' is unavailable: {st['reason']}")
    return getattr(torch.ops, _NAMESPACE)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu":
        return
    if t.device.type == "cuda":
        st = _ensure()
        if not st["cuda"]:
            raise RuntimeError(
                f"backend='ext' has no CUDA kernels in this process ({st['cuda_reason']}); "
                "use backend='triton' or 'torch' for CUDA tensors"
            )
        return
    raise RuntimeError(f"backend='ext' supports CPU and CUDA tensors, got {t.device}")


def loss_forward(E: torch.Tensor, labels: torch.Tensor, variant: Variant, anneal: float, alpha: float, b: float,
                 cosine: bool, mean: bool, compute_grad: bool):
    """The whole forward of ``autograd.forward_impl`` in one C++ op (csrc/pnp_pipeline.cpp).

    Returns (output, Prep, n_valid, G or None), as ``forward_impl``.
    """
    ops = _ops()
    _check_device(E)
    out, Xs, perm, lo, hi, denom, n_valid, G = ops.loss_forward(
        E, labels, int(variant.code), float(anneal), float(alpha), float(b), bool(cosine), bool(mean),
        bool(compute_grad))
    return out, Prep(Xs, perm, lo, hi, denom), n_valid, (G if compute_grad else None)


def loss_backward(grad_out: torch.Tensor, prep: Prep, n_valid: torch.Tensor, G: torch.Tensor, cosine: bool,
                  mean: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """dL/dE of ``autograd.backward_impl`` in one C++ op (csrc/pnp_pipeline.cpp)."""
    return _ops().loss_backward(grad_out, *prep, n_valid, G, bool(cosine), bool(mean), out_dtype)


def rows_forward(
    S: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    variant: Variant,
    anneal: float,
    alpha: float,
    b: float,
    compute_grad: bool,
):
    """Per-row PNP loss of a float32/float64 (queries x gallery) block, and its dS if asked."""
    ops = _ops()
    _check_device(S)
    if S.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ext backend computes in float32 or float64, got similarities of dtype {S.dtype}")
    if S.dim() == 2 and S.shape[1] > 0 and S.stride(1) != 1:
        S = S.contiguous()
    lo = lo.to(device=S.device, dtype=torch.int32).contiguous()
    hi = hi.to(device=S.device, dtype=torch.int32).contiguous()
    if S.device.type == "cpu" and lo.numel():  # free on the CPU; a CUDA check would synchronise
        bad = ((hi - lo) >= 2) & ((lo < 0) | (hi > S.shape[1]))
        if bool(bad.any()):
            raise RuntimeError(
                f"ext rows_forward: the positive segment of row {int(bad.nonzero()[0, 0])} "
                f"is out of range for {S.shape[1]} columns"
            )
    loss, G = ops.rows_forward(S, lo, hi, int(variant.code), float(anneal), float(alpha), float(b), bool(compute_grad))
    return loss, (G if compute_grad else None)


def symmetric_grad(G: torch.Tensor, row_grad: torch.Tensor) -> torch.Tensor:
    """diag(g) G + (diag(g) G)^T for a square G, in one pass."""
    ops = _ops()
    _check_device(G)
    if G.shape[1] > 0 and G.stride(1) != 1:
        G = G.contiguous()
    g = row_grad.to(device=G.device, dtype=G.dtype).contiguous()
    return ops.symmetric_grad(G, g)


def _segments(labels: torch.Tensor):
    """(lo, hi, perm) of a label vector: each sorted row's class is the segment [lo, hi)."""
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, side="left", out_int32=True)
    hi = torch.searchsorted(sorted_labels, sorted_labels, side="right", out_int32=True)
    return lo, hi, perm


def _selfcheck() -> int:  # pragma: no cover - manual / GPU-machine tool
    """Build status, then ext vs torch backend parity on every available device."""
    from . import torch as torch_backend
    from ..variants import VARIANTS

    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), python {sys.version.split()[0]}")
    t0 = time.perf_counter()
    st = build_info()
    print(f"ext build: ok={st['ok']} cuda={st['cuda']} in {time.perf_counter() - t0:.1f} s")
    print(f"  sources: {st['source_dir']}\n  build dir: {st['build_dir']}")
    if not st["ok"]:
        print(f"  reason: {st['reason']}")
        return 1
    if st["cuda_reason"]:
        print(f"  CUDA kernels: {st['cuda_reason']}")
    devices = ["cpu"] + (["cuda"] if st["cuda"] else [])
    worst = 0.0
    failures = 0
    for dev in devices:
        gen = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float64):
            for B, n_cls in ((64, 16), (300, 37), (9, 1), (7, 7), (1030, 256)):
                labels = torch.randint(0, n_cls, (B,), generator=gen)
                X = torch.nn.functional.normalize(torch.randn(B, 32, generator=gen, dtype=torch.float64), dim=1)
                lo, hi, perm = _segments(labels)
                Xs = X[perm]
                S64 = Xs @ Xs.t()
                g64 = torch.rand(B, generator=gen, dtype=torch.float64)
                for v in VARIANTS.values():
                    ref_l, ref_G = torch_backend.rows_forward(S64, lo, hi, v, 0.05, 1.3, 2.0, True)
                    ref_H = torch_backend.symmetric_grad(ref_G, g64)
                    S = S64.to(dev, dtype)
                    l, G = rows_forward(S, lo.to(dev), hi.to(dev), v, 0.05, 1.3, 2.0, True)
                    l2, G2 = rows_forward(S, lo.to(dev), hi.to(dev), v, 0.05, 1.3, 2.0, True)
                    H = symmetric_grad(G, g64.to(dev, dtype))
                    det = torch.equal(l, l2) and torch.equal(G, G2)
                    errs = []
                    for a, r in ((l, ref_l), (G, ref_G), (H, ref_H)):
                        a = a.double().cpu()
                        errs.append(float((a - r).norm() / r.norm().clamp_min(1e-300)))
                    finite = all(bool(torch.isfinite(t).all()) for t in (l, G, H))
                    tol = 1e-5 if dtype == torch.float32 else 1e-11
                    ok = det and finite and max(errs) <= tol
                    worst = max(worst, max(errs)) if dtype == torch.float32 else worst
                    if not ok:
                        failures += 1
                        print(f"  FAIL {dev} {dtype} B={B} classes={n_cls} {v.name}: rel err loss/G/H "
                              f"{errs[0]:.2e}/{errs[1]:.2e}/{errs[2]:.2e} deterministic={det} finite={finite}")
        print(f"  {dev}: parity vs torch backend float64 done")
    print(f"worst float32 relative error: {worst:.2e}; failures: {failures}")
    print("OK" if failures == 0 else "FAILED")
    return 0 if failures == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_selfcheck())
