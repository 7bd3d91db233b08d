"""The one interface every task implements, and the options a task declares.

A task is everything about a distillation that depends on what is distilled: which Hugging Face
auto class the models are, how the student is built and checked against the teacher, its own
config options and their defaults, how its files become a cached data set and batches, its loss
(through :mod:`fastdistill.losses`) and its held-out evaluation. The trainer
(:mod:`fastdistill.train.trainer`) owns everything else: the run directory, resume, devices and
processes, the optimizer and schedule, the step with its NaN skip, logging and checkpoints. It
looks the task up once by name (:mod:`fastdistill.train.tasks`) and never tests the name again.

The lifecycle, in the order the trainer calls it:

1. configuration, class-level: ``Options`` (a dataclass of the task's own keys, flat in config
   files and flags), :meth:`Task.fill_defaults`, :meth:`Task.validate`;
2. ``Task(cfg, device)``; models: :meth:`load_tokenizer`, :meth:`load_teacher`,
   :meth:`build_student`, :meth:`check_models`;
3. data: :meth:`load_data` (rank 0 builds the caches, the other ranks read them), then
   :meth:`token_counts` and :meth:`collate` for every micro-batch;
4. the step: :meth:`loss` on the outputs of the student and the teacher;
5. :meth:`evaluate`, before, during and after training.

Loss normalisation. Each loss term is a mean over its own tokens across a whole optimizer step
(all micro-batches, all processes). :meth:`token_counts` gives, per example and per *normaliser
group* (e.g. ``kl`` over attended tokens, ``ce`` over labelled ones), the number of tokens behind
the group's terms, known on the host. The trainer passes :meth:`loss` a mapping ``w``:
``w[group]`` is this micro-batch's share of the step's count of that group and ``w["world"]`` the
number of processes (the loss multiplies by it to undo DDP's gradient average).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

# The logged loss terms, in this order, for every task (a task that has no such term reports 0).
LOSS_TERMS = ("kl", "ce", "mse", "cos")


@dataclass
class TaskOptions:
    """A task's own config keys. Subclasses declare fields with
    :func:`fastdistill.train.fields.option`; each becomes a flag, listed under the task in
    ``--help``. Key names are global: two tasks may share a key only through a common base."""

    def validate(self, cfg) -> None:  # noqa: B027 (optional hook)
        """Raise ``ValueError`` naming the key when a value is bad (``cfg``: the whole config)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DataSet(Protocol):
    """What the trainer needs of a task's data set: its size and each example's length in tokens
    (the batch plan groups examples of similar length)."""

    def __len__(self) -> int: ...

    @property
    def lengths(self) -> np.ndarray: ...


class Batch(Protocol):
    num_tokens: int  # attended tokens (host int), for tokens/s

    def to(self, device) -> Batch: ...

    def model_inputs(self, model) -> dict[str, torch.Tensor]: ...


