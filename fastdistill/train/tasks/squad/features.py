"""SQuAD data: JSON files → examples → tokenised windows ("features"), cached safely → batches.

The files are read by :mod:`fastdistill.train.tasks.squad.files`.

Features. Each question is paired with its context as ``[CLS] question [SEP] context [SEP]`` (the
tokenizer's own special-token layout) by a fast tokenizer, which also gives each token's character
span (offsets) in the context. The question is cut to ``max_query_length`` tokens. A context too
long for one sequence of ``max_length`` tokens is cut into overlapping windows whose starts are
``doc_stride`` context tokens apart (the meaning of the DistilBERT SQuAD script and of the original BERT code; the
newer Hugging Face ``run_qa.py`` passes ``doc_stride`` as the overlap instead). Training targets
are the first gold answer's first and last token; when the answer is not wholly inside a window,
or the question is unanswerable, both point at the ``[CLS]`` token (the "no answer" position).
Every token also records whether this window gives it its *maximal context* (the window where it
has the most tokens on its shorter side, as in the original BERT code): an answer may start only
at such a token, so overlapping windows do not propose the same span twice.

Cache. The shared token cache (:mod:`fastdistill.train.cache`) under ``CACHE_DIR/squad-<key>/``,
where the key hashes every setting that changes the features (the tokenizer's full serialised
form, max_length, doc_stride, max_query_length, the version flag, each file's SHA-256, the cache
format). Beyond the cache's checksum, the arrays' layout is checked before use, and the entry must
have been made for the same questions.

Batches are padded to ``max_length`` (the DistilBERT SQuAD script's fixed width): the start/end softmax of a feature
then spans the same positions whatever batch it is in, so the loss does not depend on how the
global batch is split over processes and micro-batches.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastdistill.train import cache
from fastdistill.train.tasks.squad.files import SquadExample, read_examples

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the shared token cache (1 wrote features.safetensors itself)
# name → dtype of every array in the cache (token arrays are flat, rows cut by `seq_offsets`).
ARRAYS = {
    "input_ids": np.int32,
    "token_type_ids": np.int8,
    "offsets": np.int32,  # (tokens, 2): character span in the context; -1 for non-context tokens
    "max_context": np.uint8,  # 1 where this window is the token's maximal-context window
    "seq_offsets": np.int64,  # (features + 1,)
    "example_index": np.int32,  # (features,)
    "start_positions": np.int32,
    "end_positions": np.int32,
    "cls_index": np.int32,
}
_FEATURE_ARRAYS = ("example_index", "start_positions", "end_positions", "cls_index")
_TOKEN_ARRAYS = ("input_ids", "token_type_ids", "offsets", "max_context")


# ---- features ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSettings:
    max_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    v2: bool = False


@dataclass
class SquadFeatures:
    """Tokenised windows, stored flat: feature i is tokens ``seq_offsets[i]:seq_offsets[i+1]``."""

    arrays: dict[str, np.ndarray]
    examples: list[SquadExample]
    settings: FeatureSettings
    meta: dict

    def __len__(self) -> int:
        return len(self.arrays["example_index"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.arrays["seq_offsets"])

    @property
    def v2(self) -> bool:
        return self.settings.v2

    def tokens(self, name: str, i: int) -> np.ndarray:
        o = self.arrays["seq_offsets"]
        return self.arrays[name][o[i] : o[i + 1]]

    def features_of(self) -> list[np.ndarray]:
        """For each example, the indices of its features (in window order)."""
        idx = self.arrays["example_index"]
        order = np.argsort(idx, kind="stable")
        bounds = np.searchsorted(idx[order], np.arange(len(self.examples) + 1))
        return [order[bounds[e] : bounds[e + 1]] for e in range(len(self.examples))]


def check_settings(tokenizer, settings: FeatureSettings) -> int:
    """``ValueError`` unless the tokenizer and lengths can make features; returns the number of
    special tokens of a question–context pair."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"--task squad needs a fast tokenizer (character offsets); {type(tokenizer).__name__} "
            "is not one"
        )
    if tokenizer.cls_token_id is None:
        raise ValueError(
            "--task squad needs a tokenizer with a CLS token: it is the no-answer position"
        )
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    room = settings.max_length - settings.max_query_length - n_special
    if settings.doc_stride < 1 or settings.max_query_length < 1:
        raise ValueError("doc_stride and max_query_length must be >= 1")
    if room < settings.doc_stride:
        raise ValueError(
            f"max_length {settings.max_length} leaves {room} context tokens per window after a "
            f"question of max_query_length {settings.max_query_length} and {n_special} special "
            f"tokens; doc_stride ({settings.doc_stride}) must not exceed that, or windows would "
            "skip context tokens"
        )
    return n_special


