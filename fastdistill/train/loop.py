"""The distiller. ``train(config)`` runs one distillation from start (or a checkpoint) to the end;
it reads top to bottom: setup → models → data → optimizer → resume → loop → final save.

Loss normalisation. Every loss term is a mean over its tokens (KL/MSE over the attended or the
predicted tokens, CE over the labelled ones, cosine over the attended ones), taken over the whole
optimizer step: all micro-batches of the accumulation and all processes. The token counts come from
the host-side batch plan (masks are drawn per sequence with a known count), so each micro-batch's
term is weighted by ``local count / step count`` with no device sync, and the update is the same
whichever way a global batch is split over processes and micro-batches (the seed averaged
micro-batch means instead).

NaN/Inf. After the backward, ``all_finite(loss, grad_norm)`` gives a 0-dim bool on the device; the
fused AdamW takes it as ``found_inf`` and leaves parameters *and* its moments and step count
untouched when it is set (with fp16 the GradScaler does the same on its own overflow check). Skips
are counted on the device; the counters are read at the log interval, the only host sync, and a
run with ``max_consecutive_skips`` skips in a row stops there with :class:`TrainingError` (its last
checkpoint is the last good state: a skipped step changes nothing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastdistill import losses as FL
from fastdistill.train import checkpoint as ckpt
from fastdistill.train.config import TrainConfig
from fastdistill.train.data import (
    IGNORE_INDEX,
    BatchPlan,
    MLMMasker,
    TokenData,
    collate,
    load_or_build,
)
from fastdistill.train.metrics import MetricsLogger, plot_metrics
from fastdistill.train.squad import evaluate_squad, squad_loss
from fastdistill.train.squad_data import (
    FeatureSettings,
    collate_features,
    load_features,
    read_examples,
    resolve_version,
)
from fastdistill.train.student import count_parameters, init_student_from_teacher

log = logging.getLogger("fastdistill.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many consecutive non-finite steps)."""


# ---- small pieces ------------------------------------------------------------------------------


def _auto_class(task: str):
    import transformers

    return {
        "mlm": transformers.AutoModelForMaskedLM,
        "clm": transformers.AutoModelForCausalLM,
        "hidden": transformers.AutoModel,
        "squad": transformers.AutoModelForQuestionAnswering,
    }[task]


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG seed of one optimizer step (so a resumed run draws the same numbers)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def hidden_of(out) -> torch.Tensor:
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out.hidden_states[-1]


# ---- the loss ------------------------------------------------------------------------------------


def compute_loss(
    cfg: TrainConfig, s_out, t_out, batch, w: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, terms) for one micro-batch. ``w[term]`` scales a term's local mean into its share of
    the optimizer step's mean (× world size, undoing DDP's gradient average). ``terms`` =
    [kl, ce, mse, cos] as shares of the step's means, detached, for logging."""
    world = w["world"]
    attn = batch.attention_mask
    zero = attn.new_zeros((), dtype=torch.float32)
    kl = ce = mse = cos = zero
    total = None
    if cfg.task in ("mlm", "clm"):
        s_logits = s_out.logits
        alpha_ce = cfg.alpha_mlm if cfg.task == "mlm" else cfg.alpha_clm
        kl_mask = batch.pred_mask if (cfg.restrict_ce_to_mask and cfg.task == "mlm") else attn
        a_kl = cfg.alpha_kl * w["kl"] * world if t_out is not None else 0.0
        a_mse = cfg.alpha_mse * w["kl"] * world if t_out is not None else 0.0
        a_ce = alpha_ce * w["ce"] * world
        if cfg.loss_impl == "eager":
            total, kl, ce, mse = seed_logit_losses(
                cfg,
                s_logits,
                None if t_out is None else t_out.logits,
                batch,
                kl_mask,
                a_kl,
                a_ce,
                a_mse,
            )
        elif a_kl > 0 or a_ce > 0 or a_mse > 0:
            t_logits = t_out.logits if t_out is not None else s_logits.detach()
            total, kl, ce, mse = FL.distillation_loss(
                s_logits,
                t_logits,
                labels=batch.labels,
                mask=kl_mask,
                temperature=cfg.temperature,
                alpha_kl=a_kl,
                alpha_ce=a_ce,
                alpha_mse=a_mse,
                ignore_index=IGNORE_INDEX,
            )
        kl, ce, mse = kl * w["kl"], ce * w["ce"], mse * w["kl"]
    elif cfg.task == "squad":  # ce: the QA loss, (CE_start + CE_end) / 2
        total, kl, ce = squad_loss(cfg, s_out, t_out, batch, w)
    if t_out is not None and (cfg.alpha_cos > 0 or (cfg.task == "hidden" and cfg.alpha_mse > 0)):
        s_h, t_h = hidden_of(s_out), hidden_of(t_out)
        if cfg.alpha_cos > 0:
            if cfg.loss_impl == "eager":
                c = seed_cosine_loss(s_h, t_h, attn)
            else:
                c = FL.cosine_loss(s_h, t_h, mask=attn)
            total = _add(total, c * (cfg.alpha_cos * w["cos"] * world))
            cos = c.detach().float() * w["cos"]
        if cfg.task == "hidden" and cfg.alpha_mse > 0:
            m = FL.mse_loss(s_h, t_h, mask=attn, reduction="mean")
            total = _add(total, m * (cfg.alpha_mse * w["cos"] * world))
            mse = m.detach() * w["cos"]
    if total is None:  # no token of this micro-batch carries a loss: still a graph for DDP
        total = s_out[0].sum() * 0.0
    return total, torch.stack([kl, ce, mse, cos]).float()


