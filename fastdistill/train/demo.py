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

About two minutes on two CPU cores. The tokenizer and model-config builders are also what the tests
use (tests/_tiny.py builds the tests' tiny models and data on them).
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


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(
    files, vocab_size: int = 4000, out_dir: str | os.PathLike | None = None
):
    """A lower-cased BERT-style WordPiece tokenizer trained on ``files`` ([PAD]=0, [UNK], [CLS],
    [SEP], [MASK]); a ``transformers`` fast tokenizer, saved to ``out_dir`` if given. The same
    files give the same tokenizer, byte for byte, in every process."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the "##" continuation characters in the order it meets them in a hash
    # map (seeded at random per process) and breaks ties between equally frequent merges by
    # those numbers, so ids and even the set of tokens changed from run to run. Numbering them
    # beforehand (sorted, passed as special tokens) makes training deterministic; the tokenizer
    # is then rebuilt from the trained vocabulary with only the real special tokens.
    continuation = ["##" + c for c in _continuation_chars(files, normalizer, pre_tokenizer)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS + continuation,
    )
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer, trained.pre_tokenizer = normalizer, pre_tokenizer
    trained.train([str(f) for f in files], trainer)
    tok = Tokenizer(models.WordPiece(trained.get_vocab(), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL_TOKENS)
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


def _continuation_chars(files, normalizer, pre_tokenizer) -> list[str]:
    """The characters that occur inside a word (not first) of ``files``, sorted: those the
    WordPiece trainer gives a "##" token. Read as the trainer reads them, line by line."""
    chars: set[str] = set()
    for f in files:
        with open(f, encoding="utf-8") as lines:
            for line in lines:
                for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
                    chars.update(word[1:])
    return sorted(chars)


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
    """A small config of ``arch`` (bert, roberta, distilbert, gpt2, llama), special ids from
    ``tokenizer``."""
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
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            intermediate_size=inter,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
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
    # Batches of 32 distilled better than 16 here at equal steps and at equal tokens
    # (bench/RESULTS.md); the student otherwise runs on the defaults (learning rate 5e-4, uniform
    # masking), which did better on this corpus than the 1e-3 and count^-0.7 masking once used.
    "batch_size": 32,
    "teacher_steps": 700,
    # The teacher is trained from scratch: a higher rate than the default fine-tuning-like one.
    "teacher_lr": 2e-3,
    "student_steps": 300,
}


QUICK = dict(
    vocab_size=800,
    teacher=dict(hidden=32, layers=2, heads=2, intermediate=64, max_positions=64, dropout=0.0),
    teacher_steps=6,
    student_steps=6,
    batch_size=8,
)


def demo_settings(quick: bool = False) -> dict[str, Any]:
    """The demo's sizes, steps and learning rates (``quick``: shrunk to seconds, for tests)."""
    return {**DEMO, **(QUICK if quick else {})}


def demo_configs(
    output_dir: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    progress_bar: bool = True,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """The two runs of the demo, in order: ``{"teacher": TrainConfig, "student": TrainConfig}``
    (not resolved). Every key the demo sets is here, so ``--demo --print-config`` shows them; the
    teacher's model config and tokenizer are written by :func:`run_demo` before its run."""
    from fastdistill.train.config import TrainConfig

    settings = demo_settings(quick)
    out = Path(output_dir)
    common = dict(
        task="mlm",
        train_files=[str(out / "data" / "train.txt")],
        eval_files=[str(out / "data" / "heldout.txt")],
        cache_dir=str(out / "cache"),
        max_length=settings["max_length"],
        batch_size=settings["batch_size"],
        progress_bar=progress_bar,
        tensorboard=tensorboard,
        overwrite_output_dir=True,
        log_interval=10 if not quick else 2,
        save_interval=100 if not quick else 2,
        eval_max_sequences=256 if not quick else 16,
    )
    teacher = dict(
        student_config=str(out / "teacher-config"),
        tokenizer=str(out / "tokenizer"),
        output_dir=str(out / "teacher"),
        max_steps=settings["teacher_steps"],
        learning_rate=settings["teacher_lr"],
        **common,
    )
    student = dict(
        teacher=str(out / "teacher" / "final"),
        output_dir=str(out / "student"),
        max_steps=settings["student_steps"],
        **common,
    )
    return {"teacher": TrainConfig.from_dict(teacher), "student": TrainConfig.from_dict(student)}


def demo_config_yaml(output_dir: str | os.PathLike = "runs/demo", **kwargs) -> str:
    """The demo's two configurations as YAML documents (for ``--demo --print-config``), each
    headed by the keys the demo sets beyond the trainer's defaults; ``kwargs`` as for
    :func:`demo_configs`. Each document is a config file ``--config`` accepts."""
    import yaml

    settings = demo_settings(kwargs.get("quick", False))
    model = ", ".join(f"{k}={v}" for k, v in settings["teacher"].items())
    docs = [
        "# fastdistill-train --demo runs the teacher run (skipped when "
        f"{Path(output_dir) / 'teacher' / 'final'} exists),\n# then the student run. The "
        f"teacher is a BERT\n# ({model})\n# on a WordPiece vocabulary of "
        f"{settings['vocab_size']} tokens trained on the training chapters."
    ]
    for i, (name, cfg) in enumerate(demo_configs(output_dir, **kwargs).items(), 1):
        chosen = "".join(f"#   {k}: {v}\n" for k, v in _beyond_defaults(cfg).items())
        body = yaml.safe_dump(cfg.resolved().to_dict(), sort_keys=False)
        docs.append(f"---\n# {i}. {name} run; the demo sets, beyond the defaults:\n{chosen}{body}")
    return "\n".join(docs)


def run_demo(
    output_dir: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    progress_bar: bool = True,
    tensorboard: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the embedded default; ``quick`` shrinks it to seconds (tests). ``resume``: a run (the
    teacher's or the student's) that left checkpoints continues from its latest one instead of
    starting again."""

    from fastdistill.train.trainer import train

    settings = demo_settings(quick)
    out = Path(output_dir)
    configs = demo_configs(out, quick=quick, progress_bar=progress_bar, tensorboard=tensorboard)
    if resume:
        configs = resumed(configs)
    train_txt, _ = split_corpus(CORPUS, out / "data")
    teacher_dir = Path(configs["student"].teacher)
    for name, cfg in configs.items():
        chosen = " ".join(f"{k}={v}" for k, v in _beyond_defaults(cfg).items())
        log.info("demo %s run, set beyond the defaults: %s", name, chosen)
    if not (teacher_dir / "config.json").is_file():
        tokenizer = build_wordpiece_tokenizer(
            [train_txt], settings["vocab_size"], configs["teacher"].tokenizer
        )
        config = tiny_config("bert", len(tokenizer), tokenizer=tokenizer, **settings["teacher"])
        config.save_pretrained(configs["teacher"].student_config)
        log.info(
            "step 1/2: training the teacher (%d steps, hard MLM loss only)",
            settings["teacher_steps"],
        )
        train(configs["teacher"])
    else:
        log.info("step 1/2: reusing the teacher in %s", teacher_dir)
    log.info("step 2/2: distilling it into a student with every other layer")
    summary = train(configs["student"])
    return write_result(out, configs, summary)


def resumed(configs: dict[str, Any]) -> dict[str, Any]:
    """The demo's runs with ``resume`` on for each run that left checkpoints."""
    import dataclasses

    from fastdistill.train import checkpoint

    return {
        name: dataclasses.replace(cfg, resume=True, overwrite_output_dir=False)
        if checkpoint.has_checkpoints(cfg.output_dir)
        else cfg
        for name, cfg in configs.items()
    }


def write_result(out: Path, configs: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What a demo reports (see :func:`format_demo`), also written to OUT/demo_summary.json."""
    student_run = Path(configs["student"].output_dir)
    result = {
        "run_dir": str(student_run),
        "teacher": str(configs["student"].teacher),
        "student": str(student_run / "final"),
        "figure": summary.get("figure"),
        "teacher_parameters": summary.get("teacher_parameters"),
        "student_parameters": summary.get("student_parameters"),
        "before": summary.get("eval_before", {}),
        "after": summary.get("eval_after", {}),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=1))
    return result


def _beyond_defaults(cfg) -> dict[str, Any]:
    """The keys of ``cfg`` whose values differ from the trainer's defaults."""
    from fastdistill.train.config import TrainConfig

    default = TrainConfig(task=cfg.task).to_dict()
    return {k: v for k, v in cfg.to_dict().items() if v != default.get(k)}


def format_demo(result: dict[str, Any], kind: str = "mlm") -> str:
    """The demo's report: held-out agreement with the teacher before and after distillation
    (``kind``: ``mlm``, the BERT demo, or ``clm``, the Llama one)."""
    b, a = result["before"], result["after"]
    model, tokens, acc = (
        ("a Llama", "next tokens", "next-token")
        if kind == "clm"
        else ("a BERT", "masked tokens", "MLM")
    )
    lines = [
        f"fastdistill-train demo: {model} teacher distilled into a student with half its layers",
        f"  teacher {result['teacher_parameters'] / 1e6:.2f}M parameters, student "
        f"{result['student_parameters'] / 1e6:.2f}M",
        f"  {'on held-out text (' + tokens + ')':<38}   before     after",
    ]
    for key, label in (
        ("kl_to_teacher", "KL(teacher || student)"),
        ("top1_agreement", "top-1 agreement with teacher"),
        ("accuracy", f"student {acc} accuracy"),
        ("teacher_accuracy", f"teacher {acc} accuracy"),
    ):
        if key in b and key in a:
            lines.append(f"  {label:<38} {b[key]:>8.4f}  {a[key]:>8.4f}")
    lines += [f"  student: {result['student']}", f"  figure:  {result['figure']}"]
    return "\n".join(lines)
