"""Fault injection for the trainer tests: run ``train`` in a child process that SIGKILLs itself
at a chosen point (inside a checkpoint write, between the directory rename and the ``latest``
marker, during the final evaluation, after an optimizer step, or after a random delay)."""

from __future__ import annotations

import os
import random
import signal
import threading


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def run_and_die(config: dict, point: str, n: int) -> None:
    """Child process body: train ``config``; die at the ``n``-th ``point``."""
    import torch

    torch.set_num_threads(1)
    from fastdistill.train import TrainConfig, checkpoint, train
    from fastdistill.train.tasks.mlm import MLMTask

    calls = {"n": 0}

    def nth() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    if point == "seal":  # every file written and fsynced, before the directory rename
        real_seal = checkpoint._seal

        def seal(tmp):
            real_seal(tmp)
            if nth():
                _die()

        checkpoint._seal = seal
    elif point == "marker":  # the checkpoint renamed into place, `latest` not yet replaced
        real_write = checkpoint.fsutil.write_text_atomic

        def write(path, text):
            if path.name == checkpoint.LATEST and nth():
                _die()
            real_write(path, text)

        checkpoint.fsutil.write_text_atomic = write
    elif point == "final_eval":  # the evaluation after the last step, before final/ is written
        real_eval = MLMTask.evaluate

        def evaluate(self, *a, **k):
            if not k.get("score_teacher") and nth():
                _die()
            return real_eval(self, *a, **k)

        MLMTask.evaluate = evaluate
    elif point == "timer":  # anywhere, after a random delay (seeded by n)
        delay = random.Random(n).uniform(1.0, 6.0)
        threading.Timer(delay, _die).start()
    on_step_end = None
    if point == "step":

        def on_step_end(step):
            if step == n:
                _die()

    train(TrainConfig.from_dict(config), on_step_end=on_step_end)
