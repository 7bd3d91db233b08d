"""What fastdistill is measured against: the seed trainer's eager formulas, ``torch.compile`` of
them, and (on a GPU, when importable) Liger-Kernel's kl_div pipelines (LigerKLDIVLoss, and LigerJSD
at beta=0).

The eager formulas are copied in meaning from the DistilBERT distiller the project replaces:

    loss_ce  = KLDivLoss(reduction="batchmean")(log_softmax(s / T), softmax(t / T)) * T**2
    loss_mlm = cross_entropy(s, labels)                       (ignore_index=-100)
    loss_mse = MSELoss(reduction="sum")(s, t) / rows
    loss_cos = CosineEmbeddingLoss()(s_hidden, t_hidden, ones)

with rows chosen by ``masked_select`` when an attention mask is given, as the seed does. They run
in the inputs' dtype (the seed under fp16/bf16 autocast-free training computes in that dtype).

Every function takes ``(student, teacher, labels, mask)`` positionally so that fastdistill, eager
and compiled variants are interchangeable in the benchmarks; a function returns its loss (a tuple
whose first element is the loss for ``distillation``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastdistill.losses as fdl

from .shapes import ALPHAS, TEMPERATURE

LossFn = Callable[..., Tensor | tuple[Tensor, ...]]

OPS = (
    "kl_div", "kl_div_masked", "mse", "cross_entropy", "cosine", "distillation",
    "reverse_kl", "jsd", "tvd",
)  # fmt: skip
# The LLM divergences: no T² (TRL's convention), batchmean over all rows, JSD at this beta.
DIVERGENCE_OPS = ("reverse_kl", "jsd", "tvd")
JSD_BETA = 0.5


# ---- the seed's eager formulas ---------------------------------------------------------------


def _select_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The seed's row selection: masked_select of the full (N, V) tensor (a copy), then a view."""
    if mask is None:
        return x
    expanded = mask.unsqueeze(-1).expand_as(x)
    return torch.masked_select(x, expanded).view(-1, x.size(-1))


def eager_kl_div(
    s: Tensor,
    t: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = TEMPERATURE,
) -> Tensor:
    s, t = _select_rows(s, mask), _select_rows(t, mask)
    kl = nn.KLDivLoss(reduction="batchmean")
    return kl(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1)) * (
        temperature**2
    )


