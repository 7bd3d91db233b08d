"""The distillation trainer. ``train(config)`` runs one distillation from start (or a checkpoint) to
the end. What is distilled (models, data, loss, evaluation) is the task's
(:mod:`fastdistill.train.tasks`); the trainer owns the rest, in named phases that read top to
bottom: run directory and resume → models → data → schedule and optimizer → restore → the loop
(one optimizer step, then the log interval's logging, evaluation and checkpoint) → the end.

Loss normalisation. Every loss term is a mean over its tokens taken over the whole optimizer step:
all micro-batches of the accumulation and all processes. The token counts come from the task on the
host (:meth:`~fastdistill.train.tasks.base.Task.token_counts`), so each micro-batch's term is
weighted by ``local count / step count`` with no device sync, and the update is the same whichever
way a global batch is split over processes and micro-batches.

NaN/Inf. After the backward, ``all_finite(loss, grad_norm)`` gives a 0-dim bool on the device; the
fused AdamW takes it as ``found_inf`` and leaves parameters *and* its moments and step count
untouched when it is set (with fp16 the GradScaler does the same on its own overflow check). Skips
are counted on the device (:mod:`fastdistill.train.interval`); the counters are read at the log
interval, the only host sync, and a run with ``max_consecutive_skips`` skips in a row stops there
with :class:`TrainingError` (its last checkpoint is the last good state: a skipped step changes
nothing).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdistill import losses as FL
from fastdistill.train import checkpoint as ckpt
from fastdistill.train import fsutil, loading, optimization, parallel, rundir
from fastdistill.train.batching import BatchPlan
from fastdistill.train.config import TrainConfig
from fastdistill.train.interval import IntervalStats, train_record
from fastdistill.train.metrics import MetricsLogger, append_eval, fmt, plot_metrics
from fastdistill.train.runtime import (
    Processes,
    process_group,
    select_device,
    step_seed,
)
from fastdistill.train.student import count_parameters
from fastdistill.train.tasks import LOSS_TERMS

log = logging.getLogger("fastdistill.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many consecutive non-finite steps)."""


