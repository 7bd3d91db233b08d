"""Fixtures and options for the benchmark suites (``pytest bench``; see bench/README.md)."""

from __future__ import annotations

import os

import pytest
import torch

from . import harness, shapes


def pytest_addoption(parser):
    group = parser.getgroup("fastdistill bench")
    group.addoption(
        "--bench-shapes",
        default=os.environ.get("FASTDISTILL_BENCH_SHAPES", "all"),
        help="comma-separated shape names from bench/shapes.py (default: all): "
        + ", ".join(shapes.REGISTRY),
    )
    group.addoption(
        "--target-reps",
        type=int,
        default=7,
        help="interleaved repetitions per implementation in test_targets.py (min is reported)",
    )
    group.addoption(
        "--targets-json",
        default=None,
        help="write the CPU target measurements (test_targets.py) to this JSON file",
    )


def pytest_sessionstart(session):
    """Refuse to time a fallback: without the compiled core the "fastdistill" rows would time
    the plain-PyTorch reference and every ratio would be meaningless. FASTDISTILL_BACKEND=torch
    (timing the reference on purpose) is allowed."""
    from fastdistill import _native

    wanted = os.environ.get("FASTDISTILL_BACKEND", "auto").strip().lower()
    if not _native.available() and wanted != "torch":
        pytest.exit(
            f"bench: the compiled core is not importable ({_native.IMPORT_PROBLEM}); refusing to "
            "time the plain-PyTorch fallback as fastdistill",
            returncode=2,
        )


def pytest_report_header(config):
    info = harness.machine_info()
    return [
        f"fastdistill bench: {info['cpu']} ({info['cpu_flags']}), {info['cores']} cores, "
        f"torch {info['torch']} ({info['torch_threads']} threads), triton {info['triton']}, "
        f"fastdistill ISA {info['fastdistill_isa']}, backend {info['backend']}",
        "shapes: "
        + "; ".join(s.describe() for s in shapes.select(config.getoption("--bench-shapes"))),
    ]


def pytest_benchmark_update_machine_info(config, machine_info):
    # Recorded in --benchmark-json so bench/report.py can describe the machine of that run.
    machine_info["fastdistill"] = harness.machine_info()


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        selected = shapes.select(metafunc.config.getoption("--bench-shapes"))
        metafunc.parametrize("shape", selected, ids=[s.name for s in selected])


def pytest_collection_modifyitems(config, items):
    # Group the suite by shape and dtype so the input cache (a few shapes at a time) hits, and run
    # the cheap sanity tests first. Stable sort: within a group the file's order is kept.
    order = {name: i for i, name in enumerate(shapes.REGISTRY)}

    def key(item):
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec else {}
        shape = params.get("shape")
        if shape is None and "kl_div_masked" in item.name:
            shape = shapes.BERT  # runs on the BERT shape: keep it with that group
        # fp32 before bf16: the bf16 inputs are the fp32 ones rounded (see InputCache).
        dtype = 0 if params.get("dtype", torch.float32) == torch.float32 else 1
        return (shape is not None, order.get(getattr(shape, "name", ""), -1), dtype)

    items.sort(key=key)


def pytest_terminal_summary(terminalreporter):
    if harness.SUMMARY_LINES:
        terminalreporter.section("fastdistill benchmark summary")
        for line in harness.SUMMARY_LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def input_cache():
    torch.manual_seed(0)
    return harness.InputCache()


@pytest.fixture(scope="session")
def copy_bw():
    """This machine's copy bandwidth (read + write bytes per second), measured once per run."""
    return harness.copy_bandwidth()


@pytest.fixture(scope="session")
def targets_json_path(request):
    return request.config.getoption("--targets-json")
