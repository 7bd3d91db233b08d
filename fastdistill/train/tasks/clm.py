"""``clm``: a causal-LM teacher (GPT-2 family): KL(teacher ‖ student) at T (× T²) on every
attended token, the hard next-token loss, the hidden-state cosine, optionally the logit MSE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdistill.train import fields
from fastdistill.train.fields import option
from fastdistill.train.tasks.text import (
    TextOptions,
    TextTask,
    check_hidden_sizes,
    check_same_vocab,
)


@dataclass
class CLMOptions(TextOptions):
    alpha_clm: float | None = option(None, "weight of the hard next-token loss (default 2.0)")

    def validate(self, cfg) -> None:
        super().validate(cfg)
        fields.nonneg("alpha_clm", self.alpha_clm)


class CLMTask(TextTask):
    name = "clm"
    help = "causal-LM teacher (GPT-2)"
    Options = CLMOptions
    boundary = ("bos_token", "eos_token")
    targets = "next_token"
    # The teacher sees the same tokens every epoch: its top-k can be cached once.
    supports_teacher_cache = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.teacher_cache = None
        self.cache_offsets = None
        self.capture_temperature = 1.0

    @classmethod
    def fill_defaults(cls, cfg) -> None:
        super().fill_defaults(cfg)
        if cfg.options.alpha_clm is None:
            cfg.options.alpha_clm = 2.0

    @classmethod
    def has_training_signal(cls, cfg) -> bool:
        return super().has_training_signal(cfg) or cfg.options.alpha_clm > 0

    @property
    def alpha_ce(self) -> float:
        return self.opts.alpha_clm

    def auto_class(self):
        import transformers

        return transformers.AutoModelForCausalLM

    def check_models(self, tokenizer, student, teacher) -> None:
        super().check_models(tokenizer, student, teacher)
        check_same_vocab(student, teacher)
        check_hidden_sizes(self.cfg, student, teacher)

    # ---- training from a teacher cache ----------------------------------------------------------

    def use_teacher_cache(self, path: str, tokenizer, train_data) -> None:
        from fastdistill.train import cache
        from fastdistill.train.teacher_cache import TeacherCache

        want = {
            "k": self.cfg.teacher_top_k,
            "data_key": train_data.meta["key"],
            "tokenizer": cache.tokenizer_fingerprint(tokenizer),
            "vocab_size": None,  # ids beyond the student's vocabulary are refused by the loss
            "num_sequences": len(train_data),
            "num_tokens": train_data.num_tokens,
        }
        self.teacher_cache = TeacherCache.open(path, want)
        self.cache_offsets = train_data.offsets
        captured = float(self.teacher_cache.manifest["capture_temperature"])
        self.capture_temperature = captured
        if self.cfg.topk_normalization == "tail" and captured != self.cfg.temperature:
            raise ValueError(
                f"topk_normalization tail needs temperature = the capture temperature of the "
                f"cache ({captured}), got {self.cfg.temperature}"
            )

    def collate(self, data, indices, *, stream):
        batch = super().collate(data, indices, stream=stream)
        if self.teacher_cache is not None and stream > 0:  # training batches only
            width = batch.input_ids.shape[1]
            batch.teacher_topk = self.teacher_cache.batch(indices, self.cache_offsets, width)
        return batch

    def loss(self, s_out, t_out, batch, w):
        if batch.teacher_topk is None:
            return super().loss(s_out, t_out, batch, w)
        return topk_loss(self.cfg, self.alpha_ce, self.capture_temperature, s_out, batch, w)


def topk_loss(cfg, alpha_ce: float, capture_temperature: float, s_out, batch, w):
    """Forward KL to the cached top-k teacher targets (× T²) + the hard next-token loss."""
    from fastdistill import losses as FL

    ids, logprobs, tail = batch.teacher_topk
    world = w["world"]
    total, kd, ce = FL.topk_distillation_loss(
        s_out.logits,
        ids,
        logprobs,
        teacher_tail=tail,
        labels=batch.labels,
        mask=batch.attention_mask,
        normalization=cfg.topk_normalization,
        temperature=cfg.temperature,
        capture_temperature=capture_temperature,
        t2_scale=True,
        alpha_kd=cfg.alpha_kl * w["kl"] * world,
        alpha_ce=alpha_ce * w["ce"] * world,
    )
    zero = kd.new_zeros(())
    return total, torch.stack([kd * w["kl"], ce * w["ce"], zero, zero]).float()
