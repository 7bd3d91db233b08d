"""The squad task of fastdistill-train: config, the distillation loss (against the seed's formula),
and end to end on the fixture: a tiny QA teacher trained from scratch, distilled into a smaller
student, evaluated with the official metrics; --do-eval; exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from _tiny import build_word_tokenizer, tiny_squad_inputs
from safetensors.torch import load_file

from fastdistill.train import TrainConfig, train
from fastdistill.train.cli import main as train_main
from fastdistill.train.demo import tiny_config
from fastdistill.train.tasks.squad import features as sd
from fastdistill.train.tasks.squad.loss import squad_loss

DATA = Path(__file__).parent / "data"
DEV = DATA / "dev-v2.0.json"  # nested SQuAD v2.0: 14 questions, 6 unanswerable
SAMPLE = DATA / "sample.json"  # the same questions, flat layout, more gold answers
# CI-sized: 14 questions in 38 windows of 96 tokens.
SIZES = dict(max_length=96, doc_stride=48, max_query_length=24)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


# ---- config ------------------------------------------------------------------------------------------


def test_squad_defaults_follow_the_seed():
    c = TrainConfig(task="squad", teacher="t", train_files=["a.json"]).resolved()
    o = c.options
    assert (c.alpha_kl, o.alpha_squad, c.alpha_cos, c.temperature) == (0.5, 0.5, 0.0, 2.0)
    assert "alpha_mlm" not in c.to_dict()  # an mlm key, not a squad one
    assert (c.max_length, o.doc_stride, o.max_query_length) == (384, 128, 64)
    assert (o.n_best_size, o.max_answer_length, o.null_score_diff_threshold) == (20, 30, 0.0)
    assert o.mask_question_and_padding is False and o.squad_version == "auto"
    alone = TrainConfig(
        task="squad", student_config="s", tokenizer="t", train_files=["a.json"]
    ).resolved()
    assert (alone.alpha_kl, alone.options.alpha_squad) == (0.0, 1.0)
    assert TrainConfig(teacher="t", train_files=["a"]).resolved().max_length == 128  # mlm


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="mlm", alpha_squad=1.0), "alpha_squad applies to --task squad"),
        (dict(alpha_mse=1.0), "alpha_mse does not apply to --task squad"),
        (dict(max_length=60, max_query_length=64), "max_length .* must exceed max_query_length"),
        (dict(doc_stride=0), "doc_stride must be an integer > 0"),
        (dict(squad_version="v3"), "squad_version must be one of"),
        (dict(null_score_diff_threshold=float("nan")), "null_score_diff_threshold"),
        (dict(eval_interval=15, log_interval=10), "eval_interval .* multiple of log_interval"),
        (dict(do_eval=True), "do_eval needs eval_files"),
        (dict(do_eval=True, eval_files=["d.json"]), "do_eval evaluates --student-pretrained"),
        (dict(train_files=[]), "train_files is empty"),
    ],
)
def test_squad_validation(kwargs, match):
    base = dict(task="squad", teacher="t", train_files=["a.json"])
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(base).resolved()


def test_squad_flags(capsys):
    args = ["--task", "squad", "--teacher", "t", "--train-files", "a.json", "--print-config"]
    args += ["--doc-stride", "64", "--mask-question-and-padding", "--squad-version", "v2"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "alpha_squad: 0.5" in out and "doc_stride: 64" in out and "max_length: 384" in out
    assert "mask_question_and_padding: true" in out and "squad_version: v2" in out
    assert train_main(["--task", "squad", "--squad-version", "v3"]) == 2


# ---- the loss ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    examples = sd.read_examples([DEV])
    tok = build_word_tokenizer(
        [t for ex in examples for t in (ex.question, ex.context)], tmp_path_factory.mktemp("tok")
    )
    settings = sd.FeatureSettings(**SIZES, v2=True)
    arrays, _ = sd.convert_examples(examples, tok, settings)
    feats = sd.SquadFeatures(arrays, examples, settings, {})
    return sd.collate_features(feats, list(range(0, 24, 3)), pad_id=tok.pad_token_id)


def _logits(batch, seed):
    g = torch.Generator().manual_seed(seed)
    shape = batch.input_ids.shape
    return [torch.randn(shape, generator=g) * 3 for _ in range(2)]


def _seed_reference(s, t, batch, T, allowed=None):
    """The seed's formula, written out: KLDivLoss(batchmean) of log_softmax / softmax at T, × T²,
    averaged over start and end; CrossEntropyLoss averaged over start and end; with ``allowed``
    the softmaxes run over those positions only."""
    if allowed is not None:
        s = [x.masked_fill(~allowed, float("-inf")) for x in s]
        t = [x.masked_fill(~allowed, float("-inf")) for x in t]
    kl = 0.0
    for sx, tx in zip(s, t, strict=True):
        log_ps, log_pt = F.log_softmax(sx / T, -1), F.log_softmax(tx / T, -1)
        pt = log_pt.exp()
        # p_t = 0 terms contribute 0 (their log terms are -inf - -inf = nan otherwise)
        terms = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
        kl = kl + terms.sum() / sx.shape[0] * T**2
    qa = (
        F.cross_entropy(s[0], batch.start_positions) + F.cross_entropy(s[1], batch.end_positions)
    ) / 2
    return kl / 2, qa


@pytest.mark.parametrize(
    "impl, masked", [("fused", False), ("fused", True), ("eager", False)]
)  # (the eager path is the seed's code: it has no masking option)
def test_loss_is_the_seed_formula(batch, masked, impl):
    cfg = TrainConfig.from_dict(
        dict(
            task="squad",
            teacher="t",
            train_files=["a.json"],
            temperature=2.0,
            alpha_kl=0.7,
            alpha_squad=0.3,
            loss_impl=impl,
            mask_question_and_padding=masked,
            **SIZES,
        )
    ).resolved()
    s = [x.requires_grad_() for x in _logits(batch, 0)]
    t = _logits(batch, 1)
    w = {"world": 1, "kl": 1.0, "ce": 1.0}
    total, kl, qa = squad_loss(
        cfg,
        SimpleNamespace(start_logits=s[0], end_logits=s[1]),
        SimpleNamespace(start_logits=t[0], end_logits=t[1]),
        batch,
        w,
    )
    total.backward()
    grads = [x.grad.clone() for x in s]
    s_ref = [x.detach().clone().requires_grad_() for x in s]
    kl_ref, qa_ref = _seed_reference(s_ref, t, batch, 2.0, batch.answer_mask if masked else None)
    (0.7 * kl_ref + 0.3 * qa_ref).backward()
    torch.testing.assert_close(kl, kl_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qa, qa_ref.detach(), rtol=1e-5, atol=1e-6)
    for g, x in zip(grads, s_ref, strict=True):
        torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-7)
    if masked:
        for g in grads:
            assert (g[~batch.answer_mask] == 0).all()  # question and padding: no gradient
            assert (g[:, 0] != 0).all()  # [CLS] stays in the softmax
            assert torch.isfinite(g).all()


def test_loss_weights_split_over_micro_batches(batch):
    """w scales a micro-batch's mean into its share of the step's mean (two halves = the whole)."""
    cfg = TrainConfig.from_dict(
        dict(task="squad", teacher="t", train_files=["a.json"], **SIZES)
    ).resolved()
    s, t = _logits(batch, 2), _logits(batch, 3)

    def out(x, rows):
        return SimpleNamespace(start_logits=x[0][rows], end_logits=x[1][rows])

    def part(rows):
        b = sd.SquadBatch(
            batch.input_ids[rows],
            batch.attention_mask[rows],
            batch.token_type_ids[rows],
            batch.start_positions[rows],
            batch.end_positions[rows],
            batch.answer_mask[rows],
            0,
        )
        n = len(range(*rows.indices(8)))
        return squad_loss(
            cfg, out(s, rows), out(t, rows), b, {"world": 1, "kl": n / 8, "ce": n / 8}
        )

    whole = part(slice(0, 8))
    a, b = part(slice(0, 3)), part(slice(3, 8))
    for i in range(3):
        torch.testing.assert_close(a[i] + b[i], whole[i], rtol=1e-5, atol=1e-6)


# ---- end to end ----------------------------------------------------------------------------------------


def _cfg(root, out, **kw):
    base = dict(
        task="squad",
        train_files=[str(SAMPLE)],  # the flat file for training, the nested one for evaluation
        eval_files=[str(DEV)],
        cache_dir=str(root / "cache"),
        output_dir=str(out),
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=10,
        log_interval=10,
        save_interval=100,
        progress_bar=False,
        tensorboard=False,
        device="cpu",
        **SIZES,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """A 2-layer, 64-wide BERT QA teacher trained from scratch on the fixture (hard QA loss alone),
    and a 1-layer, 32-wide student distilled from it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qa")
    paths = tiny_squad_inputs(root, [SAMPLE])
    teacher = train(
        _cfg(
            root,
            root / "teacher",
            student_config=paths["teacher_config"],
            tokenizer=paths["tokenizer"],
            max_steps=200,
        )
    )
    student = train(
        _cfg(
            root,
            root / "student",
            teacher=str(root / "teacher" / "final"),
            student_config=paths["student_config"],
            max_steps=200,
            eval_interval=100,
            tensorboard=True,
        )
    )
    return dict(root=root, paths=paths, teacher=teacher, student=student)