def convert_examples(
    examples: Sequence[SquadExample], tokenizer, settings: FeatureSettings
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Examples → feature arrays (see :data:`ARRAYS`) and counts for the log."""
    n_special = check_settings(tokenizer, settings)
    L, stride = settings.max_length, settings.doc_stride
    # Leading blanks would only take room (some SQuAD questions have many).
    questions = _cut_questions(
        [ex.question.lstrip() for ex in examples], tokenizer, settings.max_query_length
    )
    stats = {"examples": len(examples), "features": 0, "windows_without_answer": 0, "mismatch": 0}
    per_example: list[list[dict]] = [[] for _ in examples]
    # Windows whose starts are `doc_stride` tokens apart: the tokenizer's `stride` is the overlap,
    # which depends on the question's length, so questions of one length are encoded together.
    by_length: dict[int, list[int]] = {}
    for i, (_, q_len) in enumerate(questions):
        by_length.setdefault(q_len, []).append(i)
    for q_len, members in sorted(by_length.items()):
        room = L - q_len - n_special
        for first in range(0, len(members), 1024):
            chunk = members[first : first + 1024]
            enc = tokenizer(
                [questions[i][0] for i in chunk],
                [examples[i].context for i in chunk],
                truncation="only_second",
                max_length=L,
                stride=room - stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                return_token_type_ids=True,
            )
            windows: dict[int, list[dict[str, np.ndarray]]] = {}
            for f, sample in enumerate(enc["overflow_to_sample_mapping"]):
                seq = np.array([-1 if s is None else s for s in enc.sequence_ids(f)])
                windows.setdefault(chunk[sample], []).append(
                    {
                        "input_ids": np.asarray(enc["input_ids"][f], dtype=np.int64),
                        "token_type_ids": np.asarray(enc["token_type_ids"][f], dtype=np.int8),
                        "context": np.flatnonzero(seq == 1),
                        "offsets": np.asarray(enc["offset_mapping"][f], dtype=np.int64).reshape(
                            -1, 2
                        ),
                    }
                )
            for i, ws in windows.items():
                per_example[i] = _example_features(
                    examples[i], ws, stride, tokenizer.cls_token_id, stats
                )
    out: dict[str, list] = {name: [] for name in ARRAYS if name != "seq_offsets"}
    for e, features in enumerate(per_example):
        for feat in features:
            for name in _TOKEN_ARRAYS:
                out[name].append(feat[name])
            for name in _FEATURE_ARRAYS:
                out[name].append(e if name == "example_index" else feat[name])
    lengths = [len(ids) for ids in out["input_ids"]]
    seq_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    arrays = {"seq_offsets": seq_offsets}
    for name in _TOKEN_ARRAYS:
        parts = out[name]
        arrays[name] = (
            np.concatenate(parts).astype(ARRAYS[name], copy=False)
            if parts
            else np.zeros((0, 2) if name == "offsets" else 0, ARRAYS[name])
        )
    for name in _FEATURE_ARRAYS:
        arrays[name] = np.asarray(out[name], dtype=ARRAYS[name])
    stats["features"] = len(lengths)
    return arrays, stats


def _example_features(ex: SquadExample, windows, stride: int, cls_id: int, stats) -> list[dict]:
    """The features of one question from its tokenised windows (compact dtypes)."""
    span = None  # the first gold answer's characters [start, end): the training target
    if not ex.is_impossible:
        text, s_char = ex.answers[0]
        span = (s_char, s_char + len(text))
        if ex.context[span[0] : span[1]] != text:
            stats["mismatch"] += 1
    ctx_pos = [w["context"] for w in windows]
    _check_windows(windows, ctx_pos, stride, ex.qid)
    best = _max_context_windows([len(p) for p in ctx_pos], stride)
    features = []
    for k, (w, pos) in enumerate(zip(windows, ctx_pos, strict=True)):
        ids = w["input_ids"]
        cls = np.flatnonzero(ids == cls_id)
        if len(cls) == 0:
            raise ValueError(f"the tokenizer put no CLS token into question {ex.qid!r}")
        cls_index = int(cls[0])
        offsets = np.full((len(ids), 2), -1, dtype=np.int32)
        offsets[pos] = w["offsets"][pos]
        max_context = np.zeros(len(ids), dtype=np.uint8)
        max_context[pos] = best[k * stride : k * stride + len(pos)] == k
        start = end = cls_index
        if span is not None and len(pos):
            a, b = offsets[pos, 0], offsets[pos, 1]
            if a[0] <= span[0] and b[-1] >= span[1]:
                # first token: the last one starting at or before the answer; last token: the
                # first one ending at or after it
                start = int(pos[np.searchsorted(a, span[0], side="right") - 1])
                end = int(pos[min(np.searchsorted(b, span[1], side="left"), len(pos) - 1)])
            else:
                stats["windows_without_answer"] += 1
        features.append(
            {
                "input_ids": ids.astype(np.int32),
                "token_type_ids": w["token_type_ids"],
                "offsets": offsets,
                "max_context": max_context,
                "start_positions": start,
                "end_positions": end,
                "cls_index": cls_index,
            }
        )
    return features


def _cut_questions(questions: list[str], tokenizer, max_q: int) -> list[tuple[str, int]]:
    """(question text cut to at most ``max_q`` tokens, its token count). The text is cut at the end
    of its ``max_q``-th token, so the question in the pair tokenises to the same tokens."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    result = []
    for q, ids, offs in zip(questions, enc["input_ids"], enc["offset_mapping"], strict=True):
        while len(ids) > max_q:
            cut = offs[max_q - 1][1]
            q = q[: min(cut, len(q) - 1)]
            one = tokenizer(q, add_special_tokens=False, return_offsets_mapping=True)
            ids, offs = one["input_ids"], one["offset_mapping"]
        result.append((q, len(ids)))
    return result


def _check_windows(windows, ctx_pos, stride: int, qid: str) -> None:
    """Window k + 1 must start ``stride`` context tokens after window k (what the overlap passed
    to the tokenizer gives); a tokenizer that tokenised the question differently inside the pair
    would break that, and with it the max-context map and the window positions."""
    for k in range(len(windows) - 1):
        prev, nxt = ctx_pos[k], ctx_pos[k + 1]  # positions of the context tokens
        if len(nxt) and len(prev) > stride:  # overlapping: same token at prev[stride] and nxt[0]
            ok = np.array_equal(
                windows[k]["offsets"][prev[stride]], windows[k + 1]["offsets"][nxt[0]]
            )
        elif len(nxt) and len(prev) == stride:  # adjacent: nxt starts after prev's last token
            ok = windows[k + 1]["offsets"][nxt[0], 0] >= windows[k]["offsets"][prev[-1], 1]
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"question {qid!r}: context window {k + 1} does not start {stride} tokens after "
                f"window {k}; this tokenizer's pair encoding is not supported"
            )


