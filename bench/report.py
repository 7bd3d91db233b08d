"""Turn a benchmark run into markdown for bench/RESULTS.md.

    python -m bench.report --run                      # run `pytest bench`, then print the report
    python -m bench.report --run --out report.md      # ... and write it to a file
    python -m bench.report --bench-json B.json --targets-json T.json   # from an earlier run
    python -m bench.report --gpu-json gpu_results.json   # a GPU benchmark run (bench/gpu_bench.py)

``--run`` invokes ``pytest bench -q --benchmark-json=... --targets-json=...`` (extra pytest
arguments after ``--``) and reads both files. All figures come from that one run: the suites'
timings (pytest-benchmark, best of its rounds), the peak extra memory and effective bandwidth each
case recorded in extra_info, and test_targets.py's interleaved measurements of the CPU targets.
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


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; "-" for a figure that was not measured."""
    return "-" if value is None else format(value, spec)


def _fmt_ms(seconds: float | None) -> str:
    return fmt(None if seconds is None else seconds * 1e3, ".1f")


def _fmt_x(value: float | None) -> str:
    return fmt(value, ".2f")


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
    lines = ["## CPU targets (bench/test_targets.py)", ""]
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


# ---- the GPU benchmark (bench/gpu_bench.py) ------------------------------------------------------
# Rendered from the payload gpu_bench writes as JSON ("machine", "copy_bw", "settings", "results",
# "triton_kernels", "notes"), so `--gpu-json` re-renders a run without rerunning it. The settings
# (temperature, targets, which implementations are fastdistill's) come from the payload too: the
# report describes the run as it was configured.


def _measured(r: dict) -> bool:
    return r.get("ms_median") is not None


def gpu_status_cell(r: dict) -> str:
    """Short status for the table (the full text is in the Details section)."""
    status, text = r["status"], r.get("detail", "")
    if status in ("ok", "OOM", "not installed"):
        return status
    if status == "FAIL":
        return f"FAIL: {text}"
    if status == "unavailable" and ": " in text:
        text = text.split(": ", 1)[1]  # BackendUnavailableError: "<what>: <why>. Available..."
    short = text.split(". ")[0][:100].replace("|", "/")
    return f"{status}: {short}" if short else status


