"""fastdistill::all_finite: one 0-dim bool tensor, true when no element of any input is NaN or
±inf. The result stays on the inputs' device, so a trainer can gate its optimizer step on it
(``torch.where``) without a host sync. Integer and bool tensors are finite by definition."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.backend import select_backend
from fastdistill.ops._common import unsupported


def float_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors that can hold NaN/inf: floating point, and complex viewed as real pairs."""
    out = []
    for t in tensors:
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_floating_point():
            out.append(t)
    return out


@torch.library.custom_op("fastdistill::all_finite", mutates_args=())
def all_finite(tensors: list[Tensor]) -> Tensor:
    device = tensors[0].device
    floats = float_tensors(tensors)
    backend = select_backend("all_finite", device)
    if not floats:
        return torch.ones((), dtype=torch.bool, device=device)
    if backend == "native" and device.type == "cpu":
        core = _native.core()
        ok = True
        for t in floats:
            code = _native.DTYPE_CODES.get(t.dtype)
            if code is None:  # e.g. float8: no bit-level kernel; use torch for it
                ok = ok and bool(torch.isfinite(t).all())
            else:
                t = t.contiguous()
                ok = ok and core.all_finite(t.data_ptr(), t.numel(), code, _native.num_threads())
            if not ok:
                break
        return torch.tensor(ok, dtype=torch.bool)
    raise unsupported(f"all_finite has no {backend} kernel for {device.type}")


@all_finite.register_fake
def _(tensors):
    return torch.empty((), dtype=torch.bool, device=tensors[0].device)
