"""--task squad under DDP: two gloo processes (as torchrun starts them) build the feature cache
once (rank 0) and end with the weights of one process that sees the same global batches."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from _ddp import train_two_processes_and_one
from _tiny import tiny_squad_inputs
from safetensors.torch import load_file

from fastdistill.train import TrainConfig

DEV = Path(__file__).parent / "data" / "dev-v2.0.json"


def test_two_processes_build_the_cache_once_and_match_one_process(tmp_path):
    paths = tiny_squad_inputs(tmp_path / "in", [DEV])
    common = dict(
        task="squad",
        student_config=paths["student_config"],
        tokenizer=paths["tokenizer"],
        train_files=[str(DEV)],
        max_length=96,
        doc_stride=48,
        max_query_length=24,
        gradient_accumulation_steps=2,
        max_steps=2,
        log_interval=2,
        save_interval=2,
        learning_rate=3e-3,
        warmup_steps=1,
        progress_bar=False,
        tensorboard=False,
        device="cpu",
    )
    train_two_processes_and_one(tmp_path, common, global_batch=8)
    assert [p.name.startswith("squad-") for p in (tmp_path / "c2").iterdir()] == [True]
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    torch.manual_seed(TrainConfig.seed)  # the student's initialisation, as the runs drew it
    config = transformers.AutoConfig.from_pretrained(paths["student_config"])
    init = transformers.AutoModelForQuestionAnswering.from_config(config).state_dict()
    compared = 0
    for k in a:
        update = (a[k] - init[k]).norm()
        # A constant added to every position (the start/end bias of qa_outputs, a key bias, the
        # last LayerNorm's bias) does not change a softmax: those parameters' true gradient is 0,
        # they get round-off, which Adam turns into tiny steps of random sign. Not comparable.
        if update < 1e-4 * a[k].numel() ** 0.5:
            continue
        # The processes sum gradients in another order (all-reduce): compare the updates.
        assert (b[k] - a[k]).norm() <= 1e-3 * update + 1e-6, k
        compared += 1
    assert compared >= len(a) // 2
