"""Immiscible noise assignment: its overhead per training step of the unit trainer.

    python bench/immiscible.py [--batches 128,256,512,1024] [--preset tiny] [--steps 10]
        [--rounds 5] [--knn-k 4] [--threads 2] [--profile] [--json out.json]

For each batch size, three `UnitTrainer`s on the digits (8x8, one channel) with the same seed
and model differ only in `training.assignment`: "none", "assignment" (linear assignment within
the batch) and "knn" (`knn_k` candidate noises per image). They train interleaved in rounds
(order rotated) so machine noise hits all alike; "step overhead" is a method's median step time
over none's, minus one. Beside the steps, the assignment call alone (`assign_noise` on a batch
of digits and fresh noise, on the CPU as the trainer calls it) is timed in the same rounds;
"call share" is its median time as a fraction of none's median step, the less noisy figure.
`--profile` prints a torch.profiler table of the knn call at each batch. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tspace_core.data import load_digits
from tspace_core.immiscible import ASSIGNMENTS, assign_noise
from tspace_core.models import ModelConfig, build_unet, unet_config
from tspace_core.schedules import ScheduleConfig
from tspace_core.states import StatesConfig, latent_states
from tspace_core.training import TrainConfig, UnitTrainer

METHODS = ASSIGNMENTS  # ("none", "assignment", "knn")


def make_trainers(
    images: torch.Tensor, batch: int, args: argparse.Namespace
) -> dict[str, UnitTrainer]:
    """One trainer per method, alike but for the assignment: a unit of 10 states."""
    config = unet_config(ModelConfig(preset=args.preset), images.shape[-1], 1, 0)
    states = latent_states(ScheduleConfig(), StatesConfig(count=10))
    trainers = {}
    for method in METHODS:
        cfg = TrainConfig(batch_size=batch, assignment=method, knn_k=args.knn_k, steps=10**9)
        trainers[method] = UnitTrainer(
            build_unet(config, seed=0), states.timesteps, states.alphas_cumprod, images, cfg
        )
    return trainers


def time_steps(trainer: UnitTrainer, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - started) / steps


def time_calls(method: str, x0: torch.Tensor, k: int, calls: int) -> float:
    """Seconds per `assign_noise` call, fresh noise each call, as the trainer draws it."""
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(calls):
        noise = torch.randn(x0.shape, generator=generator)
        started = time.perf_counter()
        assign_noise(x0, noise, method, k=k, generator=generator)
        total += time.perf_counter() - started
    return total / calls


def measure(images: torch.Tensor, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    trainers = make_trainers(images, batch, args)
    x0 = images[torch.randint(len(images), (batch,), generator=torch.Generator().manual_seed(1))]
    x0 = x0.float() / 127.5 - 1
    for method, trainer in trainers.items():  # warm up
        time_steps(trainer, 2)
        time_calls(method, x0, args.knn_k, 2)
    steps: dict[str, list[float]] = {m: [] for m in METHODS}
    calls: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS[r % 3 :] + METHODS[: r % 3]:
            steps[method].append(time_steps(trainers[method], args.steps))
            calls[method].append(time_calls(method, x0, args.knn_k, args.steps))
    step = {m: statistics.median(v) for m, v in steps.items()}
    call = {m: statistics.median(v) for m, v in calls.items()}
    return {
        "batch": batch,
        "step_s": step,
        "call_s": call,
        "step_overhead": {m: step[m] / step["none"] - 1 for m in METHODS[1:]},
        "call_share": {m: call[m] / step["none"] for m in METHODS[1:]},
    }


def profile_knn(images: torch.Tensor, batch: int, k: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    x0 = images[:batch].float() / 127.5 - 1
    time_calls("knn", x0, k, 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_calls("knn", x0, k, 50)
    print(f"\n== knn, k={k}, batch {batch}: 50 calls")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["batch", "ms none", "ms assign", "ms knn", "assign step", "knn step"]
    head += ["ms assign call", "ms knn call", "assign call", "knn call"]
    print("  ".join(f"{h:>14}" for h in head))
    for row in rows:
        step, call = row["step_s"], row["call_s"]
        cells = [str(row["batch"])] + [f"{1000 * step[m]:.2f}" for m in METHODS]
        cells += [f"{100 * row['step_overhead'][m]:+.1f}%" for m in METHODS[1:]]
        cells += [f"{1000 * call[m]:.3f}" for m in METHODS[1:]]
        cells += [f"{100 * row['call_share'][m]:.2f}%" for m in METHODS[1:]]
        print("  ".join(f"{c:>14}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="128,256,512,1024")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="steps (and calls) per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--knn-k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="profile the knn call")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = load_digits().images
    batches = [int(b) for b in args.batches.split(",")]
    if args.profile:
        for batch in batches:
            profile_knn(images, batch, args.knn_k)
    rows = []
    for batch in batches:
        rows.append(measure(images, batch, args))
        print(
            f"batch {batch}: "
            + ", ".join(f"{m} {1000 * s:.2f} ms" for m, s in rows[-1]["step_s"].items())
        )
    print_table(rows)
    if args.json:
        meta = {"preset": args.preset, "knn_k": args.knn_k, "threads": args.threads}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
