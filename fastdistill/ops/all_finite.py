"""fastdistill::all_finite: one 0-dim bool tensor, true when no element of any input is NaN or
±inf. The result stays on the inputs' device, so a trainer can gate its optimizer step on it
(``torch.where``) without a host sync. Integer and bool tensors are finite by definition."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.backend import select_backend
from fastdistill.ops._common import on_device, unsupported


def float_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors that can hold NaN/inf: floating point, and complex viewed as real pairs."""
    out = []
    for t in tensors:
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_floating_point():
            out.append(t)
    return out


def _all_finite_cpu(floats: list[Tensor]) -> Tensor:
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


def _all_finite_gpu(launch, floats: list[Tensor]) -> Tensor:
    """One device flag, cleared by any kernel that sees a non-finite element: no host sync."""
    device = floats[0].device  # all on one device (checked by fastdistill.losses.all_finite)
    flag = torch.ones(1, dtype=torch.int32, device=device)
    with on_device(device):
        for t in floats:
            if t.dtype in _native.DTYPE_CODES:
                launch(t.contiguous().view(-1), flag)
            else:  # e.g. float8: no kernel; fold torch's answer into the flag on the device
                flag.mul_(torch.isfinite(t).all().to(torch.int32))
    return flag[0] != 0


def _launch_triton(flat: Tensor, flag: Tensor) -> None:
    from fastdistill.triton import all_finite as kernel  # import only when used: needs triton

    kernel.launch(flat, flag)


def _launch_cuda(flat: Tensor, flag: Tensor) -> None:
    _native.core().all_finite_cuda(
        data=flat.data_ptr(),
        numel=flat.numel(),
        dtype=_native.DTYPE_CODES[flat.dtype],
        flag=flag.data_ptr(),
        stream=torch.cuda.current_stream(flat.device).cuda_stream,
    )


@torch.library.custom_op("fastdistill::all_finite", mutates_args=())
def all_finite(tensors: list[Tensor]) -> Tensor:
    device = tensors[0].device
    floats = float_tensors(tensors)
    backend = select_backend("all_finite", device)
    if not floats:
        return torch.ones((), dtype=torch.bool, device=device)
    if backend == "native" and device.type == "cpu":
        return _all_finite_cpu(floats)
    if backend == "native" and device.type == "cuda":
        return _all_finite_gpu(_launch_cuda, floats)
    if backend == "triton":
        return _all_finite_gpu(_launch_triton, floats)
    raise unsupported(f"all_finite has no {backend} kernel for {device.type}")


@all_finite.register_fake
def _(tensors):
    return torch.empty((), dtype=torch.bool, device=tensors[0].device)
