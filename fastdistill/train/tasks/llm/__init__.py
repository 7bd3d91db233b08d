"""``llm``: distil a decoder LLM (Llama, Qwen2/Qwen3, Mistral, Gemma and GPT-2 families) on plain
text or chat / prompt-completion JSON lines, the losses only on the completion (assistant) tokens,
sequences packed into full rows (:mod:`.data`).

Loss per target position: ``alpha_kl · D(teacher, student) + alpha_ce · CE``, D any divergence of
:func:`fastdistill.losses.distillation_loss` (``forward_kl``, ``reverse_kl``, ``jsd`` with
``beta``, ``tvd``) at temperature T (no T² factor: the LLM convention), both means over the step's
target positions. The logits are the models' own outputs, so a final-logit softcap or logit scale
in the model config is already applied. The teacher runs in inference mode, in bf16 by default;
its logits are widened to the student's dtype before the loss (never rounded further).

With ``--teacher-cache`` the teacher is not loaded: its stored top-k log-probabilities per token
(``--write-teacher-cache``, one entry per token of each example, written from unpacked examples)
are the targets, D is then the forward KL of ``--topk-normalization`` (the cache holds no other
divergence), through ``linear_topk_distillation_loss`` (``fused_linear``) or
``topk_distillation_loss`` (the logits). Packed rows take each member example's cached rows at its
positions: packing isolates the sequences, so a packed sequence's teacher is its unpacked one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdistill import losses as FL
from fastdistill.train import fields
from fastdistill.train.fields import option
from fastdistill.train.tasks.base import Task, TaskOptions
from fastdistill.train.tasks.llm import data as LD
from fastdistill.train.tasks.text import Means, add_logit_metrics, eval_mode
from fastdistill.train.teacher_cache import TeacherCacheTask, logged_terms

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TEACHER_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class LLMOptions(TaskOptions):
    divergence: str = option(
        "forward_kl",
        "forward_kl = KL(teacher ‖ student), reverse_kl = KL(student ‖ teacher), jsd "
        "(generalised, with --beta), tvd",
        choices=DIVERGENCES,
    )
    beta: float = option(0.5, "JSD mixture weight: 0 is forward KL, 1 reverse KL")
    alpha_ce: float = option(0.0, "weight of the hard next-token loss on the target tokens")
    train_on_prompt: bool = option(
        False, "also take the losses on prompt / user tokens (default: completions only)"
    )
    packing: bool = option(
        False,
        "pack several sequences per row (block-diagonal attention, positions restart). Off by "
        "default: rows are already grouped by length, and the block-diagonal mask takes "
        "transformers' masked attention path, which ran at 0.66x the tokens/s of padded rows "
        "(bench/llm_packing.py, bench/RESULTS.md)",
    )
    teacher_dtype: str = option(
        "bfloat16", "dtype the teacher runs in (inference only)", choices=TEACHER_DTYPES
    )
    gradient_checkpointing: bool = option(
        False, "recompute the student's activations in the backward pass (less memory)"
    )
    compile_models: bool = option(False, "torch.compile the student's and the teacher's forward")
    fused_linear: bool = option(
        True,
        "take the losses from the final hidden states and the output heads, chunk by chunk, "
        "never materialising the (tokens, vocabulary) logits (--no-fused-linear: the models' "
        "logits)",
    )
    vocab: str = option(
        "same",
        "same: teacher and student vocabularies must match; common: the divergence over the "
        "first min(V_student, V_teacher) tokens (same-family models whose padded sizes differ)",
        choices=("same", "common"),
    )

    def validate(self, cfg) -> None:
        fields.choice("divergence", self.divergence, DIVERGENCES)
        fields.unit("beta", self.beta)
        fields.nonneg("alpha_ce", self.alpha_ce)
        fields.choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)


class LLMTask(TeacherCacheTask, Task):
    name = "llm"
    help = "decoder LLM (Llama/Qwen/Mistral/Gemma/GPT-2) on text or chat JSON lines"
    Options = LLMOptions
    normalizers = ("kl", "ce")

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.pad_id = 0
        self.student = self.teacher = None  # unwrapped: the fused linear loss reads their heads

    @classmethod
    def fill_defaults(cls, cfg) -> None:
        teacher = cfg.teacher is not None or cfg.teacher_cache is not None
        if cfg.alpha_kl is None:
            cfg.alpha_kl = 1.0 if teacher else 0.0
        if cfg.alpha_cos is None:
            cfg.alpha_cos = 0.0
        if cfg.max_length is None:
            cfg.max_length = 512
        if cfg.temperature is None:
            cfg.temperature = 1.0

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.alpha_mse > 0 or cfg.alpha_cos > 0:
            raise ValueError(
                "alpha_mse and alpha_cos do not apply to --task llm (teacher and student hidden "
                "sizes usually differ): use alpha_kl and alpha_ce"
            )
        if cfg.loss_impl == "eager":
            raise ValueError("loss_impl eager is the DistilBERT formulas; --task llm is fused only")
        o = cfg.options
        if o.fused_linear and cfg.parallel == "fsdp":
            raise ValueError(
                "fused_linear reads the output heads' weights outside the models' forward, which "
                "FSDP2 shards: pass --no-fused-linear with --parallel fsdp"
            )
        if o.fused_linear and o.vocab == "common":
            raise ValueError("fused_linear needs one vocabulary: pass --no-fused-linear")
        if cfg.teacher_cache is not None and o.divergence != "forward_kl":
            raise ValueError(
                f"--teacher-cache holds the teacher's top-k log-probabilities, which give the "
                f"forward KL only (--topk-normalization picks how), not divergence "
                f"{o.divergence}: pass --divergence forward_kl, or train with the live --teacher"
            )

    @classmethod
    def has_training_signal(cls, cfg) -> bool:
        return cfg.alpha_kl + cfg.options.alpha_ce > 0

    # ---- models --------------------------------------------------------------------------------------

    def auto_class(self):
        import transformers

        return transformers.AutoModelForCausalLM

    def load_teacher(self, path: str):
        dtype = getattr(torch, self.opts.teacher_dtype)
        teacher = self.auto_class().from_pretrained(path, dtype=dtype).to(self.device).eval()
        teacher.requires_grad_(False)
        if self.opts.compile_models:
            teacher.compile()
        self.teacher = teacher
        return teacher

    def build_student(self, teacher, resume_dir=None):
        student = super().build_student(teacher, resume_dir).float()
        if self.opts.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        if self.opts.compile_models:
            student.compile()
        self.student = student
        return student

    def check_models(self, tokenizer, student, teacher) -> None:
        super().check_models(tokenizer, student, teacher)
        if teacher is None:
            return
        vs, vt = student.config.vocab_size, teacher.config.vocab_size
        if vs != vt and self.opts.vocab != "common":
            raise ValueError(
                f"student and teacher vocabularies differ ({vs} vs {vt}): pass --vocab common to "
                "distil over the first min(Vs, Vt) tokens (same tokenizer, padded sizes), or use "
                "models of one vocabulary"
            )

    # ---- data ------------------------------------------------------------------------------------------

    def load_data(self, tokenizer, files, *, build):
        settings = LD.LLMDataSettings(self.cfg.max_length, self.opts.train_on_prompt)
        out = {}
        for split, paths in files.items():
            if paths:
                examples = LD.load_examples(
                    paths, tokenizer, settings, cache_dir=self.cfg.cache_dir, build=build
                )
                out[split] = LD.pack(examples, self.cfg.max_length, self.opts.packing)
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if candidate is not None:
                self.pad_id = int(candidate)
                break
        return out

    def token_counts(self, rows):
        counts = rows.target_counts()
        return {"kl": counts, "ce": counts}

    def collate(self, rows, indices, *, stream):
        batch = LD.collate(rows, indices, pad_id=self.pad_id, packed=self.opts.packing)
        return self.attach_teacher_targets(batch, rows, indices, stream=stream)

    # The teacher cache holds examples, whatever the packing (TeacherCacheTask).

    def cache_sequences(self, rows):
        return rows.examples

    def cache_batch(self, examples, indices):
        return LD.collate_examples(examples, indices, pad_id=self.pad_id)

    def cache_rows(self, rows, indices) -> list:
        return [rows.members[i] for i in indices]

    # ---- the step --------------------------------------------------------------------------------------

    def forward(self, model, teacher, batch):
        if not self.opts.fused_linear:
            return super().forward(model, teacher, batch)
        # The final (normed) hidden states; logits only for the last position, which is unused.
        kw = dict(output_hidden_states=True, logits_to_keep=1)
        t_out = None
        if teacher is not None:
            with torch.inference_mode():
                t_out = teacher(**batch.model_inputs(teacher), **kw)
        return model(**batch.model_inputs(model), **kw), t_out

    def loss(self, s_out, t_out, batch, w):
        if self.opts.fused_linear:
            return self._linear_loss(s_out, t_out, batch, w)
        if batch.teacher_topk is not None:  # the cache's forward KL at T, no T² (LLM convention)
            return self.sparse_teacher_loss(
                s_out.logits, batch, w, mask=batch.loss_mask, alpha_ce=self.opts.alpha_ce,
                t2_scale=False,
            )  # fmt: skip
        cfg, o, world = self.cfg, self.opts, w["world"]
        s_logits = s_out.logits
        teacher = t_out is not None
        t_logits = t_out.logits.to(s_logits.dtype) if teacher else s_logits.detach()
        total, kd, ce, _ = FL.distillation_loss(
            s_logits,
            t_logits,
            labels=batch.labels,
            mask=batch.loss_mask,
            temperature=cfg.temperature,
            alpha_kl=cfg.alpha_kl * w["kl"] * world if teacher else 0.0,
            alpha_ce=o.alpha_ce * w["ce"] * world,
            divergence=o.divergence,
            beta=o.beta,
            t2_scale=False,
            vocab=o.vocab,
        )
        if total is None:  # no target in this micro-batch: still a graph for DDP
            total = s_logits.sum() * 0.0
        return total, logged_terms(kd, ce, w)

    def _linear_loss(self, s_out, t_out, batch, w):
        """The same losses from hidden states and heads (fastdistill.losses.linear_distillation_loss,
        or linear_topk_distillation_loss against a teacher cache); a final-logit softcap or logit
        scale of the model config is applied there."""
        cfg, o, world = self.cfg, self.opts, w["world"]
        head = self.student.get_output_embeddings()
        h = s_out.hidden_states[-1].to(head.weight.dtype)  # autocast may hand bf16 states
        config = self.student.config
        common = dict(
            student_bias=head.bias,
            labels=batch.labels,
            temperature=cfg.temperature,
            t2_scale=False,
            alpha_ce=o.alpha_ce * w["ce"] * world,
            softcap=getattr(config, "final_logit_softcapping", None),
            logit_scale=getattr(config, "logit_scale", None),
        )
        alpha_kd = cfg.alpha_kl * w["kl"] * world
        if batch.teacher_topk is not None:
            ids, logprobs, tail = batch.teacher_topk
            total, kd, ce = FL.linear_topk_distillation_loss(
                h, head.weight, ids, logprobs, teacher_tail=tail, alpha_kd=alpha_kd,
                normalization=cfg.topk_normalization,
                capture_temperature=self.capture_temperature, **common,
            )  # fmt: skip
            return total, logged_terms(kd, ce, w)
        teacher = {}
        if t_out is not None:
            t_head = self.teacher.get_output_embeddings()
            teacher = dict(
                teacher_hidden=t_out.hidden_states[-1],
                teacher_weight=t_head.weight,
                teacher_bias=t_head.bias,
            )
        total, kd, ce = FL.linear_distillation_loss(
            h, head.weight, divergence=o.divergence, beta=o.beta,
            alpha_kd=alpha_kd if t_out is not None else 0.0, **teacher, **common,
        )  # fmt: skip
        return total, logged_terms(kd, ce, w)

    # ---- evaluation -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(
        self, student, teacher, data, *, score_teacher=False, out_dir=None, teacher_dir=None
    ):
        """On the held-out target tokens: KL(teacher ‖ student) at T = 1, top-1 agreement, the
        student's (and teacher's) next-token accuracy and CE."""
        if data is None or len(data) == 0:
            return {}
        sums = Means()
        with eval_mode(student):
            for start in range(0, len(data), self.cfg.batch_size):
                idx = list(range(start, min(len(data), start + self.cfg.batch_size)))
                batch = self.collate(data, idx, stream=0).to(self.device)
                s_out = student(**batch.model_inputs(student))
                t_out = teacher(**batch.model_inputs(teacher)) if teacher is not None else None
                add_logit_metrics(sums, s_out, t_out, batch.labels)
        return sums.means()
