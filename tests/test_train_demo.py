"""The embedded default (`fastdistill-train` with no arguments), shrunk to seconds; the shipped
corpus and its provenance."""

from __future__ import annotations

import json

import pytest
import torch

from fastdistill.train import cli, demo


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_corpus_is_shipped_with_its_source():
    text = demo.CORPUS.read_text(encoding="utf-8")
    assert len(text) > 500_000 and text.startswith("In the beginning God created")
    source = (demo.CORPUS_DIR / "SOURCE.md").read_text()
    assert "public domain" in source.lower() and "bible-kjv-text" in source


def test_quick_demo_end_to_end(tmp_path):
    result = demo.run_demo(tmp_path / "demo", quick=True, progress_bar=False, tensorboard=False)
    for key in ("kl_to_teacher", "top1_agreement", "accuracy", "teacher_accuracy"):
        assert key in result["before"] and key in result["after"]
    run = tmp_path / "demo" / "student"
    assert (run / "final" / "model.safetensors").is_file() and (run / "metrics.png").is_file()
    assert (
        json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["student"]
        == result["student"]
    )
    assert "top-1 agreement" in demo.format_demo(result)
    # A second run reuses the trained teacher.
    again = demo.run_demo(tmp_path / "demo", quick=True, progress_bar=False, tensorboard=False)
    assert again["before"]["teacher_accuracy"] == result["before"]["teacher_accuracy"]


def test_no_arguments_runs_the_demo(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run_demo(output_dir, **kw):
        seen["dir"] = output_dir
        seen.update(kw)
        return {
            "before": {},
            "after": {},
            "teacher_parameters": 2e6,
            "student_parameters": 1e6,
            "student": "s",
            "figure": "f",
        }

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert cli.main([]) == 0
    assert seen["dir"] == "runs/demo" and seen["progress_bar"] is True
    assert cli.main(["--demo", "--output-dir", str(tmp_path), "--no-tensorboard"]) == 0
    assert seen["dir"] == str(tmp_path) and seen["tensorboard"] is False
    assert "demo" in capsys.readouterr().out
