"""The parts of the GPU benchmark (bench/gpu_bench.py) that run without a GPU: its plan, and its
report from a made-up run. No GPU machine is at hand to catch a mistake in the target verdicts or
the rendering, so these are checked here, where the suites run."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from . import gpu_bench, report, shapes


def _result(op: str, shape: str, dtype: str, impl: str, ms: float | None, **fields):
    row = gpu_bench.Row(op, shapes.get_gpu(shape), dtype)
    r = gpu_bench.new_result(row, impl)
    if ms is None:
        r.status = fields.pop("status", "unavailable")
        r.detail = fields.pop("detail", "BackendUnavailableError: triton: not built. Available: x")
    else:
        r.status, r.ms_median, r.ms_min, r.ms_max = "ok", ms, ms, ms
        r.peak_bytes = r.unit_bytes  # exactly one gradient: the memory target holds
        r.frac_copy_bw = 0.9
    for key, value in fields.items():
        setattr(r, key, value)
    return r


def _run() -> list[gpu_bench.Result]:
    results = [
        # llama2: every target met by the CUDA kernels; Triton slower than Liger's JSD pipeline
        _result("kl_div", "llama2", "bf16", "fastdistill-triton", 2.0),
        _result("kl_div", "llama2", "bf16", "fastdistill-cuda", 1.0),
        _result("kl_div", "llama2", "bf16", "eager", 10.0),
        _result("kl_div", "llama2", "bf16", "compile", 4.0),
        _result("kl_div", "llama2", "bf16", "liger-kldiv", 3.0),
        _result("kl_div", "llama2", "bf16", "liger-jsd", 1.5),
        # llama3: Liger not installed, so its comparisons are not measured
        _result("kl_div", "llama3", "bf16", "fastdistill-cuda", 1.0),
        _result("kl_div", "llama3", "bf16", "compile", 3.0),
        _result("kl_div", "llama3", "bf16", "liger-kldiv", None, status="not installed"),
        _result("kl_div", "llama3", "bf16", "fastdistill-triton", None),
    ]
    gpu_bench.add_ratios(results[:6])
    gpu_bench.add_ratios(results[6:])
    return results


def test_plan_lists_without_a_gpu(capsys):
    assert gpu_bench.main(["--list", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["kl_div", "llama2"], ["kl_div", "llama3"]]


def test_unknown_names_are_errors():
    with pytest.raises(SystemExit):
        gpu_bench.main(["--list", "--dtypes", "fp8"])
    with pytest.raises(KeyError):
        gpu_bench.main(["--list", "--shapes", "llama4"])


def test_target_verdicts():
    lines = report.gpu_targets_section([asdict(r) for r in _run()], gpu_bench.settings())
    rows = [
        [c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| llama")
    ]
    verdicts = {(cells[0], cells[1]): cells[-1] for cells in rows}
    assert verdicts == {
        ("llama2 16384x32000", "fastdistill-triton"): "NOT met",  # slower than liger-jsd
        ("llama2 16384x32000", "fastdistill-cuda"): "met",
        ("llama3 8192x128256", "fastdistill-cuda"): "met where measured",  # no Liger numbers
        ("llama3 8192x128256", "fastdistill-triton"): "not met: unavailable",
    }


def test_report_renders_again_from_its_json(tmp_path):
    """The markdown gpu_bench writes is what `python -m bench.report --gpu-json` renders."""
    paths = (str(tmp_path / "gpu.md"), str(tmp_path / "gpu.json"))
    machine = {"gpu": "none (made-up run)", "commit": "0000000"}
    copy_bw = {"bytes": 2 << 30, "reps": 20, "bytes_per_s": 3.0e12, "bytes_per_s_median": 2.9e12}
    gpu_bench.write_outputs(paths, machine, copy_bw, _run(), [], ["made up"])
    written = (tmp_path / "gpu.md").read_text()
    out = tmp_path / "again.md"
    assert report.main(["--gpu-json", paths[1], "--out", str(out)]) == 0
    assert out.read_text() == written
    assert "| kl_div | llama2 16384x32000 | bf16 | fwd+bwd | fastdistill-cuda | 1.000 | 10.00 " in (
        written
    )
    assert "2900 GB/s median (best 3000 GB/s)" in written
