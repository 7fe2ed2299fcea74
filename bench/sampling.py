"""Ensemble sampling cost: S distinct per-state models vs one model for every step.

    python bench/sampling.py [--configs tiny:8:10:16,small:32:32:16,...] [--resident 4]
        [--rounds 3] [--min-time 0.5] [--threads 2] [--no-memory] [--profile] [--json out.json]

A config is PRESET:SIDE:S:BATCH: S untrained (random) U-Nets of PRESET on SIDExSIDE one-channel
images, sampled by the product's DDIM chain (`sample_chain`, eta 0, one step per state) with
BATCH images. Each config times, per chain:

- one: one model owns every state (the cost of a plain S-step DDIM sampler);
- resident: S distinct resident models, each owning one state (`EnsemblePredictor`);
- disk: at most `--resident` models in memory, least recently used evicted, each loaded when
  its step comes from a checkpoint on disk through the product's `load_member` (read the file,
  check its SHA-256, build the U-Net, load its EMA weights);
- disk_reuse: the same bound, but reading only the EMA tensors (safetensors `safe_open`) into
  one of `--resident` U-Nets built once: no digest, no model construction.

The checkpoints are real unit checkpoints (`UnitTrainer.checkpoint_state` after one step:
weights, EMA, AdamW moments, RNG) written with `save_checkpoint` to a temporary folder. A chain
sweeps the states from noisiest to cleanest, so with fewer resident models than states every
step of every chain loads one. The modes run interleaved in rounds (order rotated) in one
process, each measurement repeating the chain for at least `--min-time` seconds; rows are
medians over rounds. Peak RSS comes from a child process per config and mode: VmHWM over one
chain, and its rise over the child's RSS before it built any model. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from tspace_core.checkpoint import save_checkpoint
from tspace_core.ensemble import Chain, Member, SampleOptions, load_member, sample_chain
from tspace_core.models import ModelConfig, build_unet, count_parameters, unet_config
from tspace_core.sampling import EnsemblePredictor
from tspace_core.schedules import ScheduleConfig
from tspace_core.states import LatentStates, StatesConfig, latent_states
from tspace_core.training import TrainConfig, UnitTrainer

MODES = ("one", "resident", "disk", "disk_reuse")
DEFAULT_CONFIGS = (
    "tiny:8:10:16,tiny:8:10:64,tiny:8:32:16,tiny:8:32:64,"
    "small:32:10:16,small:32:10:64,small:32:32:16"
)
MANIFEST = "members.json"


class Setup:
    """One config: the U-Net config, the states, and the unit checkpoints on disk."""

    def __init__(self, text: str, root: Path) -> None:
        preset, side, count, batch = text.split(":")
        self.text, self.preset, self.root = text, preset, root
        self.side, self.count, self.batch = int(side), int(count), int(batch)
        self.config = unet_config(ModelConfig(preset=preset), self.side, 1, 0)
        self.states: LatentStates = latent_states(ScheduleConfig(), StatesConfig(count=self.count))
        self.chain = Chain(self.states, (1, self.side, self.side), 0, "epsilon")
        self.opts = SampleOptions(n=self.batch, seed=0)

    def members(self) -> dict[int, Member]:
        rows = json.loads((self.root / MANIFEST).read_text())
        return {int(t): Member(u, (int(t),), name, digest, 1) for t, u, name, digest in rows}


def write_checkpoints(setup: Setup) -> None:
    """One unit checkpoint per state, each a distinct random model after one training step."""
    images = torch.randint(0, 256, (4, 1, setup.side, setup.side), dtype=torch.uint8)
    cfg = TrainConfig(batch_size=2, steps=1, warmup_steps=0)
    states = setup.states
    rows = []
    for unit, (t, abar) in enumerate(zip(states.timesteps, states.alphas_cumprod, strict=True)):
        model = build_unet(setup.config, seed=unit)
        trainer = UnitTrainer(model, (t,), (abar,), images, cfg)
        trainer.train_step()
        tensors, state = trainer.checkpoint_state()
        meta = {"unit": unit, "states": [t], "unet_config": setup.config, **state}
        name = f"unit{unit:03d}.safetensors"
        rows.append((t, unit, name, save_checkpoint(setup.root / name, tensors, meta)))
    (setup.root / MANIFEST).write_text(json.dumps(rows))


def read_ema(path: Path) -> dict[str, torch.Tensor]:
    """The sampling weights of a unit checkpoint, reading no other tensor from the file."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        ema = {n[4:]: f.get_tensor(n) for n in names if n.startswith("ema.")}
        rest = {
            n[6:]: f.get_tensor(n) for n in names if n.startswith("model.") and n[6:] not in ema
        }
    return {**rest, **ema}