def gpu_results_table(results: list[dict]) -> list[str]:
    lines = [
        "| op | shape | dtype | mode | impl | ms (median) | x eager | x compile "
        "| peak (x input) | % copy BW | check |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        kind = " (hidden)" if r["op"] == "cosine" else ""
        bw = None if r.get("frac_copy_bw") is None else 100 * r["frac_copy_bw"]
        lines.append(
            f"| {r['op']} | {r['shape']} {r['rows']}x{r['cols']}{kind} | {r['dtype']} "
            f"| {r['mode']} | {r['impl']} | {fmt(r.get('ms_median'), '.3f')} "
            f"| {fmt(r.get('x_eager'), '.2f')} | {fmt(r.get('x_compile'), '.2f')} "
            f"| {fmt(r.get('peak_x_unit'), '.2f')} | {fmt(bw, '.0f')} | {gpu_status_cell(r)} |"
        )
    return lines


def _gpu_target_cells(r: dict, row: dict[str, dict], frac: float, slack: float):
    """The cells of one fastdistill implementation's target row and whether each target is met
    (True / False / None: not measured)."""
    checks = [r["frac_copy_bw"] >= frac]
    cells = [f"{100 * r['frac_copy_bw']:.0f}% ({100 * frac:.0f}%)"]
    comp = row.get("compile")
    if comp is not None and _measured(comp):
        checks.append(comp["ms_median"] / r["ms_median"] >= 2.0)
        cells.append(f"{comp['ms_median'] / r['ms_median']:.2f}")
    else:
        checks.append(None)
        cells.append(f"not measured ({comp['status'] if comp else 'not run'})")
    for liger in ("liger-kldiv", "liger-jsd"):
        lr = row.get(liger)
        if lr is not None and _measured(lr):
            checks.append(r["ms_median"] < lr["ms_median"])
            cells.append(f"{lr['ms_median'] / r['ms_median']:.2f}x")
        else:
            checks.append(None)
            cells.append(f"not measured ({lr['status'] if lr else 'not run'})")
    extra = r["peak_bytes"] - r["unit_bytes"]
    checks.append(extra <= slack * r["unit_bytes"] + (1 << 20))
    cells.append(f"{extra / 2**20:.1f} MiB ({extra / r['rows']:.0f} B/row)")
    return cells, checks


def gpu_targets_section(results: list[dict], settings: dict) -> list[str]:
    """The GPU targets for kl_div fwd+bwd bf16, judged from this run's rows."""
    slack = settings["memory_slack_fraction"]
    lines = [
        "## GPU targets (kl_div fwd+bwd bf16, T=2)",
        "",
        "Required of each fastdistill backend: % of copy bandwidth at least the shape's target; "
        ">= 2x faster than torch.compile of the seed formula; faster than both Liger pipelines; "
        "extra peak memory <= one gradient + O(rows) "
        f"(here: + {100 * slack:g}% of one logits tensor + 1 MiB).",
        "",
        "| shape | impl | % copy BW (target) | x compile (>= 2) | vs liger-kldiv | vs liger-jsd "
        "| extra peak beyond the gradient | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    any_row = False
    for name, frac in settings["copy_bw_targets"].items():
        row = {
            r["impl"]: r
            for r in results
            if r["op"] == "kl_div"
            and r["shape"] == name
            and r["dtype"] == "bf16"
            and r["mode"] == "fwd+bwd"
        }
        for impl in settings["fastdistill_impls"]:
            r = row.get(impl)
            if r is None:
                continue
            any_row = True
            label = f"{name} {r['rows']}x{r['cols']}"
            if r["status"] != "ok":
                lines.append(f"| {label} | {impl} | - | - | - | - | - | not met: {r['status']} |")
                continue
            cells, checks = _gpu_target_cells(r, row, frac, slack)
            if all(c is True for c in checks):
                verdict = "met"
            elif any(c is False for c in checks):
                verdict = "NOT met"
            else:
                verdict = "met where measured"
            lines.append(f"| {label} | {impl} | " + " | ".join(cells) + f" | {verdict} |")
    if not any_row:
        lines.append("| (the headline rows did not run) | | | | | | | |")
    return lines + [""]


def _gpu_kernels_section(kernels: list[dict]) -> list[str]:
    out = ["## Triton kernels compiled in this run", ""]
    if not kernels:
        return out + [
            "(none found: the triton backend did not run, or Triton's cache layout changed)"
        ]
    out += ["| kernel | warps | registers | spills | shared bytes |", "|---|---:|---:|---:|---:|"]
    for k in kernels:
        if "error" in k:
            out.append(f"| {k['kernel']} | - | - | - | {k['error']} |")
        else:
            out.append(
                f"| {k['kernel']} | {k['num_warps']} | {k['regs']} | {k['spills']} "
                f"| {k['shared']} |"
            )
    return out


def render_gpu(payload: dict) -> str:
    """The markdown of one GPU benchmark run (gpu_bench's JSON payload)."""
    machine, copy_bw, settings = payload["machine"], payload["copy_bw"], payload["settings"]
    results, notes = payload["results"], payload.get("notes", [])
    out = ["# fastdistill GPU benchmark (bench/gpu_bench.py)", "", "## Machine", ""]
    out += [f"- {key}: {value}" for key, value in machine.items()]
    if copy_bw:
        out.append(
            f"- copy bandwidth: {copy_bw['bytes_per_s_median'] / 1e9:.0f} GB/s median "
            f"(best {copy_bw['bytes_per_s'] / 1e9:.0f} GB/s) over {copy_bw['reps']} "
            f"dst.copy_(src) of {copy_bw['bytes'] // 2 // 2**20} MiB, counting read + write bytes"
        )
    out += [
        f"- settings: temperature {settings['temperature']}, distillation alphas "
        f"{settings['alphas']}, labels with every 8th position ignored; times are medians of "
        "CUDA-event timings with the L2 cache flushed before each call",
        "",
        "## Results",
        "",
        "`x eager` / `x compile`: how many times faster than the seed's eager formula / "
        "torch.compile of it (ratio of medians, same run). `peak`: extra memory during one "
        "call as a multiple of one input tensor (logits, or hidden states for cosine), the "
        "gradient included. `% copy BW`: minimal bytes (inputs read once + gradient written "
        "once) / median time, as a share of the copy bandwidth above. `check`: the loss and a "
        f"{settings['grad_sample_rows']}+ row sample of the gradient against the float64 oracle.",
        "",
    ]
    out += gpu_results_table(results)
    out.append("")
    out += gpu_targets_section(results, settings)
    out += _gpu_kernels_section(payload.get("triton_kernels", []))
    out += ["", "## Details", ""]
    key_fields = ("op", "shape", "rows", "cols", "dtype", "mode", "impl")
    for r in results:
        extra = {
            k: float(f"{v:.4g}") if isinstance(v, float) else v
            for k, v in r.items()
            if k not in key_fields and v not in (None, "")
        }
        out.append(
            f"- {r['op']} {r['shape']} {r['dtype']} {r['impl']}: {json.dumps(extra, default=str)}"
        )
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


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
    p.add_argument("--gpu-json", help="bench/gpu_bench.py's JSON output to render instead")
    p.add_argument("--out", help="write the markdown here (default: stdout only)")
    args = p.parse_args(argv)
    if args.gpu_json and (args.run or args.bench_json or args.targets_json):
        p.error("--gpu-json renders a GPU run on its own, without the CPU suites' options")

    status = 0
    tmp = None
    if args.gpu_json:
        with open(args.gpu_json) as f:
            text = render_gpu(json.load(f))
    elif args.run:
        tmp = tempfile.mkdtemp(prefix="fastdistill-bench-")
        args.bench_json = args.bench_json or os.path.join(tmp, "bench.json")
        args.targets_json = args.targets_json or os.path.join(tmp, "targets.json")
        status = run_suites(args.bench_json, args.targets_json, pytest_args)
    if not (args.gpu_json or args.bench_json or args.targets_json):
        p.error("give --run, or --bench-json and/or --targets-json, or --gpu-json")

    def load(path):
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if path:
            print(f"warning: {path} does not exist (did the run fail early?)", file=sys.stderr)
        return None

    if not args.gpu_json:
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
