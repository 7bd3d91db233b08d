"""The peak-memory method (bench/memory.py) checked on allocations of known size, so the memory
ratios the suites report can be trusted."""

from __future__ import annotations

import torch

from .memory import check_method, check_untracked, peak_extra_memory


def test_known_pattern():
    res = check_method()
    assert res.n_events >= 4


def test_temporaries_and_outputs():
    n = 1_000_000

    def f():
        a = torch.empty(n)  # freed: counts for the peak only
        b = torch.empty(2 * n)  # returned: counts for peak and end
        del a
        c = torch.empty(n)  # reuses nothing: a third block while b is alive
        del c
        return b

    res = peak_extra_memory(f)
    slack = 64 << 10  # Python objects of the call, counted by tracemalloc
    assert abs(res.peak_bytes - 3 * n * 4) <= slack
    assert abs(res.end_bytes - 2 * n * 4) <= slack
    assert res.allocator_peak_bytes == 3 * n * 4


def test_backward_gradient_counts():
    x0 = torch.randn(1000, 500)

    def f():
        x = x0.detach().requires_grad_()
        x.exp().sum().backward()
        return x.grad

    res = peak_extra_memory(f)
    # exp's result is saved for the backward, which allocates the gradient (grad * result) while
    # it is alive: peak two tensors; the saved result is freed with the graph: one remains.
    slack = 64 << 10
    assert abs(res.peak_bytes - 2 * x0.nbytes) <= slack
    assert abs(res.end_bytes - x0.nbytes) <= slack


def test_untracked_allocation_counts():
    # A pooled gradient (numpy memory behind a tensor) is invisible to the allocator events;
    # tracemalloc must see it.
    res = check_untracked()
    assert res.source == "python"
    assert res.allocator_peak_bytes < 4096
