"""``fastdistill-train``: the command line of the trainer, and ``fastdistill report RUN_DIR``.

Every :class:`~fastdistill.train.config.TrainConfig` field is a flag (generated, so ``--help`` is
always complete); ``--config FILE`` loads YAML/JSON first and flags override it. With no arguments
(or ``--demo``) it runs the embedded default distillation (:mod:`fastdistill.train.demo`).

Exit status: 0 done; 1 the run stopped (e.g. too many non-finite steps; the message says why and
where the last good checkpoint is); 2 a usage or configuration error; 130 interrupted.
Under ``torchrun`` every process runs this; only rank 0 writes and logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fastdistill.train.flags import add_config_arguments, config_from_args

DESCRIPTION = (
    "Distil a Hugging Face teacher into a smaller student with the DistilBERT recipe (soft-target "
    "KL at temperature T, hard MLM/CLM loss, logit MSE, hidden-state cosine; SQuAD: KL on the "
    "start/end logits plus the QA loss, official EM/F1) using fastdistill's fused losses. With "
    "no arguments, runs the embedded demo: trains a small BERT teacher on the shipped "
    "public-domain corpus and distils it into a half-depth student (a few minutes on 2 CPU cores)."
)
EPILOG = (
    "Examples:\n"
    "  fastdistill-train                      # the embedded demo (also: --demo)\n"
    "  fastdistill-train --teacher ./bert --train-files a.txt b.txt --output-dir runs/x\n"
    "  fastdistill-train --config run.yaml --max-steps 1000   # flags override the file\n"
    "  fastdistill-train --task squad --teacher ./bert-squad --student-config ./small \\\n"
    "      --train-files train-v2.0.json --eval-files dev-v2.0.json --output-dir runs/qa\n"
    "  fastdistill-train --task squad --do-eval --student-pretrained runs/qa/final \\\n"
    "      --eval-files dev-v2.0.json --output-dir runs/qa-eval   # evaluate only\n"
    "  torchrun --nproc-per-node 2 -m fastdistill.train.cli --config run.yaml\n"
    "  fastdistill report runs/x             # redraw runs/x/metrics.png and print the summary\n"
    "Exit status: 0 done, 1 the run stopped (message says why), 2 bad usage/config, 130 interrupted."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdistill-train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file with config keys (the flags' names with underscores); "
        "flags given here override it",
    )
    parser.add_argument(
        "--demo",
        nargs="?",
        const="mlm",
        choices=("mlm", "clm"),
        help="run an embedded example: mlm (the default, what no arguments does: a BERT "
        "teacher and a half-depth student) or clm (a Llama teacher distilled with JSD); honours "
        "--output-dir (default: runs/demo, runs/demo-clm), --progress-bar, --tensorboard, "
        "--resume and --print-config (the mlm demo's configurations, without running)",
    )
    parser.add_argument(
        "--write-teacher-cache",
        metavar="DIR",
        help="run the teacher once over --train-files and write its top --teacher-top-k "
        "log-probabilities per token to DIR (resumable; then train with --teacher-cache DIR "
        "without loading the teacher)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML and exit",
    )
    add_config_arguments(parser)
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = _attach_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    _setup_logging()
    from fastdistill.train.trainer import TrainingError

    try:
        if not argv or args.demo:
            return _demo(args)
        cfg = config_from_args(args)
        if args.print_config:
            return _print_config(cfg)
        import torch

        from fastdistill.train.runtime import choose_threads

        torch.set_num_threads(choose_threads(cfg.num_threads))
        if args.write_teacher_cache:
            from fastdistill.train.teacher_cache import write

            summary = write(cfg, args.write_teacher_cache)
        else:
            from fastdistill.train.trainer import train

            summary = train(cfg)
    except (ValueError, OSError) as exc:  # bad input; OSError: a path the checks did not foresee
        print(f"fastdistill-train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"fastdistill-train: run stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastdistill-train: interrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("steps", "skipped_steps", "eval_before", "eval_after", "eval", "figure")
        if args.write_teacher_cache:
            keys = tuple(summary)
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
    return 0


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--flag -1e-3`` → ``--flag=-1e-3``: argparse takes a token like ``-1e-3`` for an option
    and reports "expected one argument" instead of letting validation name the bad value."""
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if prev.startswith("--") and "=" not in prev and token.startswith("-") and _number(token):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def _number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _print_config(cfg) -> int:
    """The resolved configuration as YAML. Without data files, a template to fill in: every key
    with its default, after a comment saying what is missing. Other errors are errors."""
    import yaml

    if not cfg.train_files and not cfg.do_eval:
        print("# a template: set train_files (and teacher, or student_config and tokenizer)")
        data = cfg.to_dict()
    else:
        data = cfg.resolved().to_dict()
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """An embedded demo; with --print-config only its two configurations (nothing runs)."""
    from fastdistill.train.demo import demo_config_yaml, format_demo, run_demo

    kind = args.demo or "mlm"
    default_out = "runs/demo" if kind == "mlm" else "runs/demo-clm"
    out = getattr(args, "output_dir", default_out)
    shown = dict(
        progress_bar=getattr(args, "progress_bar", True),
        tensorboard=getattr(args, "tensorboard", True),
    )
    resume = getattr(args, "resume", False)
    if kind == "clm":
        from fastdistill.train.demo_clm import clm_demo_configs, run_clm_demo

        if args.print_config:
            for name, cfg in clm_demo_configs(out, **shown).items():
                print(f"# {name} run\n---\n" + _yaml(cfg.resolved().to_dict()), end="")
            return 0
        print(format_demo(run_clm_demo(out, resume=resume, **shown), kind="clm"))
        return 0
    if args.print_config:
        print(demo_config_yaml(out, **shown), end="")
        return 0
    print(format_demo(run_demo(out, resume=resume, **shown)))
    return 0


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ---- fastdistill report RUN_DIR -------------------------------------------------------------------

