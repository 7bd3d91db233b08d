"""Host emulation check of the sparse-target CUDA kernel (csrc/cuda/topk_kl.cu) against the
float64 reference (fastdistill.reference), without a GPU: the kernel is translated and compiled
with check.py's emulation headers (one std::thread per CUDA thread), then run on CPU tensors.

    python tools/gpu/cuda_emu/check_topk.py     # ~1 min on 2 cores

Covers each normalisation with and without the CE, fp32/bf16, masks, T != T_c, k = 1 and k = V,
-inf log-probs, a row with a repeated id (NaN row, the GPU's answer to bad ids) and rows that
take more than one block-stride.
"""

import ctypes
import math
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

from fastdistill import reference

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "csrc"


def build() -> ctypes.CDLL:
    out = pathlib.Path(tempfile.mkdtemp(prefix="fd_topk_emu_"))
    launch = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)
    text = launch.sub(
        lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});",
        (CSRC / "cuda" / "topk_kl.cu").read_text(),
    )
    src = out / "topk_kl.cpp"
    src.write_text(text)
    lib = out / "libtopk_emu.so"
    cmd = ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-Wall",
           "-Wno-unknown-pragmas", "-Wno-unused-function", f"-I{HERE / 'include'}", f"-I{CSRC}",
           str(src), str(HERE / "emu_runtime.cpp"), str(HERE / "harness_topk.cpp"), "-o",
           str(lib)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


LIB = build()
P, I64, INT, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
LIB.emu_topk_kl.argtypes = [P, I64, P, P, P, I64, P, P, I64, I64, INT, INT, F32, F32, INT, P,
                            P, P, P]  # fmt: skip
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NORMS = ("full", "renormalized", "tail")
FAILS = []


def ptr(t):
    return None if t is None else t.data_ptr()


def case(name, s, ids, lp, tail, mask, labels, norm, T, Tc, alpha_kd, alpha_ce, tol):
    rows, cols = s.shape
    ids_sorted, order = ids.sort(-1)
    lp_sorted = lp.gather(-1, order).contiguous()
    scales = torch.tensor([alpha_kd * (1.0 / T), alpha_ce], dtype=torch.float32)
    row_kd, row_ce = torch.full((rows,), -7.0), torch.full((rows,), -7.0)
    g = torch.full((rows, cols), 123.0, dtype=s.dtype)
    code = LIB.emu_topk_kl(
        ptr(s), s.stride(0), ptr(ids_sorted.contiguous()), ptr(lp_sorted), ptr(tail),
        ids.shape[1], ptr(mask), ptr(labels), rows, cols, CODE[s.dtype], NORMS.index(norm), T,
        Tc, int(alpha_kd > 0), ptr(scales), ptr(row_kd), ptr(row_ce if labels is not None else None),
        ptr(g),
    )  # fmt: skip
    if code != 0:
        FAILS.append(f"{name}: status {code}")
        return None, None
    x = s.double().requires_grad_(True)
    kd = reference.topk_kl_loss(
        x, ids, lp.double(), teacher_tail=None if tail is None else tail.double(),
        normalization=norm, temperature=T, capture_temperature=Tc,
        mask=None if mask is None else mask.bool(), reduction="sum",
    )  # fmt: skip
    total = alpha_kd * kd
    if labels is not None:
        row, valid = reference.cross_entropy_rows(x, labels, -100)
        total = total + alpha_ce * torch.where(valid, row, 0.0).sum()
    total.backward()
    got = row_kd.double().sum() * alpha_kd
    if labels is not None:
        got = got + alpha_ce * row_ce.double().sum()
    err_l = abs(float(got - total)) / max(abs(float(total)), 1e-30)
    err_g = float((g.double() - x.grad).norm()) / max(float(x.grad.norm()), 1e-30)
    if s.dtype != torch.float32:
        rounding = float((x.grad.to(s.dtype).double() - x.grad).norm())
        excess = max(0.0, float((g.double() - x.grad).norm()) - 2 * rounding)
        err_g = excess / max(float(x.grad.norm()), 1e-30)
    ok = err_l < tol and err_g < tol
    if not ok:
        FAILS.append(f"{name}: loss rel {err_l:.2e}, grad rel {err_g:.2e}")
    print(f"{'ok  ' if ok else 'FAIL'} {name}: loss {err_l:.1e} grad {err_g:.1e}", flush=True)
    return row_kd, g


def teacher(rows, cols, k, Tc, gen):
    t = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 3
    logp = torch.log_softmax(t / Tc, -1)
    lp, ids = logp.topk(k, -1)
    perm = torch.argsort(torch.rand(rows, k, generator=gen), -1)
    lp, ids = lp.gather(-1, perm), ids.gather(-1, perm)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.logsumexp(torch.where(outside, logp, -math.inf), -1)
    return ids, lp.float(), tail.float()


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    for cols, k in ((37, 5), (37, 37), (700, 64), (5, 1)):
        for norm in NORMS:
            for dtype in (torch.float32, torch.bfloat16):
                T = 2.0 if norm == "tail" else 0.5
                Tc = T if norm == "tail" else 2.0
                ids, lp, tail = teacher(4, cols, k, Tc, gen)
                lp[1, 0] = -math.inf
                s = (torch.randn(4, cols, generator=gen) * 3).to(dtype)
                mask = torch.tensor([1, 0, 1, 1], dtype=torch.uint8)
                labels = torch.randint(0, cols, (4,), generator=gen)
                labels[2] = -100
                labels[3] = ids[3, 0]
                tol = 1e-5
                for lab, a_ce in ((None, 0.0), (labels, 0.4)):
                    name = f"{norm} {dtype} V={cols} k={k} ce={lab is not None}"
                    case(name, s, ids, lp, tail, mask, lab, norm, T, Tc, 0.7, a_ce, tol)
    # A repeated id: that row NaN (loss and gradient), the others untouched.
    ids, lp, tail = teacher(3, 50, 6, 1.0, gen)
    ids[1, 2] = ids[1, 4]
    s = torch.randn(3, 50, generator=gen)
    row_kd = torch.zeros(3)
    g = torch.zeros(3, 50)
    srt, order = ids.sort(-1)
    scales = torch.tensor([1.0, 0.0])
    LIB.emu_topk_kl(ptr(s), 50, ptr(srt.contiguous()), ptr(lp.gather(-1, order).contiguous()),
                    None, 6, None, None, 3, 50, 0, 0, 1.0, 1.0, 1, ptr(scales), ptr(row_kd),
                    None, ptr(g))  # fmt: skip
    bad_ok = bool(torch.isnan(row_kd[1]) and torch.isnan(g[1]).all())
    good_ok = bool(torch.isfinite(row_kd[[0, 2]]).all() and torch.isfinite(g[[0, 2]]).all())
    if not (bad_ok and good_ok):
        FAILS.append(f"repeated id: row_kd {row_kd}")
    print("repeated id:", "ok" if bad_ok and good_ok else "FAIL")
    print("TOTAL FAILS", len(FAILS), *FAILS, sep="\n")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
