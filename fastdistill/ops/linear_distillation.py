"""fastdistill::linear_distillation: distillation from hidden states and output heads, chunked
over tokens so that the ``(tokens, V)`` logits are never materialised.

For N tokens, the student's logits are s = h_s W_sᵀ + b_s (``(N, Hs) x (V, Hs)ᵀ``) and the
teacher's t = h_t W_tᵀ + b_t (or given logits). Per token selected by the labels (label !=
``ignore_index``; every token without labels):

    total = (alpha_kd · Σ_sel D(t', s') + alpha_ce · Σ_sel CE(s', label)) / n

with D the divergence of ``fastdistill::distillation_divergence`` (forward_kl, reverse_kl, jsd
with beta, tvd; times T² when ``t2_scale``) at temperature T, x' = the logits after
``logit_scale`` and ``softcap``, and n = ``normalizer`` when given, else max(#selected, 1). Both
components come back divided by the same n. Outputs: total, components [kd, ce] (float32, no
gradient) and the gradients of the total w.r.t. student_hidden, student_weight and student_bias
(each an empty tensor when not requested), computed in the forward pass.

How: for each chunk of C rows, the student logits come from one GEMM into a float32 buffer
(never rounded to bf16 before the softmax), the teacher's likewise (or a float32 copy of the
given logits), the fused logits kernel (CPU core, Triton or CUDA, chosen as for every other op)
writes d total/d logits for that chunk, and two more GEMMs add the chunk's share to d hidden
(rows of the chunk) and d W (accumulated in float32). Alive at once, whatever N: the chunk's
student and teacher logits, 2 · C · V floats, with the CPU and Triton kernels, which write the
gradient over the student's logits (ops/_fused_logits.py, _IN_PLACE_BACKENDS); 3 · C · V with the
CUDA kernel, which writes it to a buffer of its own. (Given float32 teacher logits are read where
they are: one buffer fewer.) Nothing is read back to the host: per-chunk sums and the count stay
on the device, 1/n scales the gradients once at the end.
With bf16/fp16 inputs on CUDA the forward GEMMs take the inputs as they are and write float32
(``fp32_output_gemm``): the teacher's head is never widened, the student's only for the backward
GEMMs, which keep the exact float32 logits gradient. On CPU both heads are widened to float32
(PyTorch's CPU build has no half-precision GEMM with a float32 output), which makes bf16 as slow
as fp32 there.

The chunk loop (``run_linear_chunks``), the normalisation, the fake outputs and the autograd rule
are shared with ``fastdistill::linear_topk_distillation`` (ops/linear_topk_distillation.py), whose
teacher is a sparse top-k one: the two ops differ only in the loss of one chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastdistill import _buffers, _native
from fastdistill.ops._divergence import divergence_code
from fastdistill.ops._fused_logits import Terms, Transform, run_fused_logits

_F32 = torch.float32
# Target size of ONE float32 chunk of logits (two or three are alive at once, see the module
# docstring; the bound on the free memory assumes three). Each chunk also reads and
# writes the whole float32 weight gradient (V x H) once, so chunks of fewer than a few hundred rows
# spend more time on that than on their GEMMs; 128 MiB is 1,024 rows at V = 32,000.
CPU_CHUNK_BYTES = 128 << 20
GPU_CHUNK_BYTES = 256 << 20


def _host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), or a conservative 4 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_chunk_size(n: int, v: int, device: torch.device) -> int:
    """Rows per chunk: one float32 ``(rows, V)`` buffer of about CPU_CHUNK_BYTES (GPU:
    GPU_CHUNK_BYTES), never more than 1/16 of the free memory for the three buffers alive at once;
    a multiple of 64 rows when that large (GEMM tiles), at most ``n``."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]  # a driver query, not a stream sync
        target = GPU_CHUNK_BYTES
    else:
        free, target = _host_available_bytes(), CPU_CHUNK_BYTES
    row_bytes = 4 * max(v, 1)
    rows = max(1, min(target, free // 48) // row_bytes)
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n))


