"""DistillationTrainer (fastdistill.integrations.transformers): a transformers.Trainer that distils
with the fused losses. Its loss and gradients equal an eager float64 formula run through the same
Trainer and, under gradient accumulation, the gradient of the whole step's batch computed by hand;
it trains, saves, resumes, runs in bf16, keeps the teacher frozen and out of the checkpoint, and
logs each term. Tiny models built from configs (no download)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastdistill.integrations.transformers import DistillationTrainer  # noqa: E402
from fastdistill.train.demo import tiny_config  # noqa: E402

V, SEQ = 64, 12


@pytest.fixture(autouse=True)
def _quiet():
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(before)


def _model(arch: str, hidden: int, seed: int):
    torch.manual_seed(seed)
    config = tiny_config(arch, V, hidden=hidden, layers=1, heads=2, max_positions=32)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 1
    config.initializer_range = 0.3  # a confident teacher: the divergence is far from 0
    auto = (
        transformers.AutoModelForCausalLM if arch == "gpt2" else transformers.AutoModelForMaskedLM
    )
    return auto.from_config(config)


def _data(n: int, *, causal: bool, labels: bool = True, seed: int = 0) -> list[dict]:
    """Sequences of different lengths (right padding), so every micro-batch selects a different
    number of tokens: a per-micro-batch mean would differ from the step's mean."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(2, V, (SEQ,), generator=g)
        attention = (torch.arange(SEQ) < 4 + (3 * i) % (SEQ - 3)).long()
        ids = torch.where(attention.bool(), ids, 0)
        row = {"input_ids": ids, "attention_mask": attention}
        if labels:
            if causal:  # a prompt of 2 tokens, then the completion is trained on
                target = torch.where(attention.bool(), ids, -100)
                target[:2] = -100
            else:  # MLM: every third position is a target
                keep = attention.bool() & (torch.arange(SEQ) % 3 == i % 3)
                target = torch.where(keep, ids, -100)
            row["labels"] = target
        rows.append(row)
    return rows


def _args(out, **kw):
    base = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        # Adam's step normalises near-zero gradients: their round-off would decide the update.
        optim="sgd",
        max_grad_norm=0.0,  # the recorded gradients are the raw ones
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(str(out), **{**base, **kw})


class _Grads(transformers.TrainerCallback):
    """The accumulated gradient of every optimizer step, before the step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.steps.append([p.grad.detach().clone() for p in model.parameters()])


# ---- the eager formula ----------------------------------------------------------------------------


def _divergence_rows(s, t, divergence, beta, temperature):
    """Per-token divergence in float64, from the textbook formulas."""
    ls, lt = (s.double() / temperature).log_softmax(-1), (t.double() / temperature).log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "forward_kl":
        return (pt * (lt - ls)).sum(-1)
    if divergence == "reverse_kl":
        return (ps * (ls - lt)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    lm = torch.logsumexp(torch.stack((lt + math.log(beta), ls + math.log1p(-beta))), 0)
    return beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)


def eager_loss(o, s, t, labels, selected, normalizer):
    """(alpha_kd Σ_sel D + alpha_ce Σ_sel CE) / n, with n the normalizer or the selected count."""
    d = _divergence_rows(s, t.to(s.dtype), o["divergence"], o["beta"], o["temperature"])
    if o["t2_scale"]:
        d = d * o["temperature"] ** 2
    n = selected.sum().clamp_min(1) if normalizer is None else normalizer
    kd = d[selected].sum() / n
    ce = torch.zeros_like(kd)
    if labels is not None:
        rows = F.cross_entropy(
            s.double().flatten(0, -2), labels.flatten().clamp_min(0), reduction="none"
        )
        ce = rows.view(labels.shape)[selected].sum() / n
    total = o["alpha_kd"] * kd + o["alpha_ce"] * ce
    return total.float(), torch.stack((kd, ce)).detach().float()


class ReferenceTrainer(DistillationTrainer):
    """The same Trainer (token selection, normaliser, logging) with the eager formula."""

    def distillation_loss(self, student_logits, teacher_logits, labels, selected, normalizer):
        return eager_loss(
            self.distillation_options, student_logits, teacher_logits, labels, selected, normalizer
        )


def _train(cls, tmp_path, name, data, arch="gpt2", args=None, **options):
    student, teacher = _model(arch, 16, seed=0), _model(arch, 32, seed=1)
    grads = _Grads()
    trainer = cls(
        model=student, args=args or _args(tmp_path / name), train_dataset=data,
        teacher_model=teacher, callbacks=[grads], **options,
    )  # fmt: skip
    trainer.train()
    return trainer, grads.steps


def _close(a, b, rtol=2e-5):
    """All tensors as one vector (some gradients are 0 up to round-off, e.g. a bias before a
    LayerNorm)."""
    assert [x.shape for x in a] == [y.shape for y in b]
    x = torch.cat([x.detach().flatten() for x in a])
    y = torch.cat([y.detach().flatten() for y in b])
    assert (x - y).norm() <= rtol * y.norm(), ((x - y).norm(), y.norm())


DIVERGENCES = [
    dict(divergence="forward_kl", temperature=2.0, t2_scale=True, alpha_ce=0.5),
    dict(divergence="reverse_kl", alpha_ce=0.25),
    dict(divergence="jsd", beta=0.5, temperature=1.5),
    dict(divergence="tvd", alpha_kd=2.0, alpha_ce=1.0),
]


@pytest.mark.parametrize("options", DIVERGENCES, ids=lambda o: o["divergence"])
def test_equals_the_same_trainer_with_the_eager_formula(tmp_path, options):
    """Two optimizer steps of two accumulated micro-batches: the logged loss and terms, each
    step's gradient and the final weights equal those of the eager float64 formula."""
    data = _data(8, causal=True)
    fused, fused_grads = _train(DistillationTrainer, tmp_path, "fused", data, **options)
    ref, ref_grads = _train(ReferenceTrainer, tmp_path, "ref", data, **options)
    assert len(fused_grads) == len(ref_grads) == 2
    for a, b in zip(fused_grads, ref_grads, strict=True):
        _close(a, b)
    _close(list(fused.model.parameters()), list(ref.model.parameters()), rtol=1e-5)
    logs = [h for h in fused.state.log_history if "loss" in h]
    ref_logs = [h for h in ref.state.log_history if "loss" in h]
    o = fused.distillation_options
    for got, want in zip(logs, ref_logs, strict=True):
        for key in ("loss", "kd_loss") + (("ce_loss",) if o["alpha_ce"] > 0 else ()):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
        assert ("ce_loss" in got) == (o["alpha_ce"] > 0)
        terms = o["alpha_kd"] * got["kd_loss"] + o["alpha_ce"] * got.get("ce_loss", 0.0)
        assert terms == pytest.approx(got["loss"], rel=1e-5)