class Task:
    """Base class: generic model handling (``auto_class`` models from a directory, a config or
    the teacher's layers); subclasses supply the data, the loss and the evaluation."""

    name: ClassVar[str]
    help: ClassVar[str]  # one line for ``--task``'s help
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    # Keys of :meth:`token_counts`; the default ``w`` groups of :meth:`loss`.
    normalizers: ClassVar[tuple[str, ...]] = ("kl",)
    # Whether the teacher's outputs can be cached once (inputs that do not change between epochs,
    # vocabulary logits): see fastdistill/train/teacher_cache.py and :meth:`use_teacher_cache`.
    supports_teacher_cache: ClassVar[bool] = False

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.opts = cfg.options
        self.device = device

    # ---- configuration ---------------------------------------------------------------------------

    @classmethod
    def fill_defaults(cls, cfg) -> None:
        """Fill the general keys left ``None`` whose default depends on the task (e.g.
        ``alpha_kl``, ``max_length``); the base gives the DistilBERT recipe's."""
        teacher = cfg.teacher is not None or cfg.teacher_cache is not None
        if cfg.alpha_kl is None:
            cfg.alpha_kl = 5.0 if teacher else 0.0
        if cfg.alpha_cos is None:  # a teacher cache holds no hidden states
            cfg.alpha_cos = 1.0 if teacher and cfg.teacher_cache is None else 0.0
        if cfg.max_length is None:
            cfg.max_length = 128

    @classmethod
    def validate(cls, cfg) -> None:
        """Task-level checks of the whole config (after :meth:`fill_defaults`)."""

    @classmethod
    def has_training_signal(cls, cfg) -> bool:
        """Whether some loss weight is non-zero (else there is nothing to train)."""
        return cfg.alpha_kl + cfg.alpha_mse + cfg.alpha_cos > 0

    # ---- models ----------------------------------------------------------------------------------

    def auto_class(self):
        """The ``transformers`` auto class of teacher and student."""
        raise NotImplementedError

    def load_tokenizer(self, path: str):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(path)

    def load_teacher(self, path: str) -> torch.nn.Module:
        teacher = self.auto_class().from_pretrained(path).to(self.device).eval()
        teacher.requires_grad_(False)
        return teacher

    def build_student(self, teacher, resume_dir=None) -> torch.nn.Module:
        """From a checkpoint being resumed, ``--student-pretrained``, ``--student-config``, or the
        teacher's embeddings and chosen layers (``--student-layers``), in that order."""
        import transformers

        from fastdistill.train.student import init_student_from_teacher, model_dir

        auto, cfg = self.auto_class(), self.cfg
        if resume_dir is not None:
            student = auto.from_pretrained(resume_dir / "model")
        elif cfg.student_pretrained:
            student = auto.from_pretrained(model_dir(cfg.student_pretrained))
        elif cfg.student_config:
            student = auto.from_config(transformers.AutoConfig.from_pretrained(cfg.student_config))
        else:
            student = init_student_from_teacher(teacher, cfg.student_layers)
        return student.to(self.device).train()

    def check_models(self, tokenizer, student, teacher) -> None:
        """``ValueError`` when the models cannot run this task together: the base checks that the
        tokenizer's ids and ``max_length`` fit both models."""
        vocab = len(tokenizer)
        for name, m in (("student", student), ("teacher", teacher)):
            if m is None:
                continue
            v = getattr(m.config, "vocab_size", None)
            if v is not None and v < vocab:
                raise ValueError(
                    f"the {name}'s vocabulary ({v}) is smaller than the tokenizer's ({vocab})"
                )
            # Models pad their vocabulary a little beyond the tokenizer's (to a multiple of 64,
            # say), never to twice its size: a far smaller tokenizer is the wrong one.
            if v is not None and vocab < v / 2:
                raise ValueError(
                    f"the tokenizer has {vocab} tokens but the {name}'s vocabulary has {v}: "
                    "the tokenizer does not belong to the model (give the right one with "
                    "--tokenizer)"
                )
            positions = getattr(m.config, "max_position_embeddings", None)
            if isinstance(positions, int) and positions < self.cfg.max_length:
                raise ValueError(
                    f"max_length {self.cfg.max_length} exceeds the {name}'s {positions} position "
                    "embeddings: lower --max-length"
                )

    # ---- data --------------------------------------------------------------------------------------

    def load_data(self, tokenizer, files: dict[str, list[str]], *, build: bool) -> dict:
        """``{split: data set}`` for the non-empty file lists of ``files`` (splits ``train`` and
        ``eval``), from the token cache. ``build=False``: the cache must exist (non-zero ranks,
        after rank 0 built it); raise ``ValueError`` otherwise."""
        raise NotImplementedError

    def token_counts(self, data: DataSet) -> dict[str, np.ndarray]:
        """Per example, the tokens behind each normaliser group (module doc)."""
        raise NotImplementedError

    def collate(self, data: DataSet, indices, *, stream: int) -> Batch:
        """The batch of examples ``indices``; ``stream`` = epoch + 1 (0 for evaluation) seeds
        any per-example randomness, so a resumed run draws the same."""
        raise NotImplementedError

    def use_teacher_cache(self, path: str, tokenizer, train_data) -> None:
        """Take the teacher's targets for ``train_data`` from the cache at ``path`` (the teacher
        is not loaded); tasks with ``supports_teacher_cache`` implement it, most simply by
        mixing in fastdistill/train/teacher_cache.py's ``TeacherCacheTask`` (as clm and llm do)."""
        raise ValueError(f"--task {self.name} cannot train from a teacher cache")

    # ---- the step ------------------------------------------------------------------------------------

    def wants_hidden_states(self, teacher) -> bool:
        """Whether the forward passes must return hidden states (``output_hidden_states``)."""
        return False

    def forward(self, model, teacher, batch):
        """``(student output, teacher output or None)`` of one micro-batch. ``model`` is the
        module the student trains through (its DDP wrapper, or itself); the teacher runs under
        inference mode."""
        states = self.wants_hidden_states(teacher) or None
        t_out = None
        if teacher is not None:
            with torch.inference_mode():
                t_out = teacher(**batch.model_inputs(teacher), output_hidden_states=states)
        s_out = model(**batch.model_inputs(model), output_hidden_states=states)
        return s_out, t_out

    def loss(self, s_out, t_out, batch, w: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, terms)`` of one micro-batch: ``total`` to backpropagate, ``terms`` the
        :data:`LOSS_TERMS` as shares of the step's means, detached, float32 (module doc)."""
        raise NotImplementedError

    # ---- evaluation -----------------------------------------------------------------------------------

    def evaluate(
        self, student, teacher, data, *, score_teacher=False, out_dir=None, teacher_dir=None
    ) -> dict:
        """Held-out metrics of the student, compared with ``teacher`` (``None`` without one);
        ``score_teacher``: also the teacher's own metrics (they do not change during a run, so
        the trainer asks once). ``out_dir``/``teacher_dir``: where files of this evaluation may
        be written (``None`` on non-zero ranks)."""
        return {}


def zero_terms(device) -> torch.Tensor:
    return torch.zeros(len(LOSS_TERMS), device=device)
