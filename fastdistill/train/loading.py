"""Loading models and tokenizers with errors that name the path and say what to do.

A path that looks local is checked before anything asks the Hugging Face hub for it: a typo in a
local directory must not wait on network retries and then blame the connection. Anything that
fails while loading (a damaged safetensors file, a missing config) is reported with the path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Files one of which every saved tokenizer directory holds.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def looks_local(value: str) -> bool:
    """Whether ``value`` can only mean a local path (hub ids are ``name`` or ``owner/name``)."""
    if (
        value.startswith(("/", ".", "~"))
        or os.sep in value.replace("/", "")
        or value.count("/") > 1
    ):
        return True
    head = value.split("/", 1)[0]
    return "/" in value and Path(head).is_dir()  # e.g. runs/teachr when runs/ exists


def check_path(flag: str, value: str | None) -> None:
    """``ValueError`` when ``value`` looks local (see :func:`looks_local`) and does not exist."""
    if value and not Path(value).expanduser().exists() and looks_local(value):
        raise ValueError(f"{flag} {value}: no such file or directory")


def load(what: str, path: str | os.PathLike, fn: Callable[[], T]) -> T:
    """``fn()``, with any failure reported as ``ValueError`` naming ``what`` and ``path``."""
    try:
        return fn()
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"cannot load the {what} from {path}: {exc}") from exc
    except Exception as exc:  # OSError, safetensors' SafetensorError, ...
        raise ValueError(f"cannot load the {what} from {path}: {exc}") from exc


def check_tokenizer_dir(path: str | None) -> None:
    """A local tokenizer directory must hold tokenizer files: without them transformers builds a
    tokenizer of a handful of special tokens, and every word becomes unknown."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir() and not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...): give the "
            "tokenizer's directory with --tokenizer"
        )


def tokenizer_for(cfg, task):
    """The run's tokenizer: ``--tokenizer``, else the teacher's, else the student's."""
    from fastdistill.train.student import model_dir

    for key in ("teacher", "student_pretrained", "student_config", "tokenizer"):
        check_path("--" + key.replace("_", "-"), getattr(cfg, key))
    student_dir = model_dir(cfg.student_pretrained) if cfg.student_pretrained else None
    path = cfg.tokenizer or cfg.teacher or student_dir
    check_tokenizer_dir(path)
    return load("tokenizer", path, lambda: task.load_tokenizer(path))


def teacher_for(cfg, task):
    """The teacher model, frozen in eval mode on the task's device (``None`` without one)."""
    if cfg.teacher is None:
        return None
    return load("teacher", cfg.teacher, lambda: task.load_teacher(cfg.teacher))


def data_everywhere(task, tokenizer, files: dict, procs) -> dict:
    """The task's data sets on every process: rank 0 tokenises and caches, then the others read
    the cache."""
    data = task.load_data(tokenizer, files, build=True) if procs.is_main else {}
    procs.barrier()
    if not procs.is_main:
        data = task.load_data(tokenizer, files, build=False)
    return data
