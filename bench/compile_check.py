"""Compile every Triton kernel specialization, and the CUDA extension, for a GPU target, without a GPU.

    python bench/compile_check.py [--arch 90] [--arch 80] [--no-cuda-ext]

Triton ships ptxas, so on a CPU-only machine this lowers each kernel of
pnp_kernels/backends/triton_kernels.py (both loss kinds, every PNP variant, with and
without gradient, cosine and dot, each reduction mode, with and without a permutation)
and of the memory-efficient kernels of pnp_kernels/backends/triton_tiled.py (every loss
kind, float32 / float16 / bfloat16 rows, the backward's windows) and the dense path's
half-precision GEMMs of pnp_kernels/backends/triton_gemm.py
to PTX and a cubin for the given compute capabilities, and prints registers, spills
and shared memory per kernel (from cuobjdump's resource usage when available). It
proves the kernels compile for that GPU, not that they run right there:
bench/gpu_check.py does that.
Must run without TRITON_INTERPRET (it re-executes itself without it).

When nvcc is on PATH (or in $CUDA_HOME/bin), it also compiles csrc/pnp_cuda.cu (the
ext backend's CUDA kernels) to an object file for each target with ``-Xptxas -v``
and the language standard torch compiles its extensions with, and prints registers
and spills per kernel. A CPU-only torch wheel lacks one
generated header (c10/cuda/impl/cuda_cmake_macros.h); a one-line stand-in is put on
the include path for this compile-only check (nothing is linked or loaded).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time


def _specializations(tb):
    """(name, kernel, signature, constexprs[, options]) for every launch configuration the package uses."""
    out = []
    i32, f32 = "i32", "fp32"
    from pnp_kernels.variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, VARIANTS

    # (kind, variant, label, NUM_K, K_BLOCK): Recall@k with the default k = (1, 2, 4, 8, 16)
    rows = [(LOSS_PNP, v.code, f"pnp,variant={v.name}", 1, 1) for v in VARIANTS.values()]
    rows.append((LOSS_SMOOTH_AP, 0, "smooth_ap", 1, 1))
    rows.append((LOSS_RECALL_AT_K, 0, "recall_at_k,|K|=5", 5, 8))
    for kind, variant, label, num_k, k_block in rows:
        for grad in (False, True):
            sig = {
                "S_ptr": "*fp32",
                "stride_s": i32,
                "lo_ptr": "*i32",
                "hi_ptr": "*i32",
                "own_ptr": "*i32",
                "kp_ptr": "*fp32",
                "loss_ptr": "*fp32",
                "G_ptr": "*fp32",
                "stride_g": i32,
                "n_cols": i32,
                "scale": f32,
                "inv_tau": f32,
                "alpha": f32,
                "b": f32,
                "LOSS": "constexpr",
                "VARIANT": "constexpr",
                "COMPUTE_GRAD": "constexpr",
                "TILE": "constexpr",
                "BLOCK_S": "constexpr",
                "NUM_K": "constexpr",
                "K_BLOCK": "constexpr",
            }
            out.append(
                (
                    f"_rows_kernel[{label},grad={grad}]",
                    tb._rows_kernel,
                    sig,
                    {
                        "LOSS": kind,
                        "VARIANT": variant,
                        "COMPUTE_GRAD": grad,
                        "TILE": tb._tile(),
                        "BLOCK_S": tb.SEGMENT_BLOCK,
                        "NUM_K": num_k,
                        "K_BLOCK": k_block,
                    },
                )
            )
    for mode in (0, 1, 2):
        sig = {
            "G_ptr": "*fp32",
            "stride_g": i32,
            "H_ptr": "*fp32",
            "stride_h": i32,
            "n": i32,
            "g_ptr": "*fp32",
            "g_stride": i32,
            "perm_ptr": "*i64",
            "n_valid_ptr": "*fp32",
            "MODE": "constexpr",
            "BLOCK": "constexpr",
        }
        out.append(
            (
                f"_symmetric_grad_kernel[mode={mode}]",
                tb._symmetric_grad_kernel,
                sig,
                {"MODE": mode, "BLOCK": 64},
                {"num_warps": tb.SYMMETRIC_NUM_WARPS},
            )
        )
    for edtype in ("fp32", "fp16", "bf16"):
        for cosine in (True, False):
            BLOCK_R, BLOCK_D = 16, 128
            sig = {
                "labels_ptr": "*i64",
                "perm_ptr": "*i64",
                "E_ptr": f"*{edtype}",
                "stride_er": i32,
                "stride_ec": i32,
                "Xs_ptr": "*fp32",
                "lo_ptr": "*i32",
                "hi_ptr": "*i32",
                "denom_ptr": "*fp32",
                "n": i32,
                "D": i32,
                "eps": f32,
                "COSINE": "constexpr",
                "BLOCK_R": "constexpr",
                "BLOCK_J": "constexpr",
                "BLOCK_D": "constexpr",
            }
            out.append(
                (
                    f"_prep_count_kernel[{edtype},cosine={cosine}]",
                    tb._prep_count_kernel,
                    sig,
                    {"COSINE": cosine, "BLOCK_R": BLOCK_R, "BLOCK_J": 128, "BLOCK_D": BLOCK_D},
                )
            )
            sig = {
                "sorted_ptr": "*i64",
                "perm_ptr": "*i64",
                "E_ptr": f"*{edtype}",
                "stride_er": i32,
                "stride_ec": i32,
                "Xs_ptr": "*fp32",
                "lo_ptr": "*i32",
                "hi_ptr": "*i32",
                "denom_ptr": "*fp32",
                "n": i32,
                "D": i32,
                "n_bits": i32,
                "eps": f32,
                "COSINE": "constexpr",
                "BLOCK_R": "constexpr",
                "BLOCK_D": "constexpr",
            }
            out.append(
                (
                    f"_prep_kernel[{edtype},cosine={cosine}]",
                    tb._prep_kernel,
                    sig,
                    {"COSINE": cosine, "BLOCK_R": BLOCK_R, "BLOCK_D": BLOCK_D},
                )
            )
            for has_perm in (True, False):
                sig = {
                    "dXs_ptr": "*fp32",
                    "Xs_ptr": "*fp32",
                    "denom_ptr": "*fp32",
                    "perm_ptr": "*i64",
                    "dE_ptr": f"*{edtype}",
                    "stride_er": i32,
                    "stride_ec": i32,
                    "n": i32,
                    "D": i32,
                    "eps": f32,
                    "out_max": f32,
                    "COSINE": "constexpr",
                    "SATURATE": "constexpr",
                    "HAS_PERM": "constexpr",
                    "BLOCK_R": "constexpr",
                    "BLOCK_D": "constexpr",
                }
                out.append(
                    (
                        f"_unprep_kernel[{edtype},cosine={cosine},perm={has_perm}]",
                        tb._unprep_kernel,
                        sig,
                        {
                            "COSINE": cosine,
                            "SATURATE": edtype == "fp16",
                            "HAS_PERM": has_perm,
                            "BLOCK_R": BLOCK_R,
                            "BLOCK_D": BLOCK_D,
                        },
                    )
                )
    for mean in (True, False):
        for has_perm in (True, False):
            sig = {
                "per_row_ptr": "*fp32",
                "lo_ptr": "*i32",
                "hi_ptr": "*i32",
                "perm_ptr": "*i64",
                "out_ptr": "*fp32",
                "n_valid_ptr": "*fp32",
                "n": i32,
                "MEAN": "constexpr",
                "HAS_PERM": "constexpr",
                "BLOCK": "constexpr",
            }
            out.append(
                (
                    f"_reduce_kernel[mean={mean},perm={has_perm}]",
                    tb._reduce_kernel,
                    sig,
                    {"MEAN": mean, "HAS_PERM": has_perm, "BLOCK": 1024},
                )
            )
    return out


def _tiled_specializations():
    """The memory-efficient kernels of pnp_kernels/backends/triton_tiled.py with their GPU tile
    shapes: the forward for every loss kind and PNP variant (with and without gradient) on
    float32 rows, and for PNP Dq, Smooth-AP and Recall@k on float16 / bfloat16 rows (cosine:
    inverse norms); both backward sweeps for those three on all three row dtypes."""
    from pnp_kernels.backends import triton_tiled as tt
    from pnp_kernels.variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, VARIANTS

    cfg = tt._GPU_CONFIG
    i32, f32 = "i32", "fp32"
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.stages}
    kinds = [(LOSS_PNP, v.code, f"pnp,variant={v.name}", 1, 1) for v in VARIANTS.values()]
    kinds += [(LOSS_SMOOTH_AP, 0, "smooth_ap", 1, 1), (LOSS_RECALL_AT_K, 0, "recall_at_k,|K|=5", 5, 8)]
    # (row dtype, HAS_NORM, (S_PREC, G_SPLIT, G_PREC)) as triton_tiled._precisions picks them
    # (float32 with TF32 off; half rows under cosine)
    dtypes = [
        ("fp32", False, (tt.FLOAT32_DOT, 0, "tf32x3")),
        ("fp16", True, ("tf32", 0, "tf32x3")),
        ("bf16", True, ("tf32", 3, "tf32x3")),
    ]
    out = []
    for kind, variant, label, num_k, k_block in kinds:
        main_kind = kind != LOSS_PNP or variant == VARIANTS["Dq"].code
        for xdt, has_norm, (s_prec, g_split, g_prec) in dtypes:
            if xdt != "fp32" and not main_kind:
                continue
            # (COMPUTE_GRAD, WITH_LOSS): the forward without and with gradient, and the backward's
            # recomputation of a window of lanes (main kinds)
            for grad, with_loss in ((False, True), (True, True)) + (((True, False),) if main_kind else ()):
                sig = {
                    **{n: f"*{xdt}" for n in ("xq_ptr", "xr_ptr")},
                    **{n: "*fp32" for n in ("iq_ptr", "ir_ptr")},
                    **{n: "*i32" for n in ("lo_ptr", "hi_ptr", "own_ptr")},
                    **{n: "*fp32" for n in ("kp_ptr", "loss_ptr", "st_ptr")},
                    **{n: i32 for n in ("Q", "M", "D", "stride_q", "stride_r", "n_lanes", "n_cap", "lane0")},
                    **{n: f32 for n in ("zscale", "inv_tau", "alpha", "beta")},
                }
                consts = dict(LOSS=kind, VARIANT=variant, COMPUTE_GRAD=grad, WITH_LOSS=with_loss)
                consts.update(HAS_NORM=has_norm, S_PREC=s_prec)
                consts.update(NUM_K=num_k, K_BLOCK=k_block, BLOCK_M=cfg.fwd_mn[0], BLOCK_N=cfg.fwd_mn[1])
                consts.update(BLOCK_D=cfg.block_d, BLOCK_P=cfg.block_p)
                sig.update({k: "constexpr" for k in consts})
                name = f"_tiled_fwd_kernel[{label},{xdt},grad={grad}{'' if with_loss else ',window'}]"
                out.append((name, tt._tiled_fwd_kernel, sig, consts, opts))
            if not main_kind:
                continue
            for (which, kernel, (bm, bn)), accum in itertools.product(
                (("rows", tt._tiled_bwd_rows_kernel, cfg.rows_mn), ("cols", tt._tiled_bwd_cols_kernel, cfg.cols_mn)),
                (False, True),
            ):
                sig = {
                    **{n: f"*{xdt}" for n in ("xq_ptr", "xr_ptr")},
                    **{n: "*fp32" for n in ("iq_ptr", "ir_ptr")},
                    **{n: "*i32" for n in ("lo_ptr", "hi_ptr", "own_ptr")},
                    **{n: "*fp32" for n in ("st_ptr", "g_ptr")},
                    **({"live_ptr": "*i8", "pmax_ptr": "*i32"} if which == "cols" else {}),
                    ("dxq_ptr" if which == "rows" else "dxr_ptr"): "*fp32",
                    **{n: i32 for n in ("Q", "M", "D", "stride_q", "stride_r", "stride_o")},
                    **{n: i32 for n in ("n_lanes", "n_cap", "lane0")},
                    **{n: f32 for n in ("zscale", "inv_tau")},
                }
                consts = dict(LOSS=kind, HAS_NORM=has_norm, **({"HAS_LIVE": False} if which == "cols" else {}))
                consts.update(S_PREC=s_prec, G_SPLIT=g_split, G_PREC=g_prec, ACCUM=accum, BLOCK_M=bm, BLOCK_N=bn)
                consts.update(BLOCK_D=cfg.block_d, BLOCK_P=cfg.block_p, BLOCK_DO=cfg.block_do)
                sig.update({k: "constexpr" for k in consts})
                name = f"_tiled_bwd_{which}_kernel[{label},{xdt}{',accum' if accum else ''}]"
                out.append((name, kernel, sig, consts, opts))
    return out


def _gemm_specializations():
    """The dense path's half-precision GEMMs of pnp_kernels/backends/triton_gemm.py with their GPU
    tile shapes: S for float16 / bfloat16 rows, with and without inverse norms; G X for both,
    with and without each scale (float32 rows take torch.mm on the dense path)."""
    import torch

    from pnp_kernels.backends import triton_gemm as tg
    from pnp_kernels.backends import triton_tiled as tt

    cfg = tg._GPU_CONFIG
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.stages}
    out = []
    for xdt, torch_dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        s_prec, g_split, g_prec = tt._precisions(torch_dt)
        for has_norm in (False, True):
            sig = {
                **{n: f"*{xdt}" for n in ("xq_ptr", "xr_ptr")},
                **{n: "*fp32" for n in ("iq_ptr", "ir_ptr", "s_ptr")},
                **{n: "i32" for n in ("Q", "M", "D", "stride_q", "stride_r", "stride_s")},
            }
            consts = dict(HAS_NORM=has_norm, S_PREC=s_prec, BLOCK_M=cfg.s_mn[0], BLOCK_N=cfg.s_mn[1])
            consts.update(BLOCK_D=cfg.s_block_d)
            sig.update({k: "constexpr" for k in consts})
            out.append((f"_similarity_kernel[{xdt},norm={has_norm}]", tg._similarity_kernel, sig, consts, opts))
        for has_row, has_col in itertools.product((False, True), (False, True)):
            sig = {
                "g_ptr": "*fp32",
                "x_ptr": f"*{xdt}",
                **{n: "*fp32" for n in ("rs_ptr", "cs_ptr", "out_ptr")},
                **{n: "i32" for n in ("Q", "K", "D", "stride_gq", "stride_gk", "stride_x", "stride_o")},
            }
            consts = dict(HAS_ROW=has_row, HAS_COL=has_col, G_SPLIT=g_split, G_PREC=g_prec)
            consts.update(BLOCK_M=cfg.g_block_m, BLOCK_K=cfg.g_block_k, BLOCK_DO=cfg.g_block_do)
            sig.update({k: "constexpr" for k in consts})
            name = f"_grad_product_kernel[{xdt},row={has_row},col={has_col}]"
            out.append((name, tg._grad_product_kernel, sig, consts, opts))
    return out


def _resource_usage(cubin: bytes):
    """(registers, spill stores + loads, shared bytes) from cuobjdump -res-usage, or None."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        txt = subprocess.run([tool, "-res-usage", path], check=False, capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(path)
    reg = re.search(r"REG:(\d+)", txt)
    shared = re.search(r"SHARED:(\d+)", txt)
    stack = re.search(r"STACK:(\d+)", txt)
    return (
        int(reg.group(1)) if reg else -1,
        int(stack.group(1)) if stack else -1,
        int(shared.group(1)) if shared else -1,
    )