def _empty_f32(rows: int, v: int, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return _buffers.empty_cpu(torch.Size((rows, v)), _F32)  # pooled: no page faults per call
    return torch.empty((rows, v), dtype=_F32, device=device)


def _wide(x: Tensor | None) -> Tensor | None:
    """``x`` in float32 (the GEMMs run in fp32 so the logits are never rounded to bf16)."""
    return x if x is None or x.dtype == _F32 else x.float()


def fp32_output_gemm(hidden: Tensor | None, weight: Tensor | None) -> bool:
    """Whether ``hidden · weightᵀ`` can run on the half-precision inputs with a float32 output
    (cuBLAS accumulates in fp32: the same logits as the fp32 GEMM of the widened inputs, at the
    half-precision GEMM's speed and without a float32 copy of the head). CUDA only: PyTorch's CPU
    build has no kernel for ``torch.mm(..., out_dtype=)``, so on CPU the inputs are widened."""
    return (
        hidden is not None
        and weight is not None
        and hidden.device.type == "cuda"
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == hidden.dtype
    )


def _logits_into(
    out: Tensor, hidden: Tensor, weight: Tensor, weight32: Tensor | None, bias32: Tensor | None
) -> Tensor:
    """out = hidden · weightᵀ (+ bias), float32, written into the chunk buffer: from the inputs
    as they are when ``weight32`` is None (see fp32_output_gemm), else from their fp32 widening."""
    if weight32 is None:
        torch.mm(hidden, weight.t(), out_dtype=_F32, out=out)
    else:
        torch.mm(_wide(hidden), weight32.t(), out=out)
    if bias32 is not None:
        out.add_(bias32)
    return out


def chunk_rows(chunk_size: int, n: int, v: int, device: torch.device) -> int:
    """Rows per chunk: ``chunk_size`` (0 = automatic, see auto_chunk_size), within [1, n]."""
    rows = chunk_size if chunk_size > 0 else auto_chunk_size(n, v, device)
    return max(1, min(rows, n))


# What a linear op computes for one chunk: given the chunk's float32 student logits (rows, V)
# (which it may overwrite), the chunk's rows of the flattened tokens, their labels and selection
# (label != ignore_index; None = every row) and whether a gradient is wanted, it returns the chunk's
# unnormalised [total, kd, ce] and d(unnormalised total)/d logits (float32, zero on unselected
# rows), or None.
ChunkLoss = Callable[[Tensor, slice, "Tensor | None", "Tensor | None", bool], tuple]


def run_linear_chunks(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    labels: Tensor | None,
    normalizer: Tensor | None,
    ignore_index: int,
    rows: int,
    wanted: tuple[bool, bool, bool],
    chunk_loss: ChunkLoss,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunk loop of the linear ops (this one and ``linear_topk_distillation``): per chunk of
    ``rows`` tokens, the student's logits by one float32 GEMM into a reused buffer, the chunk's
    loss and logits gradient from ``chunk_loss``, and its share of d hidden (rows of the chunk),
    d weight and d bias (float32 accumulation); ``wanted`` = (hidden, weight, bias). Returns the
    op's outputs: total, [kd, ce] (divided by the normaliser) and the three gradients (empty where
    not wanted), in the inputs' dtypes."""
    n, v = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    grad_hidden, grad_weight, grad_bias = wanted
    any_grad = any(wanted)
    # The backward GEMMs take the float32 logits gradient: they need the widened weight.
    w32, b32 = _wide(student_weight), _wide(student_bias)
    fwd_w32 = None if fp32_output_gemm(student_hidden, student_weight) else w32
    logits_buf = _empty_f32(rows, v, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # total, kd, ce
    d_h = torch.empty(student_hidden.shape, dtype=_F32, device=device) if grad_hidden else None
    d_w = torch.zeros(student_weight.shape, dtype=_F32, device=device) if grad_weight else None
    d_b = torch.zeros((v,), dtype=_F32, device=device) if grad_bias else None
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        h = student_hidden[sl]
        s = _logits_into(logits_buf[: h.shape[0]], h, student_weight, fwd_w32, b32)
        lab = labels[sl] if labels is not None else None
        sel = lab != ignore_index if lab is not None else None
        part, g = chunk_loss(s, sl, lab, sel, any_grad)
        sums += part
        if not any_grad:
            continue
        if grad_hidden:
            torch.mm(g, w32, out=d_h[sl])
        if grad_weight:
            # Unselected rows have zero gradient, but 0 · NaN (garbage in padding rows) is NaN.
            h32 = _wide(h) if sel is None else torch.where(sel.unsqueeze(1), _wide(h), 0.0)
            d_w.addmm_(g.t(), h32)
        if grad_bias:
            d_b.add_(g.sum(0))
        del part, g  # back to the pool before the next chunk's gradient is allocated
    return _finish(sums, labels, ignore_index, n, normalizer, student_hidden, student_weight,
                   (d_h, d_w, d_b))  # fmt: skip


def _teacher_chunk(buf, sl, teacher_hidden, teacher_w, teacher_w32, teacher_b32, teacher_logits):
    if teacher_logits is not None:
        part = teacher_logits[sl]
        return part if part.dtype == _F32 else buf[: part.shape[0]].copy_(part)
    if teacher_hidden is not None:
        h = teacher_hidden[sl]
        return _logits_into(buf[: h.shape[0]], h, teacher_w, teacher_w32, teacher_b32)
    return None


@torch.library.custom_op("fastdistill::linear_distillation", mutates_args=())
def linear_distillation(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    normalizer: Tensor | None,
    temperature: float,
    alpha_kd: float,
    alpha_ce: float,
    ignore_index: int,
    divergence: str,
    beta: float,
    t2_scale: bool,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shapes: student_hidden ``(N, Hs)``, student_weight ``(V, Hs)``, student_bias ``(V,)``;
    teacher_hidden ``(N, Ht)`` with teacher_weight ``(V, Ht)`` (and teacher_bias), or
    teacher_logits ``(N, V)``, or neither when alpha_kd is 0; labels ``(N,)`` int64; normalizer
    a 0-dim float64 tensor; chunk_size 0 = automatic. Returns (total, [kd, ce], d hidden,
    d weight, d bias)."""
    n, v = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    kd, ce = alpha_kd > 0, alpha_ce > 0
    rows = chunk_rows(chunk_size, n, v, device)
    th = teacher_hidden if kd else None
    # The teacher's head is only multiplied forward: no float32 copy where the GEMM can do without.
    widen_teacher = kd and not fp32_output_gemm(th, teacher_weight)
    tw32 = _wide(teacher_weight) if widen_teacher else None
    tb32 = _wide(teacher_bias) if kd else None
    tl = teacher_logits if kd else None
    needs_buffer = th is not None or (tl is not None and tl.dtype != _F32)
    teacher_buf = _empty_f32(rows, v, device) if needs_buffer else None
    terms = Terms(
        kl=kd, ce=ce, w_kl=alpha_kd, w_ce=alpha_ce,
        norm_kl=_native.NORM_SUM, norm_ce=_native.NORM_SUM,
        divergence=divergence_code(divergence, beta) if kd else _native.FORWARD_KL,
        beta=beta, t2_scale=t2_scale,
    )  # fmt: skip
    transform = Transform(logit_scale, softcap)

    def chunk_loss(s, sl, lab, sel, compute_grad):
        t = _teacher_chunk(teacher_buf, sl, th, teacher_weight, tw32, tb32, tl)
        # The gradient goes over the student's logits where the backend's kernel allows it (they
        # are not read again: run_linear_chunks takes the gradient and the sums from here).
        res = run_fused_logits(
            "distillation_divergence", s, t, lab if ce else None, sel if kd else None,
            terms=terms, compute_grad=compute_grad, temperature=temperature,
            ignore_index=ignore_index, transform=transform, grad_into=s,
        )  # fmt: skip
        return res.out[0:3], res.grad if compute_grad else None

    return run_linear_chunks(
        student_hidden, student_weight, student_bias, labels, normalizer, ignore_index, rows,
        (grad_hidden, grad_weight, grad_bias), chunk_loss,
    )  # fmt: skip


def _finish(sums, labels, ignore_index, n, normalizer, hidden, weight, grads):
    """Divide by the normaliser (a device tensor: no sync) and cast to the inputs' dtypes."""
    if normalizer is not None:
        denom = normalizer.to(torch.float64)
    elif labels is not None:
        denom = (labels != ignore_index).sum(dtype=torch.float64).clamp_min(1.0)
    else:
        denom = torch.full((), float(max(n, 1)), dtype=torch.float64, device=sums.device)
    out = (sums / denom).to(_F32)
    inv = (1.0 / denom).to(_F32)
    d_h, d_w, d_b = grads
    result = []
    for g, like in ((d_h, hidden), (d_w, weight), (d_b, weight)):
        if g is None:
            result.append(hidden.new_empty((0,)))  # one each: outputs must not alias
            continue
        g.mul_(inv)
        result.append(g if g.dtype == like.dtype else g.to(like.dtype))
    return out[0].clone(), out[1:3].clone(), *result


def fake_linear_outputs(hidden: Tensor, weight: Tensor, wanted: tuple[bool, bool, bool]):
    """The outputs' metadata of a linear op (its fake implementation)."""
    f32 = dict(dtype=torch.float32)
    grad_hidden, grad_weight, grad_bias = wanted

    def maybe(on: bool, like: Tensor, shape) -> Tensor:
        return like.new_empty(shape) if on else hidden.new_empty((0,))

    return (
        hidden.new_empty((), **f32),
        hidden.new_empty((2,), **f32),
        maybe(grad_hidden, hidden, hidden.shape),
        maybe(grad_weight, weight, weight.shape),
        maybe(grad_bias, weight, (weight.shape[0],)),
    )


@linear_distillation.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
      teacher_logits, labels, normalizer, temperature, alpha_kd, alpha_ce, ignore_index,
      divergence, beta, t2_scale, logit_scale, softcap, chunk_size, grad_hidden, grad_weight,
      grad_bias):  # fmt: skip
    return fake_linear_outputs(
        student_hidden, student_weight, (grad_hidden, grad_weight, grad_bias)
    )


def register_linear_autograd(op, *, num_inputs: int) -> None:
    """Autograd of a linear op: inputs 0-2 are the student's hidden states, weight and bias, the
    last three inputs say which of them want a gradient, and outputs 2-4 are those gradients,
    computed in the forward for an upstream gradient of 1; the backward scales them."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.wanted = tuple(bool(x) for x in inputs[-3:])
        # Eager: keep the gradients on ctx and hand them over in the backward (no copy by
        # AccumulateGrad, no second weight-sized buffer); traced: save_for_backward, as the
        # compiler requires (see ops/_common.py, register_saved_grad_autograd).
        ctx.traced = type(output[2]) is not torch.Tensor
        if ctx.traced:
            ctx.save_for_backward(*output[2:5])
        else:
            ctx.grads = output[2:5]

    def backward(ctx, grad_total, *_unused):
        none = (None,) * num_inputs
        if grad_total is None or not any(ctx.wanted):
            return none
        if ctx.traced:
            grads = ctx.saved_tensors
        else:
            grads = getattr(ctx, "grads", None)
            if grads is None:
                raise RuntimeError(
                    "the linear distillation losses support one backward pass per forward pass "
                    "(the gradients computed in the forward are handed over); recompute the loss "
                    "for another"
                )
            del ctx.grads
        out = []
        for on, g in zip(ctx.wanted, grads, strict=True):
            if not on:
                out.append(None)
            elif ctx.traced or torch.compiler.is_compiling():
                out.append(g * grad_total)
            elif g.device.type == "cpu" and float(grad_total) == 1.0:
                out.append(g)  # loss.backward() on CPU: a memory load, not a device sync
            else:
                out.append(g.mul_(grad_total))
        return (*out, *none[3:])

    torch.library.register_autograd(op, backward, setup_context=setup_context)


register_linear_autograd(linear_distillation, num_inputs=22)
