"""Decoder-LLM data: plain text or chat/prompt-completion JSON lines → token sequences with a
completion mask (cached once) → packed rows → batches.

Inputs, by file:

* ``.txt``: one document per non-blank line, ``bos + text + eos``; every token is a target.
* ``.jsonl`` (or ``.json`` holding a list): records with ``messages`` (a list of ``{"role",
  "content"}``, rendered with the tokenizer's chat template; the assistant turns are the targets)
  or ``prompt``/``completion`` (rendered as a user and an assistant turn when the tokenizer has a
  chat template, else ``bos + prompt + completion + eos``; the completion is the target).
  ``train_on_prompt`` makes every token a target.

A token is a *target* when the loss predicts it: position t of a sequence carries the losses of
token t + 1 when that token is a target (the last position predicts nothing). Assistant tokens are
found by rendering the conversation up to each assistant turn (with the generation prompt) and up
to its end; a template whose renderings are not prefixes of each other is refused.

Packing (``--packing``) puts several sequences in one row of at most ``max_length`` tokens (first
fit, longest first, deterministic): positions restart at 0 for each sequence and the attention
mask is block-diagonal and causal, so no token sees another sequence (``position_ids`` alone do
not isolate sequences in transformers' attention: the mask does). No position predicts across a
boundary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastdistill.train import cache, fsutil

CACHE_FORMAT = 1
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LLMDataSettings:
    max_length: int
    train_on_prompt: bool = False


# ---- reading and rendering -------------------------------------------------------------------------


def read_records(path: str) -> list[dict | str]:
    """The examples of one file: strings (plain text) or dicts (chat / prompt-completion)."""
    text = fsutil.read_text(path, "data file")
    if path.endswith(".txt"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    if path.endswith(".json") and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not a JSON record ({exc.msg})") from None
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict) or not ("messages" in r or {"prompt", "completion"} <= set(r)):
            raise ValueError(
                f"{path}: record {i} has neither 'messages' nor 'prompt' and 'completion'"
            )
    return records


def _ids(enc) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list or a BatchEncoding by version."""
    return list(enc["input_ids"] if not isinstance(enc, list) else enc)


