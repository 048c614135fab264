"""Build and load the optional C++/CUDA extension (sources in ``csrc/``).

Nothing is built at import. The first call of :func:`ops`, :func:`is_available`,
:func:`why_unavailable`, :func:`cuda_status` or :func:`build_info` JIT-builds the
extension with ``torch.utils.cpp_extension.load`` (ninja) and loads it as a plain
shared library whose ops live in ``torch.ops.pnp_kernels_ext`` (registered with
``TORCH_LIBRARY``, no pybind11: the library does not depend on the Python version).
The op schemas are documented in ``csrc/pnp_common.h`` and ``csrc/pnp_pipeline.cpp``.

* Language standard: none is passed; ``torch.utils.cpp_extension`` adds the one the
  installed torch's headers need (they use C++20 ``requires`` clauses from torch
  2.14 on), for the C++ and the CUDA compiler alike.
* Sources are found in, first match wins: ``$PNP_KERNELS_CSRC``,
  ``<package>/csrc``, ``<package>/_csrc`` (an installed wheel) and
  ``<package>/../csrc`` (a checkout or editable install).
* Build directory: ``$PNP_KERNELS_EXT_DIR``, else ``$TORCH_EXTENSIONS_DIR/pnp_kernels``,
  else ``$XDG_CACHE_HOME/pnp_kernels`` (``~/.cache/pnp_kernels``), with one
  subdirectory per key = hash(sources, flags, torch version, CUDA version, CPU/CUDA),
  so a rebuild happens only when one of them changes; a later process loads the
  finished build directly, and torch's file lock serialises concurrent builds.
  Each build writes its full outcome (flags, and on failure the whole compiler
  output) to ``build.log`` in its directory; reasons keep only the first line.
* The CUDA kernels are compiled only when ``torch.cuda.is_available()`` and nvcc
  is found (``CUDA_HOME``); if that build fails, a CPU-only build is made and
  :func:`cuda_status` carries the CUDA build's reason.
* A build prints one line to stderr when it starts and one when it ends (or fails);
  ``PNP_KERNELS_QUIET=1`` silences them. A finished build of the same key (its log
  ends in "ok in ...") is loaded directly, silently, without importing
  ``torch.utils.cpp_extension``; the compiler machinery is imported only to build, with
  its logger at ERROR level (its import warns about CUDA_HOME on CPU-only machines).
* ``PNP_KERNELS_NO_EXT=1`` disables the extension; ``PNP_KERNELS_EXT_VERBOSE=1``
  shows the build; ``PNP_KERNELS_EXT_PORTABLE=1`` builds for the x86-64 baseline
  instead of the host CPU.
* The outcome (success or failure) is cached for the life of the process.

``python -m pnp_kernels.backends.ext_build`` builds, prints the status and checks the
rows op against ``pnp_kernels.reference.row_losses_reference`` on every built device.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

__all__ = [
    "ops",
    "is_available",
    "why_unavailable",
    "cuda_status",
    "build_info",
    "source_dir",
    "torch_std_flag",
]

NAMESPACE = "pnp_kernels_ext"
OP_NAMES = ("row_losses_and_dS", "symmetrize", "loss_forward", "loss_backward")
LOG_NAME = "build.log"

_SOURCES = ("pnp_variants.h", "pnp_common.h", "pnp_cpu.cpp", "pnp_pipeline.cpp", "pnp_tiled.cpp", "pnp_cuda.cu")
_REQUIRED = ("pnp_variants.h", "pnp_common.h", "pnp_cpu.cpp", "pnp_pipeline.cpp", "pnp_tiled.cpp")
# -fno-trapping-math lets GCC if-convert (and so vectorise) the selects of the sigmoid loop.
_CXX_FLAGS = ["-O3", "-fno-trapping-math"]
# The library is built on the machine that runs it, so it may use that CPU's vector units
# (AVX2/AVX-512: 2-4x the SSE2 baseline in the sigmoid loop). The CPU model and flags are
# part of the cache key. No FMA contraction: the same rounding as a baseline build.
_NATIVE_FLAGS = ["-march=native", "-ffp-contract=off"]
_CUDA_FLAGS = ["-O3", "-lineinfo"]

_lock = threading.Lock()
_state: Optional[dict] = None  # set once per process (see _ensure)


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
        if all((c / f).is_file() for f in _REQUIRED):
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


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _openmp_flags() -> List[str]:
    # at::parallel_for runs serially unless the extension is compiled with OpenMP
    # when torch itself uses OpenMP (torch's own libgomp is reused at load time).
    try:
        if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
            return ["-fopenmp"]
    except Exception:
        pass
    return ["-fopenmp-simd"] if sys.platform.startswith("linux") else []


def _native_flags() -> List[str]:
    if _env_flag("PNP_KERNELS_EXT_PORTABLE"):
        return []
    import platform

    return list(_NATIVE_FLAGS) if platform.machine() in ("x86_64", "AMD64") else []


def _cpu_signature() -> str:
    """The CPU model and feature flags: a -march=native build is only valid on such a CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]
    except OSError:
        import platform

        return platform.processor()


