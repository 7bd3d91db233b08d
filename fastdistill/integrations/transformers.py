"""Distillation inside Hugging Face ``transformers.Trainer``, with the fused losses.

``DistillationTrainer`` is a ``Trainer`` that takes a frozen teacher and trains the student on

    loss = alpha_kd · D(teacher ‖ student at temperature T) + alpha_ce · CE(student, labels)

per selected token, summed over the tokens of the whole optimizer step (every micro-batch of the
gradient accumulation and every process) and divided by their number, the Trainer's
``num_items_in_batch``. D is ``divergence``: ``forward_kl`` KL(p_t ‖ p_s), ``reverse_kl``
KL(p_s ‖ p_t), ``jsd`` JSD(β) with M = β p_t + (1 − β) p_s (β = 0 forward KL, β = 1 reverse KL,
TRL's convention) or ``tvd`` ½ Σ |p_t − p_s|, with p = softmax(logits / T), times T² when
``t2_scale``. The teacher and student logits are read once and the gradient written once
(``fastdistill.losses.distillation_loss``).

Selected tokens: those whose label is not ``ignore_index``; without labels in the batch, the
attention mask (every token without one). For causal LMs (``causal_lm``; by default a
``*ForCausalLM`` model) the logits at position i are compared at the label i + 1, as the models'
own loss does.

Needs ``pip install fastdistill[hf]``: transformers ≥ 5.19 (the Trainer's
``loss_is_scaled_for_ga``) and accelerate.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

import fastdistill.losses as FL
from fastdistill import reference

_MIN_TRANSFORMERS = "5.19"
if Version(transformers.__version__) < Version(_MIN_TRANSFORMERS):
    raise ImportError(
        f"fastdistill.integrations.transformers needs transformers>={_MIN_TRANSFORMERS} (found "
        f"{transformers.__version__}): pip install 'fastdistill[hf]'"
    )

__all__ = ["DistillationTrainer"]

# Names of the logged terms (``{name}_loss``), in the order distillation_loss returns them.
_TERMS = ("kd", "ce")


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model``.

    Args:
        model, args, and every other ``Trainer`` argument: as for ``transformers.Trainer``.
        teacher_model: the teacher, an ``nn.Module`` returning ``.logits`` of shape
            ``(batch, seq, V_t)`` for the batch's model inputs. It is frozen (no gradient, eval
            mode, kept in eval mode), moved to the training device unless it was loaded with a
            ``device_map``, and is never saved nor given to the optimizer.
        divergence: ``forward_kl`` (default), ``reverse_kl``, ``jsd`` or ``tvd`` (see the module).
        beta: the teacher's weight β in JSD's mixture, in [0, 1] (``jsd`` only).
        temperature: T > 0, divides both sides' logits in the divergence (not in the CE).
        alpha_kd, alpha_ce: weights ≥ 0 of the divergence and of the hard-label cross-entropy
            (which needs ``labels`` in the batch); a term of weight 0 is not computed.
        t2_scale: multiply the divergence by T² (the DistilBERT recipe); off by default, as TRL.
        ignore_index: the label of tokens left out of both terms.
        vocab: ``"same"`` (student and teacher vocabularies must match) or ``"common"`` (the
            divergence over the first min(V_s, V_t) columns; the CE over the student's own).
        causal_lm: compare logits at i with labels at i + 1; None decides from the model class.
        fused_linear: take the student's and the teacher's final hidden states and output
            embeddings instead of their logits (``fastdistill.losses.linear_distillation_loss``:
            the (tokens, V) logits are never materialised; a final-logit softcap or logit scale
            of the student's config is applied there). Causal LMs of one vocabulary only.

    Logged with the Trainer's ``loss``: ``kd_loss`` and ``ce_loss`` (each term unweighted,
    normalised like ``loss``), for the terms of non-zero weight. ``distillation_loss`` is the
    formula; override it to train another one through the same token selection and
    normalisation.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        *trainer_args,
        teacher_model: nn.Module | None = None,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        alpha_kd: float = 1.0,
        alpha_ce: float = 0.0,
        t2_scale: bool = False,
        ignore_index: int = -100,
        vocab: str = "same",
        causal_lm: bool | None = None,
        fused_linear: bool = False,
        **trainer_kwargs,
    ):
        options = _check_options(
            divergence, beta, temperature, alpha_kd, alpha_ce, t2_scale, ignore_index, vocab
        )
        _check_fused_linear(fused_linear, vocab)
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(
                "teacher_model must be the teacher (an nn.Module returning .logits), got "
                f"{type(teacher_model).__name__}"
            )
        if causal_lm is not None and not isinstance(causal_lm, bool):
            raise TypeError(f"causal_lm must be True, False or None, got {causal_lm!r}")
        _check_not_shared(model, teacher_model)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        _check_loss_arguments(self)
        self.distillation_options = options
        self.causal_lm = _is_causal_lm(self.model) if causal_lm is None else causal_lm
        self.fused_linear = fused_linear
        if fused_linear and not self.causal_lm:
            raise ValueError("fused_linear=True is for causal LMs (causal_lm=True)")
        self.teacher_model = _freeze(teacher_model, self.accelerator.device)
        self._term_sums: Tensor | None = None  # device-side sums of the logged terms
        self._term_start_step = 0

    # ---- the loss --------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one micro-batch: its selected tokens' loss summed and divided
        by ``num_items_in_batch`` (the step's global count, see ``_get_num_items_in_batch``), or
        by their own count when it is None."""
        labels, selected = self._selected_tokens(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.fused_linear:
            return self._fused_linear_loss(
                model, model_inputs, labels, selected, return_outputs, num_items_in_batch
            )
        outputs = model(**model_inputs)
        student_logits = outputs.logits
        teacher_logits = self._teacher_logits(model_inputs).to(student_logits.device)
        labels = None if labels is None else labels.to(student_logits.device)
        selected = selected.to(student_logits.device)
        total, terms = self.distillation_loss(
            student_logits, teacher_logits, labels, selected, num_items_in_batch
        )
        total = self._account(model, total, terms, num_items_in_batch)
        return (total, outputs) if return_outputs else total

    def _account(self, model, total: Tensor, terms: Tensor, num_items_in_batch) -> Tensor:
        """Scale for DDP, tell the Trainer how the loss is normalised, log the terms."""
        if num_items_in_batch is not None and self._counts_across_processes():
            # DDP averages the gradients over processes; each one's sum was divided by the
            # global count, so the mean needs this factor (as Trainer.compute_loss does).
            scale = self.accelerator.num_processes
            total, terms = total * scale, terms * scale
        # Normalised over the whole step when the count is the step's; else a per-micro-batch
        # mean that the Trainer divides by the number of accumulation steps.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if model.training:
            factor = 1.0 if self.loss_is_scaled_for_ga else 1.0 / self._accumulation_steps()
            self._add_terms(terms * factor)
        return total

    def _fused_linear_loss(
        self, model, model_inputs, labels, selected, return_outputs, num_items_in_batch
    ):
        """compute_loss from the final hidden states and the output embeddings (no logits)."""
        o = self.distillation_options
        # Logits for the last position only (unused); the final normed hidden states in full.
        kw = dict(output_hidden_states=True, logits_to_keep=1)
        outputs = model(**model_inputs, **kw)
        student = self.accelerator.unwrap_model(model)
        head, t_head = student.get_output_embeddings(), self.teacher_model.get_output_embeddings()
        with torch.no_grad():
            t_hidden = self.teacher_model(**model_inputs, **kw).hidden_states[-1]
        hidden = outputs.hidden_states[-1]  # position i predicts token i + 1 (labels shifted)
        device = hidden.device
        total, kd, ce = FL.linear_distillation_loss(
            hidden.to(head.weight.dtype), head.weight, student_bias=head.bias,
            teacher_hidden=t_hidden.to(device), teacher_weight=t_head.weight.to(device),
            teacher_bias=None if t_head.bias is None else t_head.bias.to(device),
            labels=None if labels is None else labels.to(device), mask=selected.to(device),
            ignore_index=o["ignore_index"], divergence=o["divergence"], beta=o["beta"],
            temperature=o["temperature"], t2_scale=o["t2_scale"], alpha_kd=o["alpha_kd"],
            alpha_ce=o["alpha_ce"],
            softcap=getattr(student.config, "final_logit_softcapping", None),
            logit_scale=getattr(student.config, "logit_scale", None),
            normalizer=num_items_in_batch,
        )  # fmt: skip
        total = self._account(model, total, torch.stack((kd, ce)), num_items_in_batch)
        return (total, outputs) if return_outputs else total

    def distillation_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None,
        selected: Tensor,
        normalizer: Tensor | float | None,
    ) -> tuple[Tensor, Tensor]:
        """The loss over the ``selected`` tokens, fused: returns ``(total, terms)``.

        ``student_logits`` ``(B, S, V_s)``, ``teacher_logits`` ``(B, S, V_t)``, ``labels`` and
        ``selected`` (bool) ``(B, S)``, aligned (for a causal LM, position i's labels and
        selection are those of token i + 1, and the last position is unselected).
        total = (alpha_kd Σ_sel D + alpha_ce Σ_sel CE) / n, terms = (Σ_sel D / n, Σ_sel CE / n)
        detached, with n = ``normalizer``, or the number of selected tokens when None (0
        selected tokens give 0).
        """
        o = self.distillation_options
        if o["alpha_ce"] > 0 and labels is None:
            raise ValueError("alpha_ce > 0 needs labels in the batch (the hard targets)")
        if student_logits.dtype != teacher_logits.dtype:
            # The fused op reads one dtype; widening is exact (e.g. a bf16 teacher, fp32 student).
            student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        total, kd, ce, _ = FL.distillation_loss(
            student_logits, teacher_logits, labels=labels if o["alpha_ce"] > 0 else None,
            mask=selected, temperature=o["temperature"], alpha_kl=o["alpha_kd"],
            alpha_ce=o["alpha_ce"], ignore_index=o["ignore_index"], divergence=o["divergence"],
            beta=o["beta"], t2_scale=o["t2_scale"], vocab=o["vocab"],
        )  # fmt: skip
        terms = torch.stack((kd, ce))
        if normalizer is None:
            return total, terms
        # distillation_loss divides by the local count of selected tokens (its CE by the labels'
        # count, the same tokens here); rescaling to the global count stays on the device.
        count = selected.sum()
        if isinstance(normalizer, Tensor):
            normalizer = normalizer.to(device=count.device)
        scale = count / normalizer
        return total * scale, terms * scale

    def _selected_tokens(self, inputs) -> tuple[Tensor | None, Tensor]:
        """``(labels, selected)`` aligned with the model's logits, position by position: the
        tokens whose label is not ignore_index, else the attention mask, else all.

        For a causal LM the targets are shifted left instead of the logits sliced: ``logits[:,
        :-1]`` cannot be read as rows with one stride, so the losses would copy both (B, S, V)
        tensors and autograd would scatter the gradient back into a zeroed one."""
        ignore = self.distillation_options["ignore_index"]
        labels = inputs.get("labels")
        if labels is not None:
            labels = _shift_left(labels, ignore) if self.causal_lm else labels
            return labels, labels != ignore
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        mask = _shift_left(mask.bool(), False) if self.causal_lm else mask.bool()
        return None, mask

    def _teacher_logits(self, model_inputs) -> Tensor:
        if self.teacher_model.training:  # someone called .train() on it: freeze it again
            self.teacher_model.eval()
        with torch.no_grad():
            return self.teacher_model(**model_inputs).logits

    # ---- the step's token count ------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The number of tokens the loss selects over the micro-batches of one optimizer step,
        summed over processes when ``average_tokens_across_devices``: every micro-batch's loss
        is divided by it, so the accumulated gradient is that of the step's mean. A 0-dim
        tensor on ``device`` (never read on the host), or None without samples. Replaces the
        Trainer's count of ``labels != -100``, which does not know the causal shift nor the
        attention mask."""
        if not batch_samples:
            return None
        count = sum(self._selected_tokens(batch)[1].sum().to(device) for batch in batch_samples)
        if self._counts_across_processes():
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def _counts_across_processes(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.args.world_size > 1

    def _accumulation_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", None) or max(
            self.args.gradient_accumulation_steps, 1
        )

    # ---- logging -----------------------------------------------------------------------------

    def _add_terms(self, terms: Tensor) -> None:
        """Accumulate the terms on the device (no host sync) until the next training log."""
        if self._term_sums is None:
            # The first micro-batch after a log (or a resume): the optimizer steps counted
            # from here are those the Trainer's logged ``loss`` averages over.
            self._term_sums = torch.zeros_like(terms)
            self._term_start_step = self.state.global_step
        self._term_sums += terms.detach()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``kd_loss`` and ``ce_loss`` (mean per optimizer step since the last log,
        averaged over processes like ``loss``) to the Trainer's training logs."""
        if "loss" in logs and self._term_sums is not None:
            steps = max(self.state.global_step - self._term_start_step, 1)
            sums = self.accelerator.gather(self._term_sums[None]).mean(0)
            o = self.distillation_options
            weights = (o["alpha_kd"], o["alpha_ce"])
            for name, value, weight in zip(_TERMS, (sums / steps).tolist(), weights, strict=True):
                if weight > 0:
                    logs[f"{name}_loss"] = value
            self._term_sums = None
        super().log(logs, start_time)


