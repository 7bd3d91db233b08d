"""Reuse of the large CPU gradient buffers the fused losses return.

A fused loss writes one logits-sized gradient per call. On CPU every such allocation is fresh memory
from the kernel (glibc maps large blocks with mmap and unmaps them on free), so each training step
pays first-touch page faults and the kernel's page zeroing for it: ~10-25 ms per 256 MB here, a
quarter of the whole fused kernel. GPUs have a caching allocator for this; PyTorch's CPU allocator
has none. This module is a small one for our own outputs only: a gradient tensor is a view of a
pooled block, and when the last tensor viewing it dies (autograd is done with it, or the user drops
``.grad``), the block returns to the pool for the next call instead of going back to the kernel.

The pool keeps at most ``MAX_FREE_BLOCKS`` unused blocks (the largest recent sizes), so steady-state
memory is what one training step already needed. ``empty_cache()`` releases them.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from fastdistill import _native

# Below this, malloc's own free lists already recycle memory and faults are cheap.
MIN_POOLED_BYTES = 8 << 20
# One block in use by autograd while the next forward runs, one spare: enough for a loss per step.
MAX_FREE_BLOCKS = 2

_lock = threading.Lock()
_free: list[np.ndarray] = []  # unused blocks (uint8 arrays), reusable


def _release(block: np.ndarray) -> None:
    with _lock:
        _free.append(block)
        if len(_free) > MAX_FREE_BLOCKS:
            _free.sort(key=lambda b: b.nbytes)
            del _free[0]  # drop the smallest: keep the sizes that recur in big steps


def _take(nbytes: int) -> np.ndarray:
    """A free block of at least ``nbytes`` (and not wastefully larger), or a new one."""
    with _lock:
        best = None
        for i, block in enumerate(_free):
            if nbytes <= block.nbytes <= 2 * nbytes and (
                best is None or block.nbytes < _free[best].nbytes
            ):
                best = i
        if best is not None:
            return _free.pop(best)
    block = np.empty(nbytes, dtype=np.uint8)
    if _native.available():
        # Huge pages make the one-time first touch ~2x cheaper (fewer, larger faults).
        _native.core().advise_hugepages(block.ctypes.data, nbytes)
    return block


def empty_cpu(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on CPU, backed by a pooled block when large."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_POOLED_BYTES:
        return torch.empty(shape, dtype=dtype)
    block = _take(nbytes)
    view = block[:nbytes]  # the object whose death returns `block` to the pool
    weakref.finalize(view, _release, block)
    return torch.from_numpy(view).view(dtype).view(shape)


def empty_cache() -> None:
    """Release every unused pooled block to the operating system."""
    with _lock:
        _free.clear()
