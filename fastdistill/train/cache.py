"""The one cache every task uses for tokenised data: content-keyed, checksummed, atomic, no pickle.

An entry is ``CACHE_DIR/<prefix><key>/`` holding ``arrays.safetensors`` (plain numpy arrays) and
``meta.json``. The key is a hash of a *recipe*: every input that changes the arrays (the
tokenizer's full serialised form, each data file's SHA-256, the task's settings, the format
version). ``meta.json`` records the recipe, the key and the SHA-256 of the arrays file, so a
truncated or corrupted entry is detected before anything is read from it; the caller then rebuilds
it (or, on a process told not to build, refuses with a message). An entry is written into a
temporary directory beside it and renamed into place, so a reader never sees half of one; the
temporary directories of killed writers are removed by the next writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastdistill.train import fsutil

log = logging.getLogger(__name__)

ARRAYS_FILE = "arrays.safetensors"
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """``$FASTDISTILL_CACHE``, else ``$XDG_CACHE_HOME/fastdistill``, else ``~/.cache/fastdistill``."""
    env = os.environ.get("FASTDISTILL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdistill"


# ---- fingerprints ------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of everything about a tokenizer that changes its ids: the full serialised fast
    tokenizer (vocab, merges, normaliser, pre-tokeniser, post-processor; not the truncation and
    padding left from the last call) or, for a slow one, its vocab and special tokens, plus the
    class name."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are per-call settings that transformers leaves on the backend
        # after a call (and that save_pretrained then stores): they do not change the ids.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    return h.hexdigest()


def recipe_key(recipe: dict[str, Any]) -> str:
    """The cache key of a recipe (a JSON-able mapping of everything that changes the arrays)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]


def check_files(files: Sequence[str | os.PathLike]) -> None:
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"data file not found: {f}")


# ---- entries -----------------------------------------------------------------------------------


@dataclass
class CacheEntry:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]  # key, recipe, sha256, plus whatever the builder added (stats, ...)
    path: Path


def entry_path(cache_dir: str | os.PathLike | None, prefix: str, key: str) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{prefix}{key}"


def read_entry(path: Path, key: str) -> CacheEntry:
    """The entry at ``path``; ``ValueError`` (with the reason) if it is not intact or not ``key``."""
    from safetensors.numpy import load_file

    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if meta.get("key") != key:
        raise ValueError("cache key mismatch")
    if file_sha256(path / ARRAYS_FILE) != meta.get("sha256"):
        raise ValueError(f"{ARRAYS_FILE}: checksum mismatch (truncated or corrupted)")
    return CacheEntry(arrays=load_file(str(path / ARRAYS_FILE)), meta=meta, path=path)


def write_entry(path: Path, key: str, recipe: dict, arrays: dict[str, np.ndarray], **meta) -> None:
    """Write an entry atomically (temporary directory, then one rename), replacing any old one.
    Temporary directories left by killed writers are removed first."""
    from safetensors.numpy import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.remove_stale_tmp(path.parent)
        tmp = fsutil.make_tmp_dir(path.parent, f"{path.name}-")
    except OSError as exc:
        raise ValueError(
            f"cannot write the token cache in {path.parent} ({exc.strerror or exc}): set "
            "--cache-dir (or $FASTDISTILL_CACHE) to a writable directory"
        ) from None
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ARRAYS_FILE))
        record = {"key": key, "recipe": recipe, "sha256": file_sha256(tmp / ARRAYS_FILE), **meta}
        (tmp / META_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_or_build(
    path: Path,
    key: str,
    recipe: dict,
    build_arrays: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
    *,
    check: Callable[[CacheEntry], None] | None = None,
    build: bool = True,
    what: str = "token cache",
) -> CacheEntry:
    """The entry at ``path``, (re)built with ``build_arrays() -> (arrays, extra meta)`` when it is
    missing or damaged. ``check(entry)`` may raise ``ValueError`` to reject an intact entry whose
    contents do not fit (it is then rebuilt too). ``build=False`` (the non-zero ranks, after rank
    0 built the entry) raises ``ValueError`` instead of building."""
    if path.exists():
        try:
            entry = read_entry(path, key)
            if check is not None:
                check(entry)
            return entry
        except Exception as exc:  # any damage: bad JSON, truncated arrays, bad checksum or layout
            if not build:
                raise ValueError(f"{what} {path} is unusable ({exc})") from exc
            log.warning("%s %s is unusable (%s); rebuilding it", what, path, exc)
    elif not build:
        raise ValueError(f"{what} {path} is missing")
    arrays, meta = build_arrays()
    write_entry(path, key, recipe, arrays, **meta)
    entry = read_entry(path, key)
    if check is not None:
        check(entry)
    return entry
