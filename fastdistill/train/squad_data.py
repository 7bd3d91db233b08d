"""SQuAD data: JSON files → examples → tokenised windows ("features"), cached safely → batches.

Files. Three layouts are read, whatever the version: the official nested one
(``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``), the flat one
(one record per question: ``{"id", "question", "context", "answers"}``, under ``"data"`` or as a
top-level list) and JSON lines of flat records. Answers are a list of ``{"text", "answer_start"}``
or the ``{"text": [...], "answer_start": [...]}`` columns of Hugging Face datasets. A question is
unanswerable (SQuAD v2.0) when ``is_impossible`` is true or it has no answer.

Features. Each question is paired with its context as ``[CLS] question [SEP] context [SEP]`` (the
tokenizer's own special-token layout) by a fast tokenizer, which also gives each token's character
span (offsets) in the context. The question is cut to ``max_query_length`` tokens. A context too
long for one sequence of ``max_length`` tokens is cut into overlapping windows whose starts are
``doc_stride`` context tokens apart (the meaning of the seed and of the original BERT code; the
newer Hugging Face ``run_qa.py`` passes ``doc_stride`` as the overlap instead). Training targets
are the first gold answer's first and last token; when the answer is not wholly inside a window,
or the question is unanswerable, both point at the ``[CLS]`` token (the "no answer" position).
Every token also records whether this window gives it its *maximal context* (the window where it
has the most tokens on its shorter side, as in the original BERT code): an answer may start only
at such a token, so overlapping windows do not propose the same span twice.

Cache. ``CACHE_DIR/squad-<key>/features.safetensors`` (plain arrays, no pickle) and ``meta.json``,
where the key hashes every setting that changes the features (the tokenizer's full serialised
form, max_length, doc_stride, max_query_length, the version flag, each file's SHA-256, the cache
format). ``meta.json`` holds the SHA-256 of the arrays file, so a truncated or corrupted cache is
detected before anything is read from it; then it is rebuilt (or, for a process told not to
build, refused with a message). The cache is written to a temporary directory and renamed into
place, so a reader never sees half of one.

Batches are padded to ``max_length`` (the seed's fixed width): the start/end softmax of a feature
then spans the same positions whatever batch it is in, so the loss does not depend on how the
global batch is split over processes and micro-batches.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdistill.train.data import default_cache_dir, file_sha256, tokenizer_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
FEATURES_FILE = "features.safetensors"
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


# ---- examples ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SquadExample:
    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # gold (text, answer_start); empty when unanswerable
    is_impossible: bool
    title: str = ""


@dataclass
class SquadFile:
    path: str
    version: str | None  # the file's "version" field, if any
    examples: list[SquadExample]


def read_squad(path: str | os.PathLike) -> SquadFile:
    """All questions of a SQuAD file, in file order (see the module doc for the layouts).

    ``ValueError`` naming the file and the record for anything malformed, and for repeated ids."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"SQuAD file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        data = _json_lines(text, path, exc)
    version = None
    if isinstance(data, dict):
        if "data" not in data:
            raise ValueError(
                f"{path}: a SQuAD file holds a 'data' list (top-level keys: {list(data)})"
            )
        version = data.get("version")
        version = None if version is None else str(version)
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: 'data' must be a list, got {type(data).__name__}")
    examples: list[SquadExample] = []
    for i, item in enumerate(data):
        where = f"{path}: data[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object, got {type(item).__name__}")
        if "paragraphs" in item:  # nested: article → paragraphs → qas
            title = str(item.get("title", ""))
            for j, para in enumerate(_list(item, "paragraphs", where)):
                pwhere = f"{where}.paragraphs[{j}]"
                context = _str(para, "context", pwhere)
                for k, qa in enumerate(_list(para, "qas", pwhere)):
                    examples.append(_example(qa, context, title, f"{pwhere}.qas[{k}]"))
        else:
            examples.append(
                _example(item, _str(item, "context", where), str(item.get("title", "")), where)
            )
    if not examples:
        raise ValueError(f"{path}: no questions found")
    seen: set[str] = set()
    for ex in examples:
        if ex.qid in seen:
            raise ValueError(f"{path}: question id {ex.qid!r} appears more than once")
        seen.add(ex.qid)
    return SquadFile(path=path, version=version, examples=examples)


def _json_lines(text: str, path: str, first_error: Exception) -> list:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(
                f"{path}: not JSON ({first_error}) and not JSON lines (line {n} does not parse)"
            ) from None
    return records


def _list(obj: dict, key: str, where: str) -> list:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise ValueError(f"{where}: expected a list under {key!r}")
    return obj[key]


