"""Training throughput of the unit trainer vs a bare PyTorch loop on the same model and batch.

    python bench/train_speed.py --preset tiny --size 8 --batch 64 --threads 2 [--json out.json]

Both loops run interleaved in rounds in one process, so machine noise hits both alike; the table
shows images/s of each and their ratio. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tspace_core.data import load_digits
from tspace_core.models import ModelConfig, build_unet, count_parameters, unet_config
from tspace_core.training import TrainConfig, UnitTrainer


def bare_loop(model: torch.nn.Module, images: torch.Tensor, batch: int, steps: int) -> float:
    """The least a training step can do: sample, noise, forward, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = images.float() / 127.5 - 1
    alpha_bar = torch.tensor(0.5)
    started = time.perf_counter()
    for _ in range(steps):
        x0 = data[torch.randint(len(data), (batch,))]
        noise = torch.randn_like(x0)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        t = torch.full((batch,), 499)
        loss = F.mse_loss(model(x_t, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - started)


def trainer_loop(trainer: UnitTrainer, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return trainer.cfg.batch_size * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=8, help="image side (digits are 8x8)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assignment", default="none")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_digits(resize=None if args.size == 8 else args.size)
    config = unet_config(ModelConfig(preset=args.preset), args.size, 1, 0)
    cfg = TrainConfig(batch_size=args.batch, assignment=args.assignment, steps=10**9)
    trainer = UnitTrainer(build_unet(config, seed=0), (499,), (0.5,), data.images, cfg)
    bare_model = build_unet(config, seed=0)
    trainer_loop(trainer, 3), bare_loop(bare_model, data.images, args.batch, 3)  # warm up
    ours, bare = [], []
    for _ in range(args.rounds):
        ours.append(trainer_loop(trainer, args.steps))
        bare.append(bare_loop(bare_model, data.images, args.batch, args.steps))
    result = {
        "preset": args.preset,
        "parameters": count_parameters(bare_model),
        "image_size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "assignment": args.assignment,
        "trainer_images_per_s": statistics.median(ours),
        "bare_images_per_s": statistics.median(bare),
    }
    result["ratio"] = result["trainer_images_per_s"] / result["bare_images_per_s"]
    width = max(map(len, result))
    for key, value in result.items():
        print(
            f"{key:<{width}}  {value:.3f}"
            if isinstance(value, float)
            else f"{key:<{width}}  {value}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
