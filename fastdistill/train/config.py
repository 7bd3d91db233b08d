"""The trainer's configuration: one dataclass, loadable from YAML/JSON, mapped one-to-one onto the
command line.

Every field is a command-line flag (``student_layers`` → ``--student-layers``), generated from the
dataclass so the two cannot drift; a config file gives the same keys, and flags given on the command
line override the file. Unknown keys are an error that names them. ``None`` defaults that depend on
the task (``alpha_kl``, ``alpha_mlm``, ``alpha_clm``, ``alpha_cos``, ``alpha_squad``,
``max_length``) are filled in by :meth:`TrainConfig.resolved`, which also validates everything and
raises ``ValueError`` with a message naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

TASKS = ("mlm", "clm", "hidden", "squad")
MIXED_PRECISION = ("none", "bf16", "fp16")
LOSS_IMPLS = ("fused", "eager")
DEVICES = ("auto", "cpu", "cuda")
SQUAD_VERSIONS = ("auto", "v1", "v2")
# Fields whose flag takes one of a fixed set of values.
CHOICES = {
    "task": TASKS,
    "mixed_precision": MIXED_PRECISION,
    "loss_impl": LOSS_IMPLS,
    "device": DEVICES,
    "squad_version": SQUAD_VERSIONS,
}


def _f(default: Any = None, help: str = "", *, factory: Any = None, metavar: str | None = None):
    """A dataclass field whose help text becomes the flag's ``--help`` line."""
    meta = {"help": help, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- what to distil ---------------------------------------------------------------------
    task: str = _f(
        "mlm",
        "mlm: masked-LM teacher (BERT/RoBERTa/DistilBERT); clm: causal-LM teacher (GPT-2); "
        "hidden: bare encoder teacher, hidden-state cosine/MSE losses only; squad: question "
        "answering teacher (start/end logits) on SQuAD v1.1/v2.0 JSON",
    )
    teacher: str | None = _f(
        None,
        "teacher: a local directory (from_pretrained) or a hub id. Without a teacher the student is "
        "trained on the hard MLM/CLM loss alone (that is how the embedded default trains its teacher)",
        metavar="PATH",
    )
    tokenizer: str | None = _f(
        None, "tokenizer directory or hub id (default: the teacher's)", metavar="PATH"
    )
    student_config: str | None = _f(
        None,
        "build a fresh student from this config.json (or a directory holding one)",
        metavar="PATH",
    )
    student_pretrained: str | None = _f(
        None, "load the student with from_pretrained from this directory or hub id", metavar="PATH"
    )
    student_layers: list[int] | None = _f(
        None,
        "teacher layers copied into a student initialised from the teacher (default: every other "
        "layer, 0, 2, 4, ...). Used when neither --student-config nor --student-pretrained is given",
        metavar="I",
    )

    # ---- data ---------------------------------------------------------------------------------
    train_files: list[str] = _f(
        help="plain-text training files, one sequence per line (blank lines are skipped); "
        "--task squad: SQuAD JSON files (nested, flat or JSON lines)",
        factory=list,
        metavar="FILE",
    )
    eval_files: list[str] = _f(
        help="held-out text files: KL/top-1 agreement (cosine for --task hidden) before and after; "
        "--task squad: SQuAD JSON files scored with the official EM/F1",
        factory=list,
        metavar="FILE",
    )
    cache_dir: str | None = _f(
        None,
        "where tokenised data is cached (default: $FASTDISTILL_CACHE or ~/.cache/fastdistill)",
        metavar="DIR",
    )
    max_length: int | None = _f(
        None,
        "longest sequence in tokens, special tokens included (default 128; 384 for --task "
        "squad); longer lines are split, longer SQuAD contexts cut into overlapping windows",
    )
    min_length: int = _f(
        12, "sequences shorter than this many tokens are dropped (the seed's rule)"
    )
    max_unknown_fraction: float = _f(
        0.5, "sequences whose share of unknown tokens is at least this are dropped"
    )
    eval_max_sequences: int = _f(
        512, "at most this many held-out sequences are evaluated (squad: every question is)"
    )

    # ---- MLM masking (the seed's: 15%, 80/10/10, count^-0.7 smoothing) -----------------------
    mlm_mask_prob: float = _f(0.15, "share of (non-special) tokens selected for prediction")
    mlm_mask_token_prob: float = _f(0.8, "of the selected tokens, share replaced by the mask token")
    mlm_random_token_prob: float = _f(
        0.1, "of the selected tokens, share replaced by a random token"
    )
    mlm_smoothing: float = _f(
        0.7, "selection probability ∝ count^-smoothing, favouring rare tokens (0: uniform)"
    )

    # ---- question answering (--task squad) ------------------------------------------------------
    doc_stride: int = _f(
        128,
        "squad: context tokens between the starts of consecutive windows of a long context (the "
        "seed's meaning; Hugging Face's run_qa.py uses it as the overlap instead)",
    )
    max_query_length: int = _f(64, "squad: questions are cut to this many tokens")
    squad_version: str = _f(
        "auto",
        "squad: v1 (every question has an answer), v2 (unanswerable questions: trained to point "
        "at [CLS], predicted as no-answer), auto (v2 if any train or eval question has no answer)",
    )
    n_best_size: int = _f(20, "squad: candidate answers kept per question (nbest_predictions.json)")
    max_answer_length: int = _f(30, "squad: longest answer span in tokens")
    null_score_diff_threshold: float = _f(
        0.0, "squad v2: predict no answer when null score - best span score exceeds this"
    )
    mask_question_and_padding: bool = _f(
        False,
        "squad: leave question, separator and padding positions out of the start/end softmax of "
        "both losses (logits set to -inf for student and teacher; [CLS] stays). Off: the seed's "
        "softmax over all positions",
    )

    # ---- loss --------------------------------------------------------------------------------
    temperature: float = _f(2.0, "softmax temperature of the soft targets (the KL is scaled by T²)")
    alpha_kl: float | None = _f(
        None,
        "weight of KL(teacher ‖ student) at temperature T (default 5.0; 0 for hidden; 0.5 for "
        "squad, the seed's alpha_ce, applied to (KL_start + KL_end) / 2)",
    )
    alpha_mlm: float | None = _f(
        None, "weight of the hard MLM loss (default 2.0 for --task mlm, else 0)"
    )
    alpha_clm: float | None = _f(
        None, "weight of the hard next-token loss (default 2.0 for --task clm, else 0)"
    )
    alpha_mse: float = _f(
        0.0, "weight of the MSE between logits (mlm/clm, batchmean) or hidden states (hidden, mean)"
    )
    alpha_cos: float | None = _f(
        None,
        "weight of 1 - cos(last hidden states) over attended tokens (default 1.0 with a teacher; "
        "0 for squad)",
    )
    alpha_squad: float | None = _f(
        None,
        "squad: weight of the QA loss, (CE_start + CE_end) / 2 (default 0.5 with a teacher, "
        "1.0 without)",
    )
    restrict_ce_to_mask: bool = _f(
        False, "compute the KL/MSE (mlm) only on the tokens selected for prediction, not all tokens"
    )
    loss_impl: str = _f(
        "fused",
        "fused: fastdistill.losses; eager: the seed's PyTorch formulas (masked_select + "
        "KLDivLoss + ...), kept to measure the difference",
    )

    # ---- optimisation --------------------------------------------------------------------------
    batch_size: int = _f(16, "sequences per micro-batch per process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(5e-4, "peak learning rate (AdamW)")
    warmup_ratio: float = _f(
        0.05, "linear warm-up over this share of the steps (then linear decay to 0)"
    )
    warmup_steps: int | None = _f(None, "warm-up steps; overrides --warmup-ratio")
    weight_decay: float = _f(
        0.0, "AdamW weight decay (not applied to biases and LayerNorm weights)"
    )
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.98, "AdamW beta2")
    adam_epsilon: float = _f(1e-6, "AdamW epsilon")
    max_grad_norm: float = _f(
        5.0, "clip the gradient norm to this (0: no clipping, the norm is still logged)"
    )
    num_epochs: int = _f(3, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = _f(None, "optimizer steps to run (overrides --num-epochs)")
    mixed_precision: str = _f("none", "none | bf16 (torch.autocast) | fp16 (autocast + GradScaler)")
    max_consecutive_skips: int = _f(
        20,
        "stop with an error (exit status 1) after this many optimizer steps in a row skipped for "
        "a non-finite loss or gradient; checked at each log interval",
    )

    # ---- run, logging and checkpoints ----------------------------------------------------------
    output_dir: str = _f(
        "runs/fastdistill",
        "run directory: checkpoints, metrics, figure, final model",
        metavar="DIR",
    )
    overwrite_output_dir: bool = _f(
        False, "start afresh even if the run directory holds checkpoints"
    )
    resume: bool = _f(False, "continue from the latest checkpoint in the run directory")
    seed: int = _f(56, "random seed (data order, masking, initialisation)")
    log_interval: int = _f(10, "optimizer steps between log lines (the only host syncs)")
    save_interval: int = _f(
        500, "optimizer steps between checkpoints (a multiple of --log-interval)"
    )
    keep_checkpoints: int = _f(2, "checkpoints kept in the run directory (oldest removed)")
    progress_bar: bool = _f(True, "show a progress bar with ETA and tokens/s")
    tensorboard: bool = _f(True, "write tensorboard scalars to RUN_DIR/tensorboard")
    eval_interval: int | None = _f(
        None,
        "optimizer steps between held-out evaluations during training (a multiple of "
        "--log-interval; default: only before and after)",
    )
    do_eval: bool = _f(
        False,
        "evaluate --student-pretrained (a final/ directory or a checkpoint) on --eval-files "
        "without training; results in OUTPUT_DIR/eval_results.json (squad: and OUTPUT_DIR/eval/)",
    )
    device: str = _f("auto", "auto | cpu | cuda (with torchrun: the local rank's GPU)")

    # ------------------------------------------------------------------------------------------
    def resolved(self) -> TrainConfig:
        """A copy with task-dependent defaults filled in, validated (``ValueError`` if not)."""
        c = dataclasses.replace(self)
        if c.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {c.task!r}")
        teacher = c.teacher is not None
        squad = c.task == "squad"
        if c.alpha_kl is None:
            c.alpha_kl = (0.5 if squad else 5.0) if teacher and c.task != "hidden" else 0.0
        if c.alpha_mlm is None:
            c.alpha_mlm = 2.0 if c.task == "mlm" else 0.0
        if c.alpha_clm is None:
            c.alpha_clm = 2.0 if c.task == "clm" else 0.0
        if c.alpha_cos is None:
            c.alpha_cos = 1.0 if teacher and not squad else 0.0
        if c.alpha_squad is None:  # the seed's weights: 0.5 / 0.5 with a teacher
            c.alpha_squad = (0.5 if teacher else 1.0) if squad else 0.0
        if c.max_length is None:
            c.max_length = 384 if squad else 128
        c.validate()
        return c

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field (run on a :meth:`resolved` config)."""
        for name in (
            "alpha_kl",
            "alpha_mlm",
            "alpha_clm",
            "alpha_cos",
            "alpha_squad",
            "max_length",
        ):
            if getattr(self, name) is None:
                raise ValueError(f"{name} is unresolved; call TrainConfig.resolved()")
        for name, choices in CHOICES.items():
            _choice(name, getattr(self, name), choices)
        for name in (
            "alpha_kl",
            "alpha_mlm",
            "alpha_clm",
            "alpha_mse",
            "alpha_cos",
            "alpha_squad",
            "weight_decay",
        ):
            _nonneg(name, getattr(self, name))
        _positive("temperature", self.temperature)
        _positive("learning_rate", self.learning_rate)
        _nonneg("max_grad_norm", self.max_grad_norm)
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "log_interval",
            "save_interval",
            "max_length",
            "keep_checkpoints",
            "max_consecutive_skips",
            "eval_max_sequences",
            "doc_stride",
            "max_query_length",
            "n_best_size",
            "max_answer_length",
        ):
            _positive_int(name, getattr(self, name))
        if not math.isfinite(self.null_score_diff_threshold):
            raise ValueError(
                f"null_score_diff_threshold must be finite, got {self.null_score_diff_threshold}"
            )
        _nonneg_int("num_epochs", self.num_epochs)
        _nonneg_int("min_length", self.min_length)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        elif self.num_epochs == 0:
            raise ValueError("num_epochs must be > 0 when max_steps is not set")
        if self.warmup_steps is not None:
            _nonneg_int("warmup_steps", self.warmup_steps)
        for name in (
            "warmup_ratio",
            "mlm_mask_prob",
            "mlm_mask_token_prob",
            "mlm_random_token_prob",
            "max_unknown_fraction",
        ):
            _unit(name, getattr(self, name))
        if self.mlm_mask_prob == 0 and self.task == "mlm":
            raise ValueError("mlm_mask_prob must be > 0 for --task mlm")
        if self.mlm_mask_token_prob + self.mlm_random_token_prob > 1:
            raise ValueError("mlm_mask_token_prob + mlm_random_token_prob must be <= 1")
        _nonneg("mlm_smoothing", self.mlm_smoothing)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not (0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        _positive("adam_epsilon", self.adam_epsilon)
        if self.max_length < 4:
            raise ValueError(
                f"max_length must be >= 4 (two special tokens and some text), got {self.max_length}"
            )
        if self.save_interval % self.log_interval:
            raise ValueError(
                f"save_interval ({self.save_interval}) must be a multiple of log_interval "
                f"({self.log_interval}): checkpoints are written where the run syncs with the host"
            )
        if self.eval_interval is not None:
            _positive_int("eval_interval", self.eval_interval)
            if self.eval_interval % self.log_interval:
                raise ValueError(
                    f"eval_interval ({self.eval_interval}) must be a multiple of log_interval "
                    f"({self.log_interval})"
                )
        if self.do_eval:
            if not self.eval_files:
                raise ValueError("do_eval needs eval_files (--eval-files FILE ...)")
            if not self.student_pretrained:
                raise ValueError(
                    "do_eval evaluates --student-pretrained: give the model directory (a run's "
                    "final/ or a checkpoint)"
                )
            if self.resume:
                raise ValueError("do_eval does not train: it cannot be combined with resume")
        elif not self.train_files:
            raise ValueError(
                "train_files is empty: give at least one text file (--train-files FILE ...)"
            )
        if self.student_config and self.student_pretrained:
            raise ValueError("give at most one of student_config and student_pretrained")
        if self.student_layers is not None:
            if self.student_config or self.student_pretrained:
                raise ValueError(
                    "student_layers only applies to a student initialised from the teacher"
                )
            if not self.student_layers:
                raise ValueError("student_layers must name at least one teacher layer")
            if any(i < 0 for i in self.student_layers):
                raise ValueError(f"student_layers must be >= 0, got {self.student_layers}")
        # Which loss terms exist for which task.
        if self.task != "mlm" and self.alpha_mlm > 0:
            raise ValueError(f"alpha_mlm applies to --task mlm only (task is {self.task})")
        if self.task != "clm" and self.alpha_clm > 0:
            raise ValueError(f"alpha_clm applies to --task clm only (task is {self.task})")
        if self.task != "squad" and self.alpha_squad > 0:
            raise ValueError(f"alpha_squad applies to --task squad only (task is {self.task})")
        if self.task == "squad":
            if self.alpha_mse > 0:
                raise ValueError("alpha_mse does not apply to --task squad (use alpha_kl)")
            if self.max_length <= self.max_query_length + 3:
                raise ValueError(
                    f"max_length ({self.max_length}) must exceed max_query_length "
                    f"({self.max_query_length}) plus the special tokens, leaving room for context"
                )
        if self.task == "hidden":
            if self.alpha_kl > 0:
                raise ValueError(
                    "alpha_kl must be 0 for --task hidden (a bare encoder has no logits)"
                )
            if self.teacher is None:
                raise ValueError("--task hidden needs a teacher")
        if self.teacher is None:
            if self.alpha_kl > 0 or self.alpha_mse > 0 or self.alpha_cos > 0:
                raise ValueError(
                    "alpha_kl, alpha_mse and alpha_cos need a teacher; without --teacher only the "
                    "hard MLM/CLM loss is trained"
                )
            if not (self.student_config or self.student_pretrained):
                raise ValueError("without a teacher, give --student-config or --student-pretrained")
            if self.tokenizer is None and not self.do_eval:
                raise ValueError("without a teacher, give --tokenizer")
        weights = (self.alpha_kl, self.alpha_mlm, self.alpha_clm, self.alpha_mse, self.alpha_cos)
        if sum(weights) + self.alpha_squad == 0 and not self.do_eval:
            raise ValueError("every loss weight is 0: nothing to train")
        if self.loss_impl == "eager" and self.task == "hidden":
            raise ValueError(
                "loss_impl eager is the seed's logit losses; it does not apply to --task hidden"
            )

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys and wrongly typed values raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(
                f"{source}: expected a mapping of config keys, got {type(data).__name__}"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown config key(s): {', '.join(hints)}")
        hints = _type_hints()
        values = {k: _coerce(k, v, hints[k], source) for k, v in data.items()}
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Load a ``.yaml``/``.yml`` or ``.json`` file (the same keys as the flags, with underscores)."""
        return cls.from_dict(load_mapping(path), source=str(path))


def load_mapping(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    elif path.endswith(".json"):
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")
    return {} if data is None else data


# ---- the command line, generated from the fields ---------------------------------------------


def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field. Defaults are SUPPRESSed so that only the flags a
    user typed override a config file (see :func:`config_from_args`)."""
    hints = _type_hints()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        tp, optional = _unwrap_optional(hints[f.name])
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        if default not in (None, []) and tp is not bool:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = help_text + f" (default: {'on' if default else 'off'})"
            kwargs.pop("metavar", None)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs["type"] = item
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = tp
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file named by ``args.config`` (if any), overridden by the flags given."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data.update(load_mapping(args.config))
        base = TrainConfig.from_dict(data, source=args.config)
        data = base.to_dict()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(data)


# ---- validation helpers ------------------------------------------------------------------------


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{source}: {name} must not be null")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {name} must be a list, got {type(value).__name__}")
        return [_coerce(f"{name}[{i}]", v, item, source) for i, v in enumerate(value)]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{source}: {name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{source}: {name} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{source}: {name} must be a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{source}: {name} must be a string, got {value!r}")
    return value


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _nonneg(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _positive_int(name: str, value: int) -> None:
    if not (isinstance(value, int) and value > 0):
        raise ValueError(f"{name} must be an integer > 0, got {value!r}")


def _nonneg_int(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 0):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
