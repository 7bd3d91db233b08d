"""fastdistill: fused, memory-lean knowledge-distillation losses and a distillation trainer."""

__version__ = "0.1.0"

from fastdistill import losses  # noqa: E402,F401  (registers the torch.library ops)
from fastdistill._buffers import empty_cache  # noqa: E402,F401  (release pooled CPU gradient buffers)