def _add(a, b):
    return b if a is None else a + b


def seed_logit_losses(cfg, s_logits, t_logits, batch, kl_mask, a_kl, a_ce, a_mse):
    """The seed's eager formulas (distiller.py), for ``loss_impl: eager``: masked_select of the
    full-vocabulary logits, nn.KLDivLoss(batchmean) on log_softmax/softmax × T², CrossEntropyLoss,
    MSELoss(sum) / rows."""
    V = s_logits.size(-1)
    T = cfg.temperature
    total = s_logits.new_zeros((), dtype=torch.float32)
    kl = mse = total.detach()
    if t_logits is not None and (a_kl > 0 or a_mse > 0):
        sel = kl_mask.bool().unsqueeze(-1).expand_as(s_logits)
        s_sel = torch.masked_select(s_logits, sel).view(-1, V)
        t_sel = torch.masked_select(t_logits, sel).view(-1, V)
        if a_kl > 0:
            kl = (
                nn.KLDivLoss(reduction="batchmean")(
                    F.log_softmax(s_sel / T, dim=-1), F.softmax(t_sel / T, dim=-1)
                )
                * T**2
            )
            total = total + a_kl * kl
        if a_mse > 0:
            mse = nn.MSELoss(reduction="sum")(s_sel, t_sel) / s_sel.size(0)
            total = total + a_mse * mse
    ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(s_logits.view(-1, V), batch.labels.view(-1))
    if a_ce > 0:
        total = total + a_ce * ce
    return total, kl.detach().float(), ce.detach().float(), mse.detach().float()


def seed_cosine_loss(s_h, t_h, attn):
    dim = s_h.size(-1)
    sel = attn.bool().unsqueeze(-1).expand_as(s_h)
    s_sel = torch.masked_select(s_h, sel).view(-1, dim)
    t_sel = torch.masked_select(t_h, sel).view(-1, dim)
    target = s_sel.new_ones(s_sel.size(0))
    return nn.CosineEmbeddingLoss(reduction="mean")(s_sel, t_sel, target)