@contextlib.contextmanager
def _compiler_machinery() -> Iterator:
    """``torch.utils.cpp_extension``, imported (and used) with its logger at ERROR level.

    Importing it logs a warning on a CPU-only machine where a CUDA toolkit directory exists
    ("No CUDA runtime is found, using CUDA_HOME=..."): nothing a user of the CPU build can act
    on. The level is restored afterwards; ``PNP_KERNELS_EXT_VERBOSE=1`` leaves it alone.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    old = logger.level
    if not _env_flag("PNP_KERNELS_EXT_VERBOSE"):
        logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        yield cpp_extension
    finally:
        logger.setLevel(old)


def _say(line: str) -> None:
    """One line to stderr about a build, unless ``PNP_KERNELS_QUIET=1``."""
    if not _env_flag("PNP_KERNELS_QUIET"):
        print(line, file=sys.stderr, flush=True)


def _ninja_available() -> bool:
    # torch.utils.cpp_extension's check (it runs `ninja --version`), without importing it
    try:
        subprocess.run(["ninja", "--version"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except Exception:
        return False
    return True


def torch_std_flag() -> str:
    """The ``-std=`` flag torch.utils.cpp_extension compiles extensions with (e.g. ``-std=c++20``).

    The JIT build never passes one (torch adds its own); this is for tools that call a
    compiler directly on the same headers (bench/compile_check.py). Asked of torch's own
    ninja-file writer, else read from its source; "-std=c++17" if neither answers.
    """
    with _compiler_machinery() as ce:
        return _torch_std_flag(ce)


def _torch_std_flag(ce) -> str:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "build.ninja")
            ce._write_ninja_file_to_build_library(
                path, "probe", [os.path.join(tmp, "probe.cpp")], [], [], [], [], [], False, False, False
            )
            m = _std_in(Path(path).read_text(), "cflags")
            if m:
                return m
    except Exception:
        pass
    try:
        found = re.findall(r"['\"](-std=c\+\+\d+)['\"]", Path(ce.__file__).read_text())
        if found:
            return max(found, key=lambda f: int(f.rsplit("+", 1)[1]))
    except Exception:
        pass
    return "-std=c++17"


def _std_in(ninja_text: str, var: str) -> str:
    """The -std flag on the ``var = ...`` line of a build.ninja, or ""."""
    for line in ninja_text.splitlines():
        if line.startswith(var + " ="):
            m = re.findall(r"-std=\S+", line)
            return m[-1] if m else ""
    return ""


def _first_line(text: str) -> str:
    """The most telling line of a build failure: the first compiler or linker error, else the first line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    telling = re.compile(r"\berror\b:|cannot find|undefined reference|No such file")
    for skip_collect2 in (True, False):
        for ln in lines:
            if ln.startswith("Error building extension") or (skip_collect2 and ln.startswith("collect2")):
                continue
            if telling.search(ln):
                return ln[:300]
    return lines[0][:300] if lines else "unknown error"


def _quick_reason(src: Optional[Path]) -> str:
    """Reasons that need no compiler run (the fast failure path; no build log)."""
    if _env_flag("PNP_KERNELS_NO_EXT"):
        return "disabled by PNP_KERNELS_NO_EXT"
    if src is None:
        return "extension sources (csrc/) not found next to the package"
    if not _ninja_available():
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
    with _compiler_machinery() as ce:
        CUDA_HOME = ce.CUDA_HOME
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


