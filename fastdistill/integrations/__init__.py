"""Integrations with the trainers people already use. Each submodule imports its framework, so
importing ``fastdistill`` (or this package) never does:

- ``fastdistill.integrations.transformers``: ``DistillationTrainer``, a ``transformers.Trainer``
  that distils a teacher with the fused losses (``pip install fastdistill[hf]``).
- ``fastdistill.integrations.trl``: ``generalized_jsd_loss``, TRL's function of that name backed
  by the fused JSD op, and ``GKDTrainer``, TRL's GKD trainer using it (``pip install
  fastdistill[trl]``).
"""
