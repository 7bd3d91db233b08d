"""What ``fastdistill env`` reports: versions, the compiled core, and which backend each op uses.

Meant for bug reports and CI logs, so it must work on a broken install too: every probe is
guarded and a failure becomes text in the report instead of an exception.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

# Every op the backend dispatcher knows, in the order the report lists them.
OPS = (
    "kl_div",
    "mse",
    "cosine",
    "cross_entropy",
    "distillation",
    "reverse_kl",
    "jsd",
    "tvd",
    "distillation_divergence",
    "topk_kl",
    "all_finite",
)

# Environment variables that change what runs.
ENV_VARS = ("FASTDISTILL_BACKEND", "TRITON_INTERPRET")


def _error_text(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}"


def _dist_version(name: str) -> str | None:
    """Installed version of a distribution, or None; read from metadata, so nothing is imported
    (importing transformers alone takes seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fastdistill_version() -> str | None:
    version = _dist_version("fastdistill")
    if version is None:
        import fastdistill

        version = getattr(fastdistill, "__version__", None)
    return version


def _torch_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "version": None,
        "cuda_version": None,
        "cuda_available": False,
        "device_name": None,
        "num_threads": None,
    }
    try:
        import torch
    except Exception as exc:  # a missing or broken torch is exactly what a report must show
        info["version"] = _error_text(exc)
        return info
    info["version"] = torch.__version__
    info["cuda_version"] = torch.version.cuda
    info["num_threads"] = torch.get_num_threads()
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["device_name"] = torch.cuda.get_device_name(0)
    except Exception as exc:
        info["device_name"] = _error_text(exc)
    return info


def _core_info() -> dict[str, Any]:
    # Imported directly rather than through fastdistill._native: the core does not need torch,
    # so it can be reported even when torch itself is broken.
    info: dict[str, Any] = {
        "importable": False,
        "error": None,
        "path": None,
        "isa": None,
        "supported_isas": [],
        "avx512_bf16": None,
        "built_with_cuda": None,
    }
    try:
        core = importlib.import_module("fastdistill._C")
    except Exception as exc:
        info["error"] = _error_text(exc)
        return info
    info["importable"] = True
    info["path"] = getattr(core, "__file__", None)
    try:
        info["isa"] = core.isa()
        info["supported_isas"] = list(core.supported_isas())
        info["avx512_bf16"] = bool(core.avx512_bf16_in_use())
        info["built_with_cuda"] = bool(core.built_with_cuda())
    except Exception as exc:
        info["error"] = _error_text(exc)
    return info


def _backend_choices(devices: list[str]) -> dict[str, dict[str, str]]:
    """``{device: {op: backend}}``: what ``FASTDISTILL_BACKEND`` resolves to, or the error text."""
    try:
        import torch

        from fastdistill import backend
    except Exception as exc:
        return {device: dict.fromkeys(OPS, _error_text(exc)) for device in devices}
    choices: dict[str, dict[str, str]] = {}
    for device in devices:
        choices[device] = {}
        for op in OPS:
            try:
                choices[device][op] = backend.select_backend(op, torch.device(device))
            except Exception as exc:
                choices[device][op] = _error_text(exc)
    return choices


def collect_env() -> dict[str, Any]:
    """Everything ``fastdistill env`` prints, as a JSON-serialisable dict.

    Missing packages are ``None``; failures are strings starting with ``"error: "``.
    """
    torch_info = _torch_info()
    devices = ["cpu"] + (["cuda"] if torch_info["cuda_available"] else [])
    return {
        "fastdistill": _fastdistill_version(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch_info,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "core": _core_info(),
        "env": {name: os.environ.get(name) for name in ENV_VARS},
        "backends": _backend_choices(devices),
    }


def _show(value: Any, missing: str = "not installed") -> str:
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def format_env(d: dict[str, Any]) -> str:
    """Human-readable report of :func:`collect_env`'s dict, one ``name: value`` per line."""
    torch_info, core = d["torch"], d["core"]
    rows: list[tuple[str, str]] = [
        ("fastdistill", _show(d["fastdistill"], "unknown")),
        ("python", f"{d['python']} ({d['python_executable']})"),
        ("platform", _show(d["platform"])),
        ("torch", _show(torch_info["version"])),
        ("torch CUDA version", _show(torch_info["cuda_version"], "none (CPU build)")),
        ("CUDA available", _show(torch_info["cuda_available"])),
    ]
    if torch_info["cuda_available"] or torch_info["device_name"]:
        rows.append(("CUDA device", _show(torch_info["device_name"], "unknown")))
    rows += [
        ("torch threads", _show(torch_info["num_threads"], "unknown")),
        ("triton", _show(d["triton"])),
        ("transformers", _show(d["transformers"])),
        ("compiled core", "importable" if core["importable"] else "NOT importable"),
    ]
    if core["importable"]:
        rows += [
            ("  path", _show(core["path"], "unknown")),
            ("  CPU ISA in use", _show(core["isa"], "unknown")),
            ("  CPU ISAs supported", _show(core["supported_isas"])),
            (
                "  bf16 gradient rounding",
                "AVX512_BF16 instruction" if core["avx512_bf16"] else "integer (portable)",
            ),
            ("  CUDA kernels built", _show(core["built_with_cuda"], "unknown")),
        ]
    if core["error"]:
        rows.append(("  error", core["error"]))
    for name, value in d["env"].items():
        rows.append((name, _show(value, "(unset)")))

    width = max(len(name) for name, _ in rows)
    lines = [f"{name + ':':<{width + 1}} {value}" for name, value in rows]
    requested = d["env"]["FASTDISTILL_BACKEND"] or "auto"
    for device, ops in d["backends"].items():
        lines.append(f"backend per op on {device} (FASTDISTILL_BACKEND={requested}):")
        op_width = max(len(op) for op in ops)
        lines += [f"  {op + ':':<{op_width + 1}} {choice}" for op, choice in ops.items()]
    return "\n".join(lines)
