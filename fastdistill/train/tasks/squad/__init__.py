"""``squad``: distil a question-answering teacher (``AutoModelForQuestionAnswering``, start/end
logits) on SQuAD v1.1/v2.0 JSON, scored with the official EM/F1.

Modules: :mod:`.files` (SQuAD files → questions), :mod:`.features` (questions → tokenised windows,
cached; batches), :mod:`.loss` (KL on the start/end logits + the QA loss), :mod:`.evaluate`
(windows → answers → official metrics), :mod:`.decode` (logits → answers), :mod:`.metrics` (the
official v1.1/v2.0 scripts' metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastdistill.train import fields
from fastdistill.train.fields import option
from fastdistill.train.tasks.base import Task, TaskOptions
from fastdistill.train.tasks.losses import add, cosine_term, hidden_of
from fastdistill.train.tasks.squad.evaluate import evaluate_squad
from fastdistill.train.tasks.squad.features import (
    FeatureSettings,
    collate_features,
    load_features,
)
from fastdistill.train.tasks.squad.files import read_examples, resolve_version
from fastdistill.train.tasks.squad.loss import squad_loss
from fastdistill.train.tasks.text import check_hidden_sizes

SQUAD_VERSIONS = ("auto", "v1", "v2")


@dataclass
class SquadOptions(TaskOptions):
    alpha_squad: float | None = option(
        None,
        "weight of the QA loss, (CE_start + CE_end) / 2 (default 0.5 with a teacher, 1.0 without)",
    )
    doc_stride: int = option(
        128,
        "context tokens between the starts of consecutive windows of a long context (the "
        "DistilBERT and original BERT scripts' meaning; Hugging Face's run_qa.py uses it as the "
        "overlap instead)",
    )
    max_query_length: int = option(64, "questions are cut to this many tokens")
    squad_version: str = option(
        "auto",
        "v1 (every question has an answer), v2 (unanswerable questions: trained to point at "
        "[CLS], predicted as no-answer), auto (v2 if any train or eval question has no answer)",
        choices=SQUAD_VERSIONS,
    )
    n_best_size: int = option(20, "candidate answers kept per question (nbest_predictions.json)")
    max_answer_length: int = option(30, "longest answer span in tokens")
    null_score_diff_threshold: float = option(
        0.0, "v2: predict no answer when null score - best span score exceeds this"
    )
    mask_question_and_padding: bool = option(
        False,
        "leave question, separator and padding positions out of the start/end softmax of both "
        "losses (logits set to -inf for student and teacher; [CLS] stays). Off: the softmax over "
        "all positions, as the DistilBERT SQuAD script",
    )

    def validate(self, cfg) -> None:
        fields.nonneg("alpha_squad", self.alpha_squad)
        fields.choice("squad_version", self.squad_version, SQUAD_VERSIONS)
        fields.check_all(
            fields.positive_int,
            self,
            ("doc_stride", "max_query_length", "n_best_size", "max_answer_length"),
        )
        if not math.isfinite(self.null_score_diff_threshold):
            raise ValueError(
                f"null_score_diff_threshold must be finite, got {self.null_score_diff_threshold}"
            )


class SquadTask(Task):
    name = "squad"
    help = "question answering teacher (start/end logits) on SQuAD v1.1/v2.0 JSON"
    Options = SquadOptions
    normalizers = ("kl", "ce", "cos")

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.pad_id = 0

    @classmethod
    def fill_defaults(cls, cfg) -> None:
        teacher = cfg.teacher is not None
        if cfg.alpha_kl is None:  # the DistilBERT SQuAD script's alpha_ce
            cfg.alpha_kl = 0.5 if teacher else 0.0
        if cfg.alpha_cos is None:
            cfg.alpha_cos = 0.0
        if cfg.max_length is None:
            cfg.max_length = 384
        if cfg.options.alpha_squad is None:  # the script's weights: 0.5 / 0.5 with a teacher
            cfg.options.alpha_squad = 0.5 if teacher else 1.0

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.alpha_mse > 0:
            raise ValueError("alpha_mse does not apply to --task squad (use alpha_kl)")
        if cfg.max_length <= cfg.options.max_query_length + 3:
            raise ValueError(
                f"max_length ({cfg.max_length}) must exceed max_query_length "
                f"({cfg.options.max_query_length}) plus the special tokens, leaving room for "
                "context"
            )

    @classmethod
    def has_training_signal(cls, cfg) -> bool:
        return cfg.alpha_kl + cfg.alpha_cos + cfg.options.alpha_squad > 0

    def auto_class(self):
        import transformers

        return transformers.AutoModelForQuestionAnswering

    def check_models(self, tokenizer, student, teacher) -> None:
        super().check_models(tokenizer, student, teacher)
        check_hidden_sizes(self.cfg, student, teacher)

    # ---- data --------------------------------------------------------------------------------------

    def load_data(self, tokenizer, files, *, build):
        files = {split: paths for split, paths in files.items() if paths}
        # Questions are read first: the version flag (auto: v2 if any is unanswerable) is part of
        # the features' cache key.
        examples = {split: read_examples(paths) for split, paths in files.items()}
        settings = FeatureSettings(
            max_length=self.cfg.max_length,
            doc_stride=self.opts.doc_stride,
            max_query_length=self.opts.max_query_length,
            v2=resolve_version(self.opts.squad_version, list(examples.values())),
        )
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        return {
            split: load_features(
                paths,
                tokenizer,
                settings,
                cache_dir=self.cfg.cache_dir,
                build=build,
                examples=examples[split],
            )
            for split, paths in files.items()
        }

    def token_counts(self, data):
        ones = np.ones(len(data), dtype=np.int64)  # one start and one end distribution per feature
        return {"kl": ones, "ce": ones, "cos": data.lengths}

    def collate(self, data, indices, *, stream):
        return collate_features(data, indices, pad_id=self.pad_id)

    # ---- the step ----------------------------------------------------------------------------------

    def wants_hidden_states(self, teacher) -> bool:
        return teacher is not None and self.cfg.alpha_cos > 0

    def loss(self, s_out, t_out, batch, w):
        """KL on the start/end logits + the QA loss (:mod:`.loss`); ``ce`` logs the QA loss."""
        total, kl, qa = squad_loss(self.cfg, s_out, t_out, batch, w)
        cos = kl.new_zeros(())
        if t_out is not None and self.cfg.alpha_cos > 0:
            c = cosine_term(self.cfg, hidden_of(s_out), hidden_of(t_out), batch.attention_mask)
            total = add(total, c * (self.cfg.alpha_cos * w["cos"] * w["world"]))
            cos = c.detach().float() * w["cos"]
        return total, torch.stack([kl, qa, kl.new_zeros(()), cos]).float()

    # ---- evaluation ----------------------------------------------------------------------------------

    def evaluate(
        self, student, teacher, data, *, score_teacher=False, out_dir=None, teacher_dir=None
    ):
        """Official EM/F1 of the student (and of the teacher, as ``teacher_<metric>``); the
        predictions are written to ``out_dir``."""
        return evaluate_squad(
            self.cfg,
            student,
            teacher if score_teacher else None,
            data,
            self.device,
            pad_id=self.pad_id,
            out_dir=out_dir,
            teacher_dir=teacher_dir,
        )
