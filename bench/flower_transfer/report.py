"""The Flower rows of bench/transfer.py: medians of each span per size, and their table."""

from __future__ import annotations

import statistics
from typing import Any

MIB = 2**20


FLOWER_SPANS = (
    ("hop", "hop_s"),
    ("reply path", "reply_path_s"),
    ("round trip", "round_trip_s"),
)


def summarize_flower(
    sizes: list[int], sizes_bytes: dict[int, int], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Median seconds of each span for the big and the tiny reply, per size; failures."""
    rows = []
    for size in sizes:
        ok = [run for run in runs if run["size"] == size and "error" not in run]
        row: dict[str, Any] = {"size_mib": size, "bytes": sizes_bytes[size], "runs": len(ok)}
        row["errors"] = [run["error"] for run in runs if run["size"] == size and "error" in run]
        if ok:
            for _, key in FLOWER_SPANS:
                for reply in ("big", "tiny"):
                    row[f"{key}_{reply}"] = statistics.median(span(run, key, reply) for run in ok)
            net = statistics.median(
                span(run, "reply_path_s", "big") - span(run, "reply_path_s", "tiny") for run in ok
            )
            # Noise can make a small reply's net time vanish; no rate then.
            row["reply_path_net_mb_per_s"] = sizes_bytes[size] / 1e6 / net if net > 0 else None
            row["clientapp_load_s"] = statistics.median(r["big"]["clientapp_load_s"] for r in ok)
            row["chunks"] = ok[0]["check"]["chunks"]
            row["unique_chunks"] = min(run["check"]["unique_chunks"] for run in ok)
        rows.append(row)
    memory = [run["memory"] for run in runs if "memory" in run]
    mem = {
        name: {
            "idle_mib": statistics.median(m[name]["idle_kib"] for m in memory) / 1024,
            "max_growth_mib": max(m[name]["peak_kib"] - m[name]["idle_kib"] for m in memory) / 1024,
        }
        for name in ("superlink", "supernode")
        if memory
    }
    return {"sizes": rows, "memory_largest_run": mem, "runs": runs}


def span(run: dict[str, Any], key: str, reply: str) -> float:
    return float(run[key][reply] if key == "hop_s" else run[reply][key])


def print_flower(flower: dict[str, Any]) -> None:
    print("\nFlower: median seconds of each span, big reply / tiny reply (see deployment.py)")
    head = f"{'size':>9} {'runs':>5}" + "".join(f"{name + ' s':>18}" for name, _ in FLOWER_SPANS)
    print(head + f"{'reply net MB/s':>16}{'load s':>8}{'chunks':>8}")
    for row in flower["sizes"]:
        line = f"{row['bytes'] / MIB:>5.0f} MiB {row['runs']:>5}"
        if row["runs"]:
            line += "".join(
                f"{row[key + '_big']:>9.2f} /{row[key + '_tiny']:>6.2f}" for _, key in FLOWER_SPANS
            )
            net = row["reply_path_net_mb_per_s"]
            line += f"{'-' if net is None else f'{net:.0f}':>16}{row['clientapp_load_s']:>8.2f}"
            line += f"{row['unique_chunks']:>4}/{row['chunks']}"
        print(line + "".join(f"  error: {e}" for e in row["errors"]))
    for name, mem in flower["memory_largest_run"].items():
        print(
            f"flower: {name} RSS idle {mem['idle_mib']:.0f} MiB, growth "
            f"{mem['max_growth_mib']:.0f} MiB over the run of the largest size"
        )
