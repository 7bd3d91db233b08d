"""The one registry of benchmark shapes, taken from real models.

Every benchmark reads its shapes from here; no file hard-codes a vocabulary size.

A shape is a model's vocabulary ``vocab`` (the logits' last dim) and hidden size ``hidden`` (the
last dim of hidden states, for the cosine / hidden-state losses), plus ``rows``: the number of
tokens (flattened batch x sequence) used on the CPU. The CPU target shape keeps its 2048 rows
(65.5 M logits); the others get about 32 M logits (128 MB in fp32): far past every cache, so memory
traffic and first-touch page faults dominate as they do in training, yet the whole CPU suite (the
eager baseline materialises several logits-sized tensors per call, torch.compile compiles on 2
cores, and every case is first checked against a float64 oracle) stays within a few minutes.
Times scale linearly with rows, so the ratios the suite reports do not depend on this choice
once the tensors are well out of cache. The GPU benchmark (bench/gpu_bench.py) uses the same
models with GPU-sized token counts: ``GPU_REGISTRY`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Shape:
    name: str  # pytest id and report key
    model: str  # where the numbers come from
    vocab: int  # logits last dim (V)
    hidden: int  # hidden-state last dim (D)
    rows: int  # tokens on the CPU

    @property
    def logits_shape(self) -> tuple[int, int]:
        return (self.rows, self.vocab)

    @property
    def hidden_shape(self) -> tuple[int, int]:
        return (self.rows, self.hidden)

    def logits_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one ``(rows, vocab)`` tensor of ``dtype``: the unit of the memory ratios."""
        return self.rows * self.vocab * dtype.itemsize

    def hidden_bytes(self, dtype: torch.dtype) -> int:
        return self.rows * self.hidden * dtype.itemsize

    def describe(self) -> str:
        return f"{self.name} ({self.model}): {self.rows} x V={self.vocab:,}, D={self.hidden}"


BERT = Shape("bert", "bert-base-uncased (DistilBERT teacher)", vocab=30_522, hidden=768, rows=1024)
GPT2 = Shape("gpt2", "GPT-2", vocab=50_257, hidden=768, rows=640)
# The CPU targets' shape: 2048 rows x V=32,000 (Llama-2 / Mistral-7B vocabulary).
LLAMA2 = Shape(
    "llama2", "Llama-2-7B / Mistral-7B (CPU target shape)", vocab=32_000, hidden=4096, rows=2048
)
LLAMA3 = Shape("llama3", "Llama-3-8B", vocab=128_256, hidden=4096, rows=256)
GEMMA = Shape("gemma", "Gemma-2-2B", vocab=256_000, hidden=2304, rows=128)

REGISTRY: dict[str, Shape] = {s.name: s for s in (BERT, GPT2, LLAMA2, LLAMA3, GEMMA)}

# The shape the CPU targets are stated for (bench/test_targets.py).
TARGET = LLAMA2
# Knowledge-distillation temperature used throughout (the DistilBERT default is 2.0).
TEMPERATURE = 2.0
# distillation_loss weights of the CPU targets' distillation case (all three terms).
ALPHAS = {"alpha_kl": 5.0, "alpha_ce": 2.0, "alpha_mse": 1.0}


# ---- GPU sizes (bench/gpu_bench.py) -----------------------------------------------------------
# The same models with the token counts of a GPU training step (tokens = batch x sequence). The
# GPU targets are stated for 16,384 x 32,000 and 8,192 x 128,256 (bf16, fwd+bwd); every other
# model gets a step of a similar size: 0.5-1 G logits, i.e. 1-2 GB per bf16 tensor,
# far past the L2 cache (50-60 MB on an H100/H200), so the kernels run at memory speed as in
# training, while the eager baseline's 5-8 logits-sized temporaries in fp32 (about 4 GB each at
# 8,192 x 128,256) still fit on an 80 GB card.
GPU_ROWS = {"bert": 16_384, "gpt2": 8_192, "llama2": 16_384, "llama3": 8_192, "gemma": 4_096}

GPU_REGISTRY: dict[str, Shape] = {
    name: replace(shape, rows=GPU_ROWS[name]) for name, shape in REGISTRY.items()
}
# The two shapes the GPU bandwidth, speed-up and memory targets are stated for, and the share
# of the measured copy bandwidth kl_div fwd+bwd in bf16 must reach on each (on an H100).
GPU_TARGETS: dict[str, float] = {"llama2": 0.85, "llama3": 0.60}


def get_gpu(name: str) -> Shape:
    try:
        return GPU_REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown GPU benchmark shape {name!r}; known: {', '.join(GPU_REGISTRY)}"
        ) from None


def get(name: str) -> Shape:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown benchmark shape {name!r}; known: {', '.join(REGISTRY)}") from None


def select(names: str | None) -> list[Shape]:
    """Shapes named in a comma-separated list (``None`` or ``"all"``: the whole registry)."""
    if not names or names == "all":
        return list(REGISTRY.values())
    return [get(n.strip()) for n in names.split(",") if n.strip()]
