"""The repository's own rules about its code (ARCHITECTURE.md, "Code habits"): functions that fit
on a screen, modules a reader can hold, task names looked at only by the task registry, and no
reference a reader of the repository cannot follow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastdistill"
# Kernel sources are exempt from the size rules: a kernel is one long loop by design.
KERNEL_SOURCES = {PACKAGE / "triton" / "fused_logits.py"}
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 500


def _python_files(root: Path):
    return sorted(p for p in root.rglob("*.py") if p not in KERNEL_SOURCES)


def test_functions_fit_on_a_screen():
    long = []
    for path in _python_files(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over the limit: " + ", ".join(long)


def test_modules_stay_readable():
    big = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in _python_files(PACKAGE)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, "modules over the limit: " + ", ".join(big)


def test_only_the_registry_looks_at_task_names():
    pattern = re.compile(r"\.task\s*(==|!=|in\b|not in\b)|task_name\s*==")
    registry = PACKAGE / "train" / "tasks" / "__init__.py"
    config = PACKAGE / "train" / "config.py"  # splits keys by the named task's options
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _python_files(PACKAGE)
        if p not in (registry, config)
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "task names tested outside the registry: " + ", ".join(hits)


@pytest.mark.parametrize("folder", ["fastdistill", "tests", "bench", "tools", "csrc"])
def test_no_reference_outside_the_repository(folder):
    """Issue numbers and files outside the repository mean nothing to its readers."""
    pattern = re.compile(r"\.\./shared|DESIGN\.md|\bissues?[ -]#?\d+", re.IGNORECASE)
    here = Path(__file__).resolve()
    hits = []
    for path in sorted((ROOT / folder).rglob("*")):
        if path == here or not path.is_file() or path.suffix not in _TEXT_SUFFIXES:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not hits, "references a reader cannot follow: " + ", ".join(hits)


_TEXT_SUFFIXES = {".py", ".md", ".sh", ".cpp", ".h", ".cu", ".cuh", ".txt", ".toml", ".cfg"}