# ---- construction helpers ----------------------------------------------------------------------


def _check_options(
    divergence, beta, temperature, alpha_kd, alpha_ce, t2_scale, ignore_index, vocab
):
    """The distillation arguments, checked once here so a typo fails before any training."""
    if divergence not in reference.DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(map(repr, reference.DIVERGENCES))}, "
            f"got {divergence!r}"
        )
    numbers = {"beta": beta, "temperature": temperature, "alpha_kd": alpha_kd, "alpha_ce": alpha_ce}
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    for name in ("alpha_kd", "alpha_ce"):
        if not 0.0 <= numbers[name] < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {numbers[name]}")
    if alpha_kd == 0 and alpha_ce == 0:
        raise ValueError("alpha_kd and alpha_ce are both 0: nothing to train on")
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be True or False, got {t2_scale!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if vocab not in ("same", "common"):
        raise ValueError(f"vocab must be 'same' or 'common', got {vocab!r}")
    return {
        "divergence": divergence, "beta": float(beta), "temperature": float(temperature),
        "alpha_kd": float(alpha_kd), "alpha_ce": float(alpha_ce), "t2_scale": t2_scale,
        "ignore_index": ignore_index, "vocab": vocab,
    }  # fmt: skip


def _check_fused_linear(fused_linear: object, vocab: str) -> None:
    """The fused-linear path (hidden states and the output embeddings in, no logits) is switched
    on explicitly; it is never chosen behind the user's back."""
    if not isinstance(fused_linear, bool):
        raise TypeError(f"fused_linear must be True or False, got {fused_linear!r}")
    if fused_linear and vocab != "same":
        raise ValueError("fused_linear=True needs one vocabulary: use vocab='same'")


def _check_loss_arguments(trainer: transformers.Trainer) -> None:
    """Trainer options that change the loss would be ignored by the distillation loss."""
    if trainer.args.label_smoothing_factor != 0:
        raise ValueError(
            "TrainingArguments.label_smoothing_factor is not applied by DistillationTrainer's "
            "loss (hard CE on the labels as they are); set it to 0"
        )
    if trainer.compute_loss_func is not None:
        raise ValueError(
            "compute_loss_func would be ignored: DistillationTrainer computes the distillation "
            "loss; override DistillationTrainer.distillation_loss instead"
        )


def _check_not_shared(model: nn.Module | None, teacher: nn.Module) -> None:
    """Freezing a teacher that shares parameters with the student would freeze the student."""
    if model is None:
        return
    if teacher is model:
        raise ValueError("teacher_model is the student model itself; pass a separate teacher")
    student_params = {id(p) for p in model.parameters()}
    shared = [n for n, p in teacher.named_parameters() if id(p) in student_params]
    if shared:
        raise ValueError(
            f"teacher_model shares {len(shared)} parameters with the student (first: "
            f"{shared[0]!r}); freezing the teacher would freeze them in the student too: give the "
            "student its own copies"
        )


def _freeze(teacher: nn.Module, device: torch.device) -> nn.Module:
    teacher.requires_grad_(False)
    teacher.eval()
    # A teacher loaded with a device_map is already placed (possibly over several devices).
    if getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device)
    return teacher


def _is_causal_lm(model: nn.Module | None) -> bool:
    """A ``*ForCausalLM`` model (through a PEFT wrapper too) predicts the next token."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _shift_left(x: Tensor, fill) -> Tensor:
    """``x`` (B, S) moved one position left along S, the last position set to ``fill``: the
    target of each position is the next token's."""
    out = torch.empty_like(x)
    out[..., :-1] = x[..., 1:]
    out[..., -1] = fill
    return out
