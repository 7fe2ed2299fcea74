"""Scaling over workers: aggregate images/s of N `tspace-worker join` processes on one machine.

    python bench/scaling.py [--workers 1 2] [--threads 1] [--preset tiny] [--size 8]
        [--batch 64] [--steps 600] [--rounds 3] [--keep DIR] [--json out.json]

One coordinator runs as its own process with the product's defaults (bench/worker_overhead.py
has the harness). For each N in --workers, a job of N single-state units is created and N worker
processes (one site each, `--threads` torch threads each) are started together; each leases one
unit, so N units train at once. The configurations run one after another in rounds, in rotated
order, and every figure is the median over rounds.

Each worker logs a timestamped line at every tenth of its unit's steps (see worker_overhead.py).
The aggregate is measured over the common steady window, from the latest worker's step-S/10 line
to the earliest worker's step-9S/10 line: every worker's steps in that window (interpolated
linearly between its logged lines) times the batch, over the window's length. The scaling ratio
of N is the aggregate of N over N times the aggregate of one worker, both medians of the same
rounds; each round's own ratio is shown too. The coordinator shares the machine's cores, so its
CPU seconds per second over the window (from /proc/PID/stat) are shown, with each worker's and
with what the rest of the machine used (/proc/stat, less this benchmark's processes): on a
shared machine N workers may not get N cores. Images per worker CPU second (and its ratio to one
worker's) separates that from any cost of running workers side by side (memory bandwidth,
caches, the coordinator). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_overhead import Coordinator, fmt, job_toml, median, run_workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=8, help="image side (digits are 8x8)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600, help="steps of each unit (x10)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="0: the last only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="keep the folder (logs) here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.steps % 10 or args.steps < 20:
        parser.error("--steps must be a multiple of 10, at least 20")
    if 1 not in args.workers:
        parser.error("--workers must include 1: the ratio is against one worker")

    root = Path(tempfile.mkdtemp(prefix="tspace-scaling-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[int, list[dict[str, Any]]] = {n: [] for n in args.workers}
    coord = Coordinator(root)
    coord.start()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    try:
        for r in range(args.rounds):
            shift = r % len(args.workers)
            for n in args.workers[shift:] + args.workers[:shift]:
                name = f"scaling-r{r}-n{n}"
                spec = job_toml(
                    name, n, args.preset, args.size, args.steps, args.batch, args.checkpoint_every
                )
                sites = [f"w{i}" for i in range(n)]
                out = run_workers(coord, name, spec, sites, args.threads, args.batch)
                rows[n].append(out)
                each = ", ".join(f"{v:.0f}" for v in out["per_worker_images_per_s"].values())
                print(
                    f"round {r} N={n}: {out['aggregate_images_per_s']:.1f} images/s "
                    f"(each on its own window: {each}; coordinator "
                    f"{fmt(out['coordinator_cpu'], 3)} CPU s/s, workers "
                    f"{' + '.join(fmt(v, 3) for v in out['worker_cpu'].values())}, other processes "
                    f"{fmt(out['others_cpu'], 2)})",
                    flush=True,
                )
    finally:
        coord.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    single = [row["aggregate_images_per_s"] for row in rows[1]]
    one = statistics.median(single)
    single_per_cpu = [row["aggregate_images_per_cpu_s"] for row in rows[1]]
    summary: dict[int, dict[str, Any]] = {}
    for n in args.workers:
        agg = [row["aggregate_images_per_s"] for row in rows[n]]
        summary[n] = {
            "aggregate_images_per_s": statistics.median(agg),
            "scaling": statistics.median(agg) / (n * one),
            "per_round_scaling": [a / (n * s) for a, s in zip(agg, single, strict=True)],
            "per_round_images_per_s": agg,
            "per_worker_images_per_s": statistics.median(
                v for row in rows[n] for v in row["per_worker_images_per_s"].values()
            ),
            "common_window_s": statistics.median(row["common_window_s"] for row in rows[n]),
            "images_per_cpu_s": median([row["aggregate_images_per_cpu_s"] for row in rows[n]]),
            "images_per_cpu_s_vs_one": median(
                [
                    None
                    if not (row["aggregate_images_per_cpu_s"] and s)
                    else row["aggregate_images_per_cpu_s"] / s
                    for row, s in zip(rows[n], single_per_cpu, strict=True)
                ]
            ),
            "coordinator_cpu": median([row["coordinator_cpu"] for row in rows[n]]),
            "others_cpu": median([row["others_cpu"] for row in rows[n]]),
            "worker_cpu": median([v for row in rows[n] for v in row["worker_cpu"].values()]),
        }

    print(
        f"\n{args.preset}, {args.size}x{args.size}, batch {args.batch}, {args.threads} thread(s) "
        f"a worker, {args.steps} steps a unit, {os.cpu_count()} CPUs, "
        f"medians of {args.rounds} rounds\n"
    )
    print(
        "| workers | aggregate images/s | per round | per worker images/s | vs N x one worker "
        "| per round | window s | worker CPU s/s (each) | images per worker CPU s | vs one "
        "| coordinator CPU s/s | other processes' CPU s/s |"
    )
    print("| ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, s in summary.items():
        print(
            f"| {n} | {s['aggregate_images_per_s']:,.1f} "
            f"| {' / '.join(f'{v:,.0f}' for v in s['per_round_images_per_s'])} "
            f"| {s['per_worker_images_per_s']:,.1f} | {s['scaling']:.3f} "
            f"| {' / '.join(f'{v:.3f}' for v in s['per_round_scaling'])} "
            f"| {s['common_window_s']:.1f} | {fmt(s['worker_cpu'], 3)} "
            f"| {fmt(s['images_per_cpu_s'])} | {fmt(s['images_per_cpu_s_vs_one'], 3)} "
            f"| {fmt(s['coordinator_cpu'], 3)} | {fmt(s['others_cpu'], 2)} |"
        )
    if args.json:
        result = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "summary": summary,
            "rounds": rows,
            "load_average_end": os.getloadavg(),
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
