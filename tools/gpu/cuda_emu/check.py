"""Host emulation check of the CUDA kernels (csrc/cuda/*.cu) against float64, without a GPU.

The .cu files are translated (kernel<<<grid, block, smem, stream>>>(args) -> emu::launch(...)),
compiled with g++ against include/ (a few CUDA types and intrinsics: one std::thread per CUDA
thread, blocks one after another, __syncthreads and warp shuffles on std::barrier, ex2.approx
modelled as exp2 with a deterministic +-2 ulp error, 16-byte alignment of vector accesses
checked) and run on CPU tensors through ctypes.

    python tools/gpu/cuda_emu/check.py               # everything (~10 min on 2 cores)
    SECTIONS=2,11 FUZZ_N=200 FUZZ_SEED=5 python tools/gpu/cuda_emu/check.py
    GRID_CAP=3 python tools/gpu/cuda_emu/check.py    # grid-stride path: at most 3 blocks

What it cannot show: timing, the memory model, cache hints, real ex2.approx/cvt rounding, or
anything the GPU does differently from the C++ abstract machine.
"""

import ctypes
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

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
]
LIB.emu_cosine.argtypes = [P, I64, P, I64, P, I64, I64, ctypes.c_int, P, P, P]
LIB.emu_all_finite.argtypes = [P, I64, ctypes.c_int, P]
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def ptr(t):
    return None if t is None else t.data_ptr()


def run_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales, want_grad):
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


def compare(
    name, s, t, labels, mask, T, ignore, kl, ce, mse, want_grad, tol=1e-5, gtol=None, nan_ok=False
):
    scales = torch.tensor([0.7 * T, 1.3, 0.4], dtype=torch.float32)
    rk, rc, rm, g = run_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales, want_grad)
    ref, gref = ref_fused(s, t, labels, mask, T, ignore, kl, ce, mse, scales)
    for key, val in (("kl", rk), ("ce", rc), ("mse", rm)):
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
        check(
            f"{name} {key}",
            e <= tol or e_abs <= 1e-18,
            f"rel {e:.3g} vals {val[m][:4].tolist()} ref {r[m][:4].tolist()}",
        )
    if want_grad:
        nan_ref = torch.isnan(gref)
        gn = torch.isnan(g.double())
        check(
            f"{name} grad nan pattern", torch.equal(gn, nan_ref), f"{gn.sum()} vs {nan_ref.sum()}"
        )
        inf_ref = torch.isinf(gref)
        check(
            f"{name} grad inf pattern", torch.equal(torch.isinf(g.double()) & ~nan_ref, inf_ref), ""
        )
        m = ~nan_ref & ~inf_ref
        if s.dtype == torch.float32:
            e = rel(g[m], gref[m])
            lim = gtol or tol
        else:
            rounded = gref.to(s.dtype).double()
            e = float((g.double()[m] - gref[m]).norm())
            lim = 1.5 * float((rounded[m] - gref[m]).norm()) + 1e-6 * float(gref[m].norm()) + 1e-12
        check(f"{name} grad", e <= lim, f"err {e:.3g} lim {lim:.3g}")
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
        labels = torch.randint(0, cols, (rows,))
        if rows > 1:
            labels[rnd.randrange(rows)] = -100
        mask = (torch.rand(rows) < 0.7).to(torch.uint8) if rnd.random() < 0.5 else None
        want = rnd.random() < 0.8
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

print("TOTAL FAILS", len(FAILS))
sys.exit(1 if FAILS else 0)
