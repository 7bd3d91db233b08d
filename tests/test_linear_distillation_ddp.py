"""linear_distillation_loss under DDP: two gloo processes, each with half of the tokens and the
global token count as normaliser, give the whole batch's gradient of the hidden layer, the head
weight and the bias (the op is an ordinary autograd input-to-gradient map for DDP's hooks)."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

import fastdistill.losses as FL

N, H, V, HT = 24, 8, 37, 6


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, x, labels, t_hidden, t_weight, normalizer):
        total, _, _ = FL.linear_distillation_loss(
            torch.tanh(self.proj(x)), self.head.weight, student_bias=self.head.bias,
            teacher_hidden=t_hidden, teacher_weight=t_weight, labels=labels,
            divergence="jsd", alpha_ce=0.5, normalizer=normalizer, chunk_size=5,
        )  # fmt: skip
        return total


def _data():
    g = torch.Generator().manual_seed(7)
    x, th = torch.randn(N, H, generator=g), torch.randn(N, HT, generator=g)
    tw = torch.randn(V, HT, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    torch.manual_seed(3)
    return Student(), x, th, tw, labels


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, th, tw, labels = _data()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        n = (labels != -100).sum()
        part = slice(rank * N // world, (rank + 1) * N // world)
        # DDP averages the gradients over processes: scale by world to get the sum.
        loss = ddp(x[part], labels[part], th[part], tw, n) * world
        loss.backward()
        if rank == 0:
            torch.save(_grads(model), os.path.join(out, "grads.pt"))
        # Tear down together: a process that destroys its gloo group while the other still holds
        # the connection can abort in gloo's destructor ("terminate called without an active
        # exception"), failing the run after the gradients were right.
        del ddp
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_gives_the_whole_batch_gradient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    model, x, th, tw, labels = _data()
    model(x, labels, th, tw, None).backward()
    got = torch.load(tmp_path / "grads.pt")
    for g, ref in zip(got, _grads(model), strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
