"""Host emulation check of the CUDA kernels (csrc/cuda/*.cu) against float64, without a GPU.

The .cu files are translated (kernel<<<grid, block, smem, stream>>>(args) -> emu::launch(...)),
compiled with g++ against include/ (a few CUDA types and intrinsics: one std::thread per CUDA
thread, blocks one after another, __syncthreads and warp shuffles on std::barrier, ex2.approx
modelled as exp2 with a deterministic +-2 ulp error, 16-byte alignment of vector accesses
checked) and run on CPU tensors through ctypes.

    python tools/gpu/cuda_emu/check.py               # everything (~10 min on 2 cores)
    SECTIONS=2,11 FUZZ_N=200 FUZZ_SEED=5 python tools/gpu/cuda_emu/check.py
    GRID_CAP=3 python tools/gpu/cuda_emu/check.py    # grid-stride path: at most 3 blocks
    EMU_CHAOS=1 python tools/gpu/cuda_emu/check.py   # random yields and sleeps after barriers

Sections: 1-8 the fused logits kernel's T²-scaled forward KL, CE and MSE (random data, student
close to and equal to the teacher, -inf, NaN/inf rows, large logits, bad labels, strides); 9 cosine;
10 all_finite; 11 a fuzz of 1-8; 12-14 the other divergences (reverse KL, JSD at beta 0.1, 0.5 and
0.9, TVD) and forward KL with t2_scale off, logit_scale and softcap, against fastdistill.reference
in float64: random data with every term set (12), the edge cases of tests/test_divergences.py
(13: student == teacher exactly 0, masked rows, NaN rows, -inf logits, log-probabilities below
-104, JSD >= 0 next to a bf16 teacher, a student within 1e-4 of the teacher, |logits| 1e4,
strides), and a fuzz (14; FUZZ_N and FUZZ_SEED as for 11).

What it cannot show: timing, the memory model, cache hints, real ex2.approx/cvt rounding, or
anything the GPU does differently from the C++ abstract machine.
"""

import ctypes
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

from fastdistill import reference

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "csrc"  # tools/gpu/cuda_emu -> the repository root
CUDA_DIR = CSRC / "cuda"


def build() -> pathlib.Path:
    out = pathlib.Path(tempfile.mkdtemp(prefix="fd_cuda_emu_"))
    launch = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)
    cap = os.environ.get("GRID_CAP")
    sources = []
    for cu in sorted(CUDA_DIR.glob("*.cu")):
        text = launch.sub(
            lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});", cu.read_text()
        )
        if cap:
            text = re.sub(
                r"p\.rows < INT_MAX \? p\.rows : INT_MAX", f"p.rows < {cap} ? p.rows : {cap}", text
            )
        # "cuda/common.cuh" must resolve to csrc/cuda, not next to the translated copy
        dst = out / (cu.stem + ".cpp")
        dst.write_text(text)
        sources.append(str(dst))
    lib = out / "libfd_cuda_emu.so"
    cmd = [
        "g++",
        "-std=c++20",
        "-O2",
        "-fPIC",
        "-shared",
        "-pthread",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-unused-function",
        f"-I{HERE / 'include'}",
        f"-I{CSRC}",
        *sources,
        str(HERE / "emu_runtime.cpp"),
        str(HERE / "harness.cpp"),
        "-o",
        str(lib),
    ]
    subprocess.run(cmd, check=True)
    return lib


LIB = ctypes.CDLL(str(build()))
P = ctypes.c_void_p
I64 = ctypes.c_int64
LIB.emu_fused_logits.argtypes = [
    P,
    I64,
    P,
    I64,
    P,
    P,
    I64,
    I64,
    ctypes.c_int,
    ctypes.c_float,
    I64,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    P,
    P,
    P,
    P,
    P,
    ctypes.c_int,
    ctypes.c_float,
    ctypes.c_float,
    ctypes.c_int,
    ctypes.c_float,
    ctypes.c_float,
]
LIB.emu_cosine.argtypes = [P, I64, P, I64, P, I64, I64, ctypes.c_int, P, P, P]
LIB.emu_all_finite.argtypes = [P, I64, ctypes.c_int, P]
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def ptr(t):
    return None if t is None else t.data_ptr()


@dataclasses.dataclass(frozen=True)
class Div:
    """The divergence term's options (FusedLogitsArgs): the default is the T²-scaled forward KL on
    untransformed logits, what sections 1-11 check."""

    name: str = "forward_kl"
    beta: float = 0.5
    t2: bool = True
    scale: float = 1.0
    cap: float = 0.0

    def __str__(self):
        beta = f"({self.beta})" if self.name == "jsd" else ""
        return f"{self.name}{beta} t2={int(self.t2)} scale={self.scale} cap={self.cap}"


DIV_CODE = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}


def run_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales, want_grad, div=Div()):
    rows, cols = s.shape
    rk = torch.full((rows,), -7.0) if kl else None
    rc = torch.full((rows,), -7.0) if ce else None
    rm = torch.full((rows,), -7.0) if mse else None
    g = torch.full((rows, cols), 12345.0, dtype=s.dtype) if want_grad else None
    code = LIB.emu_fused_logits(
        ptr(s),
        s.stride(0),
        ptr(t),
        t.stride(0) if t is not None else 0,
        ptr(labels),
        ptr(mask),
        rows,
        cols,
        CODE[s.dtype],
        T,
        ignore,
        kl,
        ce,
        mse,
        ptr(scales),
        ptr(rk),
        ptr(rc),
        ptr(rm),
        ptr(g),
        DIV_CODE[div.name],
        div.beta,
        1.0 - div.beta,
        int(div.t2),
        div.scale,
        div.cap,
    )
    assert code == 0, code
    return rk, rc, rm, g