class _BuildError(Exception):
    def __init__(self, reason: str, build_dir: str, log_path: str):
        super().__init__(reason)
        self.reason, self.build_dir, self.log_path = reason, build_dir, log_path


def _build(src: Path, with_cuda: bool) -> dict:
    """JIT-build and load the library. Returns {build_dir, log_path, std, cuda_std};
    raises _BuildError (first line of the failure, full text in the log file).

    A finished build of the same key is loaded as it is, without the compiler machinery and
    silently; a build says so on stderr, in one line when it starts and one when it ends.
    """
    sources = [src / f for f in ("pnp_cpu.cpp", "pnp_pipeline.cpp", "pnp_tiled.cpp")] + (
        [src / "pnp_cuda.cu"] if with_cuda else []
    )
    cflags = _CXX_FLAGS + _openmp_flags() + _native_flags()
    cuda_flags = list(_CUDA_FLAGS) if with_cuda else []
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
        " ".join(cuda_flags),
        os.environ.get("CXX", "c++"),
        os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        _cpu_signature() if _native_flags() else "",
    ]
    h.update("|".join(key_parts).encode())
    digest = h.hexdigest()[:16]
    name = f"{NAMESPACE}_{digest}"
    tag = f"torch{torch.__version__.split('+')[0]}-{'cuda' if with_cuda else 'cpu'}"
    build_dir = _cache_root() / f"{tag}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / LOG_NAME
    header = [
        f"pnp_kernels extension build ({'CPU + CUDA' if with_cuda else 'CPU'})",
        f"torch {torch.__version__} (cuda {torch.version.cuda}), python {sys.version.split()[0]}",
        f"sources: {src}",
        f"extra C++ flags: {' '.join(cflags)}",
    ]
    if with_cuda:
        header.append(f"extra CUDA flags: {' '.join(cuda_flags)}")
    if _load_cached(build_dir, name, log_path):
        return _build_result(build_dir, log_path)
    what, expected = ("C++/CUDA", "a few minutes") if with_cuda else ("C++", "about 30 s")
    _say(
        f"pnp_kernels: building the {what} extension for torch {torch.__version__} "
        f"(first use; {expected}; cached in {build_dir})"
    )
    t0 = time.perf_counter()
    try:
        _jit_load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags if with_cuda else None,
            extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else None,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=_env_flag("PNP_KERNELS_EXT_VERBOSE"),
        )
    except Exception as exc:
        text = f"{exc}\n\n{traceback.format_exc()}"
        _write_log(log_path, header + [f"FAILED after {time.perf_counter() - t0:.1f} s", "", text])
        _say(
            f"pnp_kernels: the {what} extension build failed after {time.perf_counter() - t0:.0f} s: "
            f"{_first_line(str(exc))} (full build log: {log_path})"
        )
        raise _BuildError(_first_line(str(exc)), str(build_dir), str(log_path)) from None
    result = _build_result(build_dir, log_path)
    std, cuda_std = result["std"], result["cuda_std"]
    _write_log(
        log_path,
        header
        + [
            f"language standard (from torch): C++ {std or '?'}" + (f", CUDA {cuda_std or '?'}" if with_cuda else ""),
            f"{_OK_PREFIX}{time.perf_counter() - t0:.1f} s",
        ],
    )
    _say(f"pnp_kernels: built the {what} extension in {time.perf_counter() - t0:.0f} s")
    return result


_OK_PREFIX = "ok in "  # the last line of the build log of a finished build


def _jit_load(**kwargs) -> None:
    """``torch.utils.cpp_extension.load`` (compile with ninja if needed, then load)."""
    with _compiler_machinery() as ce:
        ce.load(**kwargs)


def _library_path(build_dir: Path, name: str) -> Path:
    return build_dir / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"


def _load_cached(build_dir: Path, name: str, log_path: Path) -> bool:
    """Load the library of a finished build of this key (its log ends in "ok in ..."); False
    when there is none, or it does not load (then it is built again)."""
    lib = _library_path(build_dir, name)
    try:
        lines = log_path.read_text().splitlines()
    except OSError:
        return False
    if not lib.is_file() or not lines or not lines[-1].startswith(_OK_PREFIX):
        return False
    try:
        torch.ops.load_library(str(lib))
    except Exception:
        return False
    return True