def _max_context_windows(window_lengths: list[int], stride: int) -> np.ndarray:
    """For each context token (by its position in the whole context), the window that gives it the
    most context: score min(tokens left, tokens right) + 0.01 × window length, first best wins."""
    if not window_lengths:
        return np.zeros(0, dtype=np.int64)
    total = stride * (len(window_lengths) - 1) + window_lengths[-1]
    best = np.zeros(total, dtype=np.int64)
    best_score = np.full(total, -np.inf)
    for k, n in enumerate(window_lengths):
        j = np.arange(n)
        score = np.minimum(j, n - 1 - j) + 0.01 * n
        sl = slice(k * stride, k * stride + n)
        better = score > best_score[sl]
        best[sl][better] = k
        best_score[sl][better] = score[better]
    return best


# ---- the cache -------------------------------------------------------------------------------------


def cache_key(files: Sequence[str], tokenizer, settings: FeatureSettings) -> tuple[str, dict]:
    recipe = {
        "format": CACHE_FORMAT,
        "task": "squad",
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "max_length": settings.max_length,
        "doc_stride": settings.doc_stride,
        "max_query_length": settings.max_query_length,
        "v2": settings.v2,
        "files": [cache.file_sha256(f) for f in files],
    }
    return cache.recipe_key(recipe), recipe


