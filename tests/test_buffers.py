"""The CPU gradient-buffer pool: blocks are reused only after every tensor viewing them is gone."""

import gc

import torch

from fastdistill import _buffers
from fastdistill.losses import kl_div_loss

ROWS, V = 256, 8192  # 8 MiB of fp32: just at the pooling threshold


def _grad_of_fresh_loss(s, t):
    s.grad = None
    kl_div_loss(s, t, temperature=2.0).backward()
    return s.grad


def test_block_reused_after_release_and_never_while_alive():
    assert ROWS * V * 4 >= _buffers.MIN_POOLED_BYTES
    _buffers.empty_cache()
    s = torch.randn(ROWS, V, requires_grad=True)
    t = torch.randn(ROWS, V)
    first = _grad_of_fresh_loss(s, t)
    kept = first.clone()
    ptr = first.data_ptr()
    # `first` is still alive: the next call must not write into its memory.
    s.grad = None
    second = _grad_of_fresh_loss(s, t)
    assert second.data_ptr() != ptr
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    # Drop both: the next call reuses one of their blocks and is still exact.
    del first, second
    s.grad = None
    gc.collect()
    third = _grad_of_fresh_loss(s, t)
    torch.testing.assert_close(third, kept, rtol=0, atol=0)
    assert len(_buffers._free) <= _buffers.MAX_FREE_BLOCKS


def test_empty_cache_and_small_tensors_bypass_pool():
    _buffers.empty_cache()
    assert _buffers._free == []
    small = _buffers.empty_cpu(torch.Size([4, 5]), torch.bfloat16)
    assert small.shape == (4, 5) and small.dtype == torch.bfloat16
    big = _buffers.empty_cpu(torch.Size([2, _buffers.MIN_POOLED_BYTES // 4]), torch.bfloat16)
    assert big.shape == (2, _buffers.MIN_POOLED_BYTES // 4) and big.dtype == torch.bfloat16
    big.fill_(1.5)
    assert float(big[1, -1]) == 1.5
    del big
    gc.collect()
    assert len(_buffers._free) == 1
    _buffers.empty_cache()
    assert _buffers._free == []
