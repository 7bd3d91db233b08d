"""fastdistill.integrations.trl: generalized_jsd_loss equals TRL's own (values and gradients, every
reduction, β ∈ {0, 0.5, 1}, ignored labels, num_items_in_batch), and TRL's GKD trainer with it
trains exactly as without it. Skipped without an importable TRL (an optional test dependency)."""

from __future__ import annotations

import os

import pytest
import torch

import fastdistill.losses as FL
from fastdistill.integrations.trl import generalized_jsd_loss

V, SEQ = 64, 12


def _trl_gkd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except Exception as exc:  # an incompatible trl/transformers pair must not fail the suite
        pytest.skip(f"trl's GKDTrainer is not importable here: {exc!r}")
    return GKDTrainer, GKDConfig


def _inputs(rng_seed: int, shape=(3, 7, 53), ignored_rows: bool = True):
    g = torch.Generator().manual_seed(rng_seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[0, :4] = -100  # a prompt
    if ignored_rows:
        labels[1] = -100  # a sequence with nothing to learn
    labels[2, -1] = -100
    return s, t, labels


def _compare(trl_jsd, s, t, **kw):
    """TRL's value and gradient in float64 against ours on the float32-rounded inputs."""
    x = s.float().double().requires_grad_(True)
    want = trl_jsd(x, t.float().double(), **kw)
    (want * 0.7).backward()
    y = s.float().requires_grad_(True)
    got = generalized_jsd_loss(y, t.float(), **kw)
    (got * 0.7).backward()
    assert got.dtype == torch.float32 and got.dim() == 0
    if torch.isnan(want):
        assert torch.isnan(got), kw
        return
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-7, (got, want, kw)
    assert (y.grad.double() - x.grad).norm() <= 1e-5 * x.grad.norm() + 1e-9, kw


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no-labels"])
def test_equals_trl_generalized_jsd_loss(beta, reduction, labelled):
    trl_jsd = _trl_gkd()[0].generalized_jsd_loss
    s, t, labels = _inputs(int(beta * 10) + len(reduction))
    for temperature in (0.7, 2.0):
        for n in (None, torch.tensor(9), 13.0):
            kw = dict(beta=beta, temperature=temperature, reduction=reduction)
            _compare(trl_jsd, s, t, labels=labels if labelled else None, num_items_in_batch=n, **kw)


def test_edge_cases_equal_trl():
    """2-d logits; every label ignored (batchmean gives 0, mean NaN, as TRL); defaults."""
    trl_jsd = _trl_gkd()[0].generalized_jsd_loss
    s, t, _ = _inputs(1)
    s, t = s[0], t[0]  # (7, 53)
    _compare(trl_jsd, s, t, labels=torch.tensor([5, -100, 0, 52, -100, 3, 9]))
    _compare(trl_jsd, s, t)
    nothing = torch.full((7,), -100)
    for reduction in ("batchmean", "sum", "mean"):
        _compare(trl_jsd, s, t, labels=nothing, reduction=reduction)


def test_differences_from_trl_are_errors():
    s, t, labels = _inputs(2)
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s.float(), t.float(), labels=labels, reduction="none")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s.float(), t.float(), beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(s.float(), t.float(), temperature=0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        generalized_jsd_loss(s.float(), t.float().requires_grad_(True))
    with pytest.raises(ValueError, match="normalizer"):
        generalized_jsd_loss(s.float(), t.float(), num_items_in_batch=0)
    # With num_items_in_batch TRL ignores the reduction; so does this function.
    n = torch.tensor(5.0)
    got = generalized_jsd_loss(
        s.float(), t.float(), labels=labels, reduction="none", num_items_in_batch=n
    )
    want = generalized_jsd_loss(s.float(), t.float(), labels=labels, reduction="sum") / 5
    torch.testing.assert_close(got, want)


# ---- the GKD trainer ---------------------------------------------------------------------------


def _gkd_setup(tmp_path):
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models

    from fastdistill.train.demo import tiny_config

    vocab = {f"w{i}": i for i in range(V)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
        pad_token="w0", unk_token="w1", eos_token="w2",
    )  # fmt: skip

    def model(hidden, seed):
        torch.manual_seed(seed)
        config = tiny_config("gpt2", V, hidden=hidden, layers=1, heads=2, max_positions=32)
        config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 2, 2
        config.initializer_range = 0.3
        return transformers.AutoModelForCausalLM.from_config(config)

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(3, V, (SEQ,), generator=g)
        attention = (torch.arange(SEQ) < 5 + i % 7).long()
        labels = torch.where(attention.bool(), ids, -100)
        labels[:3] = -100
        rows.append(
            {"input_ids": ids.tolist(), "attention_mask": attention.tolist(),
             "labels": labels.tolist(), "prompts": ids[:3].tolist(),
             "prompt_attention_mask": [1, 1, 1]}
        )  # fmt: skip

    def collate(batch):
        return {k: torch.tensor([r[k] for r in batch]) for k in batch[0]}

    return tokenizer, model, Dataset.from_list(rows), collate


class _Grads:
    def __init__(self):
        import transformers

        class Callback(transformers.TrainerCallback):
            def on_pre_optimizer_step(cb, args, state, control, model=None, **kw):
                self.steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]))

        self.steps: list[torch.Tensor] = []
        self.callback = Callback()


def test_gkd_trainer_with_the_fused_loss_trains_as_trls(tmp_path, monkeypatch):
    """Two off-policy steps (lmbda=0) of two accumulated micro-batches: the same logged losses
    and gradients with TRL's GKDTrainer and with fastdistill's, which calls the fused op."""
    trl_trainer, config_cls = _trl_gkd()
    from fastdistill.integrations.trl import GKDTrainer

    assert issubclass(GKDTrainer, trl_trainer)
    assert GKDTrainer.generalized_jsd_loss is generalized_jsd_loss
    calls = []
    fused = FL.jsd_loss
    monkeypatch.setattr(
        FL, "jsd_loss", lambda *a, **k: calls.append(k.get("normalizer")) or fused(*a, **k)
    )
    tokenizer, model, data, collate = _gkd_setup(tmp_path)
    runs = {}
    for cls in (trl_trainer, GKDTrainer):
        args = config_cls(
            str(tmp_path / cls.__module__), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, optim="sgd",
            max_grad_norm=0.0, lmbda=0.0, beta=0.5, max_length=SEQ, report_to=[],
            use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        )  # fmt: skip
        grads = _Grads()
        trainer = cls(
            model=model(16, 0), teacher_model=model(32, 1), args=args, train_dataset=data,
            data_collator=collate, processing_class=tokenizer, callbacks=[grads.callback],
        )  # fmt: skip
        trainer.train()
        runs[cls] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], grads.steps)
    # Every micro-batch of fastdistill's run went through the fused op, normalised by the
    # Trainer's num_items_in_batch.
    assert len(calls) == 4 and all(n is not None for n in calls)
    (want_loss, want_grads), (got_loss, got_grads) = runs[trl_trainer], runs[GKDTrainer]
    assert len(got_loss) == len(want_loss) == 2
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert (got - want).norm() <= 2e-5 * want.norm()