def _ids_digest(examples: Sequence[SquadExample]) -> str:
    return hashlib.sha256("\n".join(ex.qid for ex in examples).encode()).hexdigest()


def load_features(
    files: Sequence[str | os.PathLike],
    tokenizer,
    settings: FeatureSettings,
    *,
    cache_dir: str | os.PathLike | None = None,
    build: bool = True,
    examples: list[SquadExample] | None = None,
) -> SquadFeatures:
    """The features of ``files``, from the cache or built (and cached) when missing, stale or
    damaged. ``build=False`` (non-zero ranks, after rank 0 built it) raises ``ValueError`` instead
    of building. ``examples`` (already read from ``files``) saves reading them again."""
    files = [os.fspath(f) for f in files]
    cache.check_files(files)
    if examples is None:
        examples = read_examples(files)
    key, recipe = cache_key(files, tokenizer, settings)

    def build_arrays():
        arrays, stats = convert_examples(examples, tokenizer, settings)
        if stats["mismatch"]:
            log.warning(
                "%d answer(s) differ from their context at answer_start; the span at "
                "answer_start is used",
                stats["mismatch"],
            )
        log.info(
            "SQuAD: %d questions → %d features (%d windows without their answer → CLS)",
            stats["examples"],
            stats["features"],
            stats["windows_without_answer"],
        )
        meta = {
            "stats": stats,
            "num_examples": len(examples),
            "question_ids_sha256": _ids_digest(examples),
            "files": [os.path.abspath(f) for f in files],
        }
        return arrays, meta

    def check(entry: cache.CacheEntry) -> None:
        meta = entry.meta
        if meta.get("num_examples") != len(examples) or meta.get(
            "question_ids_sha256"
        ) != _ids_digest(examples):
            raise ValueError("the cached features were made for other questions")
        _check_arrays(entry.arrays, len(examples))

    path = cache.entry_path(cache_dir, "squad-", key)
    entry = cache.load_or_build(
        path, key, recipe, build_arrays, check=check, build=build, what="SQuAD feature cache"
    )
    return SquadFeatures(arrays=entry.arrays, examples=examples, settings=settings, meta=entry.meta)