def test_distilled_student_beats_the_untrained_one(qa, capsys):
    before, after = qa["student"]["eval_before"], qa["student"]["eval_after"]
    teacher = qa["teacher"]["eval_after"]
    with capsys.disabled():
        print(
            "\nSQuAD v2 fixture (14 questions), F1/EM: "
            f"teacher {teacher['f1']:.1f}/{teacher['exact']:.1f}, "
            f"untrained student {before['f1']:.1f}/{before['exact']:.1f}, "
            f"distilled student {after['f1']:.1f}/{after['exact']:.1f} "
            f"(HasAns F1 {before['HasAns_f1']:.1f} → {after['HasAns_f1']:.1f})"
        )
    assert before["teacher_f1"] == pytest.approx(teacher["f1"])  # the teacher as the run saw it
    assert teacher["f1"] > 60
    assert after["f1"] > before["f1"] + 40 and after["f1"] > 60
    assert after["HasAns_f1"] > before["HasAns_f1"] + 40
    assert after["total"] == 14 and after["HasAns_total"] == 8 and after["NoAns_total"] == 6
    assert qa["student"]["student_parameters"] < qa["student"]["teacher_parameters"] / 3


def test_run_writes_predictions_metrics_and_checkpoints(qa):
    run = qa["root"] / "student"
    for tag in ("step-00000000", "step-00000100", "step-00000200", "teacher"):
        d = run / "eval" / tag
        preds = json.loads((d / "predictions.json").read_text())
        nbest = json.loads((d / "nbest_predictions.json").read_text())
        odds = json.loads((d / "null_odds.json").read_text())
        results = json.loads((d / "results.json").read_text())
        assert set(preds) == set(nbest) == set(odds) and len(preds) == 14
        assert all(1 <= len(v) <= 21 for v in nbest.values())
        assert "best_f1_thresh" in results
    final = json.loads((run / "eval" / "step-00000200" / "results.json").read_text())
    assert final == qa["student"]["eval_after"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 100, 200]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(10, 201, 10))
    assert train_records[-1]["kl"] < train_records[0]["kl"]  # the KL term shrinks
    assert train_records[-1]["ce"] < train_records[0]["ce"]  # ce: the QA loss
    assert (run / "metrics.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000200"
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(run / "final")
    assert type(model).__name__ == "BertForQuestionAnswering"
    assert model.config.num_hidden_layers == 1
    # the features were built once per file: train (sample.json) and eval (dev-v2.0.json)
    assert len(list((qa["root"] / "cache").glob("squad-*"))) == 2


def test_do_eval_scores_a_saved_model(qa, tmp_path, capsys):
    run = qa["root"] / "student"
    common = ["--task", "squad", "--do-eval", "--eval-files", str(DEV), "--no-progress-bar"]
    common += ["--cache-dir", str(qa["root"] / "cache"), "--no-tensorboard", "--device", "cpu"]
    common += [f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()]
    out = tmp_path / "eval"
    assert (
        train_main([*common, "--student-pretrained", str(run / "final"), "--output-dir", str(out)])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "eval_results.json").read_text())
    assert result["eval"] == printed["eval"]
    assert result["eval"]["f1"] == pytest.approx(qa["student"]["eval_after"]["f1"])
    assert (out / "eval" / "step-00000000" / "predictions.json").is_file()
    assert not (out / "checkpoints").exists()
    # a checkpoint directory works too (its model/ is used), with the teacher scored beside it
    ckpt_dir = run / "checkpoints" / "step-00000200"
    out2 = tmp_path / "eval2"
    args = [*common, "--student-pretrained", str(ckpt_dir), "--output-dir", str(out2)]
    assert train_main([*args, "--teacher", str(qa["root"] / "teacher" / "final")]) == 0
    result2 = json.loads((out2 / "eval_results.json").read_text())["eval"]
    assert result2["f1"] == pytest.approx(result["eval"]["f1"])
    assert result2["teacher_f1"] == pytest.approx(qa["teacher"]["eval_after"]["f1"])


def test_resume_continues_exactly(qa, tmp_path):
    # The classic recipe's pair: a BERT teacher (segment ids) and a DistilBERT student (none).
    vocab = len(transformers.AutoTokenizer.from_pretrained(qa["paths"]["tokenizer"]))
    config = tiny_config("distilbert", vocab, hidden=32, layers=1, heads=2, dropout=0.1)
    config.save_pretrained(tmp_path / "distilbert")
    kw = dict(
        teacher=str(qa["root"] / "teacher" / "final"),
        student_config=str(tmp_path / "distilbert"),
        max_steps=6,
        log_interval=2,
        save_interval=2,
        gradient_accumulation_steps=2,
        batch_size=8,
        mask_question_and_padding=True,
    )
    train(_cfg(qa["root"], tmp_path / "whole", **kw))

    class Killed(Exception):
        pass

    def kill(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(qa["root"], tmp_path / "split", **kw), on_step_end=kill)
    train(_cfg(qa["root"], tmp_path / "split", resume=True, **kw))
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert any(k.startswith("distilbert.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
