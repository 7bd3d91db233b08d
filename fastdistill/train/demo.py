"""The embedded default run: ``fastdistill-train`` with no arguments.

It needs nothing from the network. On the English text shipped in ``corpus/`` (see
``corpus/SOURCE.md``: books of the King James Bible, public domain) it

1. trains a WordPiece tokenizer (``tokenizers``) and splits the text into training and held-out
   chapters (every 10th chapter is held out);
2. trains a small BERT teacher from scratch with the same trainer (hard MLM loss alone, no
   teacher) — or reuses the one a previous demo left in the run directory;
3. distils it into a student with half its layers, initialised from the teacher's layers 0, 2, …
   (the DistilBERT recipe: KL at T = 2 × 5.0 + MLM × 2.0 + hidden cosine × 1.0);
4. reports KL(teacher ‖ student) and top-1 agreement with the teacher on the held-out chapters
   before and after distillation, and writes checkpoints, metrics (JSONL, tensorboard) and figure.

About three to four minutes on two CPU cores. The helpers that build tokenizers and tiny model configs are
also what the tests use.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("fastdistill.train")

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS = CORPUS_DIR / "kjv.txt"


# ---- tokenizers -----------------------------------------------------------------------------------


def build_wordpiece_tokenizer(
    files, vocab_size: int = 4000, out_dir: str | os.PathLike | None = None
):
    """A lower-cased BERT-style WordPiece tokenizer trained on ``files`` ([PAD]=0, [UNK], [CLS],
    [SEP], [MASK]); a ``transformers`` fast tokenizer, saved to ``out_dir`` if given."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    tok.train([str(f) for f in files], trainer)
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


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    hidden: int = 32,
    layers: int = 4,
    heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 128,
    dropout: float = 0.0,
    tokenizer=None,
):
    """A small config of ``arch`` (bert, roberta, distilbert, gpt2), special ids from ``tokenizer``."""
    import transformers

    inter = intermediate or 4 * hidden
    special = {}
    if tokenizer is not None:
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                special[name] = getattr(tokenizer, name)
    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=max_positions,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **special,
        )
    elif arch == "roberta":
        cfg = transformers.RobertaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=max_positions + 2,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            type_vocab_size=1,
            **special,
        )
    elif arch == "distilbert":
        cfg = transformers.DistilBertConfig(
            vocab_size=vocab_size,
            dim=hidden,
            n_layers=layers,
            n_heads=heads,
            hidden_dim=inter,
            max_position_embeddings=max_positions,
            dropout=dropout,
            attention_dropout=dropout,
            **special,
        )
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=inter,
            n_positions=max_positions,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **special,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return cfg


# ---- the demo ---------------------------------------------------------------------------------------


