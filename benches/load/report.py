#!/usr/bin/env python3
"""Summarise one load-benchmark run directory into a table with ratios.

Usage: report.py RESULTS_DIR [--markdown]. With --markdown it prints only a
condensed table for docs.

Reads runs.tsv (one line per client run, written by run.sh) and the raw tool
output it points at. For each workload and front it prints the median over
the rounds and the spread, (max - min) / median, so noise is visible next to
every ratio.
"""

import csv
import json
import os
import statistics
import sys
from collections import defaultdict

FRONTS = ["direct", "nginx", "nginx-tuned", "gateway"]
RATIOS = [("gw/nginx", "nginx"), ("gw/tuned", "nginx-tuned"), ("gw/direct", "direct")]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

RATE_ROWS = [
    ("req/s", "rps"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("front CPU us/req", "front_cpu"),
    ("registry CPU us/req", "upstream_cpu"),
    ("front+registry us/req", "total_cpu"),
    ("front peak RSS MiB", "rss_mib"),
    ("other load, cores", "others_cores"),
]
TRANSFER_ROWS = [
    ("MB/s", "mbps"),
    ("front CPU s/GB", "front_cpu"),
    ("registry CPU s/GB", "upstream_cpu"),
    ("front+registry s/GB", "total_cpu"),
    ("front peak RSS MiB", "rss_mib"),
    ("other load, cores", "others_cores"),
]
# Rows where a gateway/direct ratio compares unlike things: for "direct" the
# front is the registry itself and there is no separate upstream.
NO_DIRECT_RATIO = {"front_cpu", "upstream_cpu", "rss_mib"}
# Rows that describe the machine during the run, not the front.
NO_RATIO = {"others_cores"}


def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def parse_h2load(raw):
    """Return (req/s, p50 ms, p99 ms, error text or None) from h2load output."""
    rps = None
    errors = None
    total = None
    ok_2xx = None
    with open(raw + ".out") as out:
        for line in out:
            if line.startswith("finished in"):
                rps = float(line.split(",")[1].split()[0])
            elif line.startswith("requests:"):
                parts = [p.split() for p in line.split(":", 1)[1].split(",")]
                counts = {p[1]: int(p[0]) for p in parts}
                total = counts["total"]
                if counts["failed"] or counts["errored"] or counts["timeout"]:
                    errors = line.strip()
            elif line.startswith("status codes:"):
                ok_2xx = int(line.split(":", 1)[1].split(",")[0].split()[0])
    if total is None:
        return None, None, None, "no h2load summary"
    if ok_2xx != total and errors is None:
        errors = f"{total - (ok_2xx or 0)} of {total} responses were not 2xx"
    durations = []
    with open(raw + ".log") as log:
        for line in log:
            fields = line.split("\t")
            if len(fields) >= 3:
                durations.append(int(fields[2]) / 1000.0)
    durations.sort()
    return rps, percentile(durations, 0.50), percentile(durations, 0.99), errors


def parse_ab(raw):
    """Return (req/s, p50 ms, p99 ms, error text or None) from ab output."""
    rps = None
    errors = []
    with open(raw + ".out") as out:
        for line in out:
            if line.startswith("Requests per second:"):
                rps = float(line.split(":")[1].split()[0])
            elif line.startswith("Failed requests:") and int(line.split(":")[1]) != 0:
                errors.append(line.strip())
            elif line.startswith("Non-2xx responses:"):
                errors.append(line.strip())
    if rps is None:
        return None, None, None, "no ab summary"
    # ab -e writes the time under which each whole percentage of requests finished.
    by_percent = {}
    with open(raw + ".csv") as table:
        for row in csv.reader(table):
            if row and row[0].replace(".", "").isdigit():
                by_percent[int(float(row[0]))] = float(row[1])
    return rps, by_percent.get(50), by_percent.get(99), "; ".join(errors) or None


def parse_curl(raw, expected_bytes, check_bytes):
    """Return an error text, or None when every curl transfer got a 2xx and,
    if check_bytes, the bytes sent and received add up to expected_bytes."""
    try:
        with open(raw + ".out") as out:
            lines = [line.split() for line in out if line.strip()]
    except FileNotFoundError:
        return "no curl output"
    if not lines:
        return "no curl output"
    bad = [line[0] for line in lines if not line[0].startswith("2")]
    if bad:
        return f"HTTP status {', '.join(bad)}"
    moved = sum(int(line[1]) + int(line[2]) for line in lines)
    if check_bytes and moved != expected_bytes:
        return f"moved {moved} bytes, expected {expected_bytes}"
    return None


def load_runs(results):
    runs = []
    with open(os.path.join(results, "runs.tsv")) as table:
        for line in table:
            front, workload, rnd, kind, units, raw, wall_us, cpu, up_cpu, hwm, rc, others = (
                line.rstrip("\n").split("\t")
            )
            if workload == "warmup":
                continue
            run = {
                "front": front,
                "workload": workload,
                "round": int(rnd),
                "kind": kind,
                "units": int(units),
                "wall_s": int(wall_us) / 1e6,
                "front_cpu_s": int(cpu) / CLOCK_TICKS,
                "upstream_cpu_s": int(up_cpu) / CLOCK_TICKS,
                "rss_mib": int(hwm) / 1024.0,
                "rc": int(rc),
                "others_cores": int(others) / CLOCK_TICKS / max(int(wall_us) / 1e6, 1e-9),
            }
            run.update(metrics_of(run, raw))
            runs.append(run)
    return runs


def metrics_of(run, raw):
    if run["rc"] == 99:
        return {"error": "a server process had exited before the run"}
    if run["kind"] == "rate":
        parser = parse_ab if os.path.exists(raw + ".csv") else parse_h2load
        try:
            rps, p50, p99, error = parser(raw)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            rps, p50, p99, error = None, None, None, f"unreadable output: {exc}"
        per_request = 1e6 / run["units"]
        front = run["front_cpu_s"] * per_request
        upstream = run["upstream_cpu_s"] * per_request
        metrics = {"rps": rps, "p50_ms": p50, "p99_ms": p99}
    else:
        # A chunked push reports only its final, empty PUT.
        error = parse_curl(raw, run["units"], "chunked" not in run["workload"])
        gigabytes = run["units"] / 1e9
        front = run["front_cpu_s"] / gigabytes
        upstream = run["upstream_cpu_s"] / gigabytes
        metrics = {"mbps": run["units"] / run["wall_s"] / 1e6}
    if run["rc"] != 0 and not error:
        error = f"client exit code {run['rc']}"
    metrics.update(front_cpu=front, upstream_cpu=upstream, total_cpu=front + upstream, error=error)
    return metrics


def summarise(runs):
    """Map (workload, front) to {metric: (median, spread fraction, rounds)}."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[(run["workload"], run["front"])].append(run)
    summary = {}
    for key, group in grouped.items():
        good = [run for run in group if not run["error"]]
        cell = {"failed": [f"round {r['round']}: {r['error']}" for r in group if r["error"]]}
        for metric in {m for _, m in RATE_ROWS + TRANSFER_ROWS}:
            values = [run[metric] for run in good if run.get(metric) is not None]
            if values:
                median = statistics.median(values)
                spread = (max(values) - min(values)) / median if median else 0.0
                cell[metric] = (median, spread, len(values))
        summary[key] = cell
    return summary


def format_value(value):
    if value >= 1000:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_cell(cell, metric):
    if metric not in cell:
        return "FAIL" if cell.get("failed") else "-"
    median, spread, rounds = cell[metric]
    text = format_value(median)
    if rounds > 1:
        text += f" ±{spread * 100:.0f}%"
    return text


def render(summary, workloads, fronts):
    width = 16
    header = f"{'workload':<24} {'metric':<22}" + "".join(f"{f:>{width}}" for f in fronts)
    header += "".join(f"{name:>10}" for name, _ in RATIOS)
    lines = [header, "-" * len(header)]
    failures = []
    for workload, kind in workloads:
        rows = RATE_ROWS if kind == "rate" else TRANSFER_ROWS
        for index, (label, metric) in enumerate(rows):
            name = workload if index == 0 else ""
            line = f"{name:<24} {label:<22}"
            for front in fronts:
                line += f"{format_cell(summary.get((workload, front), {}), metric):>{width}}"
            gateway = summary.get((workload, "gateway"), {}).get(metric)
            for _, other in RATIOS:
                base = summary.get((workload, other), {}).get(metric)
                usable = (
                    gateway
                    and base
                    and base[0]
                    and metric not in NO_RATIO
                    and not (other == "direct" and metric in NO_DIRECT_RATIO)
                )
                line += f"{gateway[0] / base[0]:>10.2f}" if usable else f"{'-':>10}"
            lines.append(line)
        lines.append("")
        for front in fronts:
            for failure in summary.get((workload, front), {}).get("failed", []):
                failures.append(f"{workload} on {front}, {failure}")
    if failures:
        lines.append("Failed runs (left out of the medians):")
        lines.extend(f"  {failure}" for failure in failures)
        lines.append("")
    return "\n".join(lines)


LEGEND = """\
Cells: median over rounds, ±(max-min)/median across rounds. Ratios are gateway
median / other median: above 1 is better for req/s and MB/s, worse for latency,
CPU and memory. "direct" is the registry serving TLS itself. Its front CPU is
the whole registry, so CPU and RSS ratios against it are left out. Compare
front+registry instead. CPU comes from utime+stime in /proc/<pid>/stat (nginx:
master and workers), peak RSS from VmHWM reset before each run (nginx: summed
over master and workers). MB/s is 10^6 bytes per second of wall time, GB 10^9
bytes. Client, fronts and registry share the same cores. "other load" is the
machine's busy CPU during the run minus front, upstream and client: work of
other processes, in cores. Runs with a high value are less trustworthy.
static-* workloads go through a static file server (nginx, 1 worker) that
stands in for the registry. There "direct" is that file server over TLS and
"registry CPU" is its CPU."""


# Rows of the condensed Markdown table: one throughput, one latency and the
# front's CPU and memory per workload.
MARKDOWN_RATE = [("req/s", "rps"), ("p99 ms", "p99_ms"), ("front CPU us/req", "front_cpu"),
                 ("front peak RSS MiB", "rss_mib")]
MARKDOWN_TRANSFER = [("MB/s", "mbps"), ("front CPU s/GB", "front_cpu"),
                     ("front peak RSS MiB", "rss_mib")]


def render_markdown(summary, workloads, fronts):
    header = ["workload", "metric", *fronts, *(name for name, _ in RATIOS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload, kind in workloads:
        rows = MARKDOWN_RATE if kind == "rate" else MARKDOWN_TRANSFER
        for index, (label, metric) in enumerate(rows):
            cells = [workload if index == 0 else "", label]
            for front in fronts:
                cell = summary.get((workload, front), {})
                cells.append("-" if front == "direct" and metric in NO_DIRECT_RATIO
                             else format_cell(cell, metric))
            gateway = summary.get((workload, "gateway"), {}).get(metric)
            for _, other in RATIOS:
                base = summary.get((workload, other), {}).get(metric)
                usable = gateway and base and base[0] and not (
                    other == "direct" and metric in NO_DIRECT_RATIO
                )
                cells.append(f"{gateway[0] / base[0]:.2f}" if usable else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    results = sys.argv[1]
    markdown = "--markdown" in sys.argv[2:]
    runs = load_runs(results)
    summary = summarise(runs)
    workloads = []
    for run in runs:
        if (run["workload"], run["kind"]) not in workloads:
            workloads.append((run["workload"], run["kind"]))
    fronts = [f for f in FRONTS if any(run["front"] == f for run in runs)]
    if markdown:
        print(render_markdown(summary, workloads, fronts))
        return

    with open(os.path.join(results, "versions.txt")) as versions:
        print(versions.read().rstrip())
    print()
    print(render(summary, workloads, fronts))
    print(LEGEND)

    serialisable = {
        f"{workload}|{front}": cell for (workload, front), cell in summary.items()
    }
    with open(os.path.join(results, "summary.json"), "w") as out:
        json.dump(serialisable, out, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
