"""Choosing one checkpoint per unit for an ensemble: rules, ties, what is skipped, and picks."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.records import CheckpointRecord
from tspace_core.catalogue.selection import choose_members, parse_rule

T0 = 1_700_000_000.0


def ckpt(
    unit: int,
    step: int,
    *,
    final: bool = False,
    at: float | None = None,
    tag: str = "",
    **fields: Any,
) -> CheckpointRecord:
    """A checkpoint of unit `unit` at `step`, created at T0 + step unless `at` says otherwise."""
    sha = hashlib.sha256(f"{unit}/{step}/{final}/{tag}".encode()).hexdigest()
    return CheckpointRecord(
        sha256=sha,
        size=1,
        job="digits",
        unit=unit,
        step=step,
        final=final,
        statement=b"{}",
        signature=b"sig",
        worker_id="w-1",
        key_id="k1",
        public_key=b"pk",
        created_at=T0 + step if at is None else at,
        **fields,
    )


def refusal(code: str, *args: Any, **kwargs: Any) -> str:
    """choose_members(*args, **kwargs) is refused with `code`; its message."""
    with pytest.raises(CatalogueError) as excinfo:
        choose_members(*args, **kwargs)
    assert excinfo.value.code == code
    return str(excinfo.value)


@pytest.mark.parametrize(
    ("rule", "parsed"),
    [
        ("final", ("final", None)),
        ("", ("final", None)),
        ("  newest ", ("newest", None)),
        ("best:loss", ("best", "loss")),
        ("best:val_loss", ("best", "val_loss")),
        ("best:fid.10k-ema", ("best", "fid.10k-ema")),
    ],
)
def test_parse_rule(rule: str, parsed: tuple[str, str | None]) -> None:
    assert parse_rule(rule) == parsed


@pytest.mark.parametrize(
    "rule", ["best", "best:", "best:1loss", "best:a b", "worst:loss", "Final", "newest:loss"]
)
def test_bad_rule_names_the_accepted_forms(rule: str) -> None:
    with pytest.raises(CatalogueError) as excinfo:
        parse_rule(rule)
    assert excinfo.value.code == "invalid_argument"
    message = str(excinfo.value)
    assert repr(rule.strip()) in message
    assert "use final, newest or best:METRIC" in message
    assert "\n" not in message


def test_final_takes_the_newest_final_checkpoint() -> None:
    old = ckpt(0, 500, final=True, at=T0 + 500)
    # After a reset the unit trained again and delivered a second final, at a lower step.
    again = ckpt(0, 400, final=True, at=T0 + 900)
    later_partial = ckpt(0, 800)
    other = ckpt(1, 500, final=True)
    got = choose_members([0, 1], [old, again, later_partial, other], "final")
    assert got == {0: again.sha256, 1: other.sha256}


def test_newest_takes_the_highest_step_then_the_newest_among_equals() -> None:
    low, high = ckpt(0, 100, at=T0 + 999), ckpt(0, 300, at=T0 + 1)
    first, second = ckpt(1, 200, at=T0 + 5, tag="a"), ckpt(1, 200, at=T0 + 6, tag="b")
    assert choose_members([0, 1], [second, low, high, first], "newest") == {
        0: high.sha256,
        1: second.sha256,
    }


def test_newest_full_tie_is_decided_by_digest_whatever_the_order() -> None:
    a, b = ckpt(0, 200, at=T0, tag="a"), ckpt(0, 200, at=T0, tag="b")
    expected = min(a.sha256, b.sha256)
    assert choose_members([0], [a, b], "newest") == {0: expected}
    assert choose_members([0], [b, a], "newest") == {0: expected}


def test_best_takes_the_lowest_value_and_breaks_ties_by_higher_step() -> None:
    worse = ckpt(0, 400, metrics={"val_loss": 0.30})
    best = ckpt(0, 100, metrics={"val_loss": 0.10})
    tie_low, tie_high = (
        ckpt(1, 100, metrics={"val_loss": 0.2}),
        ckpt(1, 300, metrics={"val_loss": 0.2}),
    )
    newer = ckpt(1, 500, metrics={"val_loss": 0.25})
    checkpoints = [worse, best, tie_high, tie_low, newer]
    assert choose_members([0, 1], checkpoints, "best:val_loss") == {
        0: best.sha256,
        1: tie_high.sha256,
    }


def test_best_reads_only_the_named_metric() -> None:
    by_loss = ckpt(0, 100, metrics={"loss": 0.1, "val_loss": 0.9})
    by_val = ckpt(0, 200, metrics={"loss": 0.5, "val_loss": 0.2})
    assert choose_members([0], [by_loss, by_val], "best:loss") == {0: by_loss.sha256}
    assert choose_members([0], [by_loss, by_val], "best:val_loss") == {0: by_val.sha256}


def test_best_skips_a_metric_that_was_not_finite() -> None:
    # A non-finite value is stored as None; it must neither win nor break the comparison.
    diverged = ckpt(0, 300, metrics={"loss": None})
    fine = ckpt(0, 200, metrics={"loss": 0.7})
    assert choose_members([0], [diverged, fine], "best:loss") == {0: fine.sha256}
    message = refusal("failed_precondition", [0], [diverged], "best:loss")
    assert "units [0]" in message and "'loss'" in message


@pytest.mark.parametrize("rule", ["final", "newest", "best:loss"])
def test_untrusted_and_discarded_checkpoints_never_count(rule: str) -> None:
    good = ckpt(0, 100, final=True, metrics={"loss": 0.5})
    untrusted = ckpt(0, 900, final=True, at=T0 + 2000, trusted=False, metrics={"loss": 0.1})
    discarded = ckpt(0, 800, final=True, at=T0 + 3000, discarded=True, metrics={"loss": 0.2})
    assert choose_members([0], [untrusted, discarded, good], rule) == {0: good.sha256}
    refusal("failed_precondition", [0], [untrusted, discarded], rule)


def test_picks_override_the_rule_even_for_checkpoints_the_rule_skips() -> None:
    newest0, newest1 = ckpt(0, 500), ckpt(1, 500)
    picked = ckpt(0, 100, discarded=True)
    got = choose_members([0, 1], [newest0, newest1, picked], "newest", {0: picked})
    assert got == {0: picked.sha256, 1: newest1.sha256}
    # A pick also stands in for a unit the rule finds nothing for.
    only = ckpt(2, 10)
    got = choose_members([0, 2], [newest0], "final", {0: newest0, 2: only})
    assert got == {0: newest0.sha256, 2: only.sha256}


def test_refusal_names_every_unit_without_a_checkpoint() -> None:
    checkpoints = [ckpt(1, 500, final=True), ckpt(3, 20)]
    message = refusal("failed_precondition", range(4), checkpoints, "final")
    assert "units [0, 2, 3]" in message and "no final checkpoint" in message
    message = refusal("failed_precondition", range(4), checkpoints, "newest")
    assert "units [0, 2]" in message and "no usable checkpoint" in message
    assert "pick their checkpoints explicitly" in message


def test_a_pick_for_a_unit_the_job_lacks_is_refused() -> None:
    message = refusal(
        "invalid_argument", [0, 1], [ckpt(0, 1), ckpt(1, 1)], "newest", {7: ckpt(0, 1)}
    )
    assert "[7]" in message and "0..1" in message


def test_units_are_reported_once_and_in_order() -> None:
    a, b = ckpt(0, 5), ckpt(2, 5)
    assert list(choose_members([2, 0, 2], [b, a], "newest")) == [0, 2]
    assert choose_members([], [a, b], "newest") == {}