@pytest.mark.parametrize("options", DIVERGENCES[:3], ids=lambda o: o["divergence"])
def test_fused_linear_equals_the_eager_formula_on_logits(tmp_path, options):
    """fused_linear=True (hidden states and heads, no logits) optimises the same objective: the
    logged losses, each step's gradients and the final weights of the eager formula."""
    data = _data(8, causal=True)
    fused, fused_grads = _train(
        DistillationTrainer, tmp_path, "fused", data, fused_linear=True, **options
    )
    ref, ref_grads = _train(ReferenceTrainer, tmp_path, "ref", data, **options)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        _close(a, b, rtol=1e-4)
    _close(list(fused.model.parameters()), list(ref.model.parameters()), rtol=1e-5)
    logs = [h["loss"] for h in fused.state.log_history if "loss" in h]
    ref_logs = [h["loss"] for h in ref.state.log_history if "loss" in h]
    assert logs == pytest.approx(ref_logs, rel=1e-5)


class _LayoutRecorder(DistillationTrainer):
    """Records whether the fused loss got the logits as rows it can read in place."""

    def distillation_loss(self, student_logits, teacher_logits, labels, selected, normalizer):
        self.row_layouts = getattr(self, "row_layouts", [])
        for x in (student_logits, teacher_logits):
            rows = x.reshape(-1, x.shape[-1])  # what the op does; a copy has its own storage
            shared = rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            self.row_layouts.append(shared)
        return super().distillation_loss(
            student_logits, teacher_logits, labels, selected, normalizer
        )


def test_causal_lm_logits_reach_the_loss_without_a_copy(tmp_path):
    """The causal shift moves the labels, not the logits: a slice logits[:, :-1] would make the
    loss copy both (B, S, V) tensors (no single row stride) and autograd zero-fill a third."""
    trainer, _ = _train(_LayoutRecorder, tmp_path, "run", _data(4, causal=True), alpha_ce=0.5)
    assert trainer.row_layouts and all(trainer.row_layouts)


@pytest.mark.parametrize(
    "arch,labels",
    [("gpt2", True), ("bert", True), ("gpt2", False)],
    ids=["clm", "mlm", "no-labels"],
)
def test_accumulated_gradient_is_the_whole_batch_gradient(tmp_path, arch, labels):
    """One optimizer step over 4 sequences as 2 micro-batches of 2 gives the gradient of the
    loss of all 4 at once: every selected token's term divided by the step's token count (by
    hand, no Trainer: the causal shift, the ignored labels or the attention mask)."""
    causal = arch == "gpt2"
    data = _data(4, causal=causal, labels=labels)
    options = dict(divergence="jsd", beta=0.3, alpha_ce=0.5 if labels else 0.0, temperature=2.0)
    args = _args(tmp_path / "run", max_steps=1)
    trainer, grads = _train(DistillationTrainer, tmp_path, "run", data, arch, args, **options)
    assert trainer.causal_lm is causal

    student, teacher = _model(arch, 16, seed=0), _model(arch, 32, seed=1)
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s, t = student(**inputs).logits, teacher(**inputs).logits.detach()
    target = batch.get("labels")
    if causal:
        s, t = s[:, :-1], t[:, :-1]
        target = None if target is None else target[:, 1:]
    if target is not None:
        selected = target != -100
    else:
        selected = batch["attention_mask"][:, 1:].bool()
    loss, _ = eager_loss(trainer.distillation_options, s, t, target, selected, None)
    loss.backward()
    _close(grads[0], [p.grad for p in student.parameters()])