def split_corpus(src: Path, out_dir: Path, heldout_every: int = 10) -> tuple[Path, Path]:
    """Chapters (blank-line separated) → train.txt and heldout.txt (every ``heldout_every``-th)."""
    chapters = [c for c in src.read_text(encoding="utf-8").split("\n\n") if c.strip()]
    train = [c for i, c in enumerate(chapters) if i % heldout_every != heldout_every - 1]
    held = [c for i, c in enumerate(chapters) if i % heldout_every == heldout_every - 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (out_dir / "heldout.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
    return out_dir / "train.txt", out_dir / "heldout.txt"


DEMO = {
    "vocab_size": 2000,
    # ~1.1M parameters (a quarter of them embeddings): big enough to learn real statistics of the text in
    # a couple of minutes on two cores, small enough to leave time for the distillation.
    "teacher": dict(hidden=128, layers=4, heads=4, intermediate=512, max_positions=64, dropout=0.1),
    "max_length": 64,
    "batch_size": 32,
    "teacher_steps": 700,
    "teacher_lr": 2e-3,
    "student_steps": 300,
    "student_lr": 1e-3,
}


def run_demo(
    output_dir: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    progress_bar: bool = True,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Run the embedded default; ``quick`` shrinks it to seconds (tests)."""
    from fastdistill.train.config import TrainConfig
    from fastdistill.train.loop import train

    settings = dict(DEMO)
    if quick:
        settings.update(
            vocab_size=800,
            teacher=dict(
                hidden=32, layers=2, heads=2, intermediate=64, max_positions=64, dropout=0.0
            ),
            teacher_steps=6,
            student_steps=6,
            batch_size=8,
        )
    out = Path(output_dir)
    data_dir = out / "data"
    train_txt, held_txt = split_corpus(CORPUS, data_dir)
    tok_dir = out / "tokenizer"
    teacher_dir = out / "teacher" / "final"
    common = dict(
        task="mlm",
        train_files=[str(train_txt)],
        eval_files=[str(held_txt)],
        cache_dir=str(out / "cache"),
        max_length=settings["max_length"],
        batch_size=settings["batch_size"],
        progress_bar=progress_bar,
        tensorboard=tensorboard,
        log_interval=10 if not quick else 2,
        save_interval=100 if not quick else 2,
        eval_max_sequences=256 if not quick else 16,
    )

    if not (teacher_dir / "config.json").is_file():
        tokenizer = build_wordpiece_tokenizer([train_txt], settings["vocab_size"], tok_dir)
        config = tiny_config("bert", len(tokenizer), tokenizer=tokenizer, **settings["teacher"])
        config_dir = out / "teacher-config"
        config.save_pretrained(config_dir)
        log.info(
            "step 1/2: training the teacher (%d steps, hard MLM loss only)",
            settings["teacher_steps"],
        )
        train(
            TrainConfig(
                student_config=str(config_dir),
                tokenizer=str(tok_dir),
                output_dir=str(out / "teacher"),
                overwrite_output_dir=True,
                max_steps=settings["teacher_steps"],
                learning_rate=settings["teacher_lr"],
                # Plain BERT masking (uniform over tokens) for the teacher: it learns the common
                # words first, fast; the student gets the seed's rare-token smoothing.
                mlm_smoothing=0.0,
                warmup_ratio=0.05,
                **common,
            )
        )
    else:
        log.info("step 1/2: reusing the teacher in %s", teacher_dir)
    log.info("step 2/2: distilling it into a student with every other layer")
    summary = train(
        TrainConfig(
            teacher=str(teacher_dir),
            output_dir=str(out / "student"),
            overwrite_output_dir=True,
            max_steps=settings["student_steps"],
            learning_rate=settings["student_lr"],
            mlm_smoothing=0.0,
            **common,
        )
    )
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    result = {
        "run_dir": str(out / "student"),
        "teacher": str(teacher_dir),
        "student": str(out / "student" / "final"),
        "figure": summary.get("figure"),
        "teacher_parameters": summary.get("teacher_parameters"),
        "student_parameters": summary.get("student_parameters"),
        "before": before,
        "after": after,
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=1))
    return result


def format_demo(result: dict[str, Any]) -> str:
    b, a = result["before"], result["after"]
    lines = [
        "fastdistill-train demo: a BERT teacher distilled into a student with half its layers",
        f"  teacher {result['teacher_parameters'] / 1e6:.2f}M parameters, student "
        f"{result['student_parameters'] / 1e6:.2f}M",
        "  on held-out text (masked tokens)        before     after",
    ]
    for key, label in (
        ("kl_to_teacher", "KL(teacher || student)"),
        ("top1_agreement", "top-1 agreement with teacher"),
        ("accuracy", "student MLM accuracy"),
        ("teacher_accuracy", "teacher MLM accuracy"),
    ):
        if key in b and key in a:
            lines.append(f"  {label:<38} {b[key]:>8.4f}  {a[key]:>8.4f}")
    lines += [f"  student: {result['student']}", f"  figure:  {result['figure']}"]
    return "\n".join(lines)


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
    from fastdistill.train.squad_data import read_examples

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