def train(cfg: TrainConfig, *, on_step_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the distillation described by ``cfg``; returns a summary (also RUN/summary.json).

    ``on_step_end(step)`` is called after every optimizer step (tests use it to interrupt a run).
    Raises ``ValueError`` for a bad configuration and :class:`TrainingError` when the run cannot go
    on."""
    import transformers

    cfg = cfg.resolved()
    transformers.utils.logging.disable_progress_bar()  # no per-save "Writing model shards" bars
    procs = Processes.from_env()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    log.info(
        "%d CPU thread(s) per process (OMP_WAIT_POLICY=%s)",
        torch.get_num_threads(),
        os.environ.get("OMP_WAIT_POLICY", "unset"),
    )
    with process_group(procs, cfg.device):
        trainer = Trainer(cfg, procs, on_step_end)
        return trainer.evaluate_only() if cfg.do_eval else trainer.fit()


class Trainer:
    def __init__(self, cfg: TrainConfig, procs: Processes, on_step_end=None):
        self.cfg, self.procs, self.on_step_end = cfg, procs, on_step_end
        self.device = select_device(cfg.device, procs.local_rank)
        self.run_dir = Path(cfg.output_dir)
        self.task = cfg.task_class()(cfg, self.device)
        torch.manual_seed(cfg.seed)
        self._setup_run_dir()
        self._setup_models()
        self._setup_data()

    # ---- phases ------------------------------------------------------------------------------------

    def _setup_run_dir(self) -> None:
        """Refuse to write over files that are not the run's; resume from the newest intact
        checkpoint (with the same settings), or start afresh (refusing to mix two runs)."""
        cfg, run_dir, main = self.cfg, self.run_dir, self.procs.is_main
        rundir.check_output_dir(cfg)
        if main and not cfg.do_eval:
            rundir.mark_run_dir(run_dir)
            ckpt.remove_leftovers(run_dir)
        self.resume_from, self.state = None, {}
        if cfg.resume:
            found = ckpt.resume_checkpoint(run_dir)
            if found is None:
                raise ValueError(f"--resume: {run_dir} holds no checkpoint to resume from")
            self.resume_from, self.state = found
            rundir.check_resume_config(self.state["config"], cfg.to_dict(), self.resume_from)
            log.info("resuming from step %d (%s)", self.state["step"], self.resume_from)
        elif not cfg.do_eval and ckpt.has_checkpoints(run_dir):
            if not cfg.overwrite_output_dir:
                raise ValueError(
                    f"{run_dir} already holds checkpoints: pass --resume to continue that run or "
                    "--overwrite-output-dir to start a new one there"
                )
            if main:  # a new run must not mix its checkpoints with the old run's
                shutil.rmtree(ckpt.checkpoint_root(run_dir))
        self.procs.barrier()

    def _setup_models(self) -> None:
        cfg, task = self.cfg, self.task
        self.tokenizer = loading.tokenizer_for(cfg, task)
        # With a teacher cache the teacher is never loaded (its top-k come from the cache).
        self.teacher = None if cfg.teacher_cache else loading.teacher_for(cfg, task)
        where = self.resume_from or cfg.student_pretrained or cfg.student_config or cfg.teacher
        self.student = loading.load(
            "student", where, lambda: task.build_student(self.teacher, self.resume_from)
        )
        task.check_models(self.tokenizer, self.student, self.teacher)
        if not bool(FL.all_finite(*self.student.parameters())):
            raise ValueError(
                f"the student's parameters are not finite before training (built from {where}): "
                "fix or replace that model"
            )

    def _setup_data(self) -> None:
        cfg = self.cfg
        files = {"eval": cfg.eval_files}
        if not cfg.do_eval:
            files["train"] = cfg.train_files
        data = loading.data_everywhere(self.task, self.tokenizer, files, self.procs)
        self.train_data, self.eval_data = data.get("train"), data.get("eval")
        if cfg.teacher_cache and not cfg.do_eval:
            self.task.use_teacher_cache(cfg.teacher_cache, self.tokenizer, self.train_data)

    def _setup_schedule(self) -> None:
        cfg = self.cfg
        self.plan = BatchPlan(
            self.train_data.lengths,
            batch_size=cfg.batch_size,
            world_size=self.procs.world,
            accum=cfg.gradient_accumulation_steps,
            seed=cfg.seed,
        )
        self.counts = self.task.token_counts(self.train_data)
        self.total_steps = cfg.max_steps or cfg.num_epochs * self.plan.steps_per_epoch
        self.warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else math.ceil(cfg.warmup_ratio * self.total_steps)
        )

    def _setup_optimizer(self) -> None:
        opt = optimization.build(self.cfg, self.student, self.total_steps, self.warmup, self.device)
        self.optimizer, self.scheduler, self.scaler = opt.optimizer, opt.scheduler, opt.scaler
        self.autocast, self.params = opt.autocast, opt.params

    def _restore(self) -> None:
        """The optimizer, schedule and data position of the checkpoint being resumed."""
        self.step, self.epoch, self.step_in_epoch, self.skipped_total = 0, 0, 0, 0
        if self.resume_from is None:
            return
        state = self.state
        if state.get("total_steps") != self.total_steps:
            raise ValueError(
                f"the checkpoint was made for {state.get('total_steps')} steps, this "
                f"config gives {self.total_steps}: resume with the same data and step settings"
            )
        ckpt.load_optimizer(self.optimizer, self.resume_from, state, model=self.student)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.skipped_total = state.get("skipped_total", 0)

    def _setup_logging(self) -> None:
        cfg, is_main = self.cfg, self.procs.is_main
        self.model = parallel.wrap(self.student, cfg.parallel, self.procs.world, self.device)
        self.metrics = (
            MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, resume_step=self.step)
            if is_main
            else None
        )
        self.stats = IntervalStats(self.device)
        self.pbar = None
        # A redrawn bar only on a terminal; in a log file, the log lines of each interval.
        if is_main and cfg.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.pbar = tqdm(
                total=self.total_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        if is_main:
            (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            log.info(
                "student %s: %.2fM parameters; teacher %s; %d examples, %d steps/epoch, %d steps",
                type(self.student).__name__,
                count_parameters(self.student) / 1e6,
                "none" if self.teacher is None else f"{count_parameters(self.teacher) / 1e6:.2f}M",
                len(self.train_data),
                self.plan.steps_per_epoch,
                self.total_steps,
            )

    # ---- the run -----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        self._setup_schedule()
        if self.cfg.parallel == "fsdp" and self.procs.world > 1:  # before the optimizer exists
            parallel.shard(self.student)
            if self.teacher is not None:
                parallel.shard(self.teacher)
        self._setup_optimizer()
        self._restore()
        self._setup_logging()
        self.summary: dict[str, Any] = {"eval_before": self._eval_before()}
        self.save_due = False
        self.plan.set_epoch(self.epoch)
        self.epoch_steps = self.plan.steps(self.epoch)
        try:
            while self.step < self.total_steps:
                self._optimizer_step(self._next_micro_batches())
                if self.step % self.cfg.log_interval == 0 or self.step == self.total_steps:
                    self._end_of_interval()
                if self.on_step_end is not None:
                    self.on_step_end(self.step)
        finally:
            if self.pbar is not None:
                self.pbar.close()
            if self.metrics is not None:
                self.metrics.close()
        return self._finish()

    def _next_micro_batches(self) -> list[np.ndarray]:
        if self.step_in_epoch >= len(self.epoch_steps):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.plan.set_epoch(self.epoch)
            self.epoch_steps = self.plan.steps(self.epoch)
        return self.epoch_steps[self.step_in_epoch]

    def _optimizer_step(self, micro_batches: list[np.ndarray]) -> None:
        """One optimizer step over ``micro_batches`` (global index arrays), NaN skip on the device."""
        procs = self.procs
        torch.manual_seed(step_seed(self.cfg.seed, self.step, procs.rank))
        step_idx = np.concatenate(micro_batches)
        denom = {g: max(int(c[step_idx].sum()), 1) for g, c in self.counts.items()}
        step_loss = torch.zeros((), device=self.device)
        step_terms = torch.zeros(len(LOSS_TERMS), device=self.device)
        for i, micro in enumerate(micro_batches):
            idx = self.plan.local(micro, procs.rank)
            batch = self.task.collate(self.train_data, idx, stream=self.epoch + 1).to(self.device)
            self.stats.tokens += batch.num_tokens * procs.world
            w = {g: float(c[idx].sum() / denom[g]) for g, c in self.counts.items()}
            w["world"] = procs.world
            skip_sync = procs.world > 1 and i < len(micro_batches) - 1
            with parallel.no_sync(self.model, self.cfg.parallel, skip_sync):
                loss, terms = self._forward(batch, w)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            step_loss += loss.detach().float() / procs.world
            step_terms += terms
        ok, grad_norm = self._apply_gradients(step_loss)
        self.stats.add_step(ok, step_loss, step_terms, grad_norm)
        self.step += 1
        self.step_in_epoch += 1
        if self.pbar is not None:
            self.pbar.update(1)

    def _forward(self, batch, w) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast:
            s_out, t_out = self.task.forward(self.model, self.teacher, batch)
            return self.task.loss(s_out, t_out, batch, w)

    def _apply_gradients(self, step_loss) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, check, step (or skip, on the device), schedule; returns (all finite, grad norm)."""
        optimizer, scaler = self.optimizer, self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.cfg.max_grad_norm > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        grad_norm = parallel.local(grad_norm)  # FSDP2: a replicated DTensor
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
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return ok, grad_norm

    def _end_of_interval(self) -> None:
        """The one host sync per log interval: log, stop a run going bad, evaluate, checkpoint."""
        cfg, step = self.cfg, self.step
        values = self.stats.read(self.procs.world, params_ok=self._params_finite())
        self.skipped_total += values["n_skipped"]
        self._log_interval(values)
        if values["max_consecutive"] >= cfg.max_consecutive_skips:
            raise self._too_many_skips(values["max_consecutive"])
        if not values["params_ok"]:
            raise self._stopped("the student's parameters are no longer finite (NaN or inf)")
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < self.total_steps:
            metrics = self._evaluate(step, score_teacher=False)
            if self.metrics is not None and metrics:
                self.metrics.log({"kind": "eval", "step": step, **metrics})
            self.stats.restart_clock()  # tokens/s: training time only
        if step % cfg.save_interval == 0:
            self.save_due = True
        # A checkpoint is written only after a finite step (else at the next log interval that
        # ends on one), so the latest checkpoint is never one of a run going bad.
        if self.save_due and values["consecutive_now"] == 0 and step < self.total_steps:
            self._save()
            self.save_due = False

    def _log_interval(self, values: dict[str, Any]) -> None:
        if not self.procs.is_main:
            return
        lr = self.scheduler.get_last_lr()[0]
        record = train_record(self.step, self.epoch, values, lr, self.skipped_total)
        self.metrics.log(record)
        if self.pbar is not None:
            self.pbar.set_postfix(
                loss=f"{record['loss'] or math.nan:.4g}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                skipped=self.skipped_total,
                refresh=False,
            )
        else:
            log.info("step %d/%d %s", self.step, self.total_steps, fmt(record))

    def _too_many_skips(self, consecutive: int) -> TrainingError:
        return self._stopped(
            f"{consecutive} consecutive optimizer steps had a non-finite loss or gradient "
            f"(limit --max-consecutive-skips {self.cfg.max_consecutive_skips})"
        )

    def _stopped(self, why: str) -> TrainingError:
        """The error that ends a run going bad: why, where, the last good state, what to try."""
        last = ckpt.latest_checkpoint(self.run_dir)
        where = f"Last good checkpoint: {last}." if last else "No checkpoint was written."
        return TrainingError(
            f"{why}; stopped at step {self.step}, nothing saved after it. {where} Lower the "
            "learning rate, check the data, the teacher and the optimizer state, or use bf16 "
            "instead of fp16."
        )

    def _params_finite(self) -> torch.Tensor:
        """0-dim bool on the device: every process's parameters (or shards) are finite."""
        mine = FL.all_finite(*[parallel.local(p) for p in self.params])
        return parallel.all_finite_everywhere(mine, self.procs.world)

    def _check_end_state(self) -> None:
        """Never end green with a wrong model: refuse to save non-finite parameters or a run in
        which every step was skipped; say when the last steps were skipped."""
        if self.step > 0 and self.skipped_total >= self.step:
            raise self._stopped(f"every one of the {self.step} optimizer steps was skipped")
        if not bool(self._params_finite()):
            raise self._stopped("the student's parameters are not finite (NaN or inf)")
        streak = int(self.stats.consecutive)
        if streak:
            log.warning(
                "the last %d optimizer step(s) were skipped (non-finite loss or gradient): the "
                "saved model is the state before them",
                streak,
            )

    # ---- checkpoints and evaluation ----------------------------------------------------------------

    def _save(self) -> None:
        # FSDP2: every process gathers (a collective); rank 0 writes.
        model_state = parallel.full_model_state(self.student, self.cfg.parallel)
        optim_state = parallel.full_optimizer_state(self.student, self.optimizer, self.cfg.parallel)
        if not self.procs.is_main:
            return
        ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            model=self.student,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            keep=self.cfg.keep_checkpoints,
            model_state=model_state,
            optimizer_state=optim_state,
            trainer_state={
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "total_steps": self.total_steps,
                "skipped_total": self.skipped_total,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "eval_before": self.summary["eval_before"],
                "config": self.cfg.to_dict(),
            },
        )

    def _evaluate(self, step: int, *, score_teacher: bool) -> dict[str, Any]:
        """Held-out metrics of the student now; files go to RUN/eval/step-N (RUN/eval/teacher)."""
        main = self.procs.is_main
        eval_dir = self.run_dir / "eval"
        return self.task.evaluate(
            self.student,
            self.teacher,
            self.eval_data,
            score_teacher=score_teacher,
            out_dir=eval_dir / f"step-{step:08d}" if main else None,
            teacher_dir=eval_dir / "teacher" if main else None,
        )

    def _eval_before(self) -> dict[str, Any]:
        if self.resume_from is not None:
            return self.state.get("eval_before", {})
        values = self._evaluate(self.step, score_teacher=True)
        if self.metrics is not None and values:
            self.metrics.log({"kind": "eval", "step": self.step, **values})
            log.info("held-out before: %s", fmt(values))
        return values

    def _finish(self) -> dict[str, Any]:
        """The end: checks, checkpoint, final model, evaluation, figure, summary."""
        self._check_end_state()
        self._save()
        summary = self.summary
        summary["eval_after"] = self._evaluate(self.step, score_teacher=False)
        summary.update(
            steps=self.step,
            skipped_steps=self.skipped_total,
            total_steps=self.total_steps,
            student_parameters=count_parameters(self.student),
            teacher_parameters=count_parameters(self.teacher) if self.teacher else None,
        )
        model_state = parallel.full_model_state(self.student, self.cfg.parallel)
        if self.procs.is_main:
            final = self.run_dir / "final"
            self.student.save_pretrained(final, state_dict=model_state, safe_serialization=True)
            self.tokenizer.save_pretrained(final)
            append_eval(self.run_dir, self.step, summary["eval_after"])
            if summary["eval_after"]:
                log.info("held-out after: %s", fmt(summary["eval_after"]))
            summary["figure"] = str(plot_metrics(self.run_dir))
            fsutil.write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.procs.barrier()
        return summary

    def evaluate_only(self) -> dict[str, Any]:
        """``--do-eval``: the metrics of ``--student-pretrained`` (and the teacher's, if given) on
        the held-out files, written to RUN/eval_results.json; no training, no checkpoint."""
        values = self._evaluate(0, score_teacher=True)
        summary = {"eval": values, "model": self.cfg.student_pretrained}
        if self.procs.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(summary, indent=1)
            fsutil.write_text_atomic(self.run_dir / "eval_results.json", text)
            log.info("held-out: %s", fmt(values))
        self.procs.barrier()
        return summary