# ---- evaluation ------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(
    cfg: TrainConfig,
    student,
    teacher,
    data: TokenData | None,
    pad_id: int,
    masker: MLMMasker | None,
    device,
) -> dict[str, float]:
    """Held-out agreement with the teacher. mlm: on the predicted (masked) tokens; clm: on every
    next-token position: KL(teacher ‖ student) at T = 1, top-1 agreement, student (and teacher)
    accuracy. hidden: mean token cosine and mean-pooled sentence-embedding cosine."""
    if data is None or len(data) == 0:
        return {}
    was_training = student.training
    student.eval()
    n = min(len(data), cfg.eval_max_sequences)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(name, value, count):
        sums[name] = sums.get(name, 0.0) + float(value)
        counts[name] = counts.get(name, 0.0) + float(count)

    for start in range(0, n, cfg.batch_size):
        batch = collate(
            data,
            list(range(start, min(n, start + cfg.batch_size))),
            task=cfg.task,
            pad_id=pad_id,
            masker=masker,
            seed=cfg.seed,
            stream=0,
        ).to(device)
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        s_out = student(**kwargs)
        t_out = teacher(**kwargs) if teacher is not None else None
        if cfg.task == "hidden":
            m = batch.attention_mask.unsqueeze(-1).float()
            s_h, t_h = hidden_of(s_out).float(), hidden_of(t_out).float()
            add("token_cosine", (F.cosine_similarity(s_h, t_h, dim=-1) * m[..., 0]).sum(), m.sum())
            s_e, t_e = (s_h * m).sum(1) / m.sum(1), (t_h * m).sum(1) / m.sum(1)
            add("embedding_cosine", F.cosine_similarity(s_e, t_e, dim=-1).sum(), len(s_e))
            continue
        sel = batch.labels != IGNORE_INDEX
        s = s_out.logits[sel].float()
        labels = batch.labels[sel]
        k = int(sel.sum())
        add("accuracy", (s.argmax(-1) == labels).sum(), k)
        add("ce", F.cross_entropy(s, labels, reduction="sum"), k)
        if t_out is not None:
            t = t_out.logits[sel].float()
            add(
                "kl_to_teacher",
                F.kl_div(
                    F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"
                ),
                k,
            )
            add("top1_agreement", (s.argmax(-1) == t.argmax(-1)).sum(), k)
            add("teacher_accuracy", (t.argmax(-1) == labels).sum(), k)
    student.train(was_training)
    return {k: sums[k] / max(counts[k], 1.0) for k in sums}


