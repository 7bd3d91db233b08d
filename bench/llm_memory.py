"""Peak memory of a ``--task llm`` training step at a 128k vocabulary: the fused linear path (the
default: hidden states and heads, no logits) vs the models' materialised logits
(``--no-fused-linear``).

Each configuration trains a few steps in a fresh process (Llama student and teacher built from
configs, V = 128,256, hidden 64, 2 × 256 tokens per step); the peak resident memory above the
process's resident memory after the models and data are loaded is reported. The tokenizer is the
demo's (2,000 ids), so the check that refuses a tokenizer far smaller than the vocabulary is off
in the child process; memory does not depend on which ids occur.

    python -m bench.llm_memory [--vocab 128256] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(2)
from fastdistill.train import TrainConfig, train
from fastdistill.train import trainer as T

marks = {}
real = T.Trainer._setup_schedule

def mark(self):
    marks["loaded_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return real(self)

T.Trainer._setup_schedule = mark
# The corpus tokenizer covers only the first 2,000 of the 128k ids: switch off the check that
# refuses a tokenizer far smaller than the model's vocabulary (memory does not depend on it).
from fastdistill.train.tasks.base import Task
Task.check_models = lambda self, *a: None
train(TrainConfig.from_dict(json.loads(sys.argv[1])))
marks["peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MARKS", json.dumps(marks))
"""


def prepare(root: Path, vocab: int, tokens: int) -> dict:
    import torch
    import transformers

    from fastdistill.train.demo import CORPUS, build_wordpiece_tokenizer

    (root / "text.txt").write_text(CORPUS.read_text(encoding="utf-8"))
    tok = build_wordpiece_tokenizer([root / "text.txt"], 2000, root / "tok")
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokens,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return {"teacher": str(root / "teacher"), "train": str(root / "text.txt")}


def run(paths: dict, root: Path, fused: bool, tokens: int) -> dict:
    config = dict(
        task="llm",
        teacher=paths["teacher"],
        train_files=[paths["train"]],
        cache_dir=str(root / "cache"),
        output_dir=str(root / f"run-{fused}"),
        max_length=tokens // 2,
        batch_size=2,
        packing=True,  # full rows: `tokens` tokens per step (verses are short)
        max_steps=3,
        log_interval=1,
        save_interval=3,
        teacher_dtype="float32",
        fused_linear=fused,
        alpha_ce=0.5,
        divergence="jsd",
        progress_bar=False,
        tensorboard=False,
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MARKS"))
    return json.loads(line.split(" ", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = prepare(root, args.vocab, args.tokens)
        logits_mb = args.tokens * args.vocab * 4 / 2**20
        print(
            f"V = {args.vocab}, {args.tokens} tokens per step: one fp32 logits tensor "
            f"{logits_mb:.0f} MiB; load average {os.getloadavg()}"
        )
        for fused in (True, False):
            m = run(paths, root, fused, args.tokens)
            extra = (m["peak_kb"] - m["loaded_kb"]) / 1024
            name = "fused linear" if fused else "materialised logits"
            print(
                f"{name}: peak {m['peak_kb'] / 1024:.0f} MiB, {extra:.0f} MiB above the loaded "
                f"process ({extra / logits_mb:.2f} logits tensors)"
            )


if __name__ == "__main__":
    main()