def ref_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales):
    s = s.double()
    t = t.double() if t is not None else None
    rows, cols = s.shape
    sel = torch.ones(rows, dtype=torch.bool) if mask is None else mask.bool()
    g = torch.zeros_like(s)
    out = {}
    c = scales.double()
    if kl:
        lps = torch.log_softmax(s / T, -1)
        pt = torch.softmax(t / T, -1)
        lpt = torch.log_softmax(t / T, -1)
        term = torch.where(pt > 0, pt * (lpt - lps), torch.zeros_like(pt))
        r = T * T * term.sum(-1)
        # Precise float64 form where every entry is finite (the naive one above loses ~1e-15
        # absolute per term, too much for KL ~ 1e-11 when the student is within 1e-5 of the teacher).
        fin = torch.isfinite(s).all(-1) & torch.isfinite(t).all(-1)
        if bool(fin.any()):
            u = ((s - t) / T).nan_to_num()
            delta = torch.logsumexp(lpt + u, -1, keepdim=True)
            v = u - delta  # log ps - log pt, without the cancellation of two log-softmaxes
            ps = torch.softmax(s / T, -1)
            tp = torch.where(v.abs() < 1, pt * (torch.expm1(v.clamp(-1, 1)) - v), ps - pt - pt * v)
            tp = torch.where(pt > 0, tp, ps)
            rp = T * T * torch.sum(tp, -1)
            r = torch.where(fin, rp, r)
        out["kl"] = torch.where(sel, r, torch.zeros_like(r))
        gk = torch.softmax(s / T, -1) - pt
        if bool(fin.any()):  # p_t expm1(v): no 1 - 1 cancellation at the maxima of peaked rows
            gk = torch.where(fin[:, None] & (pt > 0), pt * torch.expm1(v.clamp(max=700)), gk)
        g += torch.where(sel[:, None], c[0] * gk, torch.zeros_like(gk))
    if ce:
        cs = labels != ignore
        lab = labels.clamp(0, cols - 1)
        lse = torch.logsumexp(s, -1)
        sl = s.gather(1, lab[:, None])
        r = lse - sl[:, 0]
        # confident rows: log1p of the off-label mass, without lse - s_label's cancellation
        off = torch.exp(s - sl).scatter(1, lab[:, None], 0.0).sum(-1)
        r = torch.where(
            (sl[:, 0] >= s.max(-1).values) & torch.isfinite(sl[:, 0]), torch.log1p(off), r
        )
        badl = cs & ((labels < 0) | (labels >= cols))
        r = torch.where(badl, torch.full_like(r, float("nan")), r)
        out["ce"] = torch.where(cs, r, torch.zeros_like(r))
        gc = torch.softmax(s, -1) - torch.nn.functional.one_hot(lab, cols).double()
        gc = torch.where(badl[:, None], torch.full_like(gc, float("nan")), gc)
        g += torch.where(cs[:, None], c[1] * gc, torch.zeros_like(gc))
    if mse:
        d = s - t
        r = (d * d).sum(-1)
        out["mse"] = torch.where(sel, r, torch.zeros_like(r))
        g += torch.where(sel[:, None], c[2] * d, torch.zeros_like(d))
    return out, g


def rel(x, ref):
    x = x.double()
    ref = ref.double()
    num = (x - ref).norm()
    den = ref.norm()
    if den == 0:
        return float(num)
    return float(num / den)


FAILS = []


def check(name, cond, info=""):
    if not cond:
        FAILS.append(f"{name}: {info}")
        print("FAIL", name, info)


def check_values(name, got, ref, tol, atol=None):
    """Row values of each term in ``got`` (None: term off) against ``ref``: the same NaN and inf
    rows, the finite ones within ``tol`` (relative norm) or 1e-18 absolute, or within the term's
    ``atol`` (a dict) absolute plus ``tol``."""
    for key, val in got.items():
        if val is None:
            continue
        r = ref[key]
        nan_ref = torch.isnan(r)
        check(f"{name} {key} nan pattern", torch.equal(torch.isnan(val), nan_ref), f"{val} vs {r}")
        fin = ~nan_ref
        inf_ref = torch.isinf(r)
        check(
            f"{name} {key} inf pattern",
            torch.equal(torch.isinf(val[fin]), inf_ref[fin]),
            f"{val} vs {r}",
        )
        m = fin & ~inf_ref
        e = rel(val[m], r[m])
        e_abs = float((val[m].double() - r[m]).norm())
        lim = (atol or {}).get(key, 0.0) + tol * float(r[m].norm())
        check(
            f"{name} {key}",
            e <= tol or e_abs <= max(1e-18, lim),
            f"rel {e:.3g} abs {e_abs:.3g} vals {val[m][:4].tolist()} ref {r[m][:4].tolist()}",
        )


def check_grad(name, g, gref, dtype, tol, gtol=None, atol=0.0):
    """A gradient against float64: the same NaN and inf entries; fp32 within ``gtol`` (default
    ``tol``) relative; 16-bit no worse than 1.5x rounding the float64 gradient, plus 1e-6; or
    within ``atol`` (norm of the error)."""
    nan_ref = torch.isnan(gref)
    gn = torch.isnan(g.double())
    check(f"{name} grad nan pattern", torch.equal(gn, nan_ref), f"{gn.sum()} vs {nan_ref.sum()}")
    inf_ref = torch.isinf(gref)
    check(f"{name} grad inf pattern", torch.equal(torch.isinf(g.double()) & ~nan_ref, inf_ref), "")
    m = ~nan_ref & ~inf_ref
    if dtype == torch.float32:
        e = rel(g[m], gref[m])
        lim = gtol or tol
    else:
        rounded = gref.to(dtype).double()
        e = float((g.double()[m] - gref[m]).norm())
        lim = 1.5 * float((rounded[m] - gref[m]).norm()) + 1e-6 * float(gref[m].norm()) + 1e-12
    e_abs = float((g.double()[m] - gref[m]).norm())
    check(f"{name} grad", e <= lim or e_abs <= atol, f"err {e:.3g} lim {lim:.3g} abs {e_abs:.3g}")


def compare(
    name, s, t, labels, mask, T, ignore, kl, ce, mse, want_grad, tol=1e-5, gtol=None, nan_ok=False
):
    scales = torch.tensor([0.7 * T, 1.3, 0.4], dtype=torch.float32)
    rk, rc, rm, g = run_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales, want_grad)
    ref, gref = ref_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales)
    check_values(name, {"kl": rk, "ce": rc, "mse": rm}, ref, tol)
    if want_grad:
        check_grad(name, g, gref, s.dtype, tol, gtol)
    return rk, rc, rm, g


torch.manual_seed(0)
SECT = os.environ.get("SECTIONS")


def on(n):
    return SECT is None or str(n) in SECT.split(",")


combos = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]

# 1. random data, all combos, dtypes, temperatures, shapes, masks/labels
if on(1):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for cols in (1, 7, 33, 1271, 5000):
            rows = 6
            for T in (0.05, 1.0, 4.0):
                s = (torch.randn(rows, cols) * 3).to(dtype)
                t = (torch.randn(rows, cols) * 3).to(dtype)
                labels = torch.randint(0, cols, (rows,))
                labels[1] = -100
                mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.uint8)
                for kl, ce, mse in combos:
                    compare(
                        f"rand {dtype} V={cols} T={T} {kl}{ce}{mse}",
                        s,
                        t if (kl or mse) else None,
                        labels if ce else None,
                        mask,
                        T,
                        -100,
                        kl,
                        ce,
                        mse,
                        True,
                    )
                compare(
                    f"rand nograd {dtype} V={cols} T={T}",
                    s,
                    t,
                    labels,
                    None,
                    T,
                    -100,
                    1,
                    1,
                    1,
                    False,
                )
    print("random done", len(FAILS))

