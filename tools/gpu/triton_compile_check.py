"""Compile every Triton kernel for real GPU targets without a GPU, and fail on register spills.

The test suite runs the Triton kernels through the interpreter, which accepts code the compiler
rejects (non-constexpr globals, unsupported ops) and says nothing about registers. This check runs
the real compiler (Triton → PTX) for sm_80 and sm_90 on the launch configurations the ops use,
and assembles each PTX with Triton's bundled ``ptxas -v`` to read registers and spill bytes. It
needs no GPU and no CUDA driver; .ci/run calls it.

    TRITON_INTERPRET=0 python -m tools.gpu.triton_compile_check [--archs 80,90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # must precede the kernel imports (read at decoration time)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastdistill.triton import all_finite, cosine, fused_logits, topk_kl  # noqa: E402
from fastdistill.triton._common import num_warps_for, tile_shape  # noqa: E402

_DT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# ptxas moves a scalar or two (4-16 bytes) to the stack in some variants even at 48-128 registers;
# that costs nothing measurable. Register pressure from a tile that is too large shows up as
# hundreds of bytes (128 rows x 32 columns of the three-term kernel spilled 600), which fails.
MAX_SPILL_BYTES = 64


def _row_kernel_case(name, kernel, sig, cols, max_block, **flags):
    """A case for a row kernel (fused logits, cosine) on 4096 rows of ``cols`` columns, with the
    launch shape and warps its launcher would pick (fastdistill.triton._common.tile_shape)."""
    rows_per_program, block = tile_shape(4096, cols, max_block)
    const = dict(
        flags,
        HAS_MASK=True,
        WRITE_GRAD=True,
        SINGLE=cols <= block,
        ROWS=rows_per_program,
        BLOCK=block,
    )
    sig = dict(sig, **{k: "constexpr" for k in const})
    return name, kernel, sig, const, num_warps_for(rows_per_program * block)


def _fused_logits_cases():
    """The fused logits kernel: the term sets the four ops use, each dtype, the one-tile and the
    tiled row loops."""
    terms = {
        "kl_div": dict(KL=True, CE=False, MSE=False, SHARE=False),
        "cross_entropy": dict(KL=False, CE=True, MSE=False, SHARE=False),
        "mse": dict(KL=False, CE=False, MSE=True, SHARE=False),
        "distillation": dict(KL=True, CE=True, MSE=True, SHARE=False),
        "distillation-T1": dict(KL=True, CE=True, MSE=False, SHARE=True),
    }
    for op, flags in terms.items():
        for dtype in ("float32", "bfloat16", "float16"):
            d = _DT[dtype]
            sig = {
                "student_ptr": f"*{d}", "student_row_stride": "i64",
                "teacher_ptr": f"*{d}", "teacher_row_stride": "i64",
                "labels_ptr": "*i64", "mask_ptr": "*u8", "scales_ptr": "*fp32",
                "row_kl_ptr": "*fp32", "row_ce_ptr": "*fp32", "row_mse_ptr": "*fp32",
                "grad_ptr": f"*{d}", "n_rows": "i32", "n_cols": "i32", "temperature": "fp32",
                "ignore_index": "i64",
            }  # fmt: skip
            for vocab in (24, 1024, 32000):
                yield _row_kernel_case(
                    f"fused_logits[{op}, {dtype}, V={vocab}]",
                    fused_logits.fused_logits_kernel,
                    sig,
                    vocab,
                    fused_logits.MAX_BLOCK,
                    **flags,
                )


def _cosine_cases():
    for dtype in ("float32", "bfloat16"):
        d = _DT[dtype]
        sig = {
            "student_ptr": f"*{d}", "student_row_stride": "i64",
            "teacher_ptr": f"*{d}", "teacher_row_stride": "i64",
            "mask_ptr": "*u8", "scale_ptr": "*fp32", "row_loss_ptr": "*fp32",
            "grad_ptr": f"*{d}", "n_rows": "i32", "n_cols": "i32",
        }  # fmt: skip
        for hidden in (64, 768, 16384):
            yield _row_kernel_case(
                f"cosine[{dtype}, D={hidden}]", cosine.cosine_kernel, sig, hidden, cosine.MAX_BLOCK
            )


def _all_finite_cases():
    for dtype in ("float32", "bfloat16", "float16"):
        sig = {"data_ptr": f"*{_DT[dtype]}", "flag_ptr": "*i32", "numel": "i64"}
        const = {"BLOCK": all_finite.BLOCK}
        sig["BLOCK"] = "constexpr"
        yield f"all_finite[{dtype}]", all_finite.all_finite_kernel, sig, const, 4


def _topk_kl_cases():
    """The sparse-target kernel: each normalisation with the CE, bf16 and fp32, k = 64 (a teacher
    cache's), one tile (V = 1024) and the tiled loop (V = 32000)."""
    for dtype in ("float32", "bfloat16"):
        d = _DT[dtype]
        sig = {
            "student_ptr": f"*{d}", "student_row_stride": "i64", "ids_ptr": "*i64",
            "lp_ptr": "*fp32", "tail_ptr": "*fp32", "mask_ptr": "*u8", "labels_ptr": "*i64",
            "scales_ptr": "*fp32", "row_kd_ptr": "*fp32", "row_ce_ptr": "*fp32",
            "grad_ptr": f"*{d}", "n_cols": "i32", "k": "i32", "inv_t": "fp32",
            "lp_scale": "fp32", "ignore_index": "i64",
        }  # fmt: skip
        for norm, name in enumerate(("full", "renormalized", "tail")):
            for vocab in (1024, 32000):
                block = min(triton.next_power_of_2(vocab), topk_kl.MAX_BLOCK)
                const = dict(
                    NORM=norm, USE_KD=True, USE_CE=True, HAS_MASK=True, WRITE_GRAD=True,
                    BLOCK=block, KB=64, LOG_K=7,
                )  # fmt: skip
                case_sig = dict(sig, **{key: "constexpr" for key in const})
                yield (
                    f"topk_kl[{name}, {dtype}, V={vocab}]", topk_kl.topk_kl_kernel, case_sig,
                    const, num_warps_for(block),
                )  # fmt: skip


def _ptxas_candidates(arch: int) -> list[str]:
    """The ptxas Triton itself uses for ``arch`` (it bundles two; which PTX versions each accepts
    differs), then the bundled binaries by name."""
    found = []
    try:  # Triton's own choice; an internal helper, hence the fallback below
        from triton.backends.nvidia.compiler import get_ptxas

        found.append(get_ptxas(arch).path)
    except Exception:
        pass
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, name)
        if os.path.exists(path) and path not in found:
            found.append(path)
    if not found:
        raise SystemExit(f"no ptxas found in {bin_dir}; cannot read registers")
    return found