def _nvcc():
    import shutil

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(home, "bin", "nvcc") if home else None
    return cand if cand and os.path.exists(cand) else shutil.which("nvcc")


def check_cuda_ext(archs) -> int:
    """nvcc-compile csrc/pnp_cuda.cu for each arch; print per-kernel registers/spills; return failures."""
    import sysconfig

    import torch

    nvcc = _nvcc()
    if nvcc is None:
        print("\nCUDA extension: nvcc not found, not checked")
        return 0
    from pnp_kernels.backends.ext_build import torch_std_flag

    std = torch_std_flag()  # the standard the installed torch's headers are compiled with
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "csrc", "pnp_cuda.cu")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    failures = 0
    print(f"\nCUDA extension ({os.path.relpath(src, root)}), {nvcc} {std}")
    print("| kernel | target | registers | spill stores/loads bytes | shared bytes |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        stub = os.path.join(tmp, "c10", "cuda", "impl")
        os.makedirs(stub)
        if not os.path.exists(os.path.join(tinc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
            with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        for arch in archs:
            cmd = [
                nvcc,
                "-c",
                "-O3",
                std,
                f"-arch=sm_{arch}",
                "-Xptxas",
                "-v",
                "-DTORCH_API_INCLUDE_EXTENSION_H",
                "-DTORCH_EXTENSION_NAME=pnp_compile_check",
                "-I" + os.path.join(root, "csrc"),
                "-I" + tmp,
                "-isystem",
                tinc,
                "-isystem",
                os.path.join(tinc, "torch", "csrc", "api", "include"),
                "-isystem",
                sysconfig.get_paths()["include"],
                src,
                "-o",
                os.path.join(tmp, "pnp_cuda.o"),
            ]
            res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                failures += 1
                print(f"| pnp_cuda.cu | sm_{arch} | FAILED: {res.stderr.strip().splitlines()[-1][:200]} | | |")
                continue
            name = None
            for line in res.stderr.splitlines():
                m = re.search(r"Compiling entry function '(\S+)'", line)
                if m:
                    name = _demangle_kernel(m.group(1))
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m:
                    spill = f"{m.group(1)}/{m.group(2)}"
                m = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
                if m and name:
                    print(f"| {name} | sm_{arch} | {m.group(1)} | {spill} | {m.group(2)} |")
                    name = None
    return failures


def _demangle_kernel(mangled: str) -> str:
    """A short readable name: the kernel's identifier and its template arguments (f/d, loss kind, grad)."""
    m = re.search(r"(recall_rows_kernel|rows_kernel|symmetrize_kernel)I([fd])(?:Li(\d+)E)?(?:Lb([01])E)?", mangled)
    if not m:
        return mangled[:60]
    dtype = {"f": "float", "d": "double"}[m.group(2)]
    if m.group(1) == "recall_rows_kernel":
        return f"{m.group(1)}<{dtype}, grad={m.group(4) == '1'}>"
    if not m.group(3):
        return f"{m.group(1)}<{dtype}>"
    from pnp_kernels.variants import LOSS_KINDS

    kind = {code: name for name, code in LOSS_KINDS.items()}.get(int(m.group(3)), m.group(3))
    return f"{m.group(1)}<{dtype}, {kind}, grad={m.group(4) == '1'}>"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 90)")
    ap.add_argument("--no-cuda-ext", action="store_true", help="skip the nvcc compile of csrc/pnp_cuda.cu")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__)] + (argv or sys.argv[1:]), env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pnp_kernels.backends import triton_kernels as tb

    archs = args.arch or [90]
    print(f"triton {triton.__version__}; targets: " + ", ".join(f"sm_{a}" for a in archs))
    print("| kernel | target | registers | stack (spill) bytes | shared bytes | compile s |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        specializations = _specializations(tb) + _tiled_specializations() + _gemm_specializations()
        for name, kernel, sig, consts, *opts in specializations:
            t0 = time.time()
            try:
                compiled = triton.compile(
                    ASTSource(fn=kernel, signature=sig, constexprs=consts),
                    target=target,
                    options=opts[0] if opts else None,
                )
            except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                failures += 1
                print(f"| {name} | sm_{arch} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | |")
                continue
            usage = _resource_usage(compiled.asm["cubin"]) or ("?", "?", "?")
            print(f"| {name} | sm_{arch} | {usage[0]} | {usage[1]} | {usage[2]} | {time.time() - t0:.1f} |")
    print(f"{failures} failed")
    if not args.no_cuda_ext:
        ext_failures = check_cuda_ext(archs)
        print(f"CUDA extension: {ext_failures} failed")
        failures += ext_failures
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
