"""``hidden``: a bare encoder teacher (``AutoModel``, no head): the student matches its last hidden
states, by cosine (``alpha_cos``) and/or MSE (``alpha_mse``, a mean over tokens and dimensions).
Evaluated by the mean token cosine and the cosine of mean-pooled sentence embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdistill import losses as FL
from fastdistill.train.tasks.losses import add, cosine_term, hidden_of
from fastdistill.train.tasks.text import Means, TextTask, check_hidden_sizes, eval_mode, mean_pool


class HiddenTask(TextTask):
    name = "hidden"
    help = "bare encoder teacher, hidden-state cosine/MSE losses only"
    normalizers = ("cos",)
    targets = None

    @classmethod
    def fill_defaults(cls, cfg) -> None:
        if cfg.alpha_kl is None:
            cfg.alpha_kl = 0.0
        super().fill_defaults(cfg)

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.alpha_kl > 0:
            raise ValueError("alpha_kl must be 0 for --task hidden (a bare encoder has no logits)")
        if cfg.teacher is None:
            raise ValueError("--task hidden needs a teacher")
        if cfg.loss_impl == "eager":
            raise ValueError(
                "loss_impl eager is the DistilBERT scripts' logit losses; it does not apply to "
                "--task hidden"
            )

    @classmethod
    def has_training_signal(cls, cfg) -> bool:
        return cfg.alpha_mse + cfg.alpha_cos > 0

    def auto_class(self):
        import transformers

        return transformers.AutoModel

    def build_student(self, teacher, resume_dir=None):
        student = super().build_student(teacher, resume_dir)
        # The hidden-state losses never reach a pooler (BERT/RoBERTa bare encoders have one): keep
        # it as initialised (the teacher's when copied) instead of giving DDP unused parameters.
        for name, p in student.named_parameters():
            if name.startswith("pooler.") or ".pooler." in name:
                p.requires_grad_(False)
        return student

    def check_models(self, tokenizer, student, teacher) -> None:
        super().check_models(tokenizer, student, teacher)
        check_hidden_sizes(self.cfg, student, teacher, needed=True)

    def token_counts(self, data):
        return {"cos": data.lengths}

    def wants_hidden_states(self, teacher) -> bool:
        return False  # a bare encoder returns last_hidden_state anyway

    def loss(self, s_out, t_out, batch, w):
        cfg, world, attn = self.cfg, w["world"], batch.attention_mask
        s_h, t_h = hidden_of(s_out), hidden_of(t_out)
        total = None
        zero = s_h.new_zeros((), dtype=torch.float32)
        cos = mse = zero
        if cfg.alpha_cos > 0:
            c = cosine_term(cfg, s_h, t_h, attn)
            total = c * (cfg.alpha_cos * w["cos"] * world)
            cos = c.detach().float() * w["cos"]
        if cfg.alpha_mse > 0:
            m = FL.mse_loss(s_h, t_h, mask=attn, reduction="mean")
            total = add(total, m * (cfg.alpha_mse * w["cos"] * world))
            mse = m.detach() * w["cos"]
        if total is None:  # both weights 0 (config validation refuses it): still a graph for DDP
            total = s_h.sum() * 0.0
        return total, torch.stack([zero, zero, mse, cos]).float()

    @torch.inference_mode()
    def evaluate(
        self, student, teacher, data, *, score_teacher=False, out_dir=None, teacher_dir=None
    ):
        """Mean token cosine and cosine of the mean-pooled sentence embeddings, student vs teacher."""
        if data is None or len(data) == 0 or teacher is None:
            return {}
        sums = Means()
        with eval_mode(student):
            for batch in self.eval_batches(data):
                kwargs = batch.model_inputs(student)
                s_h, t_h = (
                    hidden_of(student(**kwargs)).float(),
                    hidden_of(teacher(**kwargs)).float(),
                )
                m = batch.attention_mask.unsqueeze(-1).float()
                token_cos = (F.cosine_similarity(s_h, t_h, dim=-1) * m[..., 0]).sum()
                sums.add("token_cosine", token_cos, m.sum())
                s_e, t_e = mean_pool(s_h, m), mean_pool(t_h, m)
                sums.add("embedding_cosine", F.cosine_similarity(s_e, t_e, dim=-1).sum(), len(s_e))
        return sums.means()
