"""DistillationTrainer under DDP: two gloo processes started as torchrun starts them give the
gradient of the whole step's batch (its own file: each process imports torch and transformers,
about ten seconds)."""

from __future__ import annotations

import socket

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_integrations_transformers import (  # noqa: E402
    DistillationTrainer,
    _args,
    _close,
    _data,
    _model,
    _train,
    eager_loss,
)


def _ddp_worker(rank: int, world: int, port: int, out: str, options: dict) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    args = _args(out, per_device_train_batch_size=1, max_steps=1)
    trainer, grads = _train(
        DistillationTrainer, None, None, _data(4, causal=True), args=args, **options
    )
    assert trainer.args.world_size == world
    if rank == 0:
        torch.save(grads[0], f"{out}/grads.pt")
    # Tear the gloo group down together: a process exiting while the other still holds the
    # connection can abort in gloo's destructor ("terminate called without an active exception")
    # after correct gradients.
    del trainer
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_give_the_whole_batch_gradient(tmp_path):
    """Two gloo processes (as torchrun starts them), one sequence per micro-batch, two
    micro-batches each: the averaged gradient is that of the 4 sequences' mean, counted over
    both processes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = dict(divergence="reverse_kl", alpha_ce=0.5)
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), options), nprocs=2, join=True)
    got = torch.load(tmp_path / "grads.pt", weights_only=True)

    data = _data(4, causal=True)
    student, teacher = _model("gpt2", 16, seed=0), _model("gpt2", 32, seed=1)
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s, t = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1].detach()
    target = batch["labels"][:, 1:]
    o = dict(beta=0.5, temperature=1.0, t2_scale=False, alpha_kd=1.0, **options)
    loss, _ = eager_loss(o, s, t, target, target != -100, None)
    loss.backward()
    _close(got, [p.grad for p in student.parameters()])
