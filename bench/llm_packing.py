"""Training throughput of the decoder-LLM task with packed rows vs padded rows.

Chat examples drawn from the shipped corpus with a realistic length spread (log-normal: most
short, a long tail up to the row length) train a small Llama student from a Llama teacher through
the real trainer (``--task llm``), once with ``--packing`` and once with ``--no-packing``, same
data, same steps; the trainer's own tokens/s (non-padding tokens per second of training) is
reported with the padding share of each. Runs are interleaved ``--reps`` times; the best is kept.

    python -m bench.llm_packing [--steps 30] [--reps 2] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastdistill.train import TrainConfig, train
from fastdistill.train.demo import CORPUS, build_wordpiece_tokenizer, tiny_config

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def make_inputs(root: Path, max_length: int, n: int = 1500, seed: int = 0) -> dict:
    words = CORPUS.read_text(encoding="utf-8").split()
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.2, sigma=0.8, size=(n, 2)), 3, max_length // 3)
    chats = []
    for a, b in lengths.astype(int):
        start = int(rng.integers(0, len(words) - a - b))
        user, answer = words[start : start + a], words[start + a : start + a + b]
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(user)},
                    {"role": "assistant", "content": " ".join(answer)},
                ]
            }
        )
    (root / "chats.jsonl").write_text("\n".join(map(json.dumps, chats)) + "\n")
    (root / "text.txt").write_text(CORPUS.read_text(encoding="utf-8"))
    tok = build_wordpiece_tokenizer([root / "text.txt"], 2000, root / "tok")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "tok")
    config = tiny_config("llama", len(tok), hidden=128, layers=4, heads=4, max_positions=512)
    torch.manual_seed(0)
    import transformers

    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return {"teacher": str(root / "teacher"), "train": str(root / "chats.jsonl")}


def run(paths: dict, root: Path, packing: bool, steps: int, max_length: int) -> dict:
    out = root / f"run-{'packed' if packing else 'padded'}-{time.monotonic_ns()}"
    cfg = TrainConfig.from_dict(
        dict(
            task="llm",
            teacher=paths["teacher"],
            train_files=[paths["train"]],
            cache_dir=str(root / "cache"),
            output_dir=str(out),
            max_length=max_length,
            batch_size=8,
            max_steps=steps,
            log_interval=steps // 3,
            save_interval=steps,
            packing=packing,
            teacher_dtype="float32",
            divergence="jsd",
            progress_bar=False,
            tensorboard=False,
        )
    )
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]  # skip warm-up
    return {"tokens_per_s": max(rates), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_inputs(root, args.max_length)
        best: dict[bool, dict] = {}
        for _ in range(args.reps):
            for packing in (True, False):
                r = run(paths, root, packing, args.steps, args.max_length)
                if packing not in best or r["tokens_per_s"] > best[packing]["tokens_per_s"]:
                    best[packing] = r
        print(
            f"load average: {os.getloadavg()}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        for packing, r in best.items():
            name = "packed" if packing else "padded"
            print(
                f"{name}: {r['tokens_per_s']:.0f} tokens/s (best interval), run {r['wall_s']:.1f} s"
            )
        ratio = best[True]["tokens_per_s"] / best[False]["tokens_per_s"]
        print(f"packing / padding throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
