"""``fastdistill-train``: distil a Hugging Face teacher into a smaller student with the DistilBERT
recipe (soft-target KL at temperature T, hard MLM/CLM loss, logit MSE, hidden-state cosine), using
the fused losses of :mod:`fastdistill.losses`.

Modules, in the order a run uses them: ``config`` (the dataclass and its command line), ``data``
(text → cached tokens → batches, MLM masking), ``student`` (students initialised from teacher
layers), ``loop`` (the distiller), ``checkpoint``, ``metrics`` (JSONL, tensorboard, figure),
``demo`` (the embedded default run) and ``cli``. The question-answering task (``--task squad``):
``squad_data`` (SQuAD files → windows, feature cache, batches), ``squad`` (its loss and
evaluation), ``squad_decode`` (logits → answers) and ``squad_metrics`` (the official metrics).
"""

from fastdistill.train.config import TrainConfig

__all__ = ["TrainConfig", "TrainingError", "train"]


def __getattr__(name):  # the loop imports transformers; keep `import fastdistill.train` light
    if name in ("train", "TrainingError"):
        from fastdistill.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
