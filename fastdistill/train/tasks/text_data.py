"""Text files → token sequences (cached once), MLM masking, batches: the data of the text tasks.

* Sequences: one per non-blank line, wrapped in the task's first/last special tokens; long lines are
  split, short and mostly-unknown pieces dropped (the DistilBERT scripts' binarize rules).
* Cache: the shared token cache (:mod:`fastdistill.train.cache`), keyed by the tokenizer, the
  task's special-token layout, the length and unknown-token rules and each file's SHA-256.
* Masking is per sequence and deterministic in (seed, epoch, sequence index): a sequence is masked
  the same way whichever process, micro-batch or resumed run sees it. Each sequence gets
  ``round(mlm_mask_prob × #maskable tokens)`` predictions (the DistilBERT scripts draw
  ceil(p × tokens) per batch), so the number of predicted tokens of any batch is known on the host
  without looking at the masks: the trainer normalises losses over a whole optimizer step without
  a device sync.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastdistill.train import cache, fsutil

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the shared safetensors token cache (1 was per-array .npy files)
IGNORE_INDEX = -100


def boundary_ids(tokenizer, boundary: tuple[str, str], task: str) -> tuple[int, int]:
    """(first, last) token ids wrapped around every sequence, named by the task's ``boundary``
    attributes: ("cls_token", "sep_token") for encoders (BERT/RoBERTa/DistilBERT: [CLS] … [SEP]),
    ("bos_token", "eos_token") for causal LMs (GPT-2: both <|endoftext|>)."""
    first = getattr(tokenizer, f"{boundary[0]}_id", None)
    last = getattr(tokenizer, f"{boundary[1]}_id", None)
    if first is None or last is None:
        raise ValueError(
            f"the tokenizer has no {boundary[0]}/{boundary[1]}, needed to delimit sequences for "
            f"--task {task}"
        )
    return int(first), int(last)


@dataclass(frozen=True)
class TextSettings:
    """Everything besides the files and the tokenizer that changes the token sequences."""

    boundary: tuple[int, int]  # (first, last) special token ids
    max_length: int
    min_length: int = 12
    max_unknown_fraction: float = 0.5


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


def cache_key(files: Sequence[str], tokenizer, settings: TextSettings) -> tuple[str, dict]:
    recipe = {
        "format": CACHE_FORMAT,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "special": list(settings.boundary),
        "unk": tokenizer.unk_token_id,
        "max_length": settings.max_length,
        "min_length": settings.min_length,
        "max_unknown_fraction": settings.max_unknown_fraction,
        "files": [cache.file_sha256(f) for f in files],
    }
    return cache.recipe_key(recipe), recipe


def tokenize_files(
    files: Sequence[str], tokenizer, settings: TextSettings
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One sequence per non-blank line: ``first + ids + last``; lines longer than ``max_length``
    are split into pieces, each wrapped again; then pieces shorter than ``min_length`` tokens and
    pieces whose share of unknown tokens is at least ``max_unknown_fraction`` are dropped."""
    stats = {"lines": 0, "split": 0, "too_short": 0, "unknown": 0}
    seqs: list[np.ndarray] = []
    for path in files:
        lines = [line.strip() for line in fsutil.read_text(path, "data file").splitlines()]
        lines = [line for line in lines if line]
        stats["lines"] += len(lines)
        for start in range(0, len(lines), 4096):
            encoded = tokenizer(lines[start : start + 4096], add_special_tokens=False)["input_ids"]
            for ids in encoded:
                seqs.extend(_pieces(np.asarray(ids, dtype=np.int32), tokenizer, settings, stats))
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int32)
    stats["sequences"] = len(seqs)
    return ids, offsets, stats


def _pieces(ids: np.ndarray, tokenizer, settings: TextSettings, stats: dict) -> list[np.ndarray]:
    """The kept pieces of one line, each wrapped in the boundary tokens."""
    first, last = settings.boundary
    unk = tokenizer.unk_token_id
    body = settings.max_length - 2
    pieces = [ids[i : i + body] for i in range(0, max(len(ids), 1), body)]
    stats["split"] += len(pieces) - 1
    kept = []
    for piece in pieces:
        if len(piece) + 2 < settings.min_length:
            stats["too_short"] += 1
            continue
        unknown = np.count_nonzero(piece == unk) if unk is not None else 0
        if len(piece) and unknown / (len(piece) + 2) >= settings.max_unknown_fraction:
            stats["unknown"] += 1
            continue
        kept.append(np.concatenate([[first], piece, [last]]).astype(np.int32))
    return kept


