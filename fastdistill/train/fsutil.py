"""Small file-system pieces shared by the checkpoints, the token cache and the run directory:
atomic text writes, fsync, checksums, and temporary directories that name their writer's pid so
that a later start can remove what a killed process left behind."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_TMP = re.compile(r"^\.tmp-(\d+)-")


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_tmp_dir(parent: Path, tag: str = "") -> Path:
    """A new ``parent/.tmp-<pid>-<tag>*`` directory (see :func:`remove_stale_tmp`)."""
    return Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{tag}", dir=parent))


def remove_stale_tmp(parent: Path) -> list[Path]:
    """Remove the ``.tmp-<pid>-*`` entries of ``parent`` whose writing process is gone (on this
    machine); entries of live processes, and this process's own, are left alone."""
    removed = []
    for p in parent.glob(".tmp-*") if parent.is_dir() else []:
        m = _TMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file; ``ValueError`` naming the file when it is missing or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path}"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path} ({exc.strerror or exc})") from None