def render(record, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """(token ids, target flags) of one example (module doc)."""
    if isinstance(record, str):
        ids = _wrap(tokenizer, tokenizer(record, add_special_tokens=False)["input_ids"])
        return ids, [1] * len(ids)
    messages = record.get("messages")
    if messages is None:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        if not getattr(tokenizer, "chat_template", None):
            prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            ids = _wrap(tokenizer, prompt + answer)
            flags = [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1)
            return ids, [1] * len(ids) if train_on_prompt else flags
    return _render_chat(messages, tokenizer, train_on_prompt)


def _wrap(tokenizer, body: list[int]) -> list[int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None else []) + list(body) + ([eos] if eos is not None else [])


def _render_chat(messages, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat records ('messages') need a tokenizer with a chat template (tokenizer_config.json "
            "'chat_template'); give --tokenizer with one"
        )
    ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    flags = [1 if train_on_prompt else 0] * len(ids)
    for j, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(
            _ids(
                tokenizer.apply_chat_template(
                    messages[:j], tokenize=True, add_generation_prompt=True
                )
            )
        )
        upto = _ids(tokenizer.apply_chat_template(messages[: j + 1], tokenize=True))
        if upto != ids[: len(upto)] or start > len(upto):
            raise ValueError(
                "the chat template renders a conversation's beginning differently from the whole "
                "conversation, so the assistant tokens cannot be located"
            )
        flags[start : len(upto)] = [1] * (len(upto) - start)
    return ids, flags


def examples_of(records, tokenizer, settings: LLMDataSettings):
    """(ids, target flags) per example. A plain-text document longer than a row becomes several
    (each wrapped again); a chat record stays whole (truncated later: a conversation cut in two
    would lose its context)."""
    body = max(1, settings.max_length - 2)
    for record in records:
        if not isinstance(record, str):
            yield render(record, tokenizer, settings.train_on_prompt)
            continue
        ids = tokenizer(record, add_special_tokens=False)["input_ids"]
        for start in range(0, max(len(ids), 1), body):
            piece = _wrap(tokenizer, ids[start : start + body])
            yield piece, [1] * len(piece)


# ---- the token cache --------------------------------------------------------------------------------


@dataclass
class Examples:
    """Token sequences stored flat, with their target flags (uint8)."""

    ids: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.targets[a:b]


def load_examples(
    files: Sequence[str], tokenizer, settings: LLMDataSettings, *, cache_dir=None, build=True
) -> Examples:
    """The tokenised examples of ``files`` from the shared token cache (built when missing)."""
    cache.check_files(files)
    recipe = {
        "format": CACHE_FORMAT,
        "task": "llm",
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
        "max_length": settings.max_length,
        "train_on_prompt": settings.train_on_prompt,
        "files": [cache.file_sha256(f) for f in files],
    }
    key = cache.recipe_key(recipe)

    def build_arrays():
        seqs, flags, stats = [], [], {"examples": 0, "truncated": 0, "no_target": 0}
        for path in files:
            for ids, t in examples_of(read_records(path), tokenizer, settings):
                stats["examples"] += 1
                if len(ids) > settings.max_length:
                    stats["truncated"] += 1
                    ids, t = ids[: settings.max_length], t[: settings.max_length]
                if sum(t[1:]) == 0:  # nothing to predict: no loss, only padding
                    stats["no_target"] += 1
                    continue
                seqs.append(np.asarray(ids, dtype=np.int32))
                flags.append(np.asarray(t, dtype=np.uint8))
        if not seqs:
            raise ValueError(f"no example with a target token in {', '.join(files)}")
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        arrays = {"ids": np.concatenate(seqs), "targets": np.concatenate(flags), "offsets": offsets}
        return arrays, {"stats": stats, "files": [os.path.abspath(f) for f in files]}

    entry = cache.load_or_build(
        cache.entry_path(cache_dir, "llm-", key), key, recipe, build_arrays, build=build
    )
    a = entry.arrays
    return Examples(ids=a["ids"], targets=a["targets"], offsets=a["offsets"], meta=entry.meta)


# ---- packing and batches ------------------------------------------------------------------------------


@dataclass
class Rows:
    """The training rows: each a list of example indices (one when not packing)."""

    examples: Examples
    members: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.members)

    @property
    def lengths(self) -> np.ndarray:
        lengths = self.examples.lengths
        return np.array([int(lengths[m].sum()) for m in self.members], dtype=np.int64)

    def target_counts(self) -> np.ndarray:
        """Per row, the positions that carry a loss (their next token is a target)."""
        ex = self.examples
        csum = np.concatenate([[0], np.cumsum(ex.targets, dtype=np.int64)])
        # targets at positions 1..L-1 of each example (position 0 is predicted by nothing)
        per_example = csum[ex.offsets[1:]] - csum[ex.offsets[:-1] + 1]
        return np.array([int(per_example[m].sum()) for m in self.members], dtype=np.int64)


def pack(examples: Examples, max_length: int, enabled: bool) -> Rows:
    """First fit, longest first (ties by index): deterministic, and rows nearly full."""
    if not enabled:
        return Rows(examples, [np.array([i]) for i in range(len(examples))])
    lengths = examples.lengths
    order = sorted(range(len(examples)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= int(lengths[i])
                break
        else:
            rows.append([i])
            room.append(max_length - int(lengths[i]))
    return Rows(examples, [np.array(sorted(r)) for r in rows])


@dataclass
class LLMBatch:
    input_ids: torch.Tensor  # (B, W)
    attention_mask: torch.Tensor  # (B, W) 0/1, or (B, 1, W, W) additive block-diagonal
    position_ids: torch.Tensor  # (B, W), restarting per packed sequence
    labels: torch.Tensor  # (B, W), the next token where it is a target, else IGNORE_INDEX
    num_tokens: int
    # From a teacher cache: (ids (B, W, k) int64, log-probs (B, W, k) float32, tail (B, W)), each
    # position holding its own sequence's targets (fastdistill/train/teacher_cache.py).
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    def to(self, device) -> LLMBatch:
        def mv(t):
            return t.to(device, non_blocking=True)

        return LLMBatch(
            mv(self.input_ids),
            mv(self.attention_mask),
            mv(self.position_ids),
            mv(self.labels),
            self.num_tokens,
            None if self.teacher_topk is None else tuple(mv(t) for t in self.teacher_topk),
        )

    def model_inputs(self, model) -> dict[str, torch.Tensor]:
        mask = self.attention_mask
        if mask.dim() == 4:  # additive: in the model's dtype (finfo.min of float32 overflows bf16)
            dtype = next(model.parameters()).dtype
            mask = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
        return {
            "input_ids": self.input_ids,
            "attention_mask": mask,
            "position_ids": self.position_ids,
        }


def collate_examples(examples: Examples, indices, *, pad_id: int) -> LLMBatch:
    """Examples ``indices``, one per row, right-padded (what a teacher cache is written from)."""
    rows = Rows(examples, [np.array([int(i)]) for i in indices])
    return collate(rows, range(len(rows)), pad_id=pad_id, packed=False)


def collate(rows: Rows, indices, *, pad_id: int, packed: bool) -> LLMBatch:
    """The rows ``indices``, right-padded; the attention block-diagonal when ``packed``."""
    members = [rows.members[i] for i in indices]
    width = max(int(rows.examples.lengths[m].sum()) for m in members)
    n = len(members)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    segment = np.full((n, width), -1, dtype=np.int64)  # -1: padding
    for r, m in enumerate(members):
        at = 0
        for s, i in enumerate(m):
            seq, tgt = rows.examples.sequence(int(i))
            L = len(seq)
            ids[r, at : at + L] = seq
            pos[r, at : at + L] = np.arange(L)
            segment[r, at : at + L] = s
            nxt = np.where(tgt[1:] == 1, seq[1:], IGNORE_INDEX)
            labels[r, at : at + L - 1] = nxt
            at += L
    seg = torch.from_numpy(segment)
    if packed:
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        allowed = same & causal
        # A padding row attends to itself only (an all-masked softmax row would be NaN).
        allowed |= torch.eye(width, dtype=torch.bool) & (seg[:, :, None] < 0)
        attention = torch.zeros(n, 1, width, width).masked_fill(
            ~allowed[:, None], torch.finfo(torch.float32).min
        )
    else:
        attention = (seg >= 0).long()
    return LLMBatch(
        torch.from_numpy(ids),
        attention,
        torch.from_numpy(pos),
        torch.from_numpy(labels),
        int((segment >= 0).sum()),
    )
