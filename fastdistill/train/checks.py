"""Validation of the general config keys (:class:`~fastdistill.train.config.TrainConfig`): each
check raises ``ValueError`` naming the key. The tasks check their own options."""

from __future__ import annotations

from fastdistill.train import fields


def validate_general(c) -> None:
    _validate_numbers(c)
    _validate_schedule(c)
    _validate_run(c)
    _validate_models(c)


def _validate_numbers(c) -> None:
    from fastdistill.train.config import general_fields

    for f in general_fields():
        if f.metadata.get("choices"):
            fields.choice(f.name, getattr(c, f.name), f.metadata["choices"])
    fields.check_all(fields.nonneg, c, ("alpha_kl", "alpha_mse", "alpha_cos", "weight_decay"))
    fields.check_all(fields.nonneg, c, ("max_grad_norm",))
    fields.check_all(
        fields.positive, c, ("temperature", "learning_rate", "adam_epsilon", "capture_temperature")
    )
    if c.teacher_top_k is not None:
        fields.positive_int("teacher_top_k", c.teacher_top_k)
    fields.check_all(
        fields.positive_int,
        c,
        (
            "batch_size",
            "gradient_accumulation_steps",
            "log_interval",
            "save_interval",
            "max_length",
            "keep_checkpoints",
            "max_consecutive_skips",
        ),
    )
    fields.unit("warmup_ratio", c.warmup_ratio)
    if c.num_threads is not None:
        fields.positive_int("num_threads", c.num_threads)
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(c, name)
        if not (0 <= v < 1):
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if c.max_length < 4:
        raise ValueError(
            f"max_length must be >= 4 (two special tokens and some text), got {c.max_length}"
        )


def _validate_schedule(c) -> None:
    fields.nonneg_int("num_epochs", c.num_epochs)
    if c.max_steps is not None:
        fields.positive_int("max_steps", c.max_steps)
    elif c.num_epochs == 0:
        raise ValueError("num_epochs must be > 0 when max_steps is not set")
    if c.warmup_steps is not None:
        fields.nonneg_int("warmup_steps", c.warmup_steps)
    if c.save_interval % c.log_interval:
        raise ValueError(
            f"save_interval ({c.save_interval}) must be a multiple of log_interval "
            f"({c.log_interval}): checkpoints are written where the run syncs with the host"
        )
    if c.eval_interval is not None:
        fields.positive_int("eval_interval", c.eval_interval)
        if c.eval_interval % c.log_interval:
            raise ValueError(
                f"eval_interval ({c.eval_interval}) must be a multiple of log_interval "
                f"({c.log_interval})"
            )


def _validate_run(c) -> None:
    if c.do_eval:
        if not c.eval_files:
            raise ValueError("do_eval needs eval_files (--eval-files FILE ...)")
        if not c.student_pretrained:
            raise ValueError(
                "do_eval evaluates --student-pretrained: give the model directory (a run's "
                "final/ or a checkpoint)"
            )
        if c.resume:
            raise ValueError("do_eval does not train: it cannot be combined with resume")
    elif not c.train_files:
        raise ValueError(
            "train_files is empty: give at least one text file (--train-files FILE ...)"
        )


def _validate_models(c) -> None:
    if c.student_config and c.student_pretrained:
        raise ValueError("give at most one of student_config and student_pretrained")
    if c.student_layers is not None:
        if c.student_config or c.student_pretrained:
            raise ValueError(
                "student_layers only applies to a student initialised from the teacher"
            )
        if not c.student_layers:
            raise ValueError("student_layers must name at least one teacher layer")
        if any(i < 0 for i in c.student_layers):
            raise ValueError(f"student_layers must be >= 0, got {c.student_layers}")
    if c.teacher_cache is not None:
        _validate_teacher_cache(c)
    elif c.teacher is None:
        if c.alpha_kl > 0 or c.alpha_mse > 0 or c.alpha_cos > 0:
            raise ValueError(
                "alpha_kl, alpha_mse and alpha_cos need a teacher; without --teacher only the "
                "hard MLM/CLM loss is trained"
            )
        if not (c.student_config or c.student_pretrained):
            raise ValueError("without a teacher, give --student-config or --student-pretrained")
        if c.tokenizer is None and not c.do_eval:
            raise ValueError("without a teacher, give --tokenizer")


def _validate_teacher_cache(c) -> None:
    require_teacher_cache_support(c.task, c.task_class())
    if not (c.student_config or c.student_pretrained):
        raise ValueError(
            "--teacher-cache: give --student-config or --student-pretrained (the teacher is not "
            "loaded, so no student can be copied from it)"
        )
    if c.alpha_cos > 0 or c.alpha_mse > 0:
        raise ValueError(
            "alpha_cos and alpha_mse need the teacher's hidden states or full logits, which a "
            "teacher cache does not hold: set them to 0"
        )
    if c.tokenizer is None and c.teacher is None:
        raise ValueError("--teacher-cache: give --tokenizer (the teacher's)")


def require_teacher_cache_support(name: str, task_class) -> None:
    """A ValueError naming the tasks that can use a teacher cache, unless ``task_class`` can."""
    if task_class.supports_teacher_cache:
        return
    from fastdistill.train.tasks import all_tasks  # the registry imports this module

    able = ", ".join(t.name for t in all_tasks() if t.supports_teacher_cache)
    raise ValueError(
        f"--task {name} cannot use a teacher cache: its teacher's inputs change from epoch to "
        f"epoch or it has no vocabulary logits (tasks that can: {able})"
    )
