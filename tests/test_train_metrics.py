"""The run figure (``metrics.png``): the training curves and every held-out metric the run prints."""

from __future__ import annotations

import json

import matplotlib.figure
import pytest

from fastdistill.train import metrics


def _write_run(run_dir, evals):
    records = [
        {"kind": "train", "step": s, "loss": 1.0 / s, "kl": 0.5 / s, "ce": 0.5, "lr": 1e-3}
        for s in (2, 4, 6)
    ]
    records += [{"kind": "eval", **e} for e in evals]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / metrics.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def _drawn_figure(monkeypatch, run_dir):
    """Plot ``run_dir`` and return the figure as it was saved."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    out = metrics.plot_metrics(run_dir)
    assert out.is_file() and len(saved) == 1
    return saved[0]


def _curves(fig):
    """{legend label: (xs, ys)} of every line in every panel, with the panel's title."""
    curves = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            xs, ys = (list(map(float, v)) for v in line.get_data())
            curves[line.get_label()] = (ax.get_title(), xs, ys)
    return curves


def test_figure_plots_held_out_mlm_metrics(tmp_path, monkeypatch):
    before = {"kl_to_teacher": 0.08, "top1_agreement": 0.5, "accuracy": 0.3, "ce": 4.0}
    after = {"kl_to_teacher": 0.03, "top1_agreement": 0.7, "accuracy": 0.35, "ce": 3.5}
    _write_run(
        tmp_path,
        [
            {"step": 0, **before, "teacher_accuracy": 0.4},
            {"step": 4, "kl_to_teacher": 0.05, "top1_agreement": 0.6, "accuracy": 0.32, "ce": 3.8},
            {"step": 6, **after, "teacher_accuracy": 0.4},
        ],
    )
    curves = _curves(_drawn_figure(monkeypatch, tmp_path))
    for name in before:
        title, xs, ys = curves[name]
        assert "held-out" in title and name in title
        assert xs == [0, 4, 6] and ys == pytest.approx([before[name], ys[1], after[name]])
    # The teacher's accuracy is drawn in the student accuracy's panel.
    assert curves["teacher_accuracy"][0] == curves["accuracy"][0]
    assert curves["teacher_accuracy"][2] == pytest.approx([0.4, 0.4])


def test_figure_plots_every_metric_a_task_returns(tmp_path, monkeypatch):
    # Question answering: EM/F1 families and the teacher's scores, measured once before training.
    squad = {"exact": 40.0, "f1": 50.0, "HasAns_exact": 30.0, "HasAns_f1": 45.0, "total": 12}
    _write_run(
        tmp_path,
        [
            {"step": 0, **squad, "teacher_exact": 70.0, "teacher_f1": 80.0},
            {"step": 6, **{k: v + 5 for k, v in squad.items()}},
        ],
    )
    fig = _drawn_figure(monkeypatch, tmp_path)
    curves = _curves(fig)
    for name in squad:
        assert curves[name][1:] == ([0, 6], [squad[name], squad[name] + 5])
    assert curves["exact"][0] == curves["HasAns_exact"][0] == curves["teacher_exact"][0]
    assert curves["f1"][0] == curves["teacher_f1"][0] != curves["exact"][0]
    assert curves["teacher_f1"][2] == [80.0, 80.0]  # a level line across the panel


def test_eval_panels_keep_the_last_record_of_a_step():
    panels = metrics.eval_panels(
        [
            {"kind": "eval", "step": 0, "token_cosine": 0.5, "embedding_cosine": 0.6},
            {"kind": "eval", "step": 0, "token_cosine": 0.4, "embedding_cosine": 0.6},
            {"kind": "eval", "step": 8, "token_cosine": 0.9, "embedding_cosine": 0.95, "x": "s"},
        ]
    )
    assert list(panels) == ["held-out cosine"]
    assert panels["held-out cosine"]["token_cosine"] == ([0, 8], [0.4, 0.9])


def test_figure_without_held_out_metrics(tmp_path, monkeypatch):
    _write_run(tmp_path, [])
    fig = _drawn_figure(monkeypatch, tmp_path)
    assert len(fig.axes) == 4 and "loss" in fig.axes[0].get_title()