def _build_result(build_dir: Path, log_path: Path) -> dict:
    """{build_dir, log_path, std, cuda_std} of a build directory (the -std flags from its build.ninja)."""
    ninja = build_dir / "build.ninja"
    ninja_text = ninja.read_text() if ninja.is_file() else ""
    return {
        "build_dir": str(build_dir),
        "log_path": str(log_path),
        "std": _std_in(ninja_text, "cflags"),
        "cuda_std": _std_in(ninja_text, "cuda_cflags"),
    }


def _write_log(path: Path, lines: List[str]) -> None:
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError:
        pass


def _ops_loaded() -> bool:
    try:
        ns = getattr(torch.ops, NAMESPACE)
        return all(hasattr(ns, op) for op in OP_NAMES)
    except Exception:
        return False


def _with_log(reason: str, log_path: Optional[str]) -> str:
    first = reason.splitlines()[0] if reason else ""
    return f"{first} (full build log: {log_path})" if log_path else first


def _ensure() -> dict:
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        src = source_dir()
        st = {
            "ok": False,
            "reason": "",
            "cuda": False,
            "cuda_reason": "",
            "build_dir": None,
            "log_path": None,
            "cuda_log_path": None,
            "source_dir": str(src) if src else None,
            "build_s": 0.0,
            "std": "",
            "cuda_std": "",
        }
        reason = _quick_reason(src)
        if reason or src is None:
            st["reason"] = reason
            _state = st
            return st
        want_cuda, cuda_reason = _cuda_wanted()
        t0 = time.perf_counter()
        if want_cuda:
            try:
                st.update(_build(src, with_cuda=True))
                st["ok"], st["cuda"] = True, True
                st["cuda_log_path"] = st["log_path"]
            except _BuildError as exc:
                st["cuda_log_path"] = exc.log_path
                cuda_reason = _with_log(f"CUDA build failed: {exc.reason}", exc.log_path)
        if not st["ok"]:
            st["cuda_reason"] = cuda_reason
            try:
                st.update(_build(src, with_cuda=False))
                st["ok"] = True
            except _BuildError as exc:
                st["build_dir"], st["log_path"] = exc.build_dir, exc.log_path
                st["reason"] = f"C++ extension build failed: {exc.reason}"
        if st["ok"] and not _ops_loaded():
            st["ok"] = False
            st["reason"] = f"the built library did not register torch.ops.{NAMESPACE}"
        st["build_s"] = time.perf_counter() - t0
        _state = st
        return st


def is_available() -> bool:
    """True when the extension is built and loaded (builds it on the first call)."""
    return _ensure()["ok"]


def why_unavailable() -> str:
    """Empty when available; otherwise the first line of why not plus the full build log's path."""
    st = _ensure()
    return "" if st["ok"] else _with_log(st["reason"], st["log_path"])


def cuda_status() -> str:
    """Empty when the CUDA kernels are built in; otherwise why not."""
    st = _ensure()
    if not st["ok"]:
        return why_unavailable()
    return "" if st["cuda"] else st["cuda_reason"]


def build_info() -> dict:
    """The cached build outcome: ok, reason, cuda, cuda_reason, build_dir, log_path,
    cuda_log_path, source_dir, build_s, std and cuda_std (the -std flags torch chose)."""
    return dict(_ensure())


def ops():
    """The ``torch.ops.pnp_kernels_ext`` namespace (builds on the first call)."""
    st = _ensure()
    if not st["ok"]:
        raise RuntimeError(f"backend='ext' is unavailable: {why_unavailable()}")
    return getattr(torch.ops, NAMESPACE)


def _segments(labels: torch.Tensor, min_size: int = 1):
    """(lo, hi, perm) of a label vector; classes of fewer than min_size rows get empty segments."""
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, side="left", out_int32=True)
    hi = torch.searchsorted(sorted_labels, sorted_labels, side="right", out_int32=True)
    hi = torch.where(hi - lo >= min_size, hi, lo)
    return lo, hi, perm


