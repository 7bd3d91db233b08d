"""The offline teacher: its top-k log-probabilities per token, written once, read by every later run.

Layout of a cache directory::

    plan.json                  the settings the shards are written for (written first)
    shard-00000.safetensors    ids (tokens, k) uint16/int32, logprobs (tokens, k) float16,
                               tail (tokens,) float32: the log of the probability mass outside
                               the stored ids
    shard-00000.json           that shard's sequences, tokens and SHA-256 (written after it)
    manifest.json              the plan plus every shard's record (written last)

Tokens are the flat token order of the training data's token cache (sequence i is tokens
``offsets[i]:offsets[i+1]``); shard j holds sequences ``[j·S, (j+1)·S)``. The sequences are the
task's (:class:`TeacherCacheTask`): a text line's tokens for ``clm``, an example's (text piece,
conversation or prompt + completion, all its tokens) for ``llm``, whose training rows may pack
several of them; the loss selects the positions it trains on (``llm``: the targets) by its labels. Log-probabilities are
the teacher's ``log_softmax(logits / capture_temperature)`` in float32, then stored in float16
(|error| ≤ 2⁻¹¹·|value|); the tail is ``logsumexp`` of the log-probabilities left out, computed from
the float32 values (never ``1 − Σ p`` in low precision). Writing is resumable and atomic per
shard: a shard with an intact record is kept; under torchrun rank r writes shards j ≡ r (mod
world), rank 0 the manifest. Reading verifies the cache against the run (tokenizer, data, k) and
each shard's checksum when it is first loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdistill.train import checks, fsutil

log = logging.getLogger(__name__)

FORMAT = 1
PLAN = "plan.json"
MANIFEST = "manifest.json"
SHARD_SEQUENCES = 2048  # sequences per shard: a few MB at tiny sizes, ~100 MB at LLM sizes


@dataclass(frozen=True)
class CachePlan:
    """What a cache holds; two caches with equal plans are interchangeable."""

    k: int
    capture_temperature: float
    data_key: str  # the training data's token-cache key (files, tokenizer, lengths)
    tokenizer: str  # tokenizer fingerprint
    teacher: str  # teacher fingerprint (config and weight files)
    vocab_size: int
    num_sequences: int
    num_tokens: int
    shard_sequences: int = SHARD_SEQUENCES
    ids_dtype: str = "uint16"
    logprobs_dtype: str = "float16"
    format: int = FORMAT

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_sequences / self.shard_sequences))

    def bytes_per_token(self) -> float:
        ids = np.dtype(self.ids_dtype).itemsize
        return self.k * (ids + np.dtype(self.logprobs_dtype).itemsize) + 4  # + float32 tail


def teacher_fingerprint(path: str) -> str:
    """SHA-256 of a teacher directory's config and weight files (names, sizes, contents)."""
    p = Path(path)
    files = sorted(
        f for f in p.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")
    )
    records = [[f.name, f.stat().st_size, fsutil.sha256(f)] for f in files]
    return fsutil.sha256_text(json.dumps(records))


def shard_name(j: int) -> str:
    return f"shard-{j:05d}"