# ---- the run ----------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, on_step_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the distillation described by ``cfg``; returns a summary (also RUN/summary.json).

    ``on_step_end(step)`` is called after every optimizer step (tests use it to interrupt a run).
    Raises ``ValueError`` for a bad configuration and :class:`TrainingError` when the run cannot go
    on."""
    import transformers

    cfg = cfg.resolved()
    transformers.utils.logging.disable_progress_bar()  # no per-save "Writing model shards" bars
    rank, world, local_rank = _distributed()
    is_main = rank == 0
    owns_group = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        owns_group = True
    try:
        return _train(cfg, rank, world, local_rank, is_main, transformers, on_step_end)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg, rank, world, local_rank, is_main, transformers, on_step_end):
    device = _device(cfg, local_rank)
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)

    # -- resume or start afresh ----------------------------------------------------------------
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume: {run_dir} holds no checkpoint to resume from")
    if (
        not cfg.resume
        and not cfg.do_eval
        and not cfg.overwrite_output_dir
        and ckpt.latest_checkpoint(run_dir) is not None
    ):
        raise ValueError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run or "
            "--overwrite-output-dir to start a new one there"
        )
    if not cfg.resume and not cfg.do_eval and is_main and ckpt.checkpoint_root(run_dir).exists():
        # --overwrite-output-dir: a new run must not mix its checkpoints with the old run's.
        shutil.rmtree(ckpt.checkpoint_root(run_dir))
    if world > 1:
        dist.barrier()
    state: dict[str, Any] = ckpt.load_trainer_state(resume_from) if resume_from else {}

    # -- models ----------------------------------------------------------------------------------------
    auto = _auto_class(cfg.task)
    student_dir = model_dir(cfg.student_pretrained) if cfg.student_pretrained else None
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        cfg.tokenizer or cfg.teacher or student_dir
    )
    teacher = None
    if cfg.teacher is not None:
        teacher = auto.from_pretrained(cfg.teacher).to(device).eval()
        teacher.requires_grad_(False)
    if resume_from is not None:
        student = auto.from_pretrained(resume_from / "model")
    elif cfg.student_pretrained:
        student = auto.from_pretrained(student_dir)
    elif cfg.student_config:
        student = auto.from_config(transformers.AutoConfig.from_pretrained(cfg.student_config))
    else:
        student = init_student_from_teacher(teacher, cfg.student_layers)
    student = student.to(device).train()
    if cfg.task == "hidden":
        # The hidden-state losses never reach a pooler (BERT/RoBERTa bare encoders have one): keep
        # it as initialised (the teacher's when copied) instead of giving DDP unused parameters.
        for name, p in student.named_parameters():
            if name.startswith("pooler.") or ".pooler." in name:
                p.requires_grad_(False)
    _check_models(cfg, tokenizer, student, teacher)

    # -- data (rank 0 tokenises and caches; the others read the cache) ----------------------------
    if cfg.task == "squad":
        # Questions are read first: the version flag (auto: v2 if any is unanswerable) is part of
        # the features' cache key.
        file_sets = [cfg.eval_files] if cfg.do_eval else [cfg.train_files, cfg.eval_files]
        examples = {tuple(f): read_examples(f) for f in file_sets if f}
        settings = FeatureSettings(
            max_length=cfg.max_length,
            doc_stride=cfg.doc_stride,
            max_query_length=cfg.max_query_length,
            v2=resolve_version(cfg.squad_version, list(examples.values())),
        )

        def build(files, build=True):
            return load_features(
                files,
                tokenizer,
                settings,
                cache_dir=cfg.cache_dir,
                build=build,
                examples=examples[tuple(files)],
            )
    else:
        data_kwargs = dict(
            task=cfg.task,
            max_length=cfg.max_length,
            min_length=cfg.min_length,
            max_unknown_fraction=cfg.max_unknown_fraction,
            cache_dir=cfg.cache_dir,
        )

        def build(files, build=True):
            return load_or_build(files, tokenizer, build=build, **data_kwargs)

    def load(files):
        if not files:
            return None
        if is_main:
            out = build(files)
        if world > 1:
            dist.barrier()
        return out if is_main else build(files, build=False)

    train_data = None if cfg.do_eval else load(cfg.train_files)
    eval_data = load(cfg.eval_files)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    masker = None
    if cfg.task == "mlm":
        if tokenizer.mask_token_id is None:
            raise ValueError("--task mlm needs a tokenizer with a mask token")
        counts = (train_data if train_data is not None else eval_data).counts
        masker = MLMMasker(
            counts,
            tokenizer.all_special_ids,
            tokenizer.mask_token_id,
            mask_prob=cfg.mlm_mask_prob,
            mask_token_prob=cfg.mlm_mask_token_prob,
            random_token_prob=cfg.mlm_random_token_prob,
            smoothing=cfg.mlm_smoothing,
        )
    # Held-out tokens to predict are chosen uniformly (the usual MLM evaluation), not with the
    # training smoothing that favours rare tokens.
    eval_masker = None
    if masker is not None:
        eval_masker = MLMMasker(
            counts,
            tokenizer.all_special_ids,
            tokenizer.mask_token_id,
            mask_prob=cfg.mlm_mask_prob,
            mask_token_prob=cfg.mlm_mask_token_prob,
            random_token_prob=cfg.mlm_random_token_prob,
            smoothing=0.0,
        )

    def run_eval(step: int, *, with_teacher: bool = True) -> dict[str, float]:
        """Held-out metrics of the student now. squad: the predictions go to RUN/eval/step-N, and
        the teacher (whose numbers do not change) is evaluated only ``with_teacher``."""
        if cfg.task == "squad":
            return evaluate_squad(
                cfg,
                student,
                teacher if with_teacher else None,
                eval_data,
                device,
                pad_id=pad_id,
                out_dir=run_dir / "eval" / f"step-{step:08d}" if is_main else None,
                teacher_dir=run_dir / "eval" / "teacher" if is_main else None,
            )
        return evaluate(cfg, student, teacher, eval_data, pad_id, eval_masker, device)

    if cfg.do_eval:
        return _evaluate_only(cfg, run_dir, is_main, world, run_eval)

    plan = BatchPlan(
        train_data.lengths,
        batch_size=cfg.batch_size,
        world_size=world,
        accum=cfg.gradient_accumulation_steps,
        seed=cfg.seed,
    )
    # Tokens behind each loss term, per sequence: the host-side normalisers (module doc).
    lengths = train_data.lengths
    n_pred = masker.num_predictions(train_data) if masker is not None else lengths - 1
    kl_count = n_pred if (cfg.restrict_ce_to_mask and cfg.task == "mlm") else lengths
    if cfg.task == "squad":  # one start and one end distribution per feature
        n_pred = kl_count = np.ones(len(train_data), dtype=np.int64)
    total_steps = cfg.max_steps or cfg.num_epochs * plan.steps_per_epoch
    warmup = (
        cfg.warmup_steps
        if cfg.warmup_steps is not None
        else math.ceil(cfg.warmup_ratio * total_steps)
    )

    # -- optimizer, schedule, precision ------------------------------------------------------------
    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms
    # fused=True: one kernel per step, and it honours `found_inf` on the device (the NaN skip).
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None

    step, epoch, step_in_epoch, skipped_total = 0, 0, 0, 0
    if resume_from is not None:
        ckpt.load_optimizer(optimizer, resume_from, state)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        skipped_total = state.get("skipped_total", 0)
        if state.get("total_steps") != total_steps:
            raise ValueError(
                f"the checkpoint was made for {state.get('total_steps')} steps, this "
                f"config gives {total_steps}: resume with the same data and step settings"
            )

    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )

    metrics = (
        MetricsLogger(run_dir, tensorboard=cfg.tensorboard, resume_step=step) if is_main else None
    )
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        log.info(
            "student %s: %.2fM parameters; teacher %s; %d sequences, %d steps/epoch, %d steps",
            type(student).__name__,
            count_parameters(student) / 1e6,
            "none" if teacher is None else f"{count_parameters(teacher) / 1e6:.2f}M",
            len(train_data),
            plan.steps_per_epoch,
            total_steps,
        )

    summary: dict[str, Any] = {}
    if resume_from is None:
        summary["eval_before"] = run_eval(step)
    else:
        summary["eval_before"] = state.get("eval_before", {})
    if is_main and summary["eval_before"]:
        metrics.log({"kind": "eval", "step": step, **summary["eval_before"]})
        log.info("held-out before: %s", _fmt(summary["eval_before"]))

    def save(at_step: int) -> None:
        if not is_main:
            return
        ckpt.save_checkpoint(
            run_dir,
            at_step,
            model=student,
            tokenizer=tokenizer,
            optimizer=optimizer,
            keep=cfg.keep_checkpoints,
            trainer_state={
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "total_steps": total_steps,
                "skipped_total": skipped_total,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "eval_before": summary["eval_before"],
                "config": cfg.to_dict(),
            },
        )

    # -- the loop -----------------------------------------------------------------------------------------
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    want_hidden = teacher is not None and cfg.task != "hidden" and cfg.alpha_cos > 0
    params = [p for p in student.parameters() if p.requires_grad]
    # Device-side accumulators, read once per log interval: [total, kl, ce, mse, cos], grad norm,
    # finite steps, skipped steps, consecutive skips now, most consecutive skips in the interval.
    dev_terms = torch.zeros(5, device=device)
    dev_gnorm = torch.zeros((), device=device)
    dev_ok = torch.zeros((), device=device)
    dev_skip = torch.zeros((), device=device)
    dev_consec = torch.zeros((), device=device)
    dev_max_consec = torch.zeros((), device=device)
    interval_tokens = 0
    interval_start = time.perf_counter()
    pbar = None
    if is_main and cfg.progress_bar:
        from tqdm.auto import tqdm

        pbar = tqdm(
            total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr
        )

    plan.set_epoch(epoch)
    epoch_steps = plan.steps(epoch)
    save_due = False
    try:
        while step < total_steps:
            if step_in_epoch >= len(epoch_steps):
                epoch, step_in_epoch = epoch + 1, 0
                plan.set_epoch(epoch)
                epoch_steps = plan.steps(epoch)
            micro_batches = epoch_steps[step_in_epoch]
            torch.manual_seed(step_seed(cfg.seed, step, rank))

            # Host-side normalisers of this optimizer step (module doc).
            step_idx = np.concatenate(micro_batches)
            denom = {
                "kl": kl_count[step_idx].sum(),
                "ce": n_pred[step_idx].sum(),
                "cos": lengths[step_idx].sum(),
            }
            step_loss = torch.zeros((), device=device)
            step_terms = torch.zeros(4, device=device)
            for i, micro in enumerate(micro_batches):
                idx = plan.local(micro, rank)
                if cfg.task == "squad":
                    batch = collate_features(train_data, idx, pad_id=pad_id)
                else:
                    batch = collate(
                        train_data,
                        idx,
                        task=cfg.task,
                        pad_id=pad_id,
                        masker=masker,
                        seed=cfg.seed,
                        stream=epoch + 1,
                    )
                batch = batch.to(device)
                interval_tokens += batch.num_tokens * world
                w = {
                    "world": world,
                    "kl": float(kl_count[idx].sum() / max(denom["kl"], 1)),
                    "ce": float(n_pred[idx].sum() / max(denom["ce"], 1)),
                    "cos": float(lengths[idx].sum() / max(denom["cos"], 1)),
                }
                last = i == len(micro_batches) - 1
                sync = model.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
                with sync:
                    states = want_hidden or None
                    with autocast:
                        if teacher is not None:
                            with torch.inference_mode():
                                t_out = teacher(
                                    **batch.model_inputs(teacher), output_hidden_states=states
                                )
                        else:
                            t_out = None
                        s_out = model(**batch.model_inputs(student), output_hidden_states=states)
                        loss, terms = compute_loss(cfg, s_out, t_out, batch, w)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.detach().float() / world
                step_terms += terms

            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            ok = FL.all_finite(step_loss, grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skips on its own inf check (the same grads)
                scaler.update()
            else:
                optimizer.found_inf = (~ok).float()  # fused AdamW: no update, no state change
                try:
                    optimizer.step()
                finally:
                    del optimizer.found_inf
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            okf = ok.float()
            dev_terms += torch.where(ok, torch.cat([step_loss.reshape(1), step_terms]), 0.0)
            dev_gnorm += torch.where(ok, grad_norm.float(), 0.0)
            dev_ok += okf
            dev_skip += 1 - okf
            dev_consec = torch.where(ok, 0.0, dev_consec + 1)
            dev_max_consec = torch.maximum(dev_max_consec, dev_consec)
            step += 1
            step_in_epoch += 1
            if pbar is not None:
                pbar.update(1)

            if step % cfg.log_interval == 0 or step == total_steps:
                # The one host sync per interval.
                if world > 1:  # each process holds its share of the step means: sum them
                    dist.all_reduce(dev_terms)
                values = torch.cat(
                    [
                        dev_terms,
                        torch.stack([dev_gnorm, dev_ok, dev_skip, dev_max_consec, dev_consec]),
                    ]
                ).tolist()
                total, kl, ce, mse, cos, gnorm, n_ok, n_skip, max_consec, consec_now = values
                now = time.perf_counter()
                skipped_total += int(n_skip)
                # Means over the interval's finite steps (null when every step was skipped).
                d = n_ok if n_ok > 0 else math.nan
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": total / d,
                    "kl": kl / d,
                    "ce": ce / d,
                    "mse": mse / d,
                    "cos": cos / d,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": gnorm / d,
                    "tokens_per_s": interval_tokens / max(now - interval_start, 1e-9),
                    "skipped_steps": int(n_skip),
                    "skipped_total": skipped_total,
                    "time": time.time(),
                }
                record = {
                    k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in record.items()
                }
                for t in (dev_terms, dev_gnorm, dev_ok, dev_skip, dev_max_consec):
                    t.zero_()
                interval_tokens, interval_start = 0, now
                if is_main:
                    metrics.log(record)
                    if pbar is not None:
                        pbar.set_postfix(
                            loss=f"{record['loss'] or math.nan:.4g}",
                            tok_s=f"{record['tokens_per_s']:.0f}",
                            skipped=skipped_total,
                            refresh=False,
                        )
                    else:
                        log.info("step %d/%d %s", step, total_steps, _fmt(record))
                if max_consec >= cfg.max_consecutive_skips:
                    last = ckpt.latest_checkpoint(run_dir)
                    raise TrainingError(
                        f"{int(max_consec)} consecutive optimizer steps had a non-finite loss or gradient "
                        f"(limit --max-consecutive-skips {cfg.max_consecutive_skips}); stopped at step {step}. "
                        + (
                            f"Last good checkpoint: {last}"
                            if last
                            else "No checkpoint was written yet."
                        )
                        + " Lower the learning rate, check the data and the teacher, or use bf16 instead of fp16."
                    )
                if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total_steps:
                    values = run_eval(step, with_teacher=False)
                    if is_main and values:
                        metrics.log({"kind": "eval", "step": step, **values})
                    interval_start = time.perf_counter()  # tokens/s: training time only
                if step % cfg.save_interval == 0:
                    save_due = True
                # A checkpoint is written only after a finite step (else at the next log interval
                # that ends on one), so the latest checkpoint is never one of a run going bad.
                if save_due and consec_now == 0 and step < total_steps:
                    save(step)
                    save_due = False
            if on_step_end is not None:
                on_step_end(step)
    finally:
        if pbar is not None:
            pbar.close()
        if metrics is not None:
            metrics.close()

    # -- the end: checkpoint, final model, evaluation, figure ----------------------------------------------
    save(step)
    summary["eval_after"] = run_eval(step, with_teacher=False)
    summary.update(
        steps=step,
        skipped_steps=skipped_total,
        total_steps=total_steps,
        student_parameters=count_parameters(student),
        teacher_parameters=count_parameters(teacher) if teacher is not None else None,
    )
    if is_main:
        final = run_dir / "final"
        student.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        _append_eval(run_dir, step, summary["eval_after"])
        if summary["eval_after"]:
            log.info("held-out after: %s", _fmt(summary["eval_after"]))
        summary["figure"] = str(plot_metrics(run_dir))
        ckpt.write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    if world > 1:
        dist.barrier()
    return summary


def model_dir(path: str) -> str:
    """``path``, or its ``model/`` subdirectory when ``path`` is a checkpoint directory."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        return str(p / "model")
    return path


