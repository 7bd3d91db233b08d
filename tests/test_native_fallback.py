"""Without the compiled core the ``auto`` backend falls back to the plain-PyTorch reference; that
must never be silent: one warning at import naming the reason and the fix (not Python's
"circular import" guess), and the benchmarks refuse to time the fallback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import fastdistill

ROOT = Path(__file__).resolve().parent.parent

# Run in a child whose sys.path starts with a source tree without the core, as when a user runs
# Python from a clone's root; editable-install finders would otherwise take the import first.
CHILD = r"""
import sys, warnings
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(type(f)).lower()
                 and "scikit" not in repr(type(f)).lower()]
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("always")
import fastdistill, fastdistill._native as n
assert fastdistill.__file__.startswith(sys.argv[1]), fastdistill.__file__
print("available", n.available())
"""


def _source_tree_without_core(tmp_path: Path) -> Path:
    tree = tmp_path / "clone"
    pkg = Path(fastdistill.__file__).parent
    shutil.copytree(pkg, tree / "fastdistill", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_a_source_tree_without_the_core_warns_with_the_fix(tmp_path):
    tree = _source_tree_without_core(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree)], capture_output=True, text=True, check=True
    )
    assert "available False" in proc.stdout
    warning = [ln for ln in proc.stderr.splitlines() if "RuntimeWarning: fastdistill:" in ln]
    assert len(warning) == 1, proc.stderr
    assert "source tree with no compiled core" in warning[0] and "make install" in warning[0]
    assert "circular" not in proc.stderr


def test_benchmarks_refuse_to_time_the_fallback(tmp_path):
    tree = _source_tree_without_core(tmp_path)
    shutil.copytree(ROOT / "bench", tree / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    code = CHILD.replace(
        'print("available", n.available())',
        'import pytest; sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", '
        '"bench/test_targets.py", "--collect-only"]))',
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tree)], capture_output=True, text=True, cwd=tree
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to time the plain-PyTorch fallback" in proc.stdout + proc.stderr
