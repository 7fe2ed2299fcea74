"""Tests of the UNet2DModel presets, the derived config and seeded construction."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from diffusers import UNet2DModel

from tspace_core.errors import SpecError
from tspace_core.models import (
    PRESETS,
    ModelConfig,
    build_unet,
    check_forward,
    count_parameters,
    unet_config,
)

# (low, high) parameter counts for 3-channel 32x32 images; `base` is DDPM's CIFAR-10 U-Net.
BALLPARK = {"tiny": (2e5, 2e6), "small": (2e6, 15e6), "base": (30e6, 40e6)}


def tiny(**overrides: object) -> dict[str, object]:
    cfg = ModelConfig(preset="tiny", **overrides)  # type: ignore[arg-type]
    return unet_config(cfg, sample_size=8, in_channels=1, num_classes=10)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_with_expected_sizes(preset: str) -> None:
    model = build_unet(unet_config(ModelConfig(preset=preset), 32, 3, 0), seed=0)
    assert isinstance(model, UNet2DModel)
    low, high = BALLPARK[preset]
    assert low <= count_parameters(model) <= high
    assert count_parameters(model) == sum(p.numel() for p in model.state_dict().values())


def test_presets_grow() -> None:
    counts = [
        count_parameters(build_unet(unet_config(ModelConfig(preset=p), 32, 3, 0)))
        for p in ("tiny", "small", "base")
    ]
    assert counts == sorted(counts) and len(set(counts)) == 3


@pytest.mark.parametrize(("side", "channels"), [(8, 1), (16, 3), (32, 3)])
def test_config_takes_shape_from_data(side: int, channels: int) -> None:
    config = unet_config(ModelConfig(), side, channels, 0)
    assert config["sample_size"] == side
    assert config["in_channels"] == config["out_channels"] == channels
    assert config["num_class_embeds"] is None
    model = build_unet(config, seed=0)
    x = torch.randn(2, channels, side, side)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 500])).sample
    assert out.shape == x.shape


def test_config_is_plain_json_and_rebuilds_the_same_model() -> None:
    # The config goes into checkpoint metadata; a JSON round trip must give the same network.
    config = tiny(class_conditional=True, kwargs={"block_out_channels": (16, 32)})
    again = json.loads(json.dumps(config))
    assert again == config
    assert same_weights(build_unet(config, seed=3), build_unet(again, seed=3))


def test_class_conditional_embeds_labels() -> None:
    config = tiny(class_conditional=True)
    assert config["num_class_embeds"] == 10
    model = build_unet(config, seed=0)
    x, t = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1), torch.tensor([99, 99])
    with torch.no_grad():
        same = model(x, t, class_labels=torch.tensor([4, 4])).sample
        other = model(x, t, class_labels=torch.tensor([3, 7])).sample
    assert same.shape == x.shape
    assert torch.allclose(same[0], same[1], atol=1e-6)  # same input, same label
    assert (other[0] - other[1]).abs().max() > 1e-4  # same input, different labels
    assert tiny()["num_class_embeds"] is None


def test_class_conditional_needs_labels() -> None:
    with pytest.raises(SpecError, match=r"model\.class_conditional"):
        unet_config(ModelConfig(class_conditional=True), 8, 1, 0)
    assert unet_config(ModelConfig(class_conditional=False), 8, 1, 0)["num_class_embeds"] is None


@pytest.mark.parametrize(
    ("preset", "bad", "good"), [("tiny", 9, 10), ("small", 10, 12), ("base", 12, 16)]
)
def test_side_must_survive_every_downsampling(preset: str, bad: int, good: int) -> None:
    levels = len(PRESETS[preset]["block_out_channels"]) - 1
    assert bad % 2**levels and not good % 2**levels
    with pytest.raises(SpecError, match=r"data\.resize") as info:
        unet_config(ModelConfig(preset=preset), bad, 3, 0)
    assert str(2**levels) in str(info.value)
    assert unet_config(ModelConfig(preset=preset), good, 3, 0)["sample_size"] == good


@pytest.mark.parametrize("key", ["sample_size", "in_channels", "out_channels", "num_class_embeds"])
def test_kwargs_cannot_set_derived_keys(key: str) -> None:
    with pytest.raises(SpecError, match=rf"kwargs: .*{key}"):
        ModelConfig(kwargs={key: 8})


def test_kwargs_override_the_preset() -> None:
    config = tiny(kwargs={"block_out_channels": [16, 32], "layers_per_block": 2})
    assert config["block_out_channels"] == [16, 32] and config["layers_per_block"] == 2
    assert config["down_block_types"] == list(PRESETS["tiny"]["down_block_types"])
    model = build_unet(config, seed=0)
    built: Any = model.config  # the config diffusers recorded, not ours
    assert tuple(built["block_out_channels"]) == (16, 32)
    assert built["layers_per_block"] == 2
    assert count_parameters(model) != count_parameters(build_unet(tiny(), seed=0))
    assert PRESETS["tiny"]["block_out_channels"] == (32, 64)  # the preset itself is untouched


def test_unknown_kwargs_are_named_not_ignored() -> None:
    with pytest.raises(SpecError, match="did you mean 'layers_per_block'"):
        ModelConfig(kwargs={"layers_per_blok": 2})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_out_channels": 5},
        {"block_out_channels": []},
        {"block_out_channels": [-8, 16]},
        {"block_out_channels": [16, 32, 64]},  # three levels, two block types
        {"norm_num_groups": 7},
        {"norm_num_groups": 0},
        {"act_fn": "nope"},
        {"layers_per_block": "two"},
    ],
)
def test_unusable_kwargs_are_spec_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(SpecError, match="model"):
        build_unet(unet_config(ModelConfig(kwargs=kwargs), 8, 1, 0))


@pytest.mark.parametrize(("preset", "prediction_type"), [("huge", "epsilon"), ("tiny", "sample")])
def test_config_choices(preset: str, prediction_type: str) -> None:
    with pytest.raises(SpecError, match="use one of"):
        ModelConfig(preset=preset, prediction_type=prediction_type)


def test_seeded_builds_are_reproducible_and_leave_the_global_rng_alone() -> None:
    config = tiny()
    torch.manual_seed(1)
    first = build_unet(config, seed=7)
    torch.manual_seed(2)  # a different global state must not matter
    before = torch.get_rng_state()
    second = build_unet(config, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert same_weights(first, second)
    assert not same_weights(first, build_unet(config, seed=8))


def test_unseeded_builds_follow_the_global_rng() -> None:
    config = tiny()
    torch.manual_seed(5)
    start = torch.get_rng_state()
    a = build_unet(config)
    assert not torch.equal(torch.get_rng_state(), start)  # it drew from the global RNG
    torch.manual_seed(5)
    assert same_weights(a, build_unet(config))


def test_model_output_depends_on_the_base_timestep() -> None:
    model = build_unet(tiny(), seed=0)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        late = model(x, torch.tensor([999])).sample
        early = model(x, torch.tensor([99])).sample
        again = model(x, torch.tensor([999])).sample
    assert torch.equal(late, again)
    assert (late - early).abs().max() > 1e-4


def test_a_config_that_fails_only_at_forward_time_is_caught_before_training() -> None:
    good = unet_config(ModelConfig(), 8, 1, 10)
    check_forward(good)
    bad = {**good, "norm_eps": "a"}
    build_unet(bad)  # diffusers accepts it at construction...
    with pytest.raises(SpecError, match=r"^model: .*forward pass"):
        check_forward(bad)  # ...and only the forward pass shows it cannot train
