"""`fastdistill env`: the report a user pastes into a bug report, as text and as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastdistill import _native
from fastdistill.__main__ import main
from fastdistill.env import OPS, collect_env, format_env


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    # The suite also runs under FASTDISTILL_BACKEND=triton (make test-triton); these tests
    # state the environment they need.
    monkeypatch.delenv("FASTDISTILL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _env_json(capsys) -> dict:
    assert main(["env", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_env_text(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    labels = ("fastdistill:", "python:", "torch:", "triton:", "transformers:", "compiled core:")
    for label in labels:
        assert label in out
    assert torch.__version__ in out
    assert "FASTDISTILL_BACKEND:" in out and "TRITON_INTERPRET:" in out
    assert "backend per op on cpu" in out
    for op in OPS:
        assert f"{op}:" in out


def test_env_json(capsys):
    d = _env_json(capsys)
    keys = {"fastdistill", "python", "platform", "torch", "triton", "transformers", "core", "env"}
    assert set(d) >= keys | {"backends"}
    assert d["fastdistill"]
    assert d["python"] == ".".join(map(str, sys.version_info[:3]))
    assert d["torch"]["version"] == torch.__version__
    assert d["torch"]["cuda_version"] == torch.version.cuda
    assert d["torch"]["cuda_available"] == torch.cuda.is_available()
    assert d["torch"]["num_threads"] == torch.get_num_threads()
    assert d["env"] == {"FASTDISTILL_BACKEND": None, "TRITON_INTERPRET": None}

    core = d["core"]
    assert core["importable"] == _native.available()
    if core["importable"]:
        assert core["error"] is None
        assert core["isa"] in core["supported_isas"]
        assert core["isa"] == _native.core().isa()
        assert isinstance(core["built_with_cuda"], bool)

    expected_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    assert list(d["backends"]) == expected_devices
    assert list(d["backends"]["cpu"]) == list(OPS)
    if core["importable"]:
        assert d["backends"]["cpu"]["kl_div"] == "native"
    else:
        assert d["backends"]["cpu"]["kl_div"] == "torch"


def test_env_reports_forced_backend(monkeypatch, capsys):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "torch")
    d = _env_json(capsys)
    assert d["env"]["FASTDISTILL_BACKEND"] == "torch"
    assert set(d["backends"]["cpu"].values()) == {"torch"}


def test_env_reports_bad_backend_as_text(monkeypatch, capsys):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "bogus")
    d = _env_json(capsys)
    assert d["env"]["FASTDISTILL_BACKEND"] == "bogus"
    for choice in d["backends"]["cpu"].values():
        assert choice.startswith("error: ") and "bogus" in choice
    # The text report shows the error too instead of raising.
    assert main(["env"]) == 0
    assert "error: " in capsys.readouterr().out


def test_format_env_without_core_or_optional_packages():
    # What a broken install looks like: the report still formats.
    d = collect_env()
    d["triton"] = None
    d["core"] = {
        "importable": False,
        "error": "error: ImportError: no _C",
        "path": None,
        "isa": None,
        "supported_isas": [],
        "built_with_cuda": None,
    }
    text = format_env(d)
    assert "triton:" in text and "not installed" in text
    assert "NOT importable" in text and "no _C" in text


@pytest.mark.parametrize(
    "argv", [["bogus"], [], ["env", "--no-such-flag"]], ids=["unknown", "none", "bad-flag"]
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: fastdistill" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "env" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    # Run from an empty directory so the installed package is what imports, as for a user.
    env = {k: v for k, v in os.environ.items() if k != "FASTDISTILL_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-m", "fastdistill", "env", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["torch"]["version"] == torch.__version__


def test_env_lists_every_dispatched_op():
    # Each op with a Triton kernel goes through the backend dispatcher: the report must show it.
    pytest.importorskip("triton")
    from fastdistill.triton import KERNEL_MODULES

    assert set(KERNEL_MODULES) <= set(OPS)
