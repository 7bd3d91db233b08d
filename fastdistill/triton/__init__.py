"""Triton kernels (ARCHITECTURE.md, "Layers"), one module per kernel, imported only when the ``triton`` backend
runs (this package itself does not import triton).

The logits ops (kl_div, cross_entropy, mse, distillation) are one kernel with loss terms switched
on at compile time, as on the CPU (csrc/cpu/fused_logits.cpp), so they share ``fused_logits``.
Triton reads ``TRITON_INTERPRET`` when a kernel module is imported: set it before the first call.
"""

# op name (torch.ops.fastdistill.<op>) -> module in this package holding its kernel
KERNEL_MODULES = {
    "kl_div": "fused_logits",
    "cross_entropy": "fused_logits",
    "mse": "fused_logits",
    "distillation": "fused_logits",
    "distillation_divergence": "fused_logits",
    "reverse_kl": "fused_logits",
    "jsd": "fused_logits",
    "tvd": "fused_logits",
    "cosine": "cosine",
    "all_finite": "all_finite",
    "topk_kl": "topk_kl",
}
