"""The text tasks' common base: plain-text files → cached token sequences → batches, the logit and
hidden-state losses, and the held-out evaluation against the teacher. ``mlm``, ``clm`` and
``hidden`` (:mod:`.mlm`, :mod:`.clm`, :mod:`.hidden`) differ only in their model class, targets,
loss weights and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fastdistill.train import fields
from fastdistill.train.fields import option
from fastdistill.train.tasks import text_data as TD
from fastdistill.train.tasks.base import Task, TaskOptions
from fastdistill.train.tasks.losses import add, cosine_term, hidden_of, logit_losses


@dataclass
class TextOptions(TaskOptions):
    min_length: int = option(
        12,
        "sequences shorter than this many tokens are dropped (the DistilBERT scripts' rule)",
    )
    max_unknown_fraction: float = option(
        0.5, "sequences whose share of unknown tokens is at least this are dropped"
    )
    eval_max_sequences: int = option(512, "at most this many held-out sequences are evaluated")

    def validate(self, cfg) -> None:
        fields.nonneg_int("min_length", self.min_length)
        fields.unit("max_unknown_fraction", self.max_unknown_fraction)
        fields.positive_int("eval_max_sequences", self.eval_max_sequences)


class TextTask(Task):
    """Plain text, one sequence per line; subclasses set the model class and the targets."""

    Options = TextOptions
    normalizers = ("kl", "ce", "cos")
    # Tokenizer attributes of the tokens wrapped around every sequence.
    boundary: ClassVar[tuple[str, str]] = ("cls_token", "sep_token")
    # Labels of a batch: "masked" (MLM), "next_token" (CLM) or None.
    targets: ClassVar[str | None] = None

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.pad_id = 0
        self.train_masker: TD.MLMMasker | None = None
        self.eval_masker: TD.MLMMasker | None = None

    @property
    def alpha_ce(self) -> float:
        """Weight of the hard loss on the labels (0 for tasks without labels)."""
        return 0.0

    # ---- data ------------------------------------------------------------------------------------

    def load_data(self, tokenizer, files, *, build):
        settings = TD.TextSettings(
            boundary=TD.boundary_ids(tokenizer, self.boundary, self.name),
            max_length=self.cfg.max_length,
            min_length=self.opts.min_length,
            max_unknown_fraction=self.opts.max_unknown_fraction,
        )
        data = {
            split: TD.load_or_build(
                paths, tokenizer, settings, cache_dir=self.cfg.cache_dir, build=build
            )
            for split, paths in files.items()
            if paths
        }
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.setup_targets(tokenizer, data)
        return data

    def setup_targets(self, tokenizer, data: dict) -> None:
        """Hook: prepare what :meth:`collate` needs for the targets (the MLM maskers)."""

    def token_counts(self, data):
        lengths = data.lengths
        return {"kl": lengths, "ce": lengths - 1, "cos": lengths}

    def collate(self, data, indices, *, stream):
        masker = self.train_masker if stream > 0 else self.eval_masker
        return TD.collate(
            data,
            indices,
            targets=self.targets,
            pad_id=self.pad_id,
            masker=masker,
            seed=self.cfg.seed,
            stream=stream,
        )

    # ---- the step --------------------------------------------------------------------------------

    def wants_hidden_states(self, teacher) -> bool:
        return teacher is not None and self.cfg.alpha_cos > 0

    def kl_mask(self, batch) -> torch.Tensor:
        """Rows of the KL and logit MSE: every attended token."""
        return batch.attention_mask

    def loss(self, s_out, t_out, batch, w):
        cfg, world = self.cfg, w["world"]
        teacher = t_out is not None
        a_kl = cfg.alpha_kl * w["kl"] * world if teacher else 0.0
        a_mse = cfg.alpha_mse * w["kl"] * world if teacher else 0.0
        a_ce = self.alpha_ce * w["ce"] * world
        total, kl, ce, mse = logit_losses(
            cfg,
            s_out.logits,
            t_out.logits if teacher else None,
            batch.labels,
            self.kl_mask(batch),
            a_kl,
            a_ce,
            a_mse,
        )
        terms = [kl * w["kl"], ce * w["ce"], mse * w["kl"], kl.new_zeros(())]
        if teacher and cfg.alpha_cos > 0:
            c = cosine_term(cfg, hidden_of(s_out), hidden_of(t_out), batch.attention_mask)
            total = add(total, c * (cfg.alpha_cos * w["cos"] * world))
            terms[3] = c.detach().float() * w["cos"]
        if total is None:  # no token of this micro-batch carries a loss: still a graph for DDP
            total = s_out[0].sum() * 0.0
        return total, torch.stack(terms).float()

    # ---- evaluation --------------------------------------------------------------------------------

    def eval_batches(self, data):
        """The held-out batches (at most ``eval_max_sequences`` sequences), on the device."""
        n = min(len(data), self.opts.eval_max_sequences)
        for start in range(0, n, self.cfg.batch_size):
            idx = list(range(start, min(n, start + self.cfg.batch_size)))
            yield self.collate(data, idx, stream=0).to(self.device)

    @torch.inference_mode()
    def evaluate(
        self, student, teacher, data, *, score_teacher=False, out_dir=None, teacher_dir=None
    ):
        """Held-out agreement with the teacher on the labelled tokens: KL(teacher ‖ student) at
        T = 1, top-1 agreement, student (and teacher) accuracy and CE."""
        if data is None or len(data) == 0:
            return {}
        sums = Means()
        with eval_mode(student):
            for batch in self.eval_batches(data):
                kwargs = batch.model_inputs(student)
                s_out = student(**kwargs)
                t_out = teacher(**kwargs) if teacher is not None else None
                add_logit_metrics(sums, s_out, t_out, batch.labels)
        return sums.means()


def add_logit_metrics(sums: Means, s_out, t_out, labels) -> None:
    sel = labels != TD.IGNORE_INDEX
    s = s_out.logits[sel].float()
    labels = labels[sel]
    k = int(sel.sum())
    sums.add("accuracy", (s.argmax(-1) == labels).sum(), k)
    sums.add("ce", F.cross_entropy(s, labels, reduction="sum"), k)
    if t_out is None:
        return
    t = t_out.logits[sel].float()
    sums.add("teacher_accuracy", (t.argmax(-1) == labels).sum(), k)
    v = min(s.size(-1), t.size(-1))  # vocabularies of different padded sizes: the common part
    s, t = s[:, :v], t[:, :v]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    sums.add("kl_to_teacher", kl, k)
    sums.add("top1_agreement", (s.argmax(-1) == t.argmax(-1)).sum(), k)


class Means:
    """Running sums and counts of named metrics (one host read per value, at the end)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, value, count) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / max(self.counts[k], 1.0) for k in self.sums}


class eval_mode:
    """``model.eval()`` inside, the previous mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def mean_pool(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``h`` over the positions where ``m`` (B, L, 1) is 1."""
    return (h * m).sum(1) / m.sum(1)


def check_same_vocab(student, teacher) -> None:
    if teacher is not None and student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"student and teacher vocabularies differ ({student.config.vocab_size} vs "
            f"{teacher.config.vocab_size}): the logit losses need the same vocabulary"
        )


def check_hidden_sizes(cfg, student, teacher, *, needed: bool = False) -> None:
    """Hidden-state losses need equal sizes (``needed``: they are always on)."""
    if teacher is None or not (needed or cfg.alpha_cos > 0):
        return
    if student.config.hidden_size != teacher.config.hidden_size:
        raise ValueError(
            f"hidden sizes differ (student {student.config.hidden_size}, teacher "
            f"{teacher.config.hidden_size}): the cosine/MSE hidden-state losses need equal sizes"
        )
