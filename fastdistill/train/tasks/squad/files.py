"""SQuAD files → questions (:class:`SquadExample`).

Three layouts are read, whatever the version: the official nested one
(``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``), the flat one
(one record per question: ``{"id", "question", "context", "answers"}``, under ``"data"`` or as a
top-level list) and JSON lines of flat records. Answers are a list of ``{"text", "answer_start"}``
or the ``{"text": [...], "answer_start": [...]}`` columns of Hugging Face datasets. A question is
unanswerable (SQuAD v2.0) when ``is_impossible`` is true or it has no answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastdistill.train import fsutil

# ---- examples -----------------------------------------------------------------------------------


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
    text = fsutil.read_text(path, "SQuAD file")
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
