"""Turn a benchmark run into markdown for bench/RESULTS.md.

    python -m bench.report --run                      # run `pytest bench`, then print the report
    python -m bench.report --run --out report.md      # ... and write it to a file
    python -m bench.report --bench-json B.json --targets-json T.json   # from an earlier run

``--run`` invokes ``pytest bench -q --benchmark-json=... --targets-json=...`` (extra pytest
arguments after ``--``) and reads both files. All figures come from that one run: the suites'
timings (pytest-benchmark, best of its rounds), the peak extra memory and effective bandwidth each
case recorded in extra_info, and test_targets.py's interleaved issue-2 measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

IMPL_ORDER = ("fastdistill", "eager", "compile", "liger")
OP_ORDER = ("kl_div", "distillation", "kl_div_masked", "mse", "cross_entropy", "cosine")
DTYPE_ORDER = ("fp32", "bf16")
MODE_ORDER = ("fwd+bwd", "fwd")


def run_suites(bench_json: str, targets_json: str, pytest_args: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "bench",
        "-q",
        f"--benchmark-json={bench_json}",
        f"--targets-json={targets_json}",
        *pytest_args,
    ]
    print("running:", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, cwd=root)


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def machine_section(machine: dict, copy_bw: float | None, when: str | None) -> list[str]:
    lines = ["## Machine", ""]
    lines.append(f"- date: {machine.get('date', when or '?')}")
    lines.append(
        f"- CPU: {machine.get('cpu', '?')} ({machine.get('cpu_flags', '')}), "
        f"{machine.get('cores', '?')} cores, torch threads {machine.get('torch_threads', '?')}"
    )
    lines.append(
        f"- python {machine.get('python', '?')}, torch {machine.get('torch', '?')}, "
        f"triton {machine.get('triton', '?')}, fastdistill {machine.get('fastdistill', '?')} "
        f"(CPU core ISA variant: {machine.get('fastdistill_isa', '?')}, "
        f"FASTDISTILL_BACKEND={machine.get('backend', '?')})"
    )
    lines.append(f"- platform: {machine.get('platform', '?')}")
    lines.append(
        f"- source: commit {machine.get('commit', '?')}; 1-minute load average when the run "
        f"recorded this: {machine.get('loadavg_1m', '?')} (2 cores: anything above ~0.3 means "
        "other work competed for the CPU and skews the timings)"
    )
    if copy_bw:
        lines.append(
            f"- copy bandwidth (dst.copy_(src), 256 MB, best of 20, read+write bytes): "
            f"{copy_bw / 1e9:.1f} GB/s"
        )
    return lines + [""]


def targets_section(targets: dict) -> list[str]:
    lines = ["## Issue-2 targets (bench/test_targets.py)", ""]
    lines += targets.get("table_markdown", [])
    return lines + [""]


def suite_section(bench: dict) -> list[str]:
    """One table per (op, dtype): a row per (shape, mode), the implementations side by side."""
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    shapes_seen: list[str] = []
    for b in bench.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        key = (info["op"], info["dtype"], info["shape"], info["mode"])
        cells[key][info["impl"]] = {
            "min": b["stats"]["min"],
            "rounds": b["stats"]["rounds"],
            **info,
        }
        if info["shape"] not in shapes_seen:
            shapes_seen.append(info["shape"])
    if not cells:
        return ["(no pytest-benchmark results)", ""]

    lines = [
        "## Suite (bench/test_bench_losses.py)",
        "",
        "Best time of the pytest-benchmark rounds. `x eager` / `x compile`: how many times faster "
        "fastdistill is. Peak: extra memory during the call as a multiple of one input tensor "
        "(the logits; hidden states for cosine), the gradient included for fwd+bwd. BW: "
        "fastdistill's effective bandwidth (inputs read once + gradient written once, over its "
        "best time) as a share of the copy bandwidth.",
        "",
    ]
    for op in OP_ORDER:
        for dtype in DTYPE_ORDER:
            keys = [
                (op, dtype, shape, mode)
                for shape in shapes_seen
                for mode in MODE_ORDER
                if (op, dtype, shape, mode) in cells
            ]
            if not keys:
                continue
            unit = "hidden" if op == "cosine" else "logits"
            lines += [
                f"### {op} {dtype}",
                "",
                "| shape | rows x cols | mode | fastdistill ms | eager ms | compile ms | x eager "
                f"| x compile | peak fd / eager / compile (x {unit}) | fd BW (% copy) |",
                "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
            ]
            for key in keys:
                row = cells[key]
                fd, ea, co = row.get("fastdistill"), row.get("eager"), row.get("compile")
                ref = fd or ea or co
                t = {k: (v["min"] if v else None) for k, v in (("fd", fd), ("ea", ea), ("co", co))}
                x_ea = t["ea"] / t["fd"] if t["fd"] and t["ea"] else None
                x_co = t["co"] / t["fd"] if t["fd"] and t["co"] else None
                peaks = " / ".join(
                    f"{v['peak_extra_x_input']:.2f}" if v else "-" for v in (fd, ea, co)
                )
                bw = (
                    f"{100 * fd['eff_bw_frac_copy']:.0f}%"
                    if fd and "eff_bw_frac_copy" in fd
                    else "-"
                )
                lines.append(
                    f"| {key[2]} | {ref['rows']} x {ref['cols']} | {key[3]} | {_fmt_ms(t['fd'])} "
                    f"| {_fmt_ms(t['ea'])} | {_fmt_ms(t['co'])} | {_fmt_x(x_ea)} | {_fmt_x(x_co)} "
                    f"| {peaks} | {bw} |"
                )
            lines.append("")
    return lines


def render(bench: dict | None, targets: dict | None) -> str:
    machine = {}
    copy_bw = None
    when = None
    if targets:
        machine = targets.get("machine", {})
        copy_bw = targets.get("copy_bw_bytes_per_s")
    if bench:
        machine = machine or bench.get("machine_info", {}).get("fastdistill", {})
        when = bench.get("datetime")
        if copy_bw is None:
            for b in bench.get("benchmarks", []):
                if "copy_bw_GBps" in b.get("extra_info", {}):
                    copy_bw = b["extra_info"]["copy_bw_GBps"] * 1e9
                    break
    out = ["# fastdistill benchmark results", ""]
    out += machine_section(machine, copy_bw, when)
    if targets:
        out += targets_section(targets)
    if bench:
        out += suite_section(bench)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run `pytest bench` first")
    p.add_argument("--bench-json", help="pytest-benchmark --benchmark-json output to read")
    p.add_argument("--targets-json", help="test_targets.py --targets-json output to read")
    p.add_argument("--out", help="write the markdown here (default: stdout only)")
    args = p.parse_args(argv)

    status = 0
    tmp = None
    if args.run:
        tmp = tempfile.mkdtemp(prefix="fastdistill-bench-")
        args.bench_json = args.bench_json or os.path.join(tmp, "bench.json")
        args.targets_json = args.targets_json or os.path.join(tmp, "targets.json")
        status = run_suites(args.bench_json, args.targets_json, pytest_args)
    if not args.bench_json and not args.targets_json:
        p.error("give --run, or --bench-json and/or --targets-json")

    def load(path):
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if path:
            print(f"warning: {path} does not exist (did the run fail early?)", file=sys.stderr)
        return None

    text = render(load(args.bench_json), load(args.targets_json))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    # A failed target is a finding to report, not a reason to lose the report: pass pytest's
    # status through so scripts can still tell.
    return status


if __name__ == "__main__":
    raise SystemExit(main())
