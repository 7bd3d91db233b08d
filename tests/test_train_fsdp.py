"""FSDP2 (``--parallel fsdp``) on CPU with gloo: two processes give the weights of one process
that sees the same global batch, and a sharded run stopped and resumed ends exactly where the
uninterrupted sharded run does (checkpoints are gathered into the usual format)."""

from __future__ import annotations

import json

import torch
import transformers
from _ddp import run_processes, train_two_processes_and_one
from _tiny import build_bpe_tokenizer
from safetensors.torch import load_file

from fastdistill.train import checkpoint as ckpt
from fastdistill.train.demo import CORPUS
from fastdistill.train.student import init_student_from_teacher

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _inputs(root):
    lines = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()][:200]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    tok = build_bpe_tokenizer([root / "text.txt"], 300, root / "tok", style="gpt2")
    tok.chat_template = TEMPLATE
    short = [" ".join(line.split()[:6]) for line in lines]
    chats = [
        {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
        for a, b in zip(short[0::2], short[1::2], strict=True)
    ]
    (root / "train.jsonl").write_text("\n".join(map(json.dumps, chats)) + "\n")
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(config)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return teacher


def _common(root, **kw):
    base = dict(
        task="llm",
        teacher=str(root / "teacher"),
        train_files=[str(root / "train.jsonl")],
        max_length=192,
        gradient_accumulation_steps=2,
        max_steps=4,
        log_interval=2,
        save_interval=2,
        learning_rate=3e-3,
        warmup_steps=1,
        teacher_dtype="float32",
        divergence="reverse_kl",
        alpha_ce=0.5,
        parallel="fsdp",
        fused_linear=False,  # FSDP2 shards the heads the fused linear loss reads
        progress_bar=False,
        tensorboard=False,
        device="cpu",
    )
    return base | kw


def test_two_fsdp_processes_equal_one_process(tmp_path):
    teacher = _inputs(tmp_path)
    one = train_two_processes_and_one(tmp_path, _common(tmp_path), global_batch=4)
    assert one["steps"] == 4
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    init = init_student_from_teacher(teacher).state_dict()
    assert a.keys() == b.keys()
    for k in a:  # all-reduce order differs: compare within round-off of the update
        update = (a[k] - init[k]).norm()
        assert (b[k] - a[k]).norm() <= 1e-3 * update + 1e-6, k
    state = ckpt.verify_checkpoint(ckpt.latest_checkpoint(tmp_path / "two"))
    assert state["step"] == 4  # the gathered checkpoint verifies like any other


def test_fsdp_resume_is_exact(tmp_path):
    _inputs(tmp_path)
    whole = _common(
        tmp_path, output_dir=str(tmp_path / "whole"), cache_dir=str(tmp_path / "c"), batch_size=2
    )
    run_processes(whole)
    split = dict(whole, output_dir=str(tmp_path / "split"))
    run_processes(split, stop_at=3)  # step 3 is lost; the step-2 checkpoint remains
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step-00000002"
    run_processes(dict(split, resume=True))
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
