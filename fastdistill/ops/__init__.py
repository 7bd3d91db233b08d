"""torch.library registrations of the fastdistill ops (one file per op).

Importing this package registers ``torch.ops.fastdistill.*``. Users call ``fastdistill.losses``.
"""

from fastdistill.ops import kl_div  # noqa: F401