# 2. student ~= teacher
if on(2):
    for cols in (7, 1271, 32000):
        for T in (0.05, 1.0, 4.0):
            t = torch.randn(4, cols) * 2
            s = t + 1e-4 * torch.randn(4, cols)
            compare(f"close V={cols} T={T}", s, t, None, None, T, -100, 1, 0, 0, True)
            compare(f"close kl+mse V={cols} T={T}", s, t, None, None, T, -100, 1, 0, 1, True)
            # and a few rows where the argmax differs between s and t
            t2 = torch.randn(3, cols)
            t2[:, 0] = 5.0
            t2[:, 1] = 5.0
            s2 = t2 + 1e-5 * torch.randn(3, cols)
            compare(f"close-tie V={cols} T={T}", s2, t2, None, None, T, -100, 1, 0, 0, True)
    print("close done", len(FAILS))

# 3. student == teacher exactly
if on(3):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for cols in (1, 9, 4099):
            t = (torch.randn(3, cols) * 4).to(dtype)
            t[0, 0] = float("-inf") if cols > 1 else t[0, 0]
            for T in (0.05, 1.0, 4.0):
                rk, rc, rm, g = run_fused(
                    t, t.clone(), None, None, T, -100, 1, 0, 0, torch.tensor([1.0, 1.0, 1.0]), True
                )
                check(f"equal {dtype} {cols} kl", bool((rk == 0).all()), rk)
                check(f"equal {dtype} {cols} grad", bool((g == 0).all()), g.abs().max())
                t2 = t[1:]
                rk, rc, rm, g = run_fused(
                    t2,
                    t2.clone(),
                    torch.zeros(2, dtype=torch.int64),
                    None,
                    T,
                    -100,
                    1,
                    1,
                    1,
                    torch.tensor([1.0, 0.0, 1.0]),
                    True,
                )
                check(f"equal3 {dtype} {cols} kl", bool((rk == 0).all()), rk)
                check(f"equal3 {dtype} {cols} mse", bool((rm == 0).all()), rm)
                check(f"equal3 {dtype} {cols} grad", bool((g == 0).all()), g.abs().max())
    print("equal done", len(FAILS))

# 4. -inf entries
if on(4):
    for dtype in (torch.float32, torch.bfloat16):
        cols = 300
        s = torch.randn(5, cols)
        t = torch.randn(5, cols)
        t[0, :50] = float("-inf")  # teacher masked: p_t = 0
        s[1, :50] = float("-inf")
        t[1, :50] = float("-inf")  # both
        s[2, 7] = float("-inf")  # student -inf where teacher finite: KL = inf
        s[3, 100:] = float("-inf")
        t[3, 100:] = float("-inf")
        t[4, 1:] = float("-inf")  # teacher one-hot
        labels = torch.tensor([3, 60, 8, 5, 0])
        compare(f"-inf {dtype}", s.to(dtype), t.to(dtype), labels, None, 2.0, -100, 1, 1, 0, True)
        compare(
            f"-inf T=0.05 {dtype}",
            s.to(dtype),
            t.to(dtype),
            labels,
            None,
            0.05,
            -100,
            1,
            1,
            0,
            True,
        )
    print("-inf done", len(FAILS))

# 5. NaN / +inf / all -inf rows, with masking and labels
if on(5):
    cols = 77
    s = torch.randn(6, cols)
    t = torch.randn(6, cols)
    s[0, 5] = float("nan")
    t[1, 9] = float("nan")
    s[2, 3] = float("inf")
    t[3, :] = float("-inf")
    s[4, :] = float("-inf")
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    for kl, ce, mse in combos:
        rk, rc, rm, g = run_fused(
            s,
            t if (kl or mse) else None,
            labels if ce else None,
            None,
            1.5,
            -100,
            kl,
            ce,
            mse,
            torch.tensor([0.5, 0.5, 0.5]),
            True,
        )
        if kl:
            check(
                f"nan rows kl {kl}{ce}{mse}",
                bool(torch.isnan(rk[:5]).all()) and bool(torch.isfinite(rk[5])),
                rk,
            )
            check(
                f"nan rows grad {kl}{ce}{mse}",
                bool(torch.isnan(g[:5]).all()) and bool(torch.isfinite(g[5]).all()),
                g[:, 0],
            )
        if ce:
            check(
                f"nan rows ce {kl}{ce}{mse}",
                bool(torch.isnan(rc[[0, 2, 4]]).all())
                and bool(torch.isfinite(rc[[1, 3, 5]]).all()),
                rc,
            )
        if mse:
            check(
                f"nan rows mse {kl}{ce}{mse}",
                bool(torch.isnan(rm[[0, 1]]).all()) and bool(torch.isinf(rm[[2, 3, 4]]).all()),
                rm,
            )
    # masked-out NaN rows stay 0
    mask = torch.zeros(6, dtype=torch.uint8)
    rk, rc, rm, g = run_fused(
        s, t, labels.fill_(-100), mask, 1.5, -100, 1, 1, 1, torch.tensor([0.5, 0.5, 0.5]), True
    )
    check(
        "masked nan rows",
        bool((rk == 0).all() and (rc == 0).all() and (rm == 0).all() and (g == 0).all()),
        (rk, rc, rm),
    )
    print("nan done", len(FAILS))