def eager_mse(
    s: Tensor, t: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    s, t = _select_rows(s, mask), _select_rows(t, mask)
    return nn.MSELoss(reduction="sum")(s, t) / s.size(0)


def eager_cross_entropy(
    s: Tensor, t: Tensor | None, labels: Tensor, mask: Tensor | None = None
) -> Tensor:
    return F.cross_entropy(s.view(-1, s.size(-1)), labels.view(-1))  # ignore_index=-100


def eager_cosine(
    s: Tensor, t: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    s, t = _select_rows(s, mask), _select_rows(t, mask)
    target = s.new_ones(s.size(0))
    return nn.CosineEmbeddingLoss(reduction="mean")(s, t, target)


def eager_distillation(
    s: Tensor,
    t: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    temperature: float = TEMPERATURE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """alpha_kl * loss_ce + alpha_ce * loss_mlm + alpha_mse * loss_mse, as the seed sums them."""
    kl = eager_kl_div(s, t, None, mask, temperature)
    ce = eager_cross_entropy(s, None, labels)
    mse = eager_mse(s, t, None, mask)
    total = ALPHAS["alpha_kl"] * kl + ALPHAS["alpha_ce"] * ce + ALPHAS["alpha_mse"] * mse
    return total, kl.detach(), ce.detach(), mse.detach()


# The LLM divergences as TRL's GKD trainer writes them (generalized_jsd_loss: log_softmax of both
# sides at T, F.kl_div with log_target, the mixture by logsumexp of a stacked pair), reduced by
# batchmean over all rows; TVD as the usual half L1 distance of the two softmaxes.


def eager_reverse_kl(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_pt, log_ps, reduction="none", log_target=True)  # KL(student ‖ teacher)
    return kl.sum() / s.size(0)


def eager_jsd(s, t, labels=None, mask=None, temperature: float = TEMPERATURE, beta=JSD_BETA):
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    b = torch.tensor(beta, dtype=log_ps.dtype, device=log_ps.device)
    log_m = torch.logsumexp(torch.stack([log_ps + torch.log1p(-b), log_pt + torch.log(b)]), dim=0)
    kl_t = F.kl_div(log_m, log_pt, reduction="none", log_target=True)
    kl_s = F.kl_div(log_m, log_ps, reduction="none", log_target=True)
    return (b * kl_t + (1 - b) * kl_s).sum() / s.size(0)


def eager_tvd(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    ps = F.softmax(s / temperature, dim=-1)
    pt = F.softmax(t / temperature, dim=-1)
    return 0.5 * (ps - pt).abs().sum() / s.size(0)


def eager_all_finite(
    s: Tensor, t: Tensor, labels: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """The plain-PyTorch finite check of both tensors (what a NaN guard without a host sync
    does): one isfinite + all reduction per tensor, combined on the device. GPU benchmark only."""
    return torch.isfinite(s).all() & torch.isfinite(t).all()


EAGER: dict[str, LossFn] = {
    "kl_div": eager_kl_div,
    "kl_div_masked": eager_kl_div,
    "mse": eager_mse,
    "cross_entropy": eager_cross_entropy,
    "cosine": eager_cosine,
    "distillation": eager_distillation,
    "all_finite": eager_all_finite,
    "reverse_kl": eager_reverse_kl,
    "jsd": eager_jsd,
    "tvd": eager_tvd,
}


# ---- fastdistill, in the same calling convention --------------------------------------------


def fd_kl_div(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    return fdl.kl_div_loss(s, t, temperature=temperature, mask=mask)


def fd_mse(s, t, labels=None, mask=None):
    return fdl.mse_loss(s, t, mask=mask)


def fd_cross_entropy(s, t, labels, mask=None):
    return fdl.cross_entropy(s, labels)


def fd_cosine(s, t, labels=None, mask=None):
    return fdl.cosine_loss(s, t, mask=mask)


def fd_distillation(s, t, labels, mask=None, temperature: float = TEMPERATURE):
    return fdl.distillation_loss(s, t, labels=labels, mask=mask, temperature=temperature, **ALPHAS)


def fd_all_finite(s, t, labels=None, mask=None):
    return fdl.all_finite(s, t)


def fd_reverse_kl(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    return fdl.reverse_kl_loss(s, t, temperature=temperature)


def fd_jsd(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    return fdl.jsd_loss(s, t, beta=JSD_BETA, temperature=temperature)


def fd_tvd(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    return fdl.tvd_loss(s, t, temperature=temperature)


FASTDISTILL: dict[str, LossFn] = {
    "kl_div": fd_kl_div,
    "kl_div_masked": fd_kl_div,
    "mse": fd_mse,
    "cross_entropy": fd_cross_entropy,
    "cosine": fd_cosine,
    "distillation": fd_distillation,
    "all_finite": fd_all_finite,
    "reverse_kl": fd_reverse_kl,
    "jsd": fd_jsd,
    "tvd": fd_tvd,
}


# ---- torch.compile of the eager formulas ----------------------------------------------------

_COMPILED: dict[tuple, LossFn] = {}


def _raise_recompile_limit(limit: int = 256) -> None:
    # The compiled baselines share one Python function per op, and dynamo counts cache entries
    # per code object; one entry per (shape, dtype, requires_grad) quickly exceeds the default of
    # 8, after which dynamo silently falls back to eager. Raise it so every case is compiled.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * limit)


def compiled(op: str, key: tuple = (), dynamic: bool = False) -> LossFn:
    """``torch.compile`` of the eager formula for ``op``, one compiled object per ``key``.

    ``dynamic=False`` (the default) specialises to each shape: torch.compile's best case, as a
    training loop with fixed shapes gets it. Compilation happens on the first call; callers warm
    up outside the timed region.
    """
    cache_key = (op, dynamic, *key)
    fn = _COMPILED.get(cache_key)
    if fn is None:
        _raise_recompile_limit()
        fn = torch.compile(EAGER[op], dynamic=dynamic)
        _COMPILED[cache_key] = fn
    return fn


# ---- Liger-Kernel (GPU peer; Triton kernels, CUDA only) --------------------------------------


def liger_status(device: torch.device | str = "cpu") -> str | None:
    """None when Liger-Kernel's kl_div can run on ``device``, else the reason it cannot."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed (it is a GPU library: Triton kernels, CUDA only)"
    try:
        import liger_kernel  # noqa: F401
    except Exception as exc:  # a broken install must not take the suite down
        return f"import liger_kernel failed: {exc!r}"
    if torch.device(device).type != "cuda":
        return "Liger-Kernel's Triton kernels run only on CUDA tensors"
    return None


def liger_kl_div(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    """Liger's kl_div pipeline: torch log_softmax/softmax, then LigerKLDIVLoss (batchmean) x T²."""
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    s, t = _select_rows(s, mask), _select_rows(t, mask)
    loss = LigerKLDIVLoss(reduction="batchmean")
    return loss(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1)) * (
        temperature**2
    )


def liger_jsd_forward_kl(s, t, labels=None, mask=None, temperature: float = TEMPERATURE):
    """Liger's fused JSD kernel at beta=0, which is KL(teacher ‖ student), times T²."""
    from liger_kernel.transformers.jsd import LigerJSD

    s, t = _select_rows(s, mask), _select_rows(t, mask)
    jsd = LigerJSD(beta=0.0)
    return jsd(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)) * (
        temperature**2
    )


LIGER: dict[str, LossFn] = {"kl_div": liger_kl_div, "kl_div_masked": liger_kl_div}

# The GPU benchmark times both of Liger's routes to KL(teacher ‖ student), by implementation
# name: torch's log_softmax/softmax + LigerKLDIVLoss, and torch's two log_softmaxes
# + LigerJSD(beta=0) (Liger's fused forward-KL kernel, which writes the gradient in its forward).
# Both materialise the (log-)probabilities in torch first: that is Liger's pipeline, and its cost.
LIGER_PIPELINES: dict[str, LossFn] = {
    "liger-kldiv": liger_kl_div,
    "liger-jsd": liger_jsd_forward_kl,
}


def liger_version() -> str | None:
    """The installed Liger-Kernel version, or None when it is not installed."""
    import importlib.metadata

    for dist in ("liger-kernel", "liger-kernel-nightly"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
