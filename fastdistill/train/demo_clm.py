"""The second embedded example, ``fastdistill-train --demo clm``: decoder-LLM distillation.

On the corpus shipped in ``corpus/`` it trains a small Llama-architecture teacher from scratch
(next-token loss, packed sequences), then distils it into a student with half its layers,
initialised from the teacher's layers 0, 2, … with the generalised JSD (β = 0.5) plus a little
hard next-token loss, and reports the held-out KL(teacher ‖ student) and top-1 agreement before
and after. Everything runs through ``--task llm``; a few minutes on two CPU cores.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastdistill.train.demo import (
    CORPUS,
    build_wordpiece_tokenizer,
    resumed,
    split_corpus,
    tiny_config,
    write_result,
)

log = logging.getLogger("fastdistill.train")

CLM_DEMO = {
    "vocab_size": 2000,
    "teacher": dict(hidden=128, layers=4, heads=4, intermediate=384, max_positions=128),
    "max_length": 128,
    "batch_size": 16,
    "teacher_steps": 500,
    "teacher_lr": 2e-3,
    "student_steps": 250,
    "student_lr": 1e-3,
}
QUICK = dict(
    vocab_size=600,
    teacher=dict(hidden=32, layers=2, heads=2, intermediate=64, max_positions=128),
    teacher_steps=4,
    student_steps=4,
    batch_size=4,
)


def clm_demo_configs(
    output_dir: str | os.PathLike = "runs/demo-clm",
    *,
    quick: bool = False,
    progress_bar: bool = True,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """The two runs: ``{"teacher": TrainConfig, "student": TrainConfig}`` (not resolved)."""
    from fastdistill.train.config import TrainConfig

    s = {**CLM_DEMO, **(QUICK if quick else {})}
    out = Path(output_dir)
    common = dict(
        task="llm",
        train_files=[str(out / "data" / "train.txt")],
        eval_files=[str(out / "data" / "heldout.txt")],
        cache_dir=str(out / "cache"),
        max_length=s["max_length"],
        batch_size=s["batch_size"],
        teacher_dtype="float32",  # bf16 matmuls are slow on many CPUs; the demo is small
        progress_bar=progress_bar,
        tensorboard=tensorboard,
        overwrite_output_dir=True,
        log_interval=10 if not quick else 2,
        save_interval=100 if not quick else 2,
    )
    teacher = dict(
        common,
        student_config=str(out / "teacher-config"),
        tokenizer=str(out / "tokenizer"),
        output_dir=str(out / "teacher"),
        max_steps=s["teacher_steps"],
        learning_rate=s["teacher_lr"],
        alpha_ce=1.0,
    )
    student = dict(
        common,
        teacher=str(out / "teacher" / "final"),
        output_dir=str(out / "student"),
        max_steps=s["student_steps"],
        learning_rate=s["student_lr"],
        divergence="jsd",
        beta=0.5,
        alpha_ce=0.1,
    )
    return {"teacher": TrainConfig.from_dict(teacher), "student": TrainConfig.from_dict(student)}


def run_clm_demo(
    output_dir: str | os.PathLike = "runs/demo-clm",
    *,
    quick: bool = False,
    progress_bar: bool = True,
    tensorboard: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the decoder-LLM demo (``quick``: seconds, for tests); returns what it reports."""
    from fastdistill.train.trainer import train

    s = {**CLM_DEMO, **(QUICK if quick else {})}
    out = Path(output_dir)
    configs = clm_demo_configs(out, quick=quick, progress_bar=progress_bar, tensorboard=tensorboard)
    if resume:
        configs = resumed(configs)
    train_txt, _ = split_corpus(CORPUS, out / "data")
    teacher_dir = Path(configs["student"].teacher)
    if not (teacher_dir / "config.json").is_file():
        tok = build_wordpiece_tokenizer([train_txt], s["vocab_size"], configs["teacher"].tokenizer)
        config = tiny_config("llama", len(tok), tokenizer=tok, **s["teacher"])
        config.save_pretrained(configs["teacher"].student_config)
        log.info(
            "step 1/2: training a Llama teacher (%d steps, next-token loss)", s["teacher_steps"]
        )
        train(configs["teacher"])
    log.info("step 2/2: distilling it into a student with every other layer (JSD, beta 0.5)")
    summary = train(configs["student"])
    return write_result(out, configs, summary)
