"""Config fields and their checks, shared by :class:`~fastdistill.train.config.TrainConfig` and the
tasks' option dataclasses (:class:`~fastdistill.train.tasks.base.TaskOptions`).

A field made with :func:`option` carries its ``--help`` text (and, for a fixed set of values, its
``choices``): the command line is generated from the fields, so flags and config keys cannot
drift. The checks raise ``ValueError`` with a message naming the key.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import field
from typing import Any


def option(
    default: Any = None,
    help: str = "",
    *,
    factory: Any = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
):
    """A dataclass field whose help text becomes the flag's ``--help`` line."""
    meta = {"help": help, "metavar": metavar, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def nonneg(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def positive_int(name: str, value: int) -> None:
    if not (isinstance(value, int) and value > 0):
        raise ValueError(f"{name} must be an integer > 0, got {value!r}")


def nonneg_int(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 0):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_all(check, obj, names) -> None:
    """``check(name, obj.name)`` for each name."""
    for name in names:
        check(name, getattr(obj, name))


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False
