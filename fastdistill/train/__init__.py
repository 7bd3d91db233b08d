"""``fastdistill-train``: distil a Hugging Face teacher into a smaller student with the DistilBERT
recipe (soft-target KL at temperature T, hard MLM/CLM loss, logit MSE, hidden-state cosine), using
the fused losses of :mod:`fastdistill.losses`.

Modules, in the order a run uses them: ``config`` (general keys; ``fields`` their checks, ``flags``
the generated command line), ``tasks`` (the task registry and one module per task: models, data,
loss, evaluation), ``cache`` (the token cache every task uses), ``batching`` (which examples each
process sees in each step), ``student`` (students initialised from teacher layers), ``trainer``
(the distiller, in phases; ``runtime`` and ``interval`` its pieces), ``checkpoint``, ``metrics``
(JSONL, tensorboard, figure), ``demo`` (the embedded default run) and ``cli``. ARCHITECTURE.md at
the repository root describes the layers and how to add a task.
"""

from fastdistill.train.config import TrainConfig

__all__ = ["TrainConfig", "TrainingError", "train"]


def __getattr__(name):  # the trainer imports transformers; keep `import fastdistill.train` light
    if name in ("train", "TrainingError"):
        from fastdistill.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
