"""Triton kernels, one module per op (``fastdistill/triton/<op>.py``), added by the GPU-kernel work
(issue 3). ``fastdistill.backend`` looks for a module named after the op to know whether the
``triton`` backend can serve it; none exists yet."""
