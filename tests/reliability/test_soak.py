"""The soak, short: 200 simulated workers lease and heartbeat against a coordinator process for
30 s per catalogue, with no errors and under 10% memory growth. The long version is
`python tests/reliability/soak.py --workers 200 --minutes 10 --catalogue sqlite|postgresql`."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
from soak import PG_ADMIN_URL, Settings, Tally, figures, percentile, print_table, soak
from sqlalchemy import make_url

WORKERS = 200
DURATION_S = 30.0
# A shorter lease than the default 30 s puts several heartbeat rounds and lease turnovers into a
# short run; beats come every ttl / 3, so a beat may be 13 s late before a lease is lost (the
# first leases of 200 workers queue up; 8 s has been seen on a loaded machine).
LEASE_TTL_S = 20.0
MAX_GROWTH_PCT = 10.0


def require_postgres() -> None:
    """Skip when PostgreSQL is not there, as the integration tests do (fail under CI)."""
    conninfo = make_url(PG_ADMIN_URL).set(drivername="postgresql")
    try:
        psycopg.connect(conninfo.render_as_string(hide_password=False), connect_timeout=5).close()
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {e}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def test_the_figures_measure_growth_after_the_warm_up_and_count_errors() -> None:
    # 100 s sampled each second: 100 MiB while warming up, then a climb to 130 MiB, back to 120.
    rss = [100 * 1024] * 26 + [(100 + i) * 1024 for i in range(1, 31)] + [120 * 1024] * 44
    samples = [(float(t), kib, t / 10) for t, kib in enumerate(rss)]
    tally = Tally(heartbeat_s=[i / 1000 for i in range(1, 101)])
    tally.error("Heartbeat", "UNAVAILABLE", "the coordinator went away")
    result = figures(Settings(warmup=0.25), tally, samples, window=100.0)
    assert result["rss_mib_warmup_end"] == 100.0
    assert (result["rss_growth_pct_max"], result["rss_growth_pct_end"]) == (30.0, 20.0)
    assert (result["heartbeat_ms_p50"], result["heartbeat_ms_p99"]) == (50.0, 99.0)
    assert result["errors"] == 1 and result["errors_by_code"] == {"Heartbeat UNAVAILABLE": 1}
    assert percentile([], 99) != percentile([], 99)  # NaN: no figure rather than a made-up one


@pytest.mark.parametrize("catalogue", ["sqlite", "postgresql"])
def test_200_workers_soak_without_errors_or_memory_growth(catalogue: str, tmp_path: Path) -> None:
    if catalogue == "postgresql":
        require_postgres()
    settings = Settings(
        workers=WORKERS,
        duration_s=DURATION_S,
        catalogue=catalogue,
        lease_ttl_s=LEASE_TTL_S,
        hold_beats=(2, 5),
        # The fleet's first leases (spread over one beat, slow on a loaded machine) and the
        # coordinator's lazy set-up (connection pools, TLS sessions) fall in the warm-up.
        warmup=0.4,
    )
    result = soak(settings, tmp_path)
    print_table(result)  # the figures, for -s or a failure report

    assert result["errors"] == 0, result["errors_by_code"]
    assert result["registered"] == WORKERS
    assert result["rss_growth_pct_max"] < MAX_GROWTH_PCT, result
    # The fleet really worked: a good share of the beats due were made (the first come only
    # after a lease, which is slow on a loaded machine), and leases turned over.
    beats_due = WORKERS * DURATION_S / (LEASE_TTL_S / 3)
    assert result["heartbeats"] >= beats_due / 3, result
    assert result["leases_granted"] > WORKERS, result
    assert result["leases_failed_back"] > 0 and result["leases_dropped"] > 0, result
