"""The compiled core: it imports, its CPU variants switch, and it stays torch-independent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


@pytest.fixture
def core():
    from fastdistill import _C

    return _C


@pytest.fixture
def restore_isa(core):
    original = core.isa()
    yield
    core.set_isa(original)


def test_core_imports(core):
    assert core.isa() in core.supported_isas()
    assert isinstance(core.built_with_cuda(), bool)


# Loads the extension file on its own, without the fastdistill package (whose __init__ may
# import torch), and reports what it sees.
_LOAD_CORE_ALONE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("fastdistill._C", sys.argv[1])
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)
print(json.dumps({"isa": core.isa(), "supported": core.supported_isas(),
                  "torch_loaded": "torch" in sys.modules}))
"""


def test_core_alone_without_torch_and_default_isa(core):
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_CORE_ALONE, core.__file__],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    fresh = json.loads(result.stdout)
    assert not fresh["torch_loaded"]
    isas = fresh["supported"]
    assert isas == core.supported_isas()
    assert isas[0] == "baseline"  # narrowest first
    assert len(set(isas)) == len(isas)
    # A fresh process starts on the widest variant this CPU runs.
    assert fresh["isa"] == isas[-1]


def test_set_each_isa(core, restore_isa):
    for name in core.supported_isas():
        core.set_isa(name)
        assert core.isa() == name


@pytest.mark.parametrize("name", ["bogus", "", "AVX2"])
def test_set_unknown_isa_raises(core, restore_isa, name):
    before = core.isa()
    with pytest.raises(ValueError):
        core.set_isa(name)
    assert core.isa() == before


def test_core_does_not_link_libtorch(core):
    # ARCHITECTURE.md ("Layers"): the core must not depend on libtorch, so wheels work with any torch.
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not available")
    result = subprocess.run([ldd, core.__file__], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    libs = result.stdout.splitlines()
    assert libs, "ldd printed nothing"
    offending = [line for line in libs if "libtorch" in line or "libc10" in line]
    assert not offending, offending