class BoundedEnsemble(EnsemblePredictor):
    """At most `resident` models in memory; a state's model is loaded when its step comes."""

    def __init__(self, setup: Setup, resident: int, reuse: bool) -> None:
        super().__init__({})
        self.setup, self.resident, self.reuse = setup, resident, reuse
        self.members = setup.members()
        self.cache: OrderedDict[int, nn.Module] = OrderedDict()
        self.loads = 0

    def _load(self, member: Member, evicted: nn.Module | None) -> nn.Module:
        if not self.reuse:
            return load_member(self.setup.root, member)
        # The evicted model's U-Net takes the new weights; a new one only while filling up.
        model = evicted if evicted is not None else build_unet(self.setup.config).eval()
        model.load_state_dict(read_ema(self.setup.root / member.checkpoint))
        return model

    def model(self, t: int) -> nn.Module:
        if t in self.cache:
            self.cache.move_to_end(t)
            return self.cache[t]
        evicted = None
        if len(self.cache) >= self.resident:
            _, evicted = self.cache.popitem(last=False)
            evicted = evicted if self.reuse else None  # freed before the next one loads
        model = self._load(self.members[t], evicted)
        del evicted
        self.loads += 1
        self.cache[t] = model
        return model

    def __call__(self, x: torch.Tensor, t: int, class_labels: torch.Tensor | None) -> torch.Tensor:
        self.owners = {t: self.model(t)}
        return super().__call__(x, t, class_labels)


def make_predictor(mode: str, setup: Setup, resident: int) -> EnsemblePredictor:
    timesteps = setup.states.timesteps
    if mode == "one":
        model = build_unet(setup.config, seed=0).eval()
        return EnsemblePredictor({t: model for t in timesteps})
    if mode == "resident":
        return EnsemblePredictor(
            {t: build_unet(setup.config, seed=i).eval() for i, t in enumerate(timesteps)}
        )
    return BoundedEnsemble(setup, resident, reuse=mode == "disk_reuse")


def time_chains(predictor: EnsemblePredictor, setup: Setup, reps: int) -> float:
    """Seconds per chain over `reps` chains."""
    started = time.perf_counter()
    for _ in range(reps):
        sample_chain(predictor, setup.chain, setup.opts)
    return (time.perf_counter() - started) / reps


def time_config(setup: Setup, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per chain of each mode, interleaved in rounds with the order rotated."""
    predictors = {mode: make_predictor(mode, setup, args.resident) for mode in MODES}
    warm = {mode: time_chains(p, setup, 1) for mode, p in predictors.items()}
    reps = max(1, math.ceil(args.min_time / warm["one"]))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
            times[mode].append(time_chains(predictors[mode], setup, reps))
    return {mode: statistics.median(v) for mode, v in times.items()}


def child_memory(setup: Setup, mode: str, resident: int) -> dict[str, float]:
    """Run one chain of `mode` in a fresh process; its peak RSS and rise, in MiB."""
    command = [sys.executable, __file__, "--child", mode, "--configs", setup.text]
    command += ["--root", str(setup.root), "--resident", str(resident)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return {k: v / 1024 for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def run_child(args: argparse.Namespace) -> None:
    setup = Setup(args.configs, args.root)
    torch.zeros(1) @ torch.zeros(1)  # fault in the math libraries before the baseline
    baseline = rss_kib("VmRSS")
    predictor = make_predictor(args.child, setup, args.resident)
    sample_chain(predictor, setup.chain, setup.opts)
    peak = rss_kib("VmHWM")
    print(json.dumps({"peak_mib": peak, "rise_mib": peak - baseline}))


def profile(setup: Setup, args: argparse.Namespace) -> None:
    """torch.profiler tables of `one` vs `resident` for the config, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for mode in ("one", "resident"):
        predictor = make_predictor(mode, setup, args.resident)
        time_chains(predictor, setup, 2)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            time_chains(predictor, setup, 5)
        print(f"\n== {setup.text} {mode}: 5 chains")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["config", "params", "ms one", "ms resident", "ms disk", "ms disk_reuse"]
    head += ["resident/one", "disk/one", "reuse/one", "MiB one", "MiB resident", "MiB disk"]
    head += ["MiB reuse"]
    print("  ".join(f"{h:>13}" for h in head))
    for row in rows:
        cells = [row["config"], str(row["parameters"])]
        cells += [f"{1000 * row['s_per_chain'][m]:.1f}" for m in MODES]
        cells += [f"{row['ratio'][m]:.3f}" for m in MODES[1:]]
        cells += [f"{row['peak_mib'][m]:.0f}" if m in row["peak_mib"] else "-" for m in MODES]
        print("  ".join(f"{c:>13}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="PRESET:SIDE:S:BATCH,...")
    parser.add_argument("--resident", type=int, default=4, help="models in memory for disk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak RSS children")
    parser.add_argument("--profile", action="store_true", help="profile one vs resident")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return run_child(args)
    rows = []
    for text in args.configs.split(","):
        with tempfile.TemporaryDirectory(prefix="tspace-bench-") as tmp:
            setup = Setup(text, Path(tmp))
            write_checkpoints(setup)
            if args.profile:
                profile(setup, args)
            seconds = time_config(setup, args)
            memory = (
                {} if args.no_memory else {m: child_memory(setup, m, args.resident) for m in MODES}
            )
        row = {
            "config": text,
            "parameters": count_parameters(build_unet(setup.config)),
            "resident_bound": args.resident,
            "s_per_chain": seconds,
            "ratio": {m: seconds[m] / seconds["one"] for m in MODES},
            "peak_mib": {m: v["peak_mib"] for m, v in memory.items()},
            "rise_mib": {m: v["rise_mib"] for m, v in memory.items()},
        }
        rows.append(row)
        print(f"{text}: " + ", ".join(f"{m} {1000 * s:.1f} ms" for m, s in seconds.items()))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