def resource_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill bytes that ``ptxas -v`` reports for the kernel."""
    # Triton may target an arch-specific variant (sm_90a): assemble for what the PTX names.
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
    gpu_name = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        errors = []
        for ptxas in _ptxas_candidates(arch):
            # The options Triton's own make_cubin passes (triton/backends/nvidia/compiler.py).
            cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}"]
            cmd += [src, "-o", os.path.join(tmp, "k.cubin")]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode == 0:
                log = run.stderr
                break
            errors.append(f"{os.path.basename(ptxas)}: {run.stderr.strip()[-300:]}")
        else:
            raise RuntimeError("ptxas failed: " + " | ".join(errors))
    patterns = {
        "regs": r"Used (\d+) registers",
        "stack": r"(\d+) bytes stack frame",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
    }
    return {k: int(m.group(1)) for k, p in patterns.items() if (m := re.search(p, log))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities, e.g. 80,90")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.replace(";", ",").split(",") if a]
    cases = [*_fused_logits_cases(), *_cosine_cases(), *_all_finite_cases(), *_topk_kl_cases()]
    failures = []
    print(f"triton {triton.__version__}: {len(cases)} kernels x sm_{archs}")
    for arch in archs:
        for name, fn, sig, const, warps in cases:
            t0 = time.perf_counter()
            try:
                kernel = triton.compile(
                    ASTSource(fn=fn, signature=sig, constexprs=const),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": warps},
                )
                use = resource_usage(kernel.asm["ptx"], arch)
            except Exception as exc:  # report every failing kernel, not just the first
                failures.append(f"sm_{arch} {name}: {type(exc).__name__}: {exc}")
                print(f"sm_{arch} {name}: FAILED to compile: {exc}")
                continue
            spill_bytes = max(use.get("spill_stores", 0), use.get("spill_loads", 0))
            spilled = spill_bytes > MAX_SPILL_BYTES
            print(
                f"sm_{arch} {name:45s} warps={warps} regs={use.get('regs')} "
                f"stack={use.get('stack')} spills={use.get('spill_stores')}/"
                f"{use.get('spill_loads')} ({time.perf_counter() - t0:.1f} s)"
                f"{'  SPILLS' if spilled else ('  (small spill, tolerated)' if spill_bytes else '')}"
            )
            if spilled:
                failures.append(f"sm_{arch} {name}: register spills {use}")
    if failures:
        print("\n".join(["FAILED:", *failures]), file=sys.stderr)
        return 1
    print(f"all Triton kernels compiled, none spilling more than {MAX_SPILL_BYTES} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
