"""Shared by the reliability tests: the small job they train."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def tiny_job() -> Callable[[str, int], str]:
    """The spec of a job NAME with UNITS single-state units of the tiny model, 4 steps each."""

    def spec(name: str, units: int) -> str:
        return f"""
name = "{name}"
[states]
count = {units}
[units]
partition = "single"
[model]
preset = "tiny"
[training]
steps = 4
batch_size = 8
checkpoint_every = 2
[data]
source = "digits"
"""

    return spec
