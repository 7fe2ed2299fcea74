"""Shared by the reliability tests: the small job they train, and a served coordinator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A coordinator process serving a fresh folder, with the lease TTL of the test module's
    LEASE_TTL_S (4 s if it has none); every process it started is stopped afterwards."""
    cluster = Cluster(tmp_path, lease_ttl_s=getattr(request.module, "LEASE_TTL_S", 4.0))
    try:
        cluster.start_coordinator()
        yield cluster
    finally:
        cluster.stop()


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
