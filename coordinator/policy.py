"""Scheduling decisions as pure functions of catalogue state; no I/O here."""

from __future__ import annotations

from collections.abc import Sequence

from tspace_core.catalogue.records import UnitRecord


def choose_unit(pending: Sequence[UnitRecord]) -> UnitRecord | None:
    """The next unit to lease: fewest attempts first, so retries do not starve fresh units,
    then the oldest job's units in order.

    `pending` comes in catalogue order (jobs by creation, units by index); ties keep it.
    """
    if not pending:
        return None
    return min(pending, key=lambda u: u.attempts)


def heartbeat_interval(lease_ttl_s: float) -> float:
    """How often a worker should report: three chances before its lease runs out."""
    return max(lease_ttl_s / 3, 0.2)


def retry_after(active_leases: int) -> float:
    """How long a worker with nothing to do waits before asking again."""
    return 2.0 if active_leases else 5.0