# 6. large logits
if on(6):
    for T in (0.05, 1.0, 4.0):
        s = torch.randn(4, 1000) * 1e4
        t = s + torch.randn(4, 1000) * 10
        labels = torch.tensor([3, 1, 2, 999])
        compare(f"large T={T}", s, t, labels, None, T, -100, 1, 1, 1, True)
        compare(f"large ce only T={T}", s, None, labels, None, T, -100, 0, 1, 0, True)
        for dtype in (torch.float32, torch.bfloat16):
            s = (torch.rand(13, 301, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
            t = (torch.rand(13, 301, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
            labels = torch.randint(0, 301, (13,))
            compare(f"uniform 1e4 {dtype} T={T}", s, t, labels, None, T, -100, 1, 1, 1, True)
            x = torch.full((7, 500), -1e4)
            lab = torch.randint(0, 500, (7,))
            x[torch.arange(7), lab] = 1e4
            compare(
                f"ce peaked {dtype} T={T}", x.to(dtype), None, lab, None, T, -100, 0, 1, 0, True
            )
    print("large done", len(FAILS))

# 7. label out of range
if on(7):
    s = torch.randn(4, 50)
    t = torch.randn(4, 50)
    labels = torch.tensor([50, -1, 49, -100])
    rk, rc, rm, g = run_fused(
        s, t, labels, None, 1.0, -100, 1, 1, 0, torch.tensor([0.5, 0.5, 0.5]), True
    )
    check(
        "bad label ce",
        bool(torch.isnan(rc[:2]).all()) and bool(torch.isfinite(rc[2])) and rc[3] == 0,
        rc,
    )
    check(
        "bad label grad",
        bool(torch.isnan(g[:2]).all()) and bool(torch.isfinite(g[2:]).all()),
        g[:, 0],
    )
    check("bad label kl", bool(torch.isfinite(rk).all()), rk)
    print("labels done", len(FAILS))

# 8. strided / misaligned rows (scalar paths and the head)
if on(8):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = torch.randn(5, 1300).to(dtype)
        baset = torch.randn(5, 1300).to(dtype)
        s = base[:, 3:1276]  # head != 0, same phase for s and t
        t = baset[:, 3:1276]
        labels = torch.tensor([0, 5, 1272, -100, 17])
        compare(
            f"offset3 {dtype}",
            s,
            t,
            labels,
            torch.tensor([1, 0, 1, 1, 1], dtype=torch.uint8),
            2.0,
            -100,
            1,
            1,
            1,
            True,
        )
        t2 = baset[:, 2:1275]  # different phase: scalar path
        compare(f"phase mismatch {dtype}", s, t2, labels, None, 2.0, -100, 1, 1, 1, True)
        flat = torch.randn(5 * 1273 + 1).to(dtype)
        s3 = flat[1:].view(5, 1273)  # odd row starts (contiguous, cols odd)
        t3 = torch.randn(5 * 1273 + 1).to(dtype)[1:].view(5, 1273)
        compare(f"odd cols {dtype}", s3, t3, labels, None, 0.5, -100, 1, 1, 1, True)
    print("strides done", len(FAILS))


# 9. cosine
def ref_cos(s, t, mask, scale):
    s = s.double()
    t = t.double()
    dot = (s * t).sum(-1)
    ss = (s * s).sum(-1) + 1e-12
    tt = (t * t).sum(-1) + 1e-12
    denom = (ss * tt).sqrt()
    cos = dot / denom
    loss = 1 - cos
    g = scale * (-(t / denom[:, None] - cos[:, None] * s / ss[:, None]))
    sel = torch.ones(s.shape[0], dtype=torch.bool) if mask is None else mask.bool()
    return torch.where(sel, loss, torch.zeros_like(loss)), torch.where(
        sel[:, None], g, torch.zeros_like(g)
    )


if on(9):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for cols in (1, 5, 768, 4099):
            rows = 5
            s = torch.randn(rows, cols).to(dtype)
            t = torch.randn(rows, cols).to(dtype)
            mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.uint8)
            scale = torch.tensor([0.37])
            for m in (None, mask):
                rl = torch.full((rows,), -5.0)
                g = torch.full((rows, cols), 99.0, dtype=dtype)
                assert (
                    LIB.emu_cosine(
                        ptr(s),
                        s.stride(0),
                        ptr(t),
                        t.stride(0),
                        ptr(m),
                        rows,
                        cols,
                        CODE[dtype],
                        ptr(scale),
                        ptr(rl),
                        ptr(g),
                    )
                    == 0
                )
                lr, gr = ref_cos(s, t, m, 0.37)
                check(f"cos loss {dtype} {cols}", rel(rl, lr) < 1e-5, (rl, lr))
                if dtype == torch.float32:
                    # D = 1: the exact gradient is ~eps/|s|^3 and the fp32 difference of two ~1/|s| terms
                    # is all rounding (the CPU kernel computes the same thing).
                    check(f"cos grad {dtype} {cols}", cols == 1 or rel(g, gr) < 1e-5, rel(g, gr))
                else:
                    lim = 1.5 * float((gr.to(dtype).double() - gr).norm()) + 1e-6 * float(gr.norm())
                    check(
                        f"cos grad {dtype} {cols}",
                        cols == 1 or float((g.double() - gr).norm()) <= lim,
                        (g.double() - gr).norm(),
                    )
            rl = torch.full((rows,), -5.0)
            assert (
                LIB.emu_cosine(
                    ptr(s),
                    s.stride(0),
                    ptr(t),
                    t.stride(0),
                    None,
                    rows,
                    cols,
                    CODE[dtype],
                    None,
                    ptr(rl),
                    None,
                )
                == 0
            )
            check(f"cos nograd {dtype} {cols}", rel(rl, ref_cos(s, t, None, 1.0)[0]) < 1e-5)
    # strided cosine
    base = torch.randn(4, 800)
    s = base[:, 1:769]
    t = torch.randn(4, 768)
    rl = torch.zeros(4)
    g = torch.zeros(4, 768)
    scale = torch.tensor([1.0])
    LIB.emu_cosine(
        ptr(s), s.stride(0), ptr(t), t.stride(0), None, 4, 768, 0, ptr(scale), ptr(rl), ptr(g)
    )
    lr, gr = ref_cos(s, t, None, 1.0)
    check("cos strided", rel(rl, lr) < 1e-5 and rel(g, gr) < 1e-5)
    print("cosine done", len(FAILS))

# 10. all_finite
if on(10):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n in (1, 7, 8, 9, 1000, 100003):
            for off in (0, 1, 3):
                buf = torch.randn(n + off).to(dtype)
                x = buf[off:]
                flag = torch.ones(1, dtype=torch.int32)
                assert LIB.emu_all_finite(ptr(x), n, CODE[dtype], ptr(flag)) == 0
                check(f"finite {dtype} {n} {off}", flag.item() == 1)
                for bad in (float("nan"), float("inf"), float("-inf")):
                    for pos in {0, n // 2, n - 1}:
                        y = x.clone() if off == 0 else x
                        saved = y[pos].item()
                        y[pos] = bad
                        flag = torch.ones(1, dtype=torch.int32)
                        LIB.emu_all_finite(ptr(y), n, CODE[dtype], ptr(flag))
                        check(f"nonfinite {dtype} {n} {off} {bad} {pos}", flag.item() == 0)
                        y[pos] = saved
                # neighbour outside the range must not be read
                if off:
                    buf[0] = float("nan")
                    flag = torch.ones(1, dtype=torch.int32)
                    LIB.emu_all_finite(ptr(x), n, CODE[dtype], ptr(flag))
                    check(f"outside {dtype} {n} {off}", flag.item() == 1)
        # largest finite values are finite
        x = torch.full((33,), torch.finfo(dtype).max, dtype=dtype)
        flag = torch.ones(1, dtype=torch.int32)
        LIB.emu_all_finite(ptr(x), 33, CODE[dtype], ptr(flag))
        check(f"max finite {dtype}", flag.item() == 1)
    print("all_finite done", len(FAILS))


def fuzz_rows(rnd, rows, cols):
    """A fuzz case's labels (one row ignored), mask (half the time) and whether it wants the
    gradient (sections 11 and 14)."""
    labels = torch.randint(0, cols, (rows,))
    if rows > 1:
        labels[rnd.randrange(rows)] = -100
    mask = (torch.rand(rows) < 0.7).to(torch.uint8) if rnd.random() < 0.5 else None
    return labels, mask, rnd.random() < 0.8


# 11. fuzz: random shapes, dtypes, terms, temperatures, special values, strides
if on(11):
    import random

    rnd = random.Random(int(os.environ.get("FUZZ_SEED", "7")))
    torch.manual_seed(int(os.environ.get("FUZZ_SEED", "7")))
    for it in range(int(os.environ.get("FUZZ_N", "60"))):
        dtype = rnd.choice([torch.float32, torch.bfloat16, torch.float16])
        cols = rnd.choice([1, 2, 3, 8, 9, 15, 16, 17, 31, 64, 100, 257, 1024, 3001, 9000])
        rows = rnd.choice([1, 2, 3, 5])
        T = rnd.choice([0.05, 0.3, 1.0, 2.0, 4.0])
        kl, ce, mse = rnd.choice(combos)
        scale = rnd.choice([1.0, 3.0, 30.0])
        pad = rnd.choice([0, 0, 1, 3, 8])
        off_s = rnd.choice([0, 0, 1, 2, 5])
        off_t = rnd.choice([off_s, off_s, 0, 3])
        S = torch.randn(rows, cols + pad + 8, dtype=torch.float64) * scale
        Tt = torch.randn(rows, cols + pad + 8, dtype=torch.float64) * scale
        if rnd.random() < 0.3:  # close
            Tt = S + torch.randn_like(S) * rnd.choice([1e-3, 1e-2])
        if rnd.random() < 0.3 and cols > 1:  # -inf sprinkles
            k = max(1, cols // 5)
            idx = torch.randint(0, cols, (rows, k))
            which = rnd.choice(["s", "t", "both"])
            if which in ("t", "both"):
                Tt[:, off_t:][torch.arange(rows)[:, None], idx] = float("-inf")
            if which in ("s", "both"):
                S[:, off_s:][torch.arange(rows)[:, None], idx] = float("-inf")
        S = S.to(dtype)
        Tt = Tt.to(dtype)
        s = S[:, off_s : off_s + cols]
        t = Tt[:, off_t : off_t + cols]
        labels, mask, want = fuzz_rows(rnd, rows, cols)
        if os.environ.get("FUZZ_ONLY") and int(os.environ["FUZZ_ONLY"]) != it:
            continue
        name = f"fuzz{it} {dtype} {rows}x{cols} T={T} {kl}{ce}{mse} off={off_s},{off_t} pad={pad} scale={scale}"
        compare(
            name,
            s,
            t if (kl or mse) else None,
            labels if ce else None,
            mask,
            T,
            -100,
            kl,
            ce,
            mse,
            want,
            tol=2e-5 if dtype != torch.float32 else 1e-5,
        )
    print("fuzz done", len(FAILS))

# ---- divergences and logit transforms (sections 12-14) -----------------------------------------
# The oracle is fastdistill.reference in float64 (transform_logits, divergence_rows) on the same,
# already rounded, inputs, with the gradient by autograd through the transforms.

DIVS = [Div("reverse_kl"), Div("jsd", 0.1), Div("jsd", 0.5), Div("jsd", 0.9), Div("tvd")]
XFS = [(1.0, 0.0), (0.7, 0.0), (1.0, 4.0), (2.5, 3.0)]  # (logit_scale, softcap)
KL_COMBOS = [(1, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)]


def div_rows(term, x_raw, y_raw, lab, T, div):
    """Per-row float64 values of one term on raw logits (transformed here, as in the kernel)."""
    x = reference.transform_logits(x_raw, div.scale, div.cap or None)
    if term == "ce":
        # Where the label is a maximum, log1p of the other columns' mass (lse - x_label would
        # leave ~1e-15 absolute of a CE of 1e-12); where() keeps either branch out of the other's
        # backward.
        xl = x.gather(1, lab[:, None])
        top = (xl[:, 0] >= x.max(-1).values) & torch.isfinite(xl[:, 0])
        diff = torch.where(top[:, None], x - xl, float("-inf"))
        off = torch.exp(diff).scatter(1, lab[:, None], 0.0).sum(-1)
        return torch.where(top, torch.log1p(off), torch.logsumexp(x, -1) - xl[:, 0])
    y = reference.transform_logits(y_raw, div.scale, div.cap or None)
    if term == "mse":
        return ((x - y) ** 2).sum(-1)
    return reference.divergence_rows(x, y, div.name, temperature=T, beta=div.beta)


def rows_precise(x_raw, y_raw, T, div):
    """Divergence rows in float64 without the reference formulas' cancellation (differences of
    log-probabilities near log p: 1e-5 relative where the student is within 1e-4 of the teacher
    at T = 4, nothing left of values below ~1e-16), from d = log p_t - log p_s formed from exact
    logit differences, per column: forward KL p_t (e^-d - 1 + d), reverse KL p_s (e^d - 1 - d),
    JSD p (a g(z) - h(u)) as divergences.cuh (u = a expm1(z), z = d or -d, see jsd_small_term).
    On the rows where every d is finite and e^|d| does not overflow (NaN on the others; TVD: NaN,
    its reference has no such cancellation). Columns that are -inf on both sides contribute 0."""
    x = reference.transform_logits(x_raw, div.scale, div.cap or None)
    y = reference.transform_logits(y_raw, div.scale, div.cap or None)
    both = (x == float("-inf")) & (y == float("-inf"))
    u_ = torch.where(both, 0.0, (x - y) / T)
    lt = torch.log_softmax(y / T, -1)
    d = torch.logsumexp(torch.where(both, float("-inf"), lt + u_), -1, keepdim=True) - u_
    d = torch.where(both, 0.0, d)
    ps, pt = torch.softmax(x / T, -1), torch.softmax(y / T, -1)
    if div.name == "forward_kl":
        term = pt * (torch.expm1(-d) + d)
    elif div.name == "reverse_kl":
        term = ps * (torch.expm1(d) - d)
    elif div.name == "jsd":
        a, p, z = (div.beta, ps, d) if div.beta <= 0.5 else (1 - div.beta, pt, -d)
        u = a * torch.expm1(z)
        term = p * (a * (z * torch.exp(z) - torch.expm1(z)) - ((1 + u) * torch.log1p(u) - u))
    else:
        return torch.full(x.shape[:-1], float("nan"), dtype=torch.float64)
    rows = term.clamp_min(0.0).sum(-1)
    return torch.where((d.abs() < 700).all(-1), rows, float("nan"))


def ref_values(s64, t64, labels, on, T, div):
    """float64 row values of the active terms (``on``: term -> its selected rows, or None)."""
    cols = s64.shape[1]
    lab = labels.clamp(0, cols - 1) if on["ce"] is not None else None
    factor = {"kl": T * T if div.t2 else 1.0, "ce": 1.0, "mse": 1.0}
    out = {}
    for term, rows_on in on.items():
        if rows_on is None:
            continue
        v = div_rows(term, s64, t64, lab, T, div)
        if term == "kl":
            precise = rows_precise(s64, t64, T, div)
            v = torch.where(torch.isnan(precise), v, precise)
        v = v * factor[term]
        if term == "ce":
            v = torch.where((labels < 0) | (labels >= cols), float("nan"), v)
        out[term] = torch.where(rows_on, v, 0.0)
    return out


SWAPPED = {"forward_kl": "reverse_kl", "reverse_kl": "forward_kl", "jsd": "jsd", "tvd": "tvd"}


def value_sensitivity(x, y, labels, on, term, T, div):
    """Per row, sum_j |d value / d x_j| ulp32(x_j) for the term's row values of (transformed)
    logits x (student) and y (teacher), by float64 autograd on the student's side; the teacher's
    side is the student's of the swapped call (the reference detaches the teacher): forward and
    reverse KL trade places, JSD takes 1 - beta, TVD and MSE are symmetric."""
    bound = torch.zeros(x.shape[0], dtype=torch.float64)
    plain = dataclasses.replace(div, scale=1.0, cap=0.0)
    swapped = dataclasses.replace(plain, name=SWAPPED[div.name], beta=1.0 - div.beta)
    sides = [(x, y, plain)] + ([(y, x, swapped)] if term != "ce" else [])
    for a, b, d in sides:
        leaf = a.detach().clone().requires_grad_(True)
        sub = {k: (r if k == term else None) for k, r in on.items()}
        vals = ref_values(leaf, b, labels, sub, T, d)[term]
        fin = torch.isfinite(vals)
        if not vals.requires_grad or not bool(fin.any()):
            continue
        vals[fin].sum().backward()
        a32 = a.detach().float()
        ulp = (torch.nextafter(a32, torch.tensor(float("inf"))).double() - a32.double()).nan_to_num(
            0.0, 0.0, 0.0
        )
        bound += (leaf.grad.nan_to_num(0.0, 0.0, 0.0).abs() * ulp).sum(-1)
    return bound


def transform_allowance(s64, t64, labels, on, T, div, out):
    """Per term, what the kernel's fp32 rounding of the transformed logits x' can change in the
    row values: 3 value_sensitivity (first order), for the few roundings between x and the
    kernel's x' (the kernels, CPU and Triton alike, hold x' in fp32; close to the teacher, or where
    softcap saturates, that is a large part of s' - t'). Norm over the rows; 0 without a
    transform."""
    if (div.scale, div.cap) == (1.0, 0.0):
        return {term: 0.0 for term in out}
    xs = reference.transform_logits(s64, div.scale, div.cap or None)
    xt = reference.transform_logits(t64, div.scale, div.cap or None) if t64 is not None else None
    allow = {}
    for term in out:
        bound = value_sensitivity(xs, xt, labels, on, term, T, div)
        allow[term] = 3.0 * float(bound.norm())
    return allow


def ref_div(s, t, labels, mask, T, ignore, kl, ce, mse, scales, div):
    """float64 row values and the gradient of c0 T D + c1 CE + c2 MSE / 2 w.r.t. the raw student
    logits (the kernel's, see kernels_cuda.h), with c = scales. The gradient rows: the oracle
    where every active value is finite, 0 without an active term, NaN where a value is NaN;
    also returns the rows to compare (not those with an infinite value) and, per term, the
    allowance of transform_allowance."""
    rows, cols = s.shape
    s64 = s.double()
    t64 = t.double() if t is not None else None
    sel = torch.ones(rows, dtype=torch.bool) if mask is None else mask.bool()
    on = {
        "kl": sel if kl else None,
        "ce": labels != ignore if ce else None,
        "mse": sel if mse else None,
    }
    lab = labels.clamp(0, cols - 1) if ce else None
    out = ref_values(s64, t64, labels, on, T, div)
    allow = transform_allowance(s64, t64, labels, on, T, div, out)
    active = torch.zeros(rows, dtype=torch.bool)
    nan_rows = torch.zeros(rows, dtype=torch.bool)
    fine = torch.ones(rows, dtype=torch.bool)
    for term, v in out.items():
        active |= on[term]
        fine &= torch.isfinite(v)
        if term != "mse":  # a NaN MSE (-inf - -inf) leaves NaN in its columns only: IEEE
            nan_rows |= torch.isnan(v)
    g = torch.zeros(rows, cols, dtype=torch.float64)
    g[nan_rows] = float("nan")
    idx = (active & fine).nonzero()[:, 0]
    leaf = s64[idx].clone().requires_grad_(True)
    weight = {"kl": float(scales[0]) * T, "ce": float(scales[1]), "mse": 0.5 * float(scales[2])}
    total = leaf.new_zeros(())
    for term, rows_on in on.items():
        if rows_on is None:
            continue
        m = rows_on[idx]  # each term on its own rows: a garbage row must not reach its backward
        y = t64[idx][m] if t64 is not None else None
        total = (
            total
            + weight[term] * div_rows(term, leaf[m], y, lab[idx][m] if ce else None, T, div).sum()
        )
    if total.requires_grad:
        total.backward()
        g[idx] = leaf.grad
    return out, g, active, nan_rows | fine, allow


def compare_div(name, s, t, labels, mask, T, ignore, kl, ce, mse, want_grad, div, tol=1e-5):
    scales = torch.tensor([0.7 * T, 1.3, 0.4], dtype=torch.float32)
    rk, rc, rm, g = run_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales, want_grad, div)
    ref, gref, active, rows_m, allow = ref_div(
        s, t, labels, mask, T, ignore, kl, ce, mse, scales, div
    )
    name = f"{name} {div}"
    check_values(name, {"kl": rk, "ce": rc, "mse": rm}, ref, tol, allow)
    if want_grad:
        check(f"{name} grad unselected", bool((g[~active] == 0).all()), "")
        # tests/_oracle.py's absolute floor: a row whose gradient is all below ~1e-18 (one-hot
        # rows at T = 0.05, p_s of 1e-20 where ex2 flushes below 2^-126) has no relative error
        check_grad(name, g[rows_m], gref[rows_m], s.dtype, tol, atol=1e-10)
    return rk, rc, rm, g


def inputs(s, t, labels, kl, ce, mse):
    """The kernel's inputs for a term set: the teacher only for kl and mse, labels only for ce."""
    return s, t if (kl or mse) else None, labels if ce else None


def rotate(base, i):
    """Case i's transforms, t2_scale and terms: every combination over 32 consecutive cases."""
    scale, cap = XFS[i % 4]
    d = dataclasses.replace(base, scale=scale, cap=cap, t2=(i // 16) % 2 == 0)
    terms = combos if base.name == "forward_kl" else KL_COMBOS
    return d, terms[(i // 4) % len(terms)]


# 12. each divergence (and forward KL) with the transforms and t2_scale off, random data
if on(12):
    i = 0
    for base in DIVS + [Div("forward_kl")]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for cols in (1, 7, 1271, 5000):
                rows = 6
                s = (torch.randn(rows, cols) * 3).to(dtype)
                t = (torch.randn(rows, cols) * 3).to(dtype)
                labels = torch.randint(0, cols, (rows,))
                labels[1] = -100
                mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.uint8)
                for T in (0.05, 1.0, 4.0):
                    i += 1
                    d, terms = rotate(base, i)
                    name = f"div {dtype} V={cols} T={T} {terms}"
                    args = (*inputs(s, t, labels, *terms), mask, T, -100, *terms)
                    compare_div(name, *args, True, d)
                d, _ = rotate(base, i + 5)
                compare_div(
                    f"div nograd {dtype} V={cols}", s, t, labels, None, 2.0, -100, 1, 1, 1, False, d
                )
    print("divergences done", len(FAILS))


def edge_exact_zero():
    """student == teacher: every divergence, row value and gradient exactly 0 (and MSE 0), with
    and without the transforms, -inf entries included."""
    for base in DIVS + [Div("forward_kl")]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for cols in (1, 9, 4099):
                x = (torch.randn(3, cols) * 4).to(dtype)
                if cols > 1:
                    x[0, 0] = float("-inf")
                for T in (0.05, 1.0, 4.0):
                    for scale, cap in ((1.0, 0.0), (0.5, 20.0)):
                        d = dataclasses.replace(base, scale=scale, cap=cap, t2=T != 1.0)
                        scales = torch.tensor([1.0, 0.0, 1.0])
                        what = f"equal {d} {dtype} V={cols} T={T}"
                        # MSE only on the rows without -inf ((-inf) - (-inf) is NaN there)
                        for y, mse in ((x, 0), (x[1:], 1)):
                            rk, _, rm, g = run_fused(
                                y, y.clone(), None, None, T, -100, 1, 0, mse, scales, True, d
                            )
                            check(f"{what} kl", bool((rk == 0).all()), rk)
                            check(f"{what} mse", mse == 0 or bool((rm == 0).all()), rm)
                            check(f"{what} grad", bool((g == 0).all()), g.abs().max())


def edge_masked_and_nan():
    """All rows masked (garbage in them): 0 and a 0 gradient. NaN or +inf in a selected row: its
    value and gradient NaN, the other rows finite."""
    s = torch.randn(6, 77)
    t = torch.randn(6, 77)
    s[0, 5] = float("nan")
    t[1, 9] = float("nan")
    s[2, 3] = float("inf")
    t[3, :] = float("-inf")
    s[4, :] = float("-inf")
    ignored = torch.full((6,), -100)
    for base in DIVS:
        for scale, cap in ((1.0, 0.0), (0.7, 3.0)):
            d = dataclasses.replace(base, scale=scale, cap=cap)
            zeros = torch.zeros(6, dtype=torch.uint8)
            rk, rc, rm, g = run_fused(
                s, t, ignored, zeros, 1.5, -100, 1, 1, 1, torch.ones(3), True, d
            )
            check(f"masked {d}", bool((rk == 0).all() and (rc == 0).all() and (rm == 0).all()), rk)
            check(f"masked {d} grad", bool((g == 0).all()), g.abs().max())
            rk, _, _, g = run_fused(s, t, None, None, 1.5, -100, 1, 0, 0, torch.ones(3), True, d)
            # softcap maps +inf and -inf to +-cap: those rows are finite (as in the reference)
            bad = [0, 1] if cap else [0, 1, 2, 3, 4]
            check(f"nan rows {d}", bool(torch.isnan(rk[bad]).all() and torch.isfinite(rk[5])), rk)
            check(
                f"nan rows {d} grad",
                bool(torch.isnan(g[bad]).all() and torch.isfinite(g[5]).all()),
                g[:, 0],
            )
    compare_div("nan rows", s, t, None, None, 1.5, -100, 1, 0, 1, True, Div("jsd", 0.3, cap=3.0))


def edge_inf_and_low():
    """-inf logits (both sides, the student's only, the teacher's only: reverse KL is +inf there);
    log-probabilities far below -104 on both sides (no NaN at interior beta); a student close to
    a bf16 teacher (JSD >= 0 on every row)."""
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.randn(9, 129)
        t = torch.randn(9, 129)
        both = torch.rand(9, 129) < 0.2
        both[:, :3] = False
        s[both] = float("-inf")
        t[both] = float("-inf")
        s[:, 1] = float("-inf")
        t_only = t.clone()
        t_only[:, 2] = float("-inf")
        low_s = torch.randn(6, 200)
        low_t = torch.randn(6, 200)
        low = torch.rand(6, 200) < 0.3
        low[:, 0] = False
        low_s[low] = -150.0
        low_t[low] = -130.0 - 40.0 * torch.rand(int(low.sum()))
        for base in DIVS + [Div("jsd", 0.01), Div("jsd", 0.99)]:
            for T in (0.5, 2.0):
                for cap in (0.0, 6.0):
                    d = dataclasses.replace(base, cap=cap, t2=T == 2.0)
                    sd, td = s.to(dtype), t.to(dtype)
                    compare_div(
                        f"-inf {dtype} T={T}", sd, td, None, None, T, -100, 1, 0, 0, True, d
                    )
                    rk, _, _, _ = run_fused(
                        sd, t_only.to(dtype), None, None, T, -100, 1, 0, 0, torch.ones(3), False, d
                    )
                    if base.name == "reverse_kl" and not cap:
                        check(
                            f"teacher -inf {d} {dtype}",
                            bool(torch.isinf(rk).all() and (rk > 0).all()),
                            rk,
                        )
                    else:
                        compare_div(
                            f"teacher -inf {dtype} T={T}",
                            sd,
                            t_only.to(dtype),
                            None,
                            None,
                            T,
                            -100,
                            1,
                            0,
                            0,
                            True,
                            d,
                        )
            ls, lt = low_s.to(dtype), low_t.to(dtype)
            rk, _, _, g = compare_div(
                f"lp<-104 {dtype}", ls, lt, None, None, 1.0, -100, 1, 0, 0, True, base
            )
            check(
                f"lp<-104 {base} {dtype} no nan",
                not bool(torch.isnan(rk).any() or torch.isnan(g.double()).any()),
                rk,
            )
        tb = (torch.randn(64, 1000) * 3).bfloat16()
        sb = (tb.float() + 1e-3 * torch.randn(64, 1000)).bfloat16()
        for beta in (0.1, 0.5, 0.9):
            for T in (0.5, 1.0, 3.0):
                rk, _, _, _ = run_fused(
                    sb, tb, None, None, T, -100, 1, 0, 0, torch.ones(3), False, Div("jsd", beta)
                )
                check(f"jsd >= 0 beta={beta} T={T}", bool((rk >= 0).all()), rk.min())


def edge_close_large_strided():
    """A student within 1e-4 of the teacher (where the divergences lose digits to any
    cancellation), |logits| up to 1e4, and rows at odd offsets or with mismatched phases."""
    for base in DIVS:
        for cols in (7, 1271, 32000):
            t = torch.randn(4, cols) * 2
            s = t + 1e-4 * torch.randn(4, cols)
            for T in (0.05, 1.0, 4.0):
                compare_div(f"close V={cols} T={T}", s, t, None, None, T, -100, 1, 0, 0, True, base)
        for dtype in (torch.float32, torch.bfloat16):
            s = (torch.rand(13, 301, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
            t = (torch.rand(13, 301, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
            labels = torch.randint(0, 301, (13,))
            for T in (0.05, 1.0, 4.0):
                compare_div(
                    f"uniform 1e4 {dtype} T={T}", s, t, labels, None, T, -100, 1, 1, 0, True, base
                )
            base_s = torch.randn(5, 1300).to(dtype)
            base_t = torch.randn(5, 1300).to(dtype)
            labels = torch.tensor([0, 5, 1272, -100, 17])
            mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.uint8)
            d = dataclasses.replace(base, scale=1.3, cap=5.0)
            s, t = base_s[:, 3:1276], base_t[:, 3:1276]
            compare_div(f"offset3 {dtype}", s, t, labels, mask, 2.0, -100, 1, 1, 1, True, d)
            compare_div(
                f"phase mismatch {dtype}",
                s,
                base_t[:, 2:1275],
                labels,
                None,
                2.0,
                -100,
                1,
                1,
                1,
                True,
                d,
            )


# 13. divergences: the edge cases of tests/test_divergences.py
if on(13):
    edge_exact_zero()
    edge_masked_and_nan()
    edge_inf_and_low()
    edge_close_large_strided()
    print("divergence edges done", len(FAILS))

# 14. fuzz over the divergences, transforms, t2_scale, shapes, dtypes, terms and special values
if on(14):
    import random

    rnd = random.Random(int(os.environ.get("FUZZ_SEED", "7")) + 14)
    torch.manual_seed(int(os.environ.get("FUZZ_SEED", "7")) + 14)
    for it in range(int(os.environ.get("FUZZ_N", "60"))):
        dtype = rnd.choice([torch.float32, torch.bfloat16, torch.float16])
        cols = rnd.choice([1, 2, 3, 8, 9, 17, 31, 64, 257, 1024, 3001, 9000])
        rows = rnd.choice([1, 2, 3, 5])
        T = rnd.choice([0.05, 0.3, 1.0, 2.0, 4.0])
        scale, cap = rnd.choice(XFS + [(1.0, 30.0), (0.3, 0.0)])
        base = rnd.choice(DIVS + [Div("jsd", rnd.uniform(0.02, 0.98)), Div("forward_kl")])
        d = dataclasses.replace(base, scale=scale, cap=cap, t2=rnd.random() < 0.5)
        kl, ce, mse = rnd.choice(KL_COMBOS if base.name != "forward_kl" else combos)
        mag = rnd.choice([1.0, 3.0, 30.0])
        off_s = rnd.choice([0, 0, 1, 2, 5])
        off_t = rnd.choice([off_s, off_s, 0, 3])
        S = torch.randn(rows, cols + 16, dtype=torch.float64) * mag
        Tt = torch.randn(rows, cols + 16, dtype=torch.float64) * mag
        # Close rows only without a transform: the kernels (CPU and Triton alike) round x' to fp32
        # before forming x' - t', which leaves ~ulp(x') / |x' - t'| of relative error there.
        if rnd.random() < 0.3 and (scale, cap) == (1.0, 0.0):
            Tt = S + torch.randn_like(S) * rnd.choice([1e-3, 1e-2])
        if rnd.random() < 0.3 and cols > 1:  # -inf on both sides together (finite values)
            k = max(1, cols // 5)
            idx = torch.randint(0, cols, (rows, k))
            r_ = torch.arange(rows)[:, None]
            S[:, off_s:][r_, idx] = float("-inf")
            Tt[:, off_t:][r_, idx] = float("-inf")
        s = S.to(dtype)[:, off_s : off_s + cols]
        t = Tt.to(dtype)[:, off_t : off_t + cols]
        labels, mask, want = fuzz_rows(rnd, rows, cols)
        if os.environ.get("FUZZ_ONLY") and int(os.environ["FUZZ_ONLY"]) != it:
            continue
        name = f"dfuzz{it} {dtype} {rows}x{cols} T={T} {kl}{ce}{mse} off={off_s},{off_t} mag={mag}"
        args = (*inputs(s, t, labels, kl, ce, mse), mask, T, -100, kl, ce, mse, want)
        compare_div(name, *args, d, tol=2e-5 if dtype != torch.float32 else 1e-5)
    print("divergence fuzz done", len(FAILS))

print("TOTAL FAILS", len(FAILS))
sys.exit(1 if FAILS else 0)
