"""The short chaos run: a real job under seeded random faults (worker and coordinator SIGKILLs,
a link cut and blackholed, connection resets, a corrupted checkpoint, a PostgreSQL crash), then
the audit. `python tests/reliability/chaos.py --minutes 10` is the long one."""

from __future__ import annotations

from pathlib import Path

import pgserver
from chaos import KINDS, Settings, run_chaos


def test_a_job_finishes_whole_under_seeded_faults(tmp_path: Path) -> None:
    # A private PostgreSQL server adds its crash to the faults; SQLite where none can run.
    catalogue = "sqlite" if pgserver.unavailable_reason() else "postgresql"
    settings = Settings(seed=11, seconds=40, workers=2, units=6, steps=240, catalogue=catalogue)
    run, audit = run_chaos(settings, tmp_path, timeout=600)
    landed = {kind for _, kind, _ in run.faults}
    expected = set(KINDS) if catalogue == "postgresql" else set(KINDS) - {"database"}
    print(f"\nchaos ({catalogue}): {run.faults}; {run.seconds:.0f} s; {audit}")
    assert audit.problems == []
    assert expected <= landed, f"not every fault landed: {sorted(expected - landed)}"
    assert not run.worker_exits, f"workers exited by themselves: {run.worker_exits}"
    assert audit.ensembles and audit.checkpoints > 0
