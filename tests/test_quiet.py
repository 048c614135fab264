"""A quiet first run: what a user sees on stderr, checked in fresh interpreters.

* A fresh build of the C++ extension (a private PNP_KERNELS_EXT_DIR, on the CPU) prints
  exactly two lines to stderr: the start (torch version, expected time, build directory)
  and the finish. The next process loads that build silently, without importing
  torch.utils.cpp_extension (whose import logs a CUDA_HOME warning on CPU-only machines
  with a CUDA toolkit directory), and ``python -m pnp_kernels`` then writes nothing to
  stderr and no warning anywhere.
* A failing build prints its start line and a failure line naming the first error and
  the build log; PNP_KERNELS_QUIET=1 silences both.
* numpy is a runtime dependency (without it torch warns "Failed to initialize NumPy"
  when the package imports its torch.library machinery).

This file builds the extension once (about 30-120 s on a 2-core machine).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pnp_kernels.backends import ext_build

from conftest import require_backend

ROOT = Path(__file__).resolve().parent.parent
START = re.compile(
    r"^pnp_kernels: building the C\+\+ extension for torch \S+ \(first use; about 30 s; cached in (?P<dir>.+)\)$"
)
DONE = re.compile(r"^pnp_kernels: built the C\+\+ extension in \d+ s$")
FAILED = re.compile(
    r"^pnp_kernels: the C\+\+ extension build failed after \d+ s: .*broken on purpose.* "
    r"\(full build log: (?P<log>.+)\)$"
)


def _user_env(ext_dir: Path, **extra) -> dict:
    """The environment of a user on a CPU machine: no Triton interpreter, no GPU, no quiet flag."""
    drop = ("TRITON_INTERPRET", "PNP_KERNELS_QUIET", "PNP_KERNELS_EXT_VERBOSE", "PNP_KERNELS_NO_EXT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PNP_KERNELS_EXT_DIR=str(ext_dir), CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _run(args, env, timeout=900):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT)
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout, proc.stderr


_AVAILABLE = (
    "import sys; from pnp_kernels.backends import ext_build as e; "
    "ok = e.is_available(); print(ok, 'torch.utils.cpp_extension' in sys.modules); print(e.why_unavailable())"
)


def _need_toolchain():
    """Skip (or fail, where PNP_KERNELS_REQUIRE_BACKENDS lists ext) without ninja or a compiler."""
    if ext_build._quick_reason(ext_build.source_dir()):
        require_backend("ext")


def test_build_prints_two_lines_then_the_self_check_is_silent(tmp_path):
    _need_toolchain()
    env = _user_env(tmp_path / "ext")
    out, err = _run(["-c", _AVAILABLE], env)
    assert out.splitlines()[0] == "True True", out  # built, through the compiler machinery
    lines = err.splitlines()
    assert len(lines) == 2, err
    start = START.match(lines[0])
    assert start and Path(start["dir"]).parent == tmp_path / "ext", lines[0]
    assert DONE.match(lines[1]), lines[1]

    out, err = _run(["-c", _AVAILABLE], env)
    assert out.splitlines()[0] == "True False", out  # loaded as built, compiler machinery not imported
    assert err == ""

    out, err = _run(["-m", "pnp_kernels", "--batch", "16", "--dim", "8", "--repeats", "1"], env)
    assert err == ""
    assert "warn" not in out.lower(), out
    assert re.search(r"backend ext\s+available", out), out
    assert "MISMATCH" not in out


def _broken_sources(tmp_path: Path) -> Path:
    src = tmp_path / "csrc"
    src.mkdir()
    for name in ext_build._REQUIRED:
        (src / name).write_text("#error broken on purpose\n")
    return src


@pytest.mark.parametrize("quiet", [False, True])
def test_failed_build_prints_two_lines_or_none_when_quiet(tmp_path, quiet):
    _need_toolchain()
    extra = {"PNP_KERNELS_CSRC": str(_broken_sources(tmp_path))}
    if quiet:
        extra["PNP_KERNELS_QUIET"] = "1"
    out, err = _run(["-c", _AVAILABLE], _user_env(tmp_path / "ext", **extra))
    assert out.splitlines()[0] == "False True", out
    assert "broken on purpose" in out  # the reason names the first error
    if quiet:
        assert err == ""
        return
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert START.match(lines[0]), lines[0]
    failed = FAILED.match(lines[1])
    assert failed and Path(failed["log"]).is_file(), lines[1]


def test_numpy_is_a_runtime_dependency():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert deps is not None
    assert re.search(r'^\s*"numpy[";<>=!~ ]', deps.group(1), re.M), deps.group(1)
