"""fastdistill-train configuration: dataclass ↔ YAML/JSON ↔ command line, and validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fastdistill.train.cli import build_parser, main
from fastdistill.train.config import TrainConfig, general_fields
from fastdistill.train.flags import config_from_args
from fastdistill.train.tasks import all_tasks

DATA = Path(__file__).parent / "data"


def _base(**kw):
    return TrainConfig.from_dict(dict(teacher="t", train_files=["a.txt"], **kw))


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\ntrain_files: [a.txt]\nlearning_rte: 0.1\nbogus: 1\n")
    with pytest.raises(ValueError, match="learning_rte.*did you mean 'learning_rate'") as info:
        TrainConfig.from_file(path)
    assert "'bogus'" in str(info.value)


def test_unknown_key_in_json_and_cli_exit_code(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"teacher": "t", "alpha_kll": 1.0}))
    with pytest.raises(ValueError, match="alpha_kll"):
        TrainConfig.from_file(path)
    assert main(["--config", str(path)]) == 2
    assert "alpha_kll" in capsys.readouterr().err


def test_every_field_is_a_flag_and_help_is_complete(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    keys = list(general_fields())
    for task in all_tasks():
        keys += dataclasses.fields(task.Options)
        assert task.name in text
    for f in keys:
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_flags_override_file_and_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "teacher: t\ntrain_files: a.txt\nlearning_rate: 1e-3\nmax_steps: 7\n"
        "student_layers: [0, 3]\nrestrict_ce_to_mask: true\n"
    )
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--max-steps",
            "9",
            "--no-restrict-ce-to-mask",
            "--train-files",
            "x.txt",
            "y.txt",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.learning_rate == 1e-3 and cfg.max_steps == 9 and cfg.student_layers == [0, 3]
    assert cfg.options.restrict_ce_to_mask is False and cfg.train_files == ["x.txt", "y.txt"]
    # Round trip: a resolved config written as JSON loads back to the same config.
    r = cfg.resolved()
    assert TrainConfig.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_task_defaults_follow_distilbert():
    mlm = _base().resolved()
    assert (mlm.alpha_kl, mlm.options.alpha_mlm, mlm.alpha_cos, mlm.alpha_mse) == (
        5.0,
        2.0,
        1.0,
        0.0,
    )
    assert mlm.temperature == 2.0
    clm = _base(task="clm").resolved()
    assert clm.options.alpha_clm == 2.0 and "alpha_mlm" not in clm.to_dict()
    hidden = _base(task="hidden").resolved()
    assert (hidden.alpha_kl, hidden.alpha_cos) == (0.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="seq2seq"), "task must be one of"),
        (dict(temperature=0.0), "temperature"),
        (dict(alpha_kl=-1.0), "alpha_kl"),
        (dict(task="clm", alpha_mlm=1.0), "alpha_mlm applies to --task mlm"),
        (dict(task="hidden", alpha_kl=1.0), "alpha_kl must be 0 for --task hidden"),
        (dict(save_interval=15, log_interval=10), "multiple of log_interval"),
        (dict(batch_size=0), "batch_size"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(student_config="c", student_pretrained="p"), "at most one"),
        (dict(student_config="c", student_layers=[0]), "student_layers only applies"),
        (dict(mlm_mask_token_prob=0.95, mlm_random_token_prob=0.1), "<= 1"),
        (dict(train_files=[]), "train_files is empty"),
    ],
)
def test_validation_errors(kwargs, match):
    base = dict(teacher="t", train_files=["a.txt"])
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(base).resolved()


def test_no_teacher_means_hard_loss_only():
    cfg = TrainConfig(train_files=["a"], student_config="c", tokenizer="t").resolved()
    assert cfg.alpha_kl == 0 and cfg.alpha_cos == 0 and cfg.options.alpha_mlm == 2.0
    with pytest.raises(ValueError, match="need a teacher"):
        TrainConfig(train_files=["a"], student_config="c", tokenizer="t", alpha_kl=1.0).resolved()


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\nmax_steps: many\n")
    with pytest.raises(ValueError, match="max_steps must be an integer"):
        TrainConfig.from_file(path)


def test_print_config(capsys):
    assert main(["--teacher", "t", "--train-files", "a.txt", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "alpha_kl: 5.0" in out and "task: mlm" in out


@pytest.mark.parametrize("name", ["config_mlm_0.1.json", "config_squad_0.1.json"])
def test_config_written_by_the_flat_trainer_still_loads(name):
    """A config.json written before task options moved into the tasks (every task's keys, flat)
    loads to the same settings: the general keys as they were, the task's own keys in its
    options, the other tasks' keys (at their defaults) dropped."""
    old = json.loads((DATA / name).read_text())
    cfg = TrainConfig.from_file(DATA / name).resolved()
    new = cfg.to_dict()
    defaults = TrainConfig().to_dict()
    for k in set(new) - set(old):  # keys added since: at their defaults
        assert new[k] == defaults[k], k
    assert {k: old[k] for k in new if k in old} == {k: v for k, v in new.items() if k in old}
    dropped = set(old) - set(new)
    assert dropped and all(k not in TrainConfig.__dataclass_fields__ for k in dropped)
    if cfg.task == "squad":
        assert (cfg.options.doc_stride, cfg.options.alpha_squad) == (64, 0.4)
    else:
        assert cfg.options.mlm_smoothing == 0.0 and cfg.options.restrict_ce_to_mask is True


def test_a_key_of_another_task_is_refused_unless_at_rest():
    with pytest.raises(ValueError, match="doc_stride applies to --task squad only"):
        TrainConfig.from_dict(dict(teacher="t", train_files=["a"], doc_stride=64))
    cfg = TrainConfig.from_dict(dict(teacher="t", train_files=["a"], doc_stride=128))
    assert "doc_stride" not in cfg.resolved().to_dict()