def describe_difference(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """``"key: cache X, run Y"`` for each identifying key that differs (a key whose wanted value
    is ``None`` is not compared)."""
    keys = ("format", "k", "capture_temperature", "data_key", "tokenizer", "vocab_size")
    return [
        f"{k}: cache {have.get(k)!r}, run {want.get(k)!r}"
        for k in keys
        if want.get(k) is not None and have.get(k) != want[k]
    ]


# ---- writing ---------------------------------------------------------------------------------


def prepare_dir(out: Path, plan: CachePlan) -> None:
    """Create ``out`` with ``plan.json``; refuse a directory holding another cache or other files."""
    want = asdict(plan)
    if (out / PLAN).is_file():
        have = json.loads(fsutil.read_text(out / PLAN, "teacher cache plan"))
        diffs = describe_difference(have, want)
        if diffs or have.get("teacher") != plan.teacher:
            diffs += [] if have.get("teacher") == plan.teacher else ["teacher: a different model"]
            raise ValueError(
                f"{out} holds a teacher cache for other settings ({'; '.join(diffs)}): write to "
                "another directory or delete this one"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    fsutil.write_text_atomic(out / PLAN, json.dumps(want, indent=1))


def shard_done(out: Path, j: int) -> bool:
    """Whether shard ``j`` was completed (its record is there and its checksum matches)."""
    rec = out / f"{shard_name(j)}.json"
    data = out / f"{shard_name(j)}.safetensors"
    if not (rec.is_file() and data.is_file()):
        return False
    try:
        return json.loads(rec.read_text(encoding="utf-8"))["sha256"] == fsutil.sha256(data)
    except (ValueError, KeyError):
        return False


def top_k(logits: torch.Tensor, k: int, capture_temperature: float):
    """(ids, log-probs, tail log-mass) of the top ``k`` of each row of ``logits`` (float32)."""
    logp = torch.log_softmax(logits.float() / capture_temperature, dim=-1)
    values, ids = torch.topk(logp, k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)  # -inf when k = V: no mass outside
    return ids, values, tail


def write_shard(out: Path, j: int, arrays: dict[str, np.ndarray], record: dict) -> None:
    """Atomically write one shard and then its record."""
    from safetensors.numpy import save_file

    name = shard_name(j)
    tmp = out / f".tmp-{os.getpid()}-{name}.safetensors"
    save_file(arrays, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / f"{name}.safetensors")
    record = dict(record, sha256=fsutil.sha256(out / f"{name}.safetensors"))
    fsutil.write_text_atomic(out / f"{name}.json", json.dumps(record, indent=1))


def write_manifest(out: Path, plan: CachePlan) -> dict[str, Any]:
    """Gather the shards' records into ``manifest.json`` (after every shard is done)."""
    shards = []
    for j in range(plan.num_shards):
        if not shard_done(out, j):
            raise ValueError(f"{out / shard_name(j)}.safetensors is missing or incomplete")
        shards.append(json.loads((out / f"{shard_name(j)}.json").read_text(encoding="utf-8")))
    manifest = dict(asdict(plan), shards=shards, bytes_per_token=plan.bytes_per_token())
    fsutil.write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


class Progress:
    """Tokens/s on a redrawn bar at a terminal, else one log line per shard."""

    def __init__(self, total_tokens: int, enabled: bool):
        self.start, self.done = time.perf_counter(), 0
        self.bar = None
        if enabled and os.isatty(2):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, dynamic_ncols=True)

    def update(self, tokens: int, shard: int) -> None:
        self.done += tokens
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(tokens)
        else:
            log.info(
                "teacher cache: shard %d written, %d tokens, %.0f tokens/s", shard, tokens, rate
            )

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return self.done / max(time.perf_counter() - self.start, 1e-9)


# ---- reading -------------------------------------------------------------------------------------


class TeacherCache:
    """A verified cache: the teacher's top-k of each token of each training sequence."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self.k = int(manifest["k"])
        self.shard_sequences = int(manifest["shard_sequences"])
        self._loaded: dict[int, tuple[dict[str, np.ndarray], int]] = {}
        self._first_token = {}  # shard → the flat index of its first token

    @classmethod
    def open(cls, root: str | os.PathLike, want: dict[str, Any]) -> TeacherCache:
        """Open ``root`` for a run whose ``want`` = {data_key, tokenizer, vocab_size, k (or None),
        num_sequences, num_tokens}; ``ValueError`` saying what differs when it does not fit."""
        root = Path(root)
        if not (root / MANIFEST).is_file():
            detail = (
                " (its writing did not finish: run the write again)"
                if (root / PLAN).is_file()
                else ""
            )
            raise ValueError(f"--teacher-cache {root}: no {MANIFEST}{detail}")
        manifest = json.loads(fsutil.read_text(root / MANIFEST, "teacher cache manifest"))
        want = dict(want, format=FORMAT)
        diffs = describe_difference(manifest, want)
        for key in ("num_sequences", "num_tokens"):
            if manifest.get(key) != want[key]:
                diffs.append(f"{key}: cache {manifest.get(key)}, run {want[key]}")
        if diffs:
            raise ValueError(
                f"--teacher-cache {root} does not match this run: {'; '.join(diffs)}. Write a "
                "cache for these data, tokenizer and max_length (--write-teacher-cache)"
            )
        return cls(root, manifest)

    def _shard(self, j: int, offsets: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        if j not in self._loaded:
            from safetensors.numpy import load_file

            record = self.manifest["shards"][j]
            path = self.root / f"{shard_name(j)}.safetensors"
            if not path.is_file() or fsutil.sha256(path) != record["sha256"]:
                raise ValueError(
                    f"teacher cache shard {path} is missing or does not match its checksum: "
                    "write the cache again (completed shards are kept)"
                )
            first_seq = j * self.shard_sequences
            self._loaded[j] = (load_file(str(path)), int(offsets[first_seq]))
        return self._loaded[j]

    def rows(self, seq: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, logprobs, tail) of sequence ``seq``: ``(L, k)``, ``(L, k)``, ``(L,)``."""
        arrays, base = self._shard(seq // self.shard_sequences, offsets)
        a, b = int(offsets[seq]) - base, int(offsets[seq + 1]) - base
        return arrays["ids"][a:b], arrays["logprobs"][a:b], arrays["tail"][a:b]

    def batch(self, rows, offsets: np.ndarray, width: int):
        """Padded ``(B, width, k)`` ids (int64) and log-probs (float32), ``(B, width)`` tail, for
        ``rows``: per batch row, the sequences it holds one after another from position 0 (a list
        of one for an unpacked row)."""
        n = len(rows)
        # Padding positions (masked out of the loss) still hold valid targets: distinct ids and a
        # uniform distribution, so the loss's checks of ids and mass pass on every row.
        ids = np.broadcast_to(np.arange(self.k, dtype=np.int64), (n, width, self.k)).copy()
        logp = np.full((n, width, self.k), -math.log(self.k), dtype=np.float32)
        tail = np.full((n, width), -math.inf, dtype=np.float32)
        for row, members in enumerate(rows):
            at = 0
            for i in members:
                r_ids, r_logp, r_tail = self.rows(int(i), offsets)
                end = at + len(r_ids)
                ids[row, at:end], logp[row, at:end], tail[row, at:end] = r_ids, r_logp, r_tail
                at = end
        return torch.from_numpy(ids), torch.from_numpy(logp), torch.from_numpy(tail)


# ---- training from a cache: what a task needs ---------------------------------------------------


class TeacherCacheTask:
    """Mixin of the tasks whose teacher can be cached (``clm``, ``llm``: the same tokens every
    epoch, vocabulary logits): writing (``cache_sequences``, ``cache_batch``) and training
    (``use_teacher_cache``, ``attach_teacher_targets``, ``sparse_teacher_loss``) from a cache.

    The cache is keyed by the task's *sequences*, which by default are its examples; a task whose
    training rows are not its sequences (``llm`` with packing) overrides ``cache_sequences``,
    ``cache_batch`` and ``cache_rows``."""

    supports_teacher_cache = True
    cached_teacher: TeacherCache | None = None
    cache_offsets: np.ndarray | None = None

    def cache_sequences(self, data):
        """The sequences of ``data`` the cache holds: ``offsets``, ``meta["key"]``, ``len``."""
        return data

    def cache_batch(self, sequences, indices):
        """Sequences ``indices``, one per row, right-padded: a batch whose ``attention_mask`` is
        ``(B, W)`` with each row's tokens first, for the teacher's forward."""
        return self.collate(sequences, indices, stream=0)

    def cache_rows(self, data, indices) -> list:
        """Per row of the batch ``indices`` of ``data``, the sequences it holds, in order."""
        return [[int(i)] for i in indices]

    @property
    def capture_temperature(self) -> float:
        return float(self.cached_teacher.manifest["capture_temperature"])

    def use_teacher_cache(self, path: str, tokenizer, train_data) -> None:
        """Open the cache at ``path`` for ``train_data``: a cache for other data, tokenizer,
        settings or k is refused naming what differs."""
        from fastdistill.train import cache

        sequences = self.cache_sequences(train_data)
        want = {
            "k": self.cfg.teacher_top_k,
            "data_key": sequences.meta["key"],
            "tokenizer": cache.tokenizer_fingerprint(tokenizer),
            "vocab_size": None,  # ids beyond the student's vocabulary are refused by the loss
            "num_sequences": len(sequences),
            "num_tokens": int(sequences.offsets[-1]),
        }
        self.cached_teacher = TeacherCache.open(path, want)
        self.cache_offsets = sequences.offsets
        captured = self.capture_temperature
        if self.cfg.topk_normalization == "tail" and captured != self.cfg.temperature:
            raise ValueError(
                f"topk_normalization tail needs temperature = the capture temperature of the "
                f"cache ({captured}), got {self.cfg.temperature}"
            )

    def attach_teacher_targets(self, batch, data, indices, *, stream: int):
        """``batch`` with the cached targets of its rows (training batches only, ``stream`` > 0)."""
        if self.cached_teacher is not None and stream > 0:
            width = batch.input_ids.shape[1]
            rows = self.cache_rows(data, indices)
            batch.teacher_topk = self.cached_teacher.batch(rows, self.cache_offsets, width)
        return batch

    def sparse_teacher_loss(self, logits, batch, w, *, mask, alpha_ce: float, t2_scale: bool):
        """Forward KL to the cached targets over ``mask`` (× T² with ``t2_scale``) + the hard
        loss on ``batch.labels``, on materialised logits (``topk_distillation_loss``)."""
        from fastdistill import losses as FL

        cfg, world = self.cfg, w["world"]
        ids, logprobs, tail = batch.teacher_topk
        total, kd, ce = FL.topk_distillation_loss(
            logits, ids, logprobs, teacher_tail=tail, labels=batch.labels, mask=mask,
            normalization=cfg.topk_normalization, temperature=cfg.temperature,
            capture_temperature=self.capture_temperature, t2_scale=t2_scale,
            alpha_kd=cfg.alpha_kl * w["kl"] * world, alpha_ce=alpha_ce * w["ce"] * world,
        )  # fmt: skip
        return total, logged_terms(kd, ce, w)


def logged_terms(kd: torch.Tensor, ce: torch.Tensor, w) -> torch.Tensor:
    """The four logged terms (kl, ce, mse, cos) of a loss with a divergence and a hard term."""
    zero = kd.new_zeros(())
    return torch.stack([kd * w["kl"], ce * w["ce"], zero, zero]).float()


# ---- the command: fastdistill-train --write-teacher-cache DIR -------------------------------------


def write(cfg, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run ``cfg``'s teacher once over its training data and write the top-``teacher_top_k``
    cache to ``out_dir`` (module doc); returns the manifest's summary."""
    import transformers

    from fastdistill.train import loading
    from fastdistill.train.runtime import Processes, process_group, select_device

    cfg = cfg.resolved()
    if cfg.teacher is None:
        raise ValueError("--write-teacher-cache needs the --teacher to run")
    transformers.utils.logging.disable_progress_bar()
    procs = Processes.from_env()
    with process_group(procs, cfg.device):
        device = select_device(cfg.device, procs.local_rank)
        checks.require_teacher_cache_support(cfg.task, cfg.task_class())
        task = cfg.task_class()(cfg, device)
        tokenizer = loading.tokenizer_for(cfg, task)
        teacher = loading.teacher_for(cfg, task)
        data = loading.data_everywhere(task, tokenizer, {"train": cfg.train_files}, procs)["train"]
        sequences = task.cache_sequences(data)
        plan = _plan(cfg, tokenizer, teacher, sequences)
        out = Path(out_dir)
        if procs.is_main:
            prepare_dir(out, plan)
        procs.barrier()
        rate = _write_shards(out, plan, task, teacher, sequences, procs, cfg)
        procs.barrier()
        manifest = write_manifest(out, plan) if procs.is_main else {}
    summary = {
        "cache": str(out),
        "sequences": plan.num_sequences,
        "tokens": plan.num_tokens,
        "k": plan.k,
        "bytes_per_token": plan.bytes_per_token(),
        "tokens_per_s": rate,
    }
    if procs.is_main:
        log.info("teacher cache %s: %s", out, summary)
    return summary | ({"shards": len(manifest["shards"])} if manifest else {})


def _plan(cfg, tokenizer, teacher, data) -> CachePlan:
    from fastdistill.train import cache

    vocab = int(teacher.config.vocab_size)
    k = cfg.teacher_top_k or 64
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_top_k must be in [1, {vocab}] (the vocabulary), got {k}")
    return CachePlan(
        k=k,
        capture_temperature=cfg.capture_temperature,
        data_key=data.meta["key"],
        tokenizer=cache.tokenizer_fingerprint(tokenizer),
        teacher=teacher_fingerprint(cfg.teacher),
        vocab_size=vocab,
        num_sequences=len(data),
        num_tokens=int(data.offsets[-1]),
        shard_sequences=SHARD_SEQUENCES,
        ids_dtype="uint16" if vocab <= 65536 else "int32",
    )


@torch.inference_mode()
def _write_shards(out: Path, plan: CachePlan, task, teacher, data, procs, cfg) -> float:
    mine = [j for j in range(plan.num_shards) if j % procs.world == procs.rank]
    todo = [j for j in mine if not shard_done(out, j)]
    if len(todo) < len(mine):
        log.info(
            "teacher cache: %d of %d shard(s) already written, kept",
            len(mine) - len(todo),
            len(mine),
        )
    total = sum(_shard_tokens(plan, data, j) for j in todo)
    progress = Progress(total, cfg.progress_bar and procs.is_main)
    for j in todo:
        arrays = _shard_arrays(plan, task, teacher, data, j, cfg.batch_size)
        first, last = j * plan.shard_sequences, min((j + 1) * plan.shard_sequences, len(data))
        record = {"shard": j, "sequences": [first, last], "tokens": len(arrays["tail"])}
        write_shard(out, j, arrays, record)
        progress.update(len(arrays["tail"]), j)
    return progress.close()


def _shard_tokens(plan: CachePlan, data, j: int) -> int:
    first, last = j * plan.shard_sequences, min((j + 1) * plan.shard_sequences, len(data))
    return int(data.offsets[last] - data.offsets[first])


def _shard_arrays(plan: CachePlan, task, teacher, data, j: int, batch_size: int):
    first, last = j * plan.shard_sequences, min((j + 1) * plan.shard_sequences, len(data))
    ids, logp, tail = [], [], []
    for start in range(first, last, batch_size):
        idx = list(range(start, min(last, start + batch_size)))
        batch = task.cache_batch(data, idx).to(task.device)
        logits = teacher(**batch.model_inputs(teacher)).logits
        # Right-padded: row r's first len(seq r) positions. One row at a time, so the float32
        # log-probabilities are one sequence's (length, V), not the batch's.
        for row, length in enumerate(batch.attention_mask.sum(1).tolist()):
            r_ids, r_logp, r_tail = top_k(logits[row, :length], plan.k, plan.capture_temperature)
            ids.append(r_ids.cpu())
            logp.append(r_logp.cpu())
            tail.append(r_tail.cpu())
    return {
        "ids": torch.cat(ids).numpy().astype(plan.ids_dtype),
        "logprobs": torch.cat(logp).numpy().astype(plan.logprobs_dtype),
        "tail": torch.cat(tail).numpy().astype(np.float32),
    }