def _check_layout(entry: cache.CacheEntry) -> None:
    ids, offsets = entry.arrays.get("ids"), entry.arrays.get("offsets")
    if ids is None or offsets is None or "counts" not in entry.arrays:
        raise ValueError("arrays ids, offsets and counts are required")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError("inconsistent offsets")


def load_or_build(
    files: Sequence[str],
    tokenizer,
    settings: TextSettings,
    *,
    cache_dir: str | os.PathLike | None = None,
    build: bool = True,
) -> TokenData:
    """The cached token data for ``files``; (re)built when missing, stale or corrupt.

    ``build=False`` (non-zero ranks, after rank 0 built it) raises instead of building."""
    cache.check_files(files)
    key, recipe = cache_key(files, tokenizer, settings)

    def build_arrays():
        ids, offsets, stats = tokenize_files(files, tokenizer, settings)
        if stats["sequences"] == 0:
            raise ValueError(
                f"no sequence left in {', '.join(files)} after tokenising: {stats['lines']} "
                f"lines, {stats['too_short']} pieces shorter than {settings.min_length} tokens, "
                f"{stats['unknown']} mostly unknown tokens. Check the files and the tokenizer"
            )
        counts = np.bincount(ids, minlength=len(tokenizer)).astype(np.int64)
        log.info(
            "tokenised %d lines into %d sequences (%d tokens)",
            stats["lines"],
            stats["sequences"],
            len(ids),
        )
        meta = {"stats": stats, "files": [os.path.abspath(f) for f in files]}
        return {"ids": ids, "offsets": offsets, "counts": counts}, meta

    path = cache.entry_path(cache_dir, "", key)
    entry = cache.load_or_build(path, key, recipe, build_arrays, check=_check_layout, build=build)
    a = entry.arrays
    return TokenData(ids=a["ids"], offsets=a["offsets"], counts=a["counts"], meta=entry.meta)


# ---- MLM masking -----------------------------------------------------------------------------


class MLMMasker:
    """The DistilBERT scripts' masking, per sequence: choose ``round(p × #maskable)`` (≥ 1) positions without
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
        DistilBERT scripts' ceil over a whole batch rounds once per batch; per sequence, ceil would add ~1%)."""
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
    # From a teacher cache: (ids (B, L, k) int64, log-probs (B, L, k) float32, tail (B, L)).
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def to(self, device) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        topk = None if self.teacher_topk is None else tuple(mv(t) for t in self.teacher_topk)
        return Batch(
            mv(self.input_ids),
            mv(self.attention_mask),
            mv(self.labels),
            mv(self.pred_mask),
            self.num_tokens,
            topk,
        )

    def model_inputs(self, model) -> dict[str, torch.Tensor]:
        """Forward arguments (the same for every model)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def collate(
    data: TokenData,
    indices: Sequence[int],
    *,
    targets: str | None,
    pad_id: int,
    masker: MLMMasker | None,
    seed: int,
    stream: int,
) -> Batch:
    """Right-padded batch of the given sequences. ``targets``: "masked" (MLM masks drawn per
    sequence by ``masker``, see module doc), "next_token" (labels are the next token, IGNORE_INDEX
    on the last position and on padding) or None (no labels)."""
    seqs = [data.sequence(i) for i in indices]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    labels = None
    if targets is not None:
        labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for row, (i, s) in enumerate(zip(indices, seqs, strict=True)):
        L = len(s)
        attention[row, :L] = 1
        if targets == "masked":
            inp, lab = masker(s, sequence_rng(seed, stream, i))
            input_ids[row, :L] = inp
            labels[row, :L] = lab
        else:
            input_ids[row, :L] = s
            if targets == "next_token":
                labels[row, : L - 1] = s[1:]
    t_labels = None if labels is None else torch.from_numpy(labels)
    pred_mask = t_labels != IGNORE_INDEX if targets == "masked" else None
    return Batch(
        torch.from_numpy(input_ids),
        torch.from_numpy(attention),
        t_labels,
        pred_mask,
        int(attention.sum()),
    )
