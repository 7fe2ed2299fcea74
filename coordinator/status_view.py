"""What a status snapshot says: records from the Status stream and the figures derived from them."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from tspace_core import serde
from tspace_core.catalogue.records import (
    JOB_DONE,
    UNIT_DONE,
    UNIT_FAILED,
    UNIT_LEASED,
    EventRecord,
    JobRecord,
    UnitRecord,
    WorkerRecord,
)
from tspace_core.proto.tspace.v1 import admin_pb2

RATE_WINDOW_S = 60.0
# Record fields the Status stream does not carry (serde fills them with neutral values).
OFF_WIRE: dict[type, frozenset[str]] = {
    JobRecord: frozenset({"spec_json", "shards"}),
    UnitRecord: frozenset({"lease_id"}),
    WorkerRecord: frozenset({"public_key", "hostname", "registered_at", "last_seen"}),
    EventRecord: frozenset(),
}


@dataclass(frozen=True)
class StatusView:
    """One status snapshot as records.

    time: the coordinator's clock when it built the snapshot (Unix seconds); workers'
        last_seen is on the same clock, so ages need no clock agreement with this host.
    jobs, units, workers: as the catalogue holds them, in its order.
    events: the most recent events, newest first.
    """

    time: float
    jobs: tuple[JobRecord, ...] = ()
    units: tuple[UnitRecord, ...] = ()
    workers: tuple[WorkerRecord, ...] = ()
    events: tuple[EventRecord, ...] = ()

    @classmethod
    def from_proto(cls, msg: admin_pb2.StatusSnapshot) -> StatusView:
        return cls(
            time=msg.time,
            jobs=tuple(serde.job_from_proto(j) for j in msg.jobs),
            units=tuple(serde.unit_status_from_proto(u) for u in msg.units),
            workers=tuple(serde.worker_from_proto(w, msg.time) for w in msg.workers),
            events=tuple(serde.event_from_proto(e) for e in msg.events),
        )


def current_units(view: StatusView) -> tuple[UnitRecord, ...]:
    """Units of the jobs not yet done (all units once every job is done)."""
    open_jobs = {j.name for j in view.jobs if j.status != JOB_DONE}
    return tuple(u for u in view.units if u.job in open_jobs) or view.units


def unit_steps(unit: UnitRecord) -> int:
    """Steps a unit has trained as far as the snapshot shows: its lease's progress while leased,
    otherwise the step of the checkpoint it would resume from."""
    if unit.status == UNIT_DONE:
        return unit.total_steps
    step = unit.newest_step or 0
    if unit.status == UNIT_LEASED:
        step = max(unit.step, step)
    return min(max(step, 0), unit.total_steps)


def progress(view: StatusView) -> tuple[int, int]:
    """(steps trained, steps in all) over the current units."""
    units = current_units(view)
    return sum(unit_steps(u) for u in units), sum(u.total_steps for u in units)


def images_per_s(units: Iterable[UnitRecord]) -> float:
    return sum((u.images_per_s for u in units if u.status == UNIT_LEASED), 0.0)


def eta_s(view: StatusView, steps_per_s: float | None) -> float | None:
    """Seconds to train the steps left at `steps_per_s`; failed units wait for an operator,
    so their steps do not count."""
    if not steps_per_s or steps_per_s <= 0:
        return None
    units = [u for u in current_units(view) if u.status != UNIT_FAILED]
    return sum(u.total_steps - unit_steps(u) for u in units) / steps_per_s


@dataclass
class RateMeter:
    """Aggregate training rate (steps/s) from the progress of successive snapshots."""

    window_s: float = RATE_WINDOW_S
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def observe(self, view: StatusView) -> float | None:
        """Add a snapshot; the rate over the last window_s seconds, or None while unknown."""
        self.samples.append((view.time, progress(view)[0]))
        while len(self.samples) > 2 and view.time - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        # Progress falls when a lease expires; no rate is better than a negative one.
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


def leases_by_worker(view: StatusView) -> dict[str, list[UnitRecord]]:
    """Each worker's leased units."""
    leases: dict[str, list[UnitRecord]] = {}
    for u in view.units:
        if u.status == UNIT_LEASED and u.worker_id:
            leases.setdefault(u.worker_id, []).append(u)
    return leases


def snapshot_to_dict(view: StatusView, steps_per_s: float | None = None) -> dict[str, Any]:
    """The snapshot as plain JSON-ready dicts (only what the wire carries), plus the progress
    figures; a worker's images/s is the sum over its leased units."""
    leases = leases_by_worker(view)

    def plain(record: Any) -> dict[str, Any]:
        off_wire = OFF_WIRE[type(record)]
        return {k: v for k, v in asdict(record).items() if k not in off_wire}

    workers = [
        plain(w)
        | {"last_seen_age_s": view.time - w.last_seen}
        | {"images_per_s": images_per_s(leases.get(w.worker_id, []))}
        for w in view.workers
    ]
    steps, total = progress(view)
    figures = {"steps": steps, "total_steps": total, "steps_per_s": steps_per_s}
    figures |= {"eta_s": eta_s(view, steps_per_s), "images_per_s": images_per_s(view.units)}
    return {
        "time": view.time,
        "progress": figures,
        "jobs": [plain(j) for j in view.jobs],
        "units": [plain(u) for u in view.units],
        "workers": workers,
        "events": [plain(e) for e in view.events],
    }
