"""Tiny models, tokenizers and data for the trainer tests, built from configs in seconds (no
download): the teachers are random or briefly trained, the text comes from the shipped corpus."""

from __future__ import annotations

import os
from pathlib import Path

from fastdistill.train.demo import CORPUS, build_wordpiece_tokenizer, tiny_config


def build_bpe_tokenizer(
    files, vocab_size: int = 1000, out_dir: str | os.PathLike | None = None, *, style: str = "gpt2"
):
    """A byte-level BPE tokenizer: ``style="gpt2"`` (<|endoftext|> as BOS/EOS/UNK, no mask) or
    ``"roberta"`` (<s> </s> <pad> <unk> <mask>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "gpt2":
        specials = {
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        }
        names = ["<|endoftext|>"]
    elif style == "roberta":
        specials = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "cls_token": "<s>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
        }
        names = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    else:
        raise ValueError(f"style must be gpt2 or roberta, got {style!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=names,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


# ---- tiny models -----------------------------------------------------------------------------------


def tiny_inputs(
    out_dir: str | os.PathLike,
    *,
    arch: str = "bert",
    task: str = "mlm",
    lines: int = 600,
    vocab_size: int = 600,
    hidden: int = 32,
    layers: int = 4,
    dropout: float = 0.0,
    seed: int = 0,
) -> dict[str, str]:
    """Seconds-sized inputs for tests and quick experiments: text files cut from the shipped corpus,
    a tokenizer trained on them and a randomly initialised teacher of ``arch`` saved with
    ``save_pretrained`` (``AutoModelForMaskedLM``/``ForCausalLM``/``AutoModel`` by ``task``).
    Returns the paths: train, eval, tokenizer, teacher."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    (out / "train.txt").write_text("\n".join(text[:lines]) + "\n", encoding="utf-8")
    (out / "eval.txt").write_text("\n".join(text[-lines // 4 :]) + "\n", encoding="utf-8")
    tok_dir = out / "tokenizer"
    if arch in ("bert", "distilbert"):
        tokenizer = build_wordpiece_tokenizer([out / "train.txt"], vocab_size, tok_dir)
    else:
        tokenizer = build_bpe_tokenizer(
            [out / "train.txt"], vocab_size, tok_dir, style="gpt2" if arch == "gpt2" else "roberta"
        )
    config = tiny_config(
        arch, len(tokenizer), hidden=hidden, layers=layers, dropout=dropout, tokenizer=tokenizer
    )
    # A wider initialisation than the default 0.02: a random teacher with confident (peaked)
    # predictions, so distillation has something to transfer.
    config.initializer_range = 0.5
    auto = {
        "mlm": transformers.AutoModelForMaskedLM,
        "clm": transformers.AutoModelForCausalLM,
        "hidden": transformers.AutoModel,
    }[task]
    torch.manual_seed(seed)
    teacher = auto.from_config(config)
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(
        out / "teacher"
    )  # like a hub checkpoint: the tokenizer beside the model
    return {
        "train": str(out / "train.txt"),
        "eval": str(out / "eval.txt"),
        "tokenizer": str(tok_dir),
        "teacher": str(out / "teacher"),
    }


# ---- question answering -------------------------------------------------------------------------


def build_word_tokenizer(texts, out_dir: str | os.PathLike | None = None):
    """A lower-cased BERT WordPiece tokenizer whose vocabulary is every word and punctuation mark
    of ``texts`` (BERT's pre-tokenisation), plus their characters alone and as ``##`` pieces so
    unseen words still tokenise. Built without a trainer, so it is the same on every run (the
    WordPiece trainer breaks ties differently from run to run)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = sorted(words | set(chars) | {"##" + c for c in chars})
    vocab = {tok: i for i, tok in enumerate(specials + pieces)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def tiny_squad_inputs(
    out_dir: str | os.PathLike,
    data_files,
    *,
    teacher: dict | None = None,
    student: dict | None = None,
    max_positions: int = 128,
) -> dict[str, str]:
    """Seconds-sized inputs for question answering tests and experiments: a tokenizer built from
    the questions and contexts of the SQuAD ``data_files`` and the configs of a small BERT teacher
    and a smaller BERT student (``tiny_config`` keyword arguments). Returns the paths: tokenizer,
    teacher_config, student_config."""
    from fastdistill.train.tasks.squad.files import read_examples

    out = Path(out_dir)
    texts = []
    for ex in read_examples([str(f) for f in data_files]):
        texts += [ex.question, ex.context]
    tok_dir = out / "tokenizer"
    tokenizer = build_word_tokenizer(texts, tok_dir)
    paths = {"tokenizer": str(tok_dir)}
    for name, kw in (
        ("teacher", {"hidden": 64, "layers": 2, "heads": 4, **(teacher or {})}),
        ("student", {"hidden": 32, "layers": 1, "heads": 2, **(student or {})}),
    ):
        kw.setdefault("max_positions", max_positions)
        config = tiny_config("bert", len(tokenizer), tokenizer=tokenizer, **kw)
        config.save_pretrained(out / f"{name}-config")
        paths[f"{name}_config"] = str(out / f"{name}-config")
    return paths