def test_trains_saves_and_resumes_with_the_teacher_frozen_and_out_of_the_checkpoint(tmp_path):
    from safetensors.torch import load_file

    data = _data(8, causal=True)
    options = dict(divergence="reverse_kl", alpha_ce=0.5)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch")
    whole, _ = _train(
        DistillationTrainer, tmp_path, "whole", data, args=_args(tmp_path / "whole", **args),
        **options,
    )  # fmt: skip
    teacher = whole.teacher_model
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(
        teacher.state_dict()["lm_head.weight"], _model("gpt2", 32, seed=1).lm_head.weight
    )
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    student_keys = set(whole.model.state_dict())
    assert set(saved) <= student_keys and "transformer.wte.weight" in saved
    assert all(v.shape[-1] != 32 for v in saved.values())  # nothing of the (wider) teacher
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(list(whole.model.parameters()))

    student, teacher = _model("gpt2", 16, seed=5), _model("gpt2", 32, seed=1)
    resumed = DistillationTrainer(
        model=student, args=_args(tmp_path / "whole", **args), train_dataset=data,
        teacher_model=teacher, **options,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    _close(list(resumed.model.parameters()), list(whole.model.parameters()), rtol=1e-6)
    logged = [h for h in resumed.state.log_history if "kd_loss" in h]
    assert [h["step"] for h in logged][-2:] == [3, 4]


def test_bf16_with_a_bf16_teacher(tmp_path):
    data = _data(4, causal=True)
    student, teacher = _model("gpt2", 16, seed=0), _model("gpt2", 32, seed=1).bfloat16()
    trainer = DistillationTrainer(
        model=student, args=_args(tmp_path, bf16=True, max_steps=1), train_dataset=data,
        teacher_model=teacher, divergence="jsd", alpha_ce=0.5,
    )  # fmt: skip
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert math.isfinite(log["loss"]) and log["kd_loss"] > 0 and log["ce_loss"] > 0


def test_evaluate_reports_the_distillation_loss(tmp_path):
    data = _data(4, causal=True)
    trainer = DistillationTrainer(
        model=_model("gpt2", 16, seed=0), args=_args(tmp_path), eval_dataset=data,
        teacher_model=_model("gpt2", 32, seed=1), divergence="tvd",
    )  # fmt: skip
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_loss"] < 1  # a TVD


@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(divergence="kl"), ValueError, "divergence"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(alpha_kd=-1.0), ValueError, "alpha_kd"),
        (dict(alpha_kd=0.0), ValueError, "alpha_kd and alpha_ce"),
        (dict(t2_scale=1), TypeError, "t2_scale"),
        (dict(vocab="all"), ValueError, "vocab"),
        (dict(causal_lm="yes"), TypeError, "causal_lm"),
        (dict(teacher_model=None), TypeError, "teacher_model"),
        (dict(fused_linear=True, vocab="common"), ValueError, "one vocabulary"),
        (dict(fused_linear="yes"), TypeError, "fused_linear"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, options, error, match):
    kw = {"teacher_model": _model("gpt2", 32, seed=1), **options}
    with pytest.raises(error, match=match):
        DistillationTrainer(model=_model("gpt2", 16, seed=0), args=_args(tmp_path), **kw)


@pytest.mark.parametrize(
    "args,kw,match",
    [
        (dict(label_smoothing_factor=0.1), {}, "label_smoothing_factor"),
        ({}, dict(compute_loss_func=lambda *a, **k: 0), "compute_loss_func"),
    ],
)
def test_trainer_options_the_loss_would_ignore_are_refused(tmp_path, args, kw, match):
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(
            model=_model("gpt2", 16, seed=0), args=_args(tmp_path, **args),
            teacher_model=_model("gpt2", 32, seed=1), **kw,
        )  # fmt: skip


def test_a_teacher_sharing_the_students_parameters_is_refused(tmp_path):
    student, teacher = _model("gpt2", 16, seed=0), _model("gpt2", 16, seed=1)
    teacher.transformer.wte = student.transformer.wte
    with pytest.raises(ValueError, match="shares"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher)
    assert all(p.requires_grad for p in student.parameters())


def test_hard_ce_without_labels_is_an_error(tmp_path):
    trainer = DistillationTrainer(
        model=_model("gpt2", 16, seed=0), args=_args(tmp_path, max_steps=1),
        train_dataset=_data(4, causal=True, labels=False),
        teacher_model=_model("gpt2", 32, seed=1), alpha_ce=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="alpha_ce"):
        trainer.train()


def test_importing_fastdistill_imports_no_integration_framework():
    code = (
        "import sys, fastdistill, fastdistill.losses, fastdistill.integrations, "
        "fastdistill.integrations.trl\n"
        "loaded = [m for m in ('transformers', 'trl', 'accelerate', 'datasets') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
