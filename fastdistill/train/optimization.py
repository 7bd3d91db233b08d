"""The optimizer, learning-rate schedule and mixed precision of a run.

AdamW with ``fused=True``: one kernel per step, and it honours ``found_inf`` on the device, which
is how the trainer skips a non-finite step without a host sync. Weight decay applies to matrices,
not to biases and norm weights. The schedule is a linear warm-up then a linear decay to 0
(:func:`fastdistill.train.runtime.lr_lambda`). fp16 adds a GradScaler; bf16 needs none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from fastdistill.train.runtime import lr_lambda


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    autocast: Any  # a context manager for the forward passes
    params: list[torch.nn.Parameter]  # the trainable parameters


def build(cfg, student, total_steps: int, warmup: int, device: torch.device) -> Optimization:
    trainable = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases, norms
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    return Optimization(optimizer, scheduler, scaler, autocast, trainable)
