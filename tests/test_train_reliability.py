"""The trainer's promises under faults and mistakes: it never destroys a user's files, never ends
green with a wrong model, resumes only the same run from an intact checkpoint, and every bad input
ends in one error line naming the file and what to do (exit status 2). CLI behaviour is tested
through the installed console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from _ddp import Stop, stop_after
from _tiny import tiny_inputs
from safetensors.torch import load_file, save_file

from fastdistill.train import TrainConfig, TrainingError, train
from fastdistill.train import checkpoint as ckpt
from fastdistill.train.cli import main as train_main
from fastdistill.train.rundir import RUN_MARKER

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    root = tmp_path_factory.mktemp("inp")
    paths = tiny_inputs(root, lines=300, vocab_size=300, hidden=32, layers=2)
    paths["root"] = root
    return paths


def _flat(inp, out, **kw):
    base = dict(
        teacher=inp["teacher"],
        train_files=[inp["train"]],
        eval_files=[inp["eval"]],
        cache_dir=str(inp["root"] / "cache"),
        output_dir=str(out),
        batch_size=8,
        max_length=32,
        max_steps=6,
        log_interval=2,
        save_interval=2,
        eval_max_sequences=16,
        progress_bar=False,
        tensorboard=False,
    )
    return base | kw


def _cfg(inp, out, **kw):
    return TrainConfig.from_dict(_flat(inp, out, **kw))


def _args(inp, out, *extra):
    flat = _flat(inp, out)
    args = ["--teacher", flat["teacher"], "--train-files", flat["train_files"][0]]
    args += ["--cache-dir", flat["cache_dir"], "--output-dir", str(out), "--batch-size", "8"]
    args += ["--max-length", "32", "--max-steps", "6", "--log-interval", "2"]
    args += ["--save-interval", "2", "--no-progress-bar", "--no-tensorboard"]
    return [*args, *extra]


def _console(*args, timeout=300):
    """Run the installed ``fastdistill-train``; (exit status, stderr)."""
    exe = shutil.which("fastdistill-train")
    assert exe, "fastdistill-train is not installed (pip install .)"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    return proc.returncode, proc.stderr


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("fastdistill-train: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---- never destroy a user's files ------------------------------------------------------------


def test_output_dir_that_is_or_is_inside_a_model_directory_is_refused(inp, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(inp["teacher"], teacher)
    before = (teacher / "config.json").read_bytes()
    for out in (teacher, teacher / "run"):
        rc, err = _console(*_args(inp, out, "--teacher", str(teacher)))
        assert rc == 2
        assert "teacher directory" in _one_error_line(err)
    assert (teacher / "config.json").read_bytes() == before
    assert not (teacher / "run").exists()


def test_non_empty_foreign_directory_needs_overwrite(inp, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a fastdistill run directory"):
        train(_cfg(inp, out, max_steps=2))
    train(_cfg(inp, out, max_steps=2, overwrite_output_dir=True))
    assert (out / "notes.txt").read_text() == "keep me" and (out / RUN_MARKER).is_file()
    train(_cfg(inp, out, max_steps=2, overwrite_output_dir=True))  # now a run dir: fine again


# ---- never end green with a wrong model -------------------------------------------------------


def test_every_step_skipped_is_an_error_and_nothing_is_saved(inp, tmp_path):
    teacher = tmp_path / "nan-teacher"
    shutil.copytree(inp["teacher"], teacher)
    weights = load_file(str(teacher / "model.safetensors"))
    name = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[name][0, 0] = float("nan")  # one NaN weight: every logit row it touches is NaN
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="student's parameters are not finite before training"):
        train(_cfg(inp, out, teacher=str(teacher)))  # a student copied from that teacher
    fresh = dict(student_config=inp["teacher"], max_steps=4, max_consecutive_skips=10)
    with pytest.raises(TrainingError, match="every one of the 4 optimizer steps was skipped"):
        train(_cfg(inp, out, teacher=str(teacher), **fresh))
    assert not (out / "final").exists()
    assert not ckpt.has_checkpoints(out)


def test_non_finite_parameters_stop_the_run_before_any_save(inp, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(_cfg(inp, out, max_steps=8, save_interval=4), on_step_end=stop_after(5))
    state = ckpt.checkpoint_root(out) / "step-00000004"
    opt_file = state / "optimizer.safetensors"
    opt = load_file(str(opt_file))
    key = next(k for k in opt if k.endswith("exp_avg_sq"))
    opt[key] = -opt[key] - 1.0  # a damaged optimizer state: sqrt of a negative → NaN weights
    save_file(opt, str(opt_file))
    sums = json.loads((state / ckpt.CHECKSUMS).read_text())
    sums["optimizer.safetensors"] = ckpt.fsutil.sha256(opt_file)  # damage that checksums miss
    (state / ckpt.CHECKSUMS).write_text(json.dumps(sums))
    with pytest.raises(TrainingError, match="parameters are no longer finite"):
        train(_cfg(inp, out, max_steps=8, save_interval=4, resume=True))
    assert ckpt.latest_checkpoint(out).name == "step-00000004"  # nothing saved after it
    assert not any(p.name.startswith("step-00000008") for p in ckpt.checkpoint_root(out).iterdir())


# ---- resume: the same run, from an intact checkpoint ---------------------------------------


def test_resume_refuses_changed_training_settings(inp, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(_cfg(inp, out), on_step_end=stop_after(3))
    for change, key in (
        (dict(learning_rate=1e-3), "learning_rate"),
        (dict(seed=7), "seed"),
        (dict(temperature=3.0), "temperature"),
        (dict(mlm_smoothing=0.3), "mlm_smoothing"),
    ):
        with pytest.raises(ValueError, match=rf"{key}: .* → ") as info:
            train(_cfg(inp, out, resume=True, **change))
        assert "Only these may change on resume" in str(info.value)
    summary = train(_cfg(inp, out, resume=True, log_interval=1, keep_checkpoints=3))
    assert summary["steps"] == 6
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["log_interval"] == 1 and recorded["learning_rate"] == 5e-4


def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(inp, tmp_path, caplog):
    whole = tmp_path / "whole"
    train(_cfg(inp, whole))
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(_cfg(inp, out), on_step_end=stop_after(5))
    root = ckpt.checkpoint_root(out)
    assert ckpt.latest_checkpoint(out).name == "step-00000004"
    model = root / "step-00000004" / "model" / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    model.write_bytes(bytes(raw))
    summary = train(_cfg(inp, out, resume=True))
    assert "skipping checkpoint step-00000004" in caplog.text and str(model) in caplog.text
    assert summary["steps"] == 6
    a, b = (
        load_file(str(whole / "final" / "model.safetensors")),
        load_file(str(out / "final" / "model.safetensors")),
    )
    for k in a:  # resumed from step 2: the same weights as the run never interrupted
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("damage", ["edited_step", "truncated_state", "missing_key"])
def test_damaged_only_checkpoint_is_named(inp, tmp_path, damage):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(_cfg(inp, out, keep_checkpoints=1), on_step_end=stop_after(3))
    state_file = ckpt.checkpoint_root(out) / "step-00000002" / ckpt.STATE
    state = json.loads(state_file.read_text())
    if damage == "edited_step":
        state["step"] = 4
        state_file.write_text(json.dumps(state))
        match = "does not match its checksum"
    elif damage == "truncated_state":
        state_file.write_text(state_file.read_text()[:100])
        match = "does not match its checksum"
    else:
        del state["scheduler"]
        state_file.write_text(json.dumps(state))
        (state_file.parent / ckpt.CHECKSUMS).unlink()  # as a checkpoint of an older version
        match = "lacks scheduler"
    rc, err = _console(*_args(inp, out, "--resume"))
    assert rc == 2
    line = _one_error_line(err)
    assert str(state_file) in line and re.search(match, line), line


def test_resaving_the_same_step_never_leaves_latest_naming_nothing(inp, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(inp, out, max_steps=2))
    real_replace = os.replace

    def crash_on_directory_rename(src, dst):
        if os.path.isdir(src):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_directory_rename)
    with pytest.raises(OSError, match="simulated crash"):
        train(_cfg(inp, out, max_steps=2, resume=True))  # re-saves step 2 at the end
    monkeypatch.undo()
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(out))["step"] == 2
    assert not list(ckpt.checkpoint_root(out).glob(".tmp-*"))
    train(_cfg(inp, out, max_steps=2, resume=True))
    assert ckpt.latest_checkpoint(out).name == "step-00000002-1"
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(out))["step"] == 2


def test_leftovers_of_killed_writers_are_removed(inp, tmp_path):
    out = tmp_path / "run"
    dead = _dead_pid()
    stale_ckpt = ckpt.checkpoint_root(out) / f".tmp-{dead}-abc"
    stale_cache = inp["root"] / "cache" / f".tmp-{dead}-xyz"
    for d in (stale_ckpt, stale_cache):
        (d / "model").mkdir(parents=True)
    train(_cfg(inp, out, max_steps=2, cache_dir=str(inp["root"] / "cache"), min_length=11))
    assert not stale_ckpt.exists() and not stale_cache.exists()


def test_resume_keeps_one_evaluation_per_step(inp, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(_cfg(inp, out), on_step_end=stop_after(3))
    train(_cfg(inp, out, resume=True))
    train(_cfg(inp, out, resume=True))  # a finished run resumed again
    evals = [
        r["step"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval"
    ]
    assert evals.count(0) == 1, evals


# ---- errors: one line, the file, what to do ----------------------------------------------------


def test_bad_inputs_end_in_one_error_line(inp, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait and the lord spake unto moses\n".encode("latin-1") * 20)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(inp["teacher"], f), no_tok / f)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["--train-files", inp["train"], str(latin)], str(latin)),
        (["--teacher", str(tmp_path / "nope" / "teacher")], "no such file or directory"),
        (["--teacher", "./teacher-typo"], "no such file or directory"),
        (["--teacher", str(no_tok)], "holds no tokenizer files"),
        (["--output-dir", str(a_file)], "is a file"),
        (["--cache-dir", str(a_file)], "token cache"),
        (["--learning-rate", "-1e-3"], "learning_rate must be a finite number > 0"),
    ]
    for extra, expected in cases:
        rc, err = _console(*_args(inp, tmp_path / "out", *extra))
        assert rc == 2, (extra, err)
        assert expected in _one_error_line(err), (extra, err)


def test_corrupt_teacher_weights_name_the_teacher(inp, tmp_path):
    teacher = tmp_path / "broken"
    shutil.copytree(inp["teacher"], teacher)
    (teacher / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match=f"cannot load the teacher from {teacher}"):
        train(_cfg(inp, tmp_path / "out", teacher=str(teacher)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(inp, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ValueError, match="cannot write to output_dir"):
            train(_cfg(inp, out, overwrite_output_dir=True))
    finally:
        out.chmod(stat.S_IRWXU)


def test_config_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: t\ntrain_files: [a.txt\n")
    assert train_main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not valid YAML" in err and "line" in err and "Traceback" not in err
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


# ---- helpers ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_killed_at_any_point_resumes_to_the_same_weights(inp, tmp_path):
    """SIGKILL inside checkpoint writes, between a rename and the marker, during the final
    evaluation and at random moments; after each kill ``latest`` names an intact checkpoint, and
    the resumed run ends with the bit-identical weights of a run never interrupted."""
    import multiprocessing as mp

    from _faults import run_and_die

    common = dict(max_steps=8, num_threads=1, keep_checkpoints=2)
    whole = tmp_path / "whole"
    train(_cfg(inp, whole, **common))
    out = tmp_path / "run"
    faults = [("seal", 2), ("step", 5), ("marker", 1), ("timer", 1), ("final_eval", 1)]
    faults += [("seal", 1), ("timer", 2)]  # re-saving the finished run's last step, then random
    ctx = mp.get_context("spawn")
    for i, (point, n) in enumerate(faults):
        config = _flat(inp, out, resume=i > 0 and ckpt.has_checkpoints(out), **common)
        child = ctx.Process(target=run_and_die, args=(config, point, n))
        child.start()
        child.join(timeout=300)
        latest = ckpt.latest_checkpoint(out)
        if latest is not None:
            assert ckpt.verify_checkpoint(latest)["step"] > 0, (point, n)
        # Every planned fault fires; a random one may come after the run finished.
        assert child.exitcode == -9 or (point == "timer" and child.exitcode == 0), (point, n)
    train(_cfg(inp, out, resume=True, **common))
    a = load_file(str(whole / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(ckpt.checkpoint_root(out).glob(".tmp-*"))


# ---- first use: the command line's edges and shared machines ------------------------------------


def test_off_a_terminal_the_run_logs_lines_and_says_where_it_resumes(inp, tmp_path):
    out = tmp_path / "run"
    rc, err = _console(*_args(inp, out, "--max-steps", "4", "--progress-bar"))
    assert rc == 0, err
    assert "\r" not in err and "step 2/4" in err and "step 4/4" in err
    rc, err = _console(*_args(inp, out, "--max-steps", "4", "--resume"))
    assert rc == 0, err
    assert "resuming from step 4" in err


def test_print_config_alone_prints_a_template(capsys):
    assert train_main(["--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# a template") and "learning_rate:" in out and "task: mlm" in out


def test_report_of_a_directory_of_runs_names_them(tmp_path, capsys):
    from fastdistill.__main__ import main as fastdistill_main

    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert fastdistill_main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "student") in err and str(tmp_path / "teacher") in err


def test_threads_follow_the_free_cores(monkeypatch):
    from fastdistill.train import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.1, 0.0, 0.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.choose_threads(None) == 3  # one core busy elsewhere
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert runtime.choose_threads(None) == 1  # an overloaded machine: one thread, never zero
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.choose_threads(None) == 2  # four free cores shared by two processes
    assert runtime.choose_threads(5) == 5  # --num-threads wins
    import fastdistill  # noqa: F401  (sets the wait policy unless the user did)

    assert os.environ["OMP_WAIT_POLICY"]


def test_demo_print_config_runs_nothing_and_demo_resume_continues(tmp_path):
    out = tmp_path / "demo"
    rc, err = _console("--demo", "--print-config", "--output-dir", str(out), timeout=120)
    assert rc == 0 and not out.exists(), err
    from fastdistill.train import demo

    first = demo.run_demo(out, quick=True, progress_bar=False, tensorboard=False)
    before = load_file(str(out / "student" / "final" / "model.safetensors"))
    again = demo.run_demo(out, quick=True, progress_bar=False, tensorboard=False, resume=True)
    after = load_file(str(out / "student" / "final" / "model.safetensors"))
    assert again["after"] == first["after"]
    for k in before:  # resumed the finished run: nothing trained again
        assert torch.equal(before[k], after[k]), k
    records = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # no step trained (and logged) twice