def _selfcheck() -> int:  # pragma: no cover - manual / GPU-machine tool
    """Build status, then the rows op against the float64 reference on every built device."""
    from ..reference import row_losses_reference
    from ..variants import LOSS_KINDS, VARIANTS

    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), python {sys.version.split()[0]}")
    t0 = time.perf_counter()
    st = build_info()
    print(f"ext build: ok={st['ok']} cuda={st['cuda']} in {time.perf_counter() - t0:.1f} s")
    print(f"  sources: {st['source_dir']}\n  build dir: {st['build_dir']}\n  build log: {st['log_path']}")
    stds = f"C++ {st['std'] or '?'}" + (f", CUDA {st['cuda_std']}" if st["cuda"] else "")
    print(f"  language standard (torch's choice): {stds}")
    if not st["ok"]:
        print(f"  reason: {why_unavailable()}")
        return 1
    if st["cuda_reason"]:
        print(f"  CUDA kernels: {st['cuda_reason']}")
    o = ops()
    devices = ["cpu"] + (["cuda"] if st["cuda"] else [])
    worst = {torch.float32: 0.0, torch.float64: 0.0}
    failures = 0
    gen = torch.Generator().manual_seed(0)
    cases = []
    for Q, M, n_cls in ((64, 64, 16), (40, 90, 9), (9, 9, 1), (7, 7, 7), (50, 300, 3)):
        labels = torch.randint(0, n_cls, (M,), generator=gen)
        lo, hi, _ = _segments(labels)
        rows = torch.randint(0, M, (Q,), generator=gen)  # queries take their segments from gallery rows
        lo, hi = lo[rows].contiguous(), hi[rows].contiguous()
        hi[::5] = lo[::5]  # some dropped rows
        S64 = torch.nn.functional.normalize(torch.randn(Q + M, 16, generator=gen, dtype=torch.float64), dim=1)
        S64 = S64[:Q] @ S64[Q:].t()
        cases.append((S64, lo, hi))
    ks, k_temps = [1.0, 2.0, 4.0], [1.0, 2.0, 4.0]  # Recall@k's k values and tau2_k
    for dev in devices:
        for S64, lo, hi in cases:
            w = 0.5 + torch.rand(S64.shape[0], generator=gen, dtype=torch.float64)
            own = lo.clone()  # own columns: a segment's first column on odd rows, none on even rows
            own[::2] = -1
            for kind_name, kind in LOSS_KINDS.items():
                for v in VARIANTS.values() if kind_name == "pnp" else (VARIANTS["O"],):
                    Sr = S64.clone().requires_grad_(True)
                    ref_l = row_losses_reference(
                        Sr,
                        lo,
                        hi,
                        own,
                        kind=kind,
                        variant=v.name,
                        anneal=0.05,
                        alpha=1.3,
                        b=2.0,
                        ks=ks,
                        k_temperatures=k_temps,
                    )
                    (ref_G,) = torch.autograd.grad((ref_l * w).sum(), Sr)
                    ref_G = ref_G / w[:, None]
                    for dtype in (torch.float32, torch.float64):
                        S = S64.to(dev, dtype)
                        args = (lo.to(dev), hi.to(dev), own.to(dev), kind, v.code, 0.05, 1.3, 2.0, ks, k_temps, True)
                        l, G = o.row_losses_and_dS(S, *args)
                        l2, G2 = o.row_losses_and_dS(S, *args)
                        det = torch.equal(l, l2) and torch.equal(G, G2)
                        errs = [
                            float((a.double().cpu() - r).norm() / r.norm().clamp_min(1e-300))
                            for a, r in ((l, ref_l.detach()), (G, ref_G))
                        ]
                        tol = 1e-5 if dtype == torch.float32 else 1e-10
                        finite = bool(torch.isfinite(l).all() and torch.isfinite(G).all())
                        worst[dtype] = max(worst[dtype], *errs)
                        if not (det and finite and max(errs) <= tol):
                            failures += 1
                            print(
                                f"  FAIL {dev} {dtype} {tuple(S64.shape)} {kind_name} {v.name}: rel err "
                                f"loss/dS {errs[0]:.2e}/{errs[1]:.2e} deterministic={det} finite={finite}"
                            )
        print(f"  {dev}: row_losses_and_dS vs reference done")
    print(
        f"worst relative error: float32 {worst[torch.float32]:.2e}, float64 {worst[torch.float64]:.2e}; "
        f"failures: {failures}"
    )
    print("OK" if failures == 0 else "FAILED")
    return 0 if failures == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_selfcheck())
