"""The trainer's configuration: one dataclass of general keys plus the task's own options, loadable
from YAML/JSON and mapped one-to-one onto the command line.

Every key is a flag (``student_layers`` → ``--student-layers``), generated from the dataclass
fields so the two cannot drift: :class:`TrainConfig`'s general fields, and the fields of each
registered task's ``Options`` (:mod:`fastdistill.train.tasks`), listed per task in ``--help``. A
config file gives the same keys, flat; flags given on the command line override the file.
Unknown keys are an error that names them. A key of another task than the one chosen is accepted
only at its default (or, for a loss weight, 0: what configs written by earlier versions hold, since
they listed every task's keys) and dropped; any other value is an error naming the task it
belongs to. ``None`` defaults that depend on the task (``alpha_kl``, ``alpha_cos``,
``max_length``, the task's own weights) are filled in by :meth:`TrainConfig.resolved`, which also
validates everything and raises ``ValueError`` with a message naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from fastdistill.train import checks, fields, fsutil
from fastdistill.train.fields import option

MIXED_PRECISION = ("none", "bf16", "fp16")
LOSS_IMPLS = ("fused", "eager")
DEVICES = ("auto", "cpu", "cuda")
TOPK_NORMALIZATIONS = ("full", "renormalized", "tail")


@dataclass
class TrainConfig:
    """The general keys (see the module doc); ``options`` holds the task's."""

    # ---- what to distil ---------------------------------------------------------------------
    task: str = option("mlm", "what is distilled (the task registry; see the task options below)")
    teacher: str | None = option(
        None,
        "teacher: a local directory (from_pretrained) or a hub id. Without a teacher the student is "
        "trained on the hard MLM/CLM loss alone (that is how the embedded default trains its teacher)",
        metavar="PATH",
    )
    tokenizer: str | None = option(
        None, "tokenizer directory or hub id (default: the teacher's)", metavar="PATH"
    )
    student_config: str | None = option(
        None,
        "build a fresh student from this config.json (or a directory holding one)",
        metavar="PATH",
    )
    student_pretrained: str | None = option(
        None, "load the student with from_pretrained from this directory or hub id", metavar="PATH"
    )
    student_layers: list[int] | None = option(
        None,
        "teacher layers copied into a student initialised from the teacher (default: every other "
        "layer, 0, 2, 4, ...). Used when neither --student-config nor --student-pretrained is given",
        metavar="I",
    )

    # ---- data ---------------------------------------------------------------------------------
    train_files: list[str] = option(
        help="plain-text training files, one sequence per line (blank lines are skipped); "
        "--task squad: SQuAD JSON files (nested, flat or JSON lines)",
        factory=list,
        metavar="FILE",
    )
    eval_files: list[str] = option(
        help="held-out text files: KL/top-1 agreement (cosine for --task hidden) before and after; "
        "--task squad: SQuAD JSON files scored with the official EM/F1",
        factory=list,
        metavar="FILE",
    )
    cache_dir: str | None = option(
        None,
        "where tokenised data is cached (default: $FASTDISTILL_CACHE or ~/.cache/fastdistill)",
        metavar="DIR",
    )
    max_length: int | None = option(
        None,
        "longest sequence in tokens, special tokens included (default 128; 384 for --task "
        "squad); longer lines are split, longer SQuAD contexts cut into overlapping windows",
    )

    # ---- loss --------------------------------------------------------------------------------
    temperature: float | None = option(
        None,
        "softmax temperature of the soft targets (default 2.0 with the KL scaled by T², the "
        "DistilBERT recipe; 1.0 for --task llm, unscaled)",
    )
    alpha_kl: float | None = option(
        None,
        "weight of KL(teacher ‖ student) at temperature T (default 5.0; 0 for hidden; 0.5 for "
        "squad, the DistilBERT SQuAD script's alpha_ce, applied to (KL_start + KL_end) / 2)",
    )
    alpha_mse: float = option(
        0.0, "weight of the MSE between logits (mlm/clm, batchmean) or hidden states (hidden, mean)"
    )
    alpha_cos: float | None = option(
        None,
        "weight of 1 - cos(last hidden states) over attended tokens (default 1.0 with a teacher; "
        "0 for squad)",
    )
    teacher_cache: str | None = option(
        None,
        "train from a teacher cache written by --write-teacher-cache (the teacher's top-k "
        "log-probabilities per token) instead of running the teacher; needs --student-config or "
        "--student-pretrained",
        metavar="DIR",
    )
    teacher_top_k: int | None = option(
        None,
        "log-probabilities kept per token by --write-teacher-cache (default 64); with "
        "--teacher-cache, the k the cache must have",
    )
    capture_temperature: float = option(
        1.0, "--write-teacher-cache: the teacher's log-probabilities are log_softmax(logits / this)"
    )
    topk_normalization: str = option(
        "full",
        "how a teacher cache's top-k targets meet the student: full (the student's softmax over "
        "the whole vocabulary), renormalized (both over the top-k), tail (a (k+1)-th bucket "
        "with the rest of the mass; needs temperature = the capture temperature)",
        choices=TOPK_NORMALIZATIONS,
    )
    loss_impl: str = option(
        "fused",
        "fused: fastdistill.losses; eager: the original DistilBERT scripts' PyTorch formulas "
        "(masked_select + KLDivLoss + ...), kept to measure the difference",
        choices=LOSS_IMPLS,
    )

    # ---- optimisation --------------------------------------------------------------------------
    batch_size: int = option(
        32,
        "sequences per micro-batch per process (32 beat 16 on the demo's data at equal steps and "
        "at equal tokens: bench/RESULTS.md)",
    )
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(5e-4, "peak learning rate (AdamW)")
    warmup_ratio: float = option(
        0.05, "linear warm-up over this share of the steps (then linear decay to 0)"
    )
    warmup_steps: int | None = option(None, "warm-up steps; overrides --warmup-ratio")
    weight_decay: float = option(
        0.0, "AdamW weight decay (not applied to biases and LayerNorm weights)"
    )
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.98, "AdamW beta2")
    adam_epsilon: float = option(1e-6, "AdamW epsilon")
    max_grad_norm: float = option(
        5.0, "clip the gradient norm to this (0: no clipping, the norm is still logged)"
    )
    num_epochs: int = option(3, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = option(None, "optimizer steps to run (overrides --num-epochs)")
    mixed_precision: str = option(
        "none",
        "none | bf16 (torch.autocast) | fp16 (autocast + GradScaler)",
        choices=MIXED_PRECISION,
    )
    max_consecutive_skips: int = option(
        20,
        "stop with an error (exit status 1) after this many optimizer steps in a row skipped for "
        "a non-finite loss or gradient; checked at each log interval",
    )

    # ---- run, logging and checkpoints ----------------------------------------------------------
    output_dir: str = option(
        "runs/fastdistill",
        "run directory: checkpoints, metrics, figure, final model",
        metavar="DIR",
    )
    overwrite_output_dir: bool = option(
        False, "start afresh even if the run directory holds checkpoints"
    )
    resume: bool = option(False, "continue from the latest checkpoint in the run directory")
    seed: int = option(56, "random seed (data order, masking, initialisation)")
    log_interval: int = option(10, "optimizer steps between log lines (the only host syncs)")
    save_interval: int = option(
        500, "optimizer steps between checkpoints (a multiple of --log-interval)"
    )
    keep_checkpoints: int = option(2, "checkpoints kept in the run directory (oldest removed)")
    progress_bar: bool = option(True, "show a progress bar with ETA and tokens/s")
    tensorboard: bool = option(True, "write tensorboard scalars to RUN_DIR/tensorboard")
    eval_interval: int | None = option(
        None,
        "optimizer steps between held-out evaluations during training (a multiple of "
        "--log-interval; default: only before and after)",
    )
    do_eval: bool = option(
        False,
        "evaluate --student-pretrained (a final/ directory or a checkpoint) on --eval-files "
        "without training; results in OUTPUT_DIR/eval_results.json (squad: and OUTPUT_DIR/eval/)",
    )
    parallel: str = option(
        "ddp",
        "with torchrun: ddp (every process holds the whole student) or fsdp (FSDP2: student and "
        "teacher sharded layer by layer; checkpoints gathered into the usual format)",
        choices=("ddp", "fsdp"),
    )
    num_threads: int | None = option(
        None,
        "CPU threads per process (default on the command line: the cores other processes are "
        "not using, by the load average at the start, shared among this machine's processes of "
        "the job; from Python: torch's current setting)",
    )
    device: str = option(
        "auto", "auto | cpu | cuda (with torchrun: the local rank's GPU)", choices=DEVICES
    )
    # The task's own keys (a TaskOptions of the task's class): flat in files, flags and to_dict().
    options: Any = field(default=None, metadata={"flag": False}, compare=True)

    # ---- resolution and validation ---------------------------------------------------------------
    def task_class(self):
        from fastdistill.train.tasks import get_task

        return get_task(self.task)

    def resolved(self) -> TrainConfig:
        """A copy with the task's options and task-dependent defaults filled in, validated
        (``ValueError`` naming the key if not)."""
        task = self.task_class()
        c = dataclasses.replace(self)
        if c.options is None:
            c.options = task.Options()
        elif not isinstance(c.options, task.Options):
            raise ValueError(
                f"options must be {task.Options.__name__} for --task {c.task}, got "
                f"{type(c.options).__name__}"
            )
        else:
            c.options = dataclasses.replace(c.options)
        task.fill_defaults(c)
        if c.temperature is None:
            c.temperature = 2.0
        c.validate()
        return c

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad key (run on a :meth:`resolved` config)."""
        for name in ("alpha_kl", "alpha_cos", "max_length"):
            if getattr(self, name) is None:
                raise ValueError(f"{name} is unresolved; call TrainConfig.resolved()")
        checks.validate_general(self)
        task = self.task_class()
        self.options.validate(self)
        task.validate(self)
        if not self.do_eval and not task.has_training_signal(self):
            raise ValueError("every loss weight is 0: nothing to train")

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The general keys and the task's options, flat (as in config files)."""
        out = {f.name: getattr(self, f.name) for f in general_fields()}
        options = self.options if self.options is not None else self.task_class().Options()
        out.update(options.to_dict())
        return copy.deepcopy(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a flat mapping; unknown keys, keys of another task at a non-default value
        and wrongly typed values raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(
                f"{source}: expected a mapping of config keys, got {type(data).__name__}"
            )
        task_name = data.get("task", cls.task)
        if not isinstance(task_name, str):
            raise ValueError(f"{source}: task must be a string, got {task_name!r}")
        from fastdistill.train.tasks import get_task

        task = get_task(task_name)
        general = {f.name: f for f in general_fields()}
        own = {f.name: f for f in dataclasses.fields(task.Options)}
        _check_keys(data, general, own, task_name, source)
        hints = typing.get_type_hints(cls)
        opt_hints = typing.get_type_hints(task.Options)
        values = {k: _coerce(k, v, hints[k], source) for k, v in data.items() if k in general}
        opts = {k: _coerce(k, v, opt_hints[k], source) for k, v in data.items() if k in own}
        return cls(**values, options=task.Options(**opts))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Load a ``.yaml``/``.yml`` or ``.json`` file (the same keys as the flags, with underscores)."""
        return cls.from_dict(load_mapping(path), source=str(path))


def general_fields() -> list[dataclasses.Field]:
    """The general keys: every :class:`TrainConfig` field except the task's options."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)]


def _other_task_keys(task_name: str) -> dict[str, tuple[str, dataclasses.Field]]:
    """Key → (a task declaring it, its field), for the keys of the tasks other than ``task_name``."""
    from fastdistill.train.tasks import all_tasks

    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for task in all_tasks():
        if task.name != task_name:
            for f in dataclasses.fields(task.Options):
                out.setdefault(f.name, (task.name, f))
    return out


# Defaults some keys had in earlier versions: configs written then hold them for every task.
EARLIER_DEFAULTS = {"mlm_smoothing": (0.7,)}


def _at_rest(name: str, value: Any, f: dataclasses.Field) -> bool:
    """Whether a key of another task holds its default, an earlier default, or (for a loss
    weight) 0."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return (
        value is None
        or value == default
        or value in EARLIER_DEFAULTS.get(name, ())
        or (name.startswith("alpha_") and value == 0)
    )


def _check_keys(data, general, own, task_name: str, source: str) -> None:
    others = _other_task_keys(task_name)
    unknown = [k for k in data if k not in general and k not in own and k not in others]
    if unknown:
        known = [*general, *own, *others]
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{source}: unknown config key(s): {', '.join(hints)}")
    for k in data:
        if k in others and k not in own and not _at_rest(k, data[k], others[k][1]):
            raise ValueError(
                f"{source}: {k} applies to --task {others[k][0]} only (task is {task_name})"
            )


def check_task_options(task, registered) -> None:
    """``ValueError`` if ``task``'s option keys collide with the general keys or with another
    registered task's keys (keys inherited from a shared options base are one key)."""
    general = {f.name for f in general_fields()}
    for f in dataclasses.fields(task.Options):
        if f.name in general:
            raise ValueError(f"task {task.name}: option {f.name!r} is a general config key")
        if not f.metadata.get("help"):
            raise ValueError(f"task {task.name}: option {f.name!r} has no help text")
        for other in registered:
            if other is task or other.name == task.name:
                continue
            theirs = {g.name: g for g in dataclasses.fields(other.Options)}
            if (
                f.name in theirs
                and theirs[f.name] is not f
                and options_owner(task, f) != options_owner(other, theirs[f.name])
            ):
                raise ValueError(
                    f"task {task.name}: option {f.name!r} is already a key of task {other.name}"
                )


def options_owner(task, f: dataclasses.Field) -> type:
    """The options class that declares ``f`` (a shared base for inherited keys)."""
    for klass in reversed(task.Options.__mro__):
        if f.name in getattr(klass, "__annotations__", {}):
            return klass
    return task.Options


def load_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml`` or ``.json`` config file; ``ValueError`` naming the file
    (and the line, for a syntax error) when it cannot be read."""
    path = os.fspath(path)
    if not path.endswith((".yaml", ".yml", ".json")):
        raise ValueError(f"{path}: config files must end in .yaml, .yml or .json")
    text = fsutil.read_text(path, "config file")
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except Exception as exc:  # yaml.YAMLError: the problem and its line
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise ValueError(f"{path}: not valid YAML ({problem}{where})") from None
    return {} if data is None else data


# ---- type coercion of file values -----------------------------------------------------------------


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    base, optional = fields.unwrap_optional(tp)
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