def _evaluate_only(cfg, run_dir: Path, is_main: bool, world: int, run_eval) -> dict[str, Any]:
    """``--do-eval``: the metrics of ``--student-pretrained`` (and the teacher's, if given) on the
    held-out files, written to RUN/eval_results.json; no training, no checkpoint."""
    values = run_eval(0)
    summary = {"eval": values, "model": cfg.student_pretrained}
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(run_dir / "eval_results.json", json.dumps(summary, indent=1))
        log.info("held-out: %s", _fmt(values))
    if world > 1:
        dist.barrier()
    return summary


def _append_eval(run_dir: Path, step: int, values: dict[str, float]) -> None:
    if values:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "eval", "step": step, **values}) + "\n")


def _check_models(cfg: TrainConfig, tokenizer, student, teacher) -> None:
    vocab = len(tokenizer)
    for name, m in (("student", student), ("teacher", teacher)):
        if m is None:
            continue
        v = getattr(m.config, "vocab_size", None)
        if v is not None and v < vocab:
            raise ValueError(
                f"the {name}'s vocabulary ({v}) is smaller than the tokenizer's ({vocab})"
            )
        positions = getattr(m.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions < cfg.max_length:
            raise ValueError(
                f"max_length {cfg.max_length} exceeds the {name}'s {positions} position "
                "embeddings: lower --max-length"
            )
    if teacher is None:
        return
    if cfg.task in ("mlm", "clm") and student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"student and teacher vocabularies differ ({student.config.vocab_size} vs "
            f"{teacher.config.vocab_size}): the logit losses need the same vocabulary"
        )
    if (
        cfg.alpha_cos > 0 or cfg.task == "hidden"
    ) and student.config.hidden_size != teacher.config.hidden_size:
        raise ValueError(
            f"hidden sizes differ (student {student.config.hidden_size}, teacher "
            f"{teacher.config.hidden_size}): the cosine/MSE hidden-state losses need equal sizes"
        )


def _fmt(values: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in values.items()
        if k not in ("kind", "time")
    )