def _check_arrays(arrays: dict[str, np.ndarray], n_examples: int) -> None:
    """The layout every consumer relies on (a checksum proves integrity, not a sane writer)."""
    if set(arrays) != set(ARRAYS):
        raise ValueError(f"arrays {sorted(arrays)} differ from {sorted(ARRAYS)}")
    for name, dtype in ARRAYS.items():
        if arrays[name].dtype != dtype:
            raise ValueError(f"{name} has dtype {arrays[name].dtype}, expected {np.dtype(dtype)}")
    so = arrays["seq_offsets"]
    n = len(arrays["example_index"])
    n_tokens = len(arrays["input_ids"])
    if (
        so.ndim != 1
        or len(so) != n + 1
        or so[0] != 0
        or so[-1] != n_tokens
        or np.any(so[1:] <= so[:-1])
    ):
        raise ValueError("inconsistent seq_offsets")
    for name in _TOKEN_ARRAYS:
        if len(arrays[name]) != n_tokens:
            raise ValueError(f"{name} has {len(arrays[name])} rows for {n_tokens} tokens")
    if arrays["offsets"].shape != (n_tokens, 2):
        raise ValueError("offsets must be (tokens, 2)")
    lengths = np.diff(so)
    for name in _FEATURE_ARRAYS:
        if arrays[name].shape != (n,):
            raise ValueError(f"{name} must hold one value per feature")
    ei = arrays["example_index"]
    if n and (ei.min() < 0 or ei.max() >= n_examples or np.any(np.diff(ei) < 0)):
        raise ValueError("example_index out of range or out of order")
    for name in ("start_positions", "end_positions", "cls_index"):
        v = arrays[name]
        if n and (v.min() < 0 or np.any(v >= lengths)):
            raise ValueError(f"{name} outside its feature")


# ---- batches -------------------------------------------------------------------------------------


@dataclass
class SquadBatch:
    input_ids: torch.Tensor  # (B, max_length) int64
    attention_mask: torch.Tensor  # (B, max_length) int64
    token_type_ids: torch.Tensor  # (B, max_length) int64
    start_positions: torch.Tensor  # (B,) int64
    end_positions: torch.Tensor  # (B,) int64
    answer_mask: torch.Tensor  # (B, max_length) bool: context tokens and CLS (possible answers)
    num_tokens: int  # attended tokens (host int)

    def to(self, device) -> SquadBatch:
        def mv(t):
            return t.to(device, non_blocking=True)

        return SquadBatch(
            mv(self.input_ids),
            mv(self.attention_mask),
            mv(self.token_type_ids),
            mv(self.start_positions),
            mv(self.end_positions),
            mv(self.answer_mask),
            self.num_tokens,
        )

    def model_inputs(self, model) -> dict[str, torch.Tensor]:
        """Forward arguments for ``model``: with segment ids where it takes them (BERT does;
        DistilBERT has no such argument; RoBERTa-style models have a single segment type)."""
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if uses_token_types(model):
            kwargs["token_type_ids"] = self.token_type_ids
        return kwargs


def uses_token_types(model) -> bool:
    model = getattr(model, "module", model)  # DistributedDataParallel
    if getattr(model.config, "type_vocab_size", 0) < 2:
        return False
    return "token_type_ids" in inspect.signature(model.forward).parameters


def collate_features(data: SquadFeatures, indices: Sequence[int], *, pad_id: int) -> SquadBatch:
    """The given features, right-padded to ``max_length`` (module doc)."""
    width = data.settings.max_length
    n = len(indices)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    token_types = np.zeros((n, width), dtype=np.int64)
    answer_mask = np.zeros((n, width), dtype=bool)
    a = data.arrays
    for row, i in enumerate(indices):
        ids = data.tokens("input_ids", i)
        k = len(ids)
        input_ids[row, :k] = ids
        attention[row, :k] = 1
        token_types[row, :k] = data.tokens("token_type_ids", i)
        answer_mask[row, :k] = data.tokens("offsets", i)[:, 0] >= 0
        answer_mask[row, a["cls_index"][i]] = True
    idx = np.asarray(indices, dtype=np.int64)
    return SquadBatch(
        torch.from_numpy(input_ids),
        torch.from_numpy(attention),
        torch.from_numpy(token_types),
        torch.from_numpy(a["start_positions"][idx].astype(np.int64)),
        torch.from_numpy(a["end_positions"][idx].astype(np.int64)),
        torch.from_numpy(answer_mask),
        int(attention.sum()),
    )