REPORT_HELP = (
    "draw the figure of a fastdistill-train run (loss terms, lr, grad norm, tokens/s, held-out "
    "metrics) into "
    "RUN_DIR/metrics.png and print its last metrics"
)


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a fastdistill-train --output-dir")
    parser.add_argument("-o", "--output", metavar="PNG", help="write the figure here instead")


def report_run(args: argparse.Namespace) -> int:
    from fastdistill.train.metrics import METRICS_FILE, plot_metrics, read_metrics

    runs = sorted(str(p.parent) for p in Path(args.run_dir).glob(f"*/{METRICS_FILE}"))
    if not os.path.isfile(os.path.join(args.run_dir, METRICS_FILE)) and runs:
        print(
            f"fastdistill report: error: {args.run_dir} holds runs, not a run: report one of "
            f"{', '.join(runs)}",
            file=sys.stderr,
        )
        return 1
    try:
        path = plot_metrics(args.run_dir, args.output)
    except ValueError as exc:
        print(f"fastdistill report: error: {exc}", file=sys.stderr)
        return 1
    records = read_metrics(os.path.join(args.run_dir, METRICS_FILE))
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last = train[-1]

    def g(name):
        value = last.get(name)
        return "n/a" if value is None else f"{value:.4g}"

    print(f"run: {args.run_dir}")
    print(
        f"steps: {last['step']}  skipped: {last.get('skipped_total', 0)}  last loss: {g('loss')} "
        f"(kl {g('kl')}, ce {g('ce')}, mse {g('mse')}, cos {g('cos')})  tokens/s: {g('tokens_per_s')}"
    )
    for r in evals:
        values = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k not in ("kind", "step"))
        print(f"held-out at step {r['step']}: {values}")
    print(f"figure: {path}")
    return 0


if __name__ == "__main__":  # torchrun -m fastdistill.train.cli ...
    raise SystemExit(main())
