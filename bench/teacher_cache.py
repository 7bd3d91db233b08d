"""The offline teacher on CPU: training from a top-k cache vs with the live teacher.

GPT-2-architecture models built from configs (no downloads) on the shipped corpus through the
real trainer (``--task clm``): one student, teachers of about 2x and 4x its parameters (random,
with the wide initialisation the tests use, so their predictions are peaked). For each teacher:

* (a) training throughput, same student, same steps: the trainer's tokens/s with the live teacher
  vs from the cache (the cache's one-off writing time reported separately);
* (b) bytes per token of the cache at k = 16 and 64;
* (c) held-out KL(teacher ‖ student) after the same steps, evaluated against the real teacher:
  the live dense teacher vs the cache at k = 64 in each normalisation.

    python -m bench.teacher_cache [--steps 60] [--throughput-only]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fastdistill.train import TrainConfig, train
from fastdistill.train import teacher_cache as TC
from fastdistill.train.demo import CORPUS, build_wordpiece_tokenizer, split_corpus, tiny_config

STUDENT = dict(hidden=128, layers=2, heads=4)
TEACHERS = {"2x": dict(hidden=192, layers=3, heads=4), "4x": dict(hidden=256, layers=4, heads=4)}


def build(root: Path) -> dict:
    train_txt, held_txt = split_corpus(CORPUS, root / "data")
    tok = build_wordpiece_tokenizer([train_txt], 2000, root / "tok")
    # GPT-2 needs bos/eos: reuse the WordPiece [CLS]/[SEP] as them.
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    tok.save_pretrained(root / "tok")
    paths = {"train": str(train_txt), "eval": str(held_txt), "tok": str(root / "tok")}
    import transformers

    for name, size in {"student": STUDENT, **TEACHERS}.items():
        config = tiny_config("gpt2", len(tok), max_positions=64, tokenizer=tok, **size)
        config.initializer_range = 0.2 if name != "student" else 0.02
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
        paths[f"{name}_params"] = sum(p.numel() for p in model.parameters())
    return paths


def cfg(paths: dict, out: Path, **kw) -> TrainConfig:
    base = dict(
        task="clm",
        train_files=[paths["train"]],
        eval_files=[paths["eval"]],
        cache_dir=str(out.parent / "cache"),
        output_dir=str(out),
        student_config=paths["student"],
        max_length=64,
        batch_size=16,
        learning_rate=1e-3,
        alpha_cos=0.0,
        temperature=1.0,
        eval_max_sequences=256,
        progress_bar=False,
        tensorboard=False,
    )
    return TrainConfig.from_dict(base | kw)


def tokens_per_s(run: Path) -> float:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]
    return max(rates)


def heldout_kl(paths: dict, run: Path, teacher: str) -> float:
    out = run.parent / f"{run.name}-eval"
    summary = train(
        cfg(
            paths,
            out,
            teacher=paths[teacher],
            do_eval=True,
            student_config=None,
            student_pretrained=str(run / "final"),
        )
    )
    return summary["eval"]["kl_to_teacher"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument(
        "--throughput-only",
        action="store_true",
        help="(a) alone: one cache (k = 64) per teacher and the 'full' run from it",
    )
    args = p.parse_args()
    ks = (64,) if args.throughput_only else (16, 64)
    modes = ("full",) if args.throughput_only else ("full", "renormalized", "tail")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root)
        steps = dict(max_steps=args.steps, log_interval=args.steps // 4, save_interval=args.steps)
        for teacher in TEACHERS:
            live = root / f"live-{teacher}"
            train(cfg(paths, live, teacher=paths[teacher], **steps))
            row = {
                "teacher": teacher,
                "ratio": paths[f"{teacher}_params"] / paths["student_params"],
                "live_tok_s": tokens_per_s(live),
                "live_kl": heldout_kl(paths, live, teacher),
            }
            for k in ks:
                start = time.perf_counter()
                summary = TC.write(
                    cfg(paths, root / "w", teacher=paths[teacher], teacher_top_k=k),
                    root / f"tc-{teacher}-{k}",
                )
                row[f"write_s_k{k}"] = time.perf_counter() - start
                row[f"bytes_per_token_k{k}"] = summary["bytes_per_token"]
            for mode in modes:
                run = root / f"cache-{teacher}-{mode}"
                train(
                    cfg(
                        paths,
                        run,
                        tokenizer=paths["tok"],
                        teacher_cache=str(root / f"tc-{teacher}-64"),
                        topk_normalization=mode,
                        **steps,
                    )
                )
                row[f"{mode}_tok_s"] = tokens_per_s(run)
                row[f"{mode}_kl"] = heldout_kl(paths, run, teacher)
            rows.append(row)
    print(
        f"load average before {load_before}, after {os.getloadavg()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.steps} steps, batch 16 x 64 tokens"
    )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