def _str(obj: dict, key: str, where: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
        raise ValueError(f"{where}: expected a string under {key!r}")
    return obj[key]


def _example(qa: Any, context: str, title: str, where: str) -> SquadExample:
    if not isinstance(qa, dict):
        raise ValueError(f"{where} must be an object, got {type(qa).__name__}")
    if "id" not in qa or not isinstance(qa["id"], (str, int)):
        raise ValueError(f"{where}: expected a question id under 'id'")
    qid = str(qa["id"])
    question = _str(qa, "question", where)
    raw = qa.get("answers", [])
    if isinstance(raw, dict):  # columns, as in Hugging Face datasets
        texts, starts = raw.get("text", []), raw.get("answer_start", [])
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise ValueError(
                f"{where}: 'answers' columns 'text' and 'answer_start' must be lists of one length"
            )
        pairs = list(zip(texts, starts, strict=True))
    elif isinstance(raw, list):
        pairs = []
        for a in raw:
            if not isinstance(a, dict):
                raise ValueError(
                    f"{where}: each answer must be an object with 'text' and 'answer_start'"
                )
            pairs.append((a.get("text"), a.get("answer_start")))
    else:
        raise ValueError(f"{where}: 'answers' must be a list or an object of columns")
    answers = []
    for text, start in pairs:
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            raise ValueError(
                f"{where} (question {qid!r}): an answer needs a string 'text' and an integer "
                f"'answer_start', got {text!r} at {start!r}"
            )
        if not 0 <= start <= len(context) - len(text):
            raise ValueError(
                f"{where} (question {qid!r}): answer {text!r} at {start} lies outside its context "
                f"({len(context)} characters)"
            )
        answers.append((text, start))
    impossible = bool(qa.get("is_impossible", False)) or not answers
    return SquadExample(qid, question, context, tuple(answers), impossible, title)


def read_examples(files: Sequence[str | os.PathLike]) -> list[SquadExample]:
    examples: list[SquadExample] = []
    seen: dict[str, str] = {}
    for f in files:
        for ex in read_squad(f).examples:
            if ex.qid in seen:
                raise ValueError(f"question id {ex.qid!r} is in both {seen[ex.qid]} and {f}")
            seen[ex.qid] = os.fspath(f)
            examples.append(ex)
    return examples


def resolve_version(version: str, example_sets: Sequence[Sequence[SquadExample]]) -> bool:
    """True for SQuAD v2.0 (unanswerable questions allowed). ``auto``: v2 when any question of
    any given file is unanswerable. ``v1`` with unanswerable questions is a ``ValueError``."""
    n_impossible = sum(ex.is_impossible for examples in example_sets for ex in examples)
    if version == "auto":
        return n_impossible > 0
    if version == "v1" and n_impossible:
        raise ValueError(
            f"squad_version is v1 but the train/eval files hold {n_impossible} question(s) without "
            "an answer (SQuAD v2.0 data): use squad_version v2 or auto"
        )
    if version not in ("v1", "v2"):
        raise ValueError(f"squad_version must be auto, v1 or v2, got {version!r}")
    return version == "v2"


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
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "max_length": settings.max_length,
        "doc_stride": settings.doc_stride,
        "max_query_length": settings.max_query_length,
        "v2": settings.v2,
        "files": [file_sha256(f) for f in files],
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
    return key, recipe


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
    if examples is None:
        examples = read_examples(files)
    key, recipe = cache_key(files, tokenizer, settings)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"squad-{key}"
    if path.exists():
        try:
            return _load(path, key, examples, settings)
        except Exception as exc:  # any damage: bad JSON, truncated/corrupted arrays, bad layout
            if not build:
                raise ValueError(f"SQuAD feature cache {path} is unusable ({exc})") from exc
            log.warning("SQuAD feature cache %s is unusable (%s); rebuilding it", path, exc)
    elif not build:
        raise ValueError(f"SQuAD feature cache {path} is missing")
    arrays, stats = convert_examples(examples, tokenizer, settings)
    if stats["mismatch"]:
        log.warning(
            "%d answer(s) differ from their context at answer_start; the span at answer_start "
            "is used",
            stats["mismatch"],
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-squad-{key}-", dir=root))
    try:
        from safetensors.numpy import save_file

        save_file(arrays, str(tmp / FEATURES_FILE))
        meta = {
            "key": key,
            "format": CACHE_FORMAT,
            "recipe": recipe,
            "stats": stats,
            "num_examples": len(examples),
            "question_ids_sha256": _ids_digest(examples),
            "sha256": file_sha256(tmp / FEATURES_FILE),
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
        "SQuAD: %d questions → %d features (%d windows without their answer → CLS): %s",
        stats["examples"],
        stats["features"],
        stats["windows_without_answer"],
        path,
    )
    return _load(path, key, examples, settings)


def _load(
    path: Path, key: str, examples: list[SquadExample], settings: FeatureSettings
) -> SquadFeatures:
    from safetensors.numpy import load_file

    meta = json.loads((path / "meta.json").read_text())
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
        raise ValueError("cache key or format mismatch")
    if file_sha256(path / FEATURES_FILE) != meta["sha256"]:
        raise ValueError(f"{FEATURES_FILE}: checksum mismatch (truncated or corrupted)")
    if meta["num_examples"] != len(examples) or meta["question_ids_sha256"] != _ids_digest(
        examples
    ):
        raise ValueError("the cached features were made for other questions")
    arrays = load_file(str(path / FEATURES_FILE))
    _check_arrays(arrays, len(examples))
    return SquadFeatures(arrays=arrays, examples=examples, settings=settings, meta=meta)


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
