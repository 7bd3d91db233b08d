"""``clm``: a causal-LM teacher (GPT-2 family): KL(teacher ‖ student) at T (× T²) on every
attended token, the hard next-token loss, the hidden-state cosine, optionally the logit MSE."""

from __future__ import annotations

from dataclasses import dataclass

from fastdistill.train import fields
from fastdistill.train.fields import option
from fastdistill.train.tasks.text import (
    TextOptions,
    TextTask,
    check_hidden_sizes,
    check_same_vocab,
)
from fastdistill.train.teacher_cache import TeacherCacheTask


@dataclass
class CLMOptions(TextOptions):
    alpha_clm: float | None = option(None, "weight of the hard next-token loss (default 2.0)")

    def validate(self, cfg) -> None:
        super().validate(cfg)
        fields.nonneg("alpha_clm", self.alpha_clm)


class CLMTask(TeacherCacheTask, TextTask):
    name = "clm"
    help = "causal-LM teacher (GPT-2)"
    Options = CLMOptions
    boundary = ("bos_token", "eos_token")
    targets = "next_token"
    # The teacher sees the same tokens every epoch: its top-k can be cached once (TeacherCacheTask).

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

    def collate(self, data, indices, *, stream):
        batch = super().collate(data, indices, stream=stream)
        return self.attach_teacher_targets(batch, data, indices, stream=stream)

    def loss(self, s_out, t_out, batch, w):
        if batch.teacher_topk is None:
            return super().loss(s_out, t_out, batch, w)
        # Forward KL to the cached targets on every attended token (× T²) + the next-token loss.
        return self.sparse_teacher_loss(
            s_out.logits, batch, w, mask=batch.attention_mask, alpha_ce=self.alpha_ce, t2_scale=True
        )
