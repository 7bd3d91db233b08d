"""Text files → token sequences (cached once, as numpy arrays), length-grouped batches, MLM masking.

The pipeline follows the seed's (binarize → token counts → LmSeqsDataset → GroupedBatchSampler →
masking), with these changes:

* Cache: ``CACHE_DIR/<key>/{ids,offsets,counts}.npy`` + ``meta.json``, where the key hashes every
  input that changes the result (tokenizer fingerprint, task's special-token layout, max/min length,
  unknown-token rule, each file's SHA-256). Arrays load with ``allow_pickle=False``; ``meta.json``
  records each array's SHA-256, so a truncated or corrupted cache is detected and rebuilt. The
  cache is written to a temporary directory and renamed into place (readers never see half of one).
* Masking is per sequence and deterministic in (seed, epoch, sequence index): a sequence is masked
  the same way whichever process, micro-batch or resumed run sees it. Each sequence gets
  ``round(mlm_mask_prob × #maskable tokens)`` predictions (the seed draws ceil(p × tokens) per batch), so the
  number of predicted tokens of any batch is known on the host without looking at the masks — the
  trainer uses it to normalise losses over a whole optimizer step without a device sync.
* Batches: the same plan on every process (seeded by seed and epoch). Sequences are shuffled, sorted
  by length inside windows of ``group_window`` global micro-batches (so padding is small, as in the
  seed's length groups), cut into global micro-batches of ``batch_size × world_size`` and shuffled
  again; process r takes slice r of each global micro-batch. ``gradient_accumulation_steps``
  consecutive micro-batches form one optimizer step; an epoch holds only whole steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
IGNORE_INDEX = -100
_ARRAYS = ("ids", "offsets", "counts")


def default_cache_dir() -> Path:
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


def special_ids(tokenizer, task: str) -> tuple[int, int]:
    """(first, last) token ids wrapped around every sequence: [CLS] … [SEP] for encoders
    (BERT/RoBERTa/DistilBERT), BOS … EOS for causal LMs (GPT-2: both <|endoftext|>)."""
    if task == "clm":
        first, last = tokenizer.bos_token_id, tokenizer.eos_token_id
        names = "bos_token/eos_token"
    else:
        first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
        names = "cls_token/sep_token"
    if first is None or last is None:
        raise ValueError(
            f"the tokenizer has no {names}, needed to delimit sequences for --task {task}"
        )
    return int(first), int(last)


# ---- the token cache ---------------------------------------------------------------------------


@dataclass
class TokenData:
    """Variable-length sequences stored flat: sequence i is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray  # int32, all sequences concatenated (special tokens included)
    offsets: np.ndarray  # int64, len = n + 1
    counts: np.ndarray  # int64, occurrences of each token id (MLM smoothing)
    meta: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def cache_key(
    files: Sequence[str],
    tokenizer,
    task: str,
    max_length: int,
    min_length: int,
    max_unknown_fraction: float,
) -> tuple[str, dict]:
    first, last = special_ids(tokenizer, task)
    recipe = {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "special": [first, last],
        "unk": tokenizer.unk_token_id,
        "max_length": max_length,
        "min_length": min_length,
        "max_unknown_fraction": max_unknown_fraction,
        "files": [file_sha256(f) for f in files],
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
    return key, recipe


def tokenize_files(
    files: Sequence[str],
    tokenizer,
    task: str,
    max_length: int,
    min_length: int,
    max_unknown_fraction: float,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One sequence per non-blank line: ``first + ids + last``; lines longer than ``max_length``
    are split into pieces, each wrapped again (the seed's remove_long_sequences); then pieces
    shorter than ``min_length`` tokens and pieces whose share of unknown tokens is at least
    ``max_unknown_fraction`` are dropped (remove_empty_sequences / remove_unknown_sequences)."""
    first, last = special_ids(tokenizer, task)
    unk = tokenizer.unk_token_id
    body = max_length - 2
    seqs: list[np.ndarray] = []
    stats = {"lines": 0, "split": 0, "too_short": 0, "unknown": 0}
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        lines = [line for line in lines if line]
        stats["lines"] += len(lines)
        for start in range(0, len(lines), 4096):
            encoded = tokenizer(lines[start : start + 4096], add_special_tokens=False)["input_ids"]
            for ids in encoded:
                ids = np.asarray(ids, dtype=np.int32)
                pieces = [ids[i : i + body] for i in range(0, max(len(ids), 1), body)]
                stats["split"] += len(pieces) - 1
                for piece in pieces:
                    if len(piece) + 2 < min_length:
                        stats["too_short"] += 1
                        continue
                    if (
                        unk is not None
                        and len(piece)
                        and (
                            np.count_nonzero(piece == unk) / (len(piece) + 2)
                            >= max_unknown_fraction
                        )
                    ):
                        stats["unknown"] += 1
                        continue
                    seqs.append(np.concatenate([[first], piece, [last]]).astype(np.int32))
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int32)
    stats["sequences"] = len(seqs)
    return ids, offsets, stats


def _array_sha(path: Path) -> str:
    return file_sha256(path)


def _load_cache(path: Path, key: str) -> TokenData:
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
        raise ValueError("cache key or format mismatch")
    arrays = {}
    for name in _ARRAYS:
        file = path / f"{name}.npy"
        if _array_sha(file) != meta["sha256"][name]:
            raise ValueError(f"{file.name}: checksum mismatch")
        arrays[name] = np.load(file, allow_pickle=False)
    ids, offsets = arrays["ids"], arrays["offsets"]
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError("inconsistent offsets")
    return TokenData(ids=ids, offsets=offsets, counts=arrays["counts"], meta=meta)


def load_or_build(
    files: Sequence[str],
    tokenizer,
    *,
    task: str,
    max_length: int,
    min_length: int = 12,
    max_unknown_fraction: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
    build: bool = True,
) -> TokenData:
    """The cached token data for ``files``; (re)built when missing, stale or corrupt.

    ``build=False`` (non-zero ranks, after rank 0 built it) raises instead of building."""
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"data file not found: {f}")
    key, recipe = cache_key(files, tokenizer, task, max_length, min_length, max_unknown_fraction)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / key
    if path.exists():
        try:
            return _load_cache(path, key)
        except Exception as exc:  # any damage: corrupt JSON, truncated array, bad checksum
            if not build:
                raise ValueError(f"token cache {path} is unreadable ({exc})") from exc
            log.warning("token cache %s is unreadable (%s); rebuilding it", path, exc)
    elif not build:
        raise ValueError(f"token cache {path} is missing")
    ids, offsets, stats = tokenize_files(
        files, tokenizer, task, max_length, min_length, max_unknown_fraction
    )
    if stats["sequences"] == 0:
        raise ValueError(
            f"no sequence left in {', '.join(files)} after tokenising: {stats['lines']} lines, "
            f"{stats['too_short']} pieces shorter than {min_length} tokens, {stats['unknown']} mostly "
            f"unknown tokens. Check the files and the tokenizer"
        )
    counts = np.bincount(ids, minlength=len(tokenizer)).astype(np.int64)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        sha = {}
        for name, arr in (("ids", ids), ("offsets", offsets), ("counts", counts)):
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
            sha[name] = _array_sha(tmp / f"{name}.npy")
        meta = {
            "key": key,
            "format": CACHE_FORMAT,
            "recipe": recipe,
            "stats": stats,
            "sha256": sha,
            "files": [os.path.abspath(f) for f in files],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "tokenised %d lines into %d sequences (%d tokens): %s",
        stats["lines"],
        stats["sequences"],
        len(ids),
        path,
    )
    return _load_cache(path, key)


# ---- MLM masking -----------------------------------------------------------------------------


class MLMMasker:
    """The seed's masking, per sequence: choose ``round(p × #maskable)`` (≥ 1) positions without
    replacement with probability ∝ count(token)^-smoothing (rare tokens more often; special and
    padding tokens never), then 80% → mask token, 10% → random non-special token, 10% kept."""

    def __init__(
        self,
        counts: np.ndarray,
        special_token_ids: Sequence[int],
        mask_token_id: int,
        *,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
        smoothing: float = 0.7,
    ):
        counts = np.asarray(counts, dtype=np.float64)
        probs = np.maximum(counts, 1.0) ** -smoothing
        special = np.zeros(len(counts), dtype=bool)
        special[[i for i in special_token_ids if 0 <= i < len(counts)]] = True
        probs[special] = 0.0
        self.token_probs = probs
        self.random_ids = np.flatnonzero(~special)
        self.mask_token_id = int(mask_token_id)
        self.mask_prob = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob

    def num_predictions(self, data: TokenData) -> np.ndarray:
        """Predicted tokens per sequence, without drawing any mask (host-side loss normalisers)."""
        maskable = (self.token_probs[data.ids] > 0).astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(maskable)])
        n = csum[data.offsets[1:]] - csum[data.offsets[:-1]]
        return np.minimum(self._count(n), n)

    def _count(self, n):
        """Predictions for ``n`` maskable tokens: round(p·n), at least 1 — unbiased on average (the
        seed's ceil over a whole batch rounds once per batch; per sequence, ceil would add ~1%)."""
        return np.where(
            n > 0, np.maximum(np.floor(self.mask_prob * np.asarray(n) + 0.5), 1), 0
        ).astype(np.int64)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) for one sequence; labels are IGNORE_INDEX where not predicted."""
        ids = np.asarray(ids, dtype=np.int64)
        inputs, labels = ids.copy(), np.full_like(ids, IGNORE_INDEX)
        w = self.token_probs[ids]
        cand = np.flatnonzero(w > 0)
        k = min(int(self._count(len(cand))), len(cand))
        if k == 0:
            return inputs, labels
        if k == len(cand):
            pos = cand
        else:
            p = w[cand]
            pos = rng.choice(cand, size=k, replace=False, p=p / p.sum())
        labels[pos] = ids[pos]
        u = rng.random(k)
        inputs[pos[u < self.mask_token_prob]] = self.mask_token_id
        rand = pos[
            (u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)
        ]
        inputs[rand] = self.random_ids[rng.integers(len(self.random_ids), size=len(rand))]
        return inputs, labels


def sequence_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator for one sequence's mask: stream 0 = evaluation, epoch + 1 = training."""
    return np.random.default_rng([seed, stream, int(index)])


# ---- batches ---------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64
    labels: torch.Tensor | None  # (B, L) int64 MLM targets / next tokens, IGNORE_INDEX elsewhere
    pred_mask: torch.Tensor | None  # (B, L) bool, tokens selected for MLM prediction
    num_tokens: int  # attended tokens (host int)

    def to(self, device) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            mv(self.input_ids),
            mv(self.attention_mask),
            mv(self.labels),
            mv(self.pred_mask),
            self.num_tokens,
        )

    def model_inputs(self, model) -> dict[str, torch.Tensor]:
        """Forward arguments (the same for every model)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def collate(
    data: TokenData,
    indices: Sequence[int],
    *,
    task: str,
    pad_id: int,
    masker: MLMMasker | None,
    seed: int,
    stream: int,
) -> Batch:
    """Right-padded batch of the given sequences; MLM masks drawn per sequence (see module doc);
    CLM labels are the next token (IGNORE_INDEX on the last position and on padding)."""
    seqs = [data.sequence(i) for i in indices]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    labels = None
    if task in ("mlm", "clm"):
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for row, (i, s) in enumerate(zip(indices, seqs, strict=True)):
        L = len(s)
        attention[row, :L] = 1
        if task == "mlm" and masker is not None:
            inp, lab = masker(s, sequence_rng(seed, stream, i))
            input_ids[row, :L] = inp
            labels[row, :L] = lab
        else:
            input_ids[row, :L] = s
            if task == "clm":
                labels[row, : L - 1] = s[1:]
    t_labels = None if labels is None else torch.from_numpy(labels)
    pred_mask = t_labels != IGNORE_INDEX if task == "mlm" and t_labels is not None else None
    return Batch(
        torch.from_numpy(input_ids),
        torch.from_numpy(attention),
        t_labels,
        pred_mask,
        int(attention.sum()),
    )


class BatchPlan:
    """Which sequences each process sees in each micro-batch of each optimizer step (module doc).

    ``steps(epoch)`` → list of optimizer steps; each is a list of ``accum`` global micro-batches,
    each an int64 array of ``batch_size × world_size`` sequence indices; ``local(mb, rank)`` is the
    slice of a global micro-batch that process ``rank`` computes. ``set_epoch`` mirrors
    DistributedSampler's: every process must use the same epoch."""

    group_window = 50  # global micro-batches sorted together (the seed's length groups)

    def __init__(
        self, lengths: np.ndarray, *, batch_size: int, world_size: int, accum: int, seed: int
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.accum = accum
        self.seed = seed
        self.global_batch = batch_size * world_size
        self.epoch = 0
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"not enough data for one optimizer step: {len(self.lengths)} sequences, but one step "
                f"needs batch_size × world_size × gradient_accumulation_steps = "
                f"{self.global_batch * accum}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return (len(self.lengths) // self.global_batch) // self.accum

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self, epoch: int | None = None) -> list[list[np.ndarray]]:
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, 1_000_003, epoch])
        perm = rng.permutation(len(self.lengths))
        m = self.global_batch
        window = m * self.group_window
        micro: list[np.ndarray] = []
        for start in range(0, len(perm), window):
            chunk = perm[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            micro.extend(chunk[i : i + m] for i in range(0, len(chunk) - m + 1, m))
        order = rng.permutation(len(micro))
        micro = [micro[i] for i in order]
        n_steps = len(micro) // self.accum
        return [micro[s * self.accum : (s + 1) * self.accum] for s in range(n_steps)]

    def local(self, micro: np.ndarray, rank: int) -> np.ndarray:
        return micro[rank * self.batch_size : (rank + 1) * self.batch_size]
