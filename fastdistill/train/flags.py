"""The command line of the trainer's configuration, generated from the fields: one flag per general
key (:class:`~fastdistill.train.config.TrainConfig`), then one per task option, grouped by the tasks
that declare it, so ``--help`` is always complete and flags cannot drift from config keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from fastdistill.train import fields
from fastdistill.train.config import (
    TrainConfig,
    general_fields,
    load_mapping,
    options_owner,
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(group, f: dataclasses.Field, tp: Any, default: Any, **override) -> None:
    """The flag of one field; ``override``: argparse keywords that replace the generated ones."""
    tp, _ = fields.unwrap_optional(tp)
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
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    kwargs.update(override)
    group.add_argument(_flag(f.name), **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per general key, then per task option (one argument group per set of tasks that
    share the keys). Defaults are SUPPRESSed so that only the flags a user typed override a config
    file (see :func:`config_from_args`)."""
    from fastdistill.train.tasks import all_tasks, task_names

    general = parser.add_argument_group("configuration (one flag per config key)")
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in general_fields():
        override = {}
        if f.name == "task":  # the registered tasks, known only now
            tasks = "; ".join(f"{t.name}: {t.help}" for t in all_tasks())
            override = dict(choices=task_names(), help=f"{f.metadata['help']}. {tasks}")
        _add_field(general, f, hints[f.name], getattr(defaults, f.name), **override)
    for names, fs, tp_hints, opts_default in _task_option_groups():
        group = parser.add_argument_group(f"options of --task {', '.join(names)}")
        for f in fs:
            _add_field(group, f, tp_hints[f.name], getattr(opts_default, f.name))


def _task_option_groups():
    """(task names, fields, type hints, default options) per group of tasks sharing keys."""
    from fastdistill.train.tasks import all_tasks

    seen: set[str] = set()
    groups = []
    for task in all_tasks():
        new = [f for f in dataclasses.fields(task.Options) if f.name not in seen]
        by_owner: dict[type, list] = {}
        for f in new:
            by_owner.setdefault(options_owner(task, f), []).append(f)
        for owner, fs in by_owner.items():
            names = [t.name for t in all_tasks() if issubclass(t.Options, owner)]
            groups.append((names, fs, typing.get_type_hints(task.Options), task.Options()))
            seen.update(f.name for f in fs)
    return groups


def all_keys() -> set[str]:
    """Every config key: the general ones and every registered task's."""
    from fastdistill.train.tasks import all_tasks

    keys = {f.name for f in general_fields()}
    for task in all_tasks():
        keys.update(f.name for f in dataclasses.fields(task.Options))
    return keys


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file named by ``args.config`` (if any), overridden by the flags given."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data.update(load_mapping(args.config))
        base = TrainConfig.from_dict(data, source=args.config)
        data = base.to_dict()
    names = all_keys()
    given = {k: v for k, v in vars(args).items() if k in names}
    if "task" in given and given["task"] != data.get("task", given["task"]):
        # A new task on the command line: the file's options of the old task do not carry over.
        data = {k: v for k, v in data.items() if k in {f.name for f in general_fields()}}
    data.update(given)
    return TrainConfig.from_dict(data)
