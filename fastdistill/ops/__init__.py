"""torch.library registrations of the fastdistill ops, one file per op.

Importing this package registers ``torch.ops.fastdistill.*``. Users call ``fastdistill.losses``;
the ops take already-validated arguments and return the loss with the saved student gradient.
"""

from fastdistill.ops import (  # noqa: F401
    all_finite,
    cosine,
    cross_entropy,
    distillation,
    distillation_divergence,
    jsd,
    kl_div,
    linear_distillation,
    linear_topk_distillation,
    mse,
    reverse_kl,
    topk_kl,
    tvd,
)
