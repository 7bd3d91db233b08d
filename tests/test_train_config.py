"""fastdistill-train configuration: dataclass ↔ YAML/JSON ↔ command line, and validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fastdistill.train.cli import build_parser, main
from fastdistill.train.config import TrainConfig, config_from_args


def _base(**kw):
    return TrainConfig(teacher="t", train_files=["a.txt"], **kw)


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
    for f in dataclasses.fields(TrainConfig):
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
    assert cfg.restrict_ce_to_mask is False and cfg.train_files == ["x.txt", "y.txt"]
    # Round trip: a resolved config written as JSON loads back to the same config.
    r = cfg.resolved()
    assert TrainConfig.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_task_defaults_follow_distilbert():
    mlm = _base().resolved()
    assert (mlm.alpha_kl, mlm.alpha_mlm, mlm.alpha_clm, mlm.alpha_cos, mlm.alpha_mse) == (
        5.0,
        2.0,
        0.0,
        1.0,
        0.0,
    )
    assert mlm.temperature == 2.0
    clm = _base(task="clm").resolved()
    assert (clm.alpha_mlm, clm.alpha_clm) == (0.0, 2.0)
    hidden = _base(task="hidden").resolved()
    assert (hidden.alpha_kl, hidden.alpha_mlm, hidden.alpha_cos) == (0.0, 0.0, 1.0)


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
        TrainConfig(**base).resolved()


def test_no_teacher_means_hard_loss_only():
    cfg = TrainConfig(train_files=["a"], student_config="c", tokenizer="t").resolved()
    assert cfg.alpha_kl == 0 and cfg.alpha_cos == 0 and cfg.alpha_mlm == 2.0
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
