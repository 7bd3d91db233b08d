"""fastdistill: fused, memory-lean knowledge-distillation losses and a distillation trainer."""

import os

__version__ = "0.1.0"

# The compiled core links the system's OpenMP runtime and torch ships its own: two runtimes whose
# idle threads spin (OpenMP's default wait policy) starve each other and any other process on the
# machine, making torch ops after a fastdistill call, and vice versa, many times slower. Threads
# that sleep when idle cost microseconds per parallel region. A value the user set is kept; the
# runtimes read it when they load, so it is set before the core (and, if not yet, torch) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastdistill import losses  # noqa: E402,F401  (registers the torch.library ops)
from fastdistill._buffers import empty_cache  # noqa: E402,F401  (release pooled CPU gradient buffers)
