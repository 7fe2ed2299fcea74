"""Choosing one checkpoint per unit for an ensemble: a pure function of the unit's checkpoints.

Rules: "final" (the unit's newest final checkpoint, what completing the unit delivered),
"newest" (the highest step), "best:METRIC" (the lowest recorded value of METRIC, e.g.
best:val_loss; ties go to the higher step). Only trusted, not discarded checkpoints count;
explicit picks by the operator override the rule for their units.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from tspace_core.catalogue.errors import CatalogueError
from tspace_core.catalogue.records import CheckpointRecord

RULES = ("final", "newest", "best:METRIC")
_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def parse_rule(rule: str) -> tuple[str, str | None]:
    """("final" | "newest" | "best", metric or None); refused with the accepted forms."""
    rule = rule.strip() or "final"
    if rule in ("final", "newest"):
        return rule, None
    kind, _, metric = rule.partition(":")
    if kind == "best" and _METRIC.fullmatch(metric):
        return "best", metric
    raise CatalogueError(
        "invalid_argument",
        f"unknown selection {rule[:70]!r}; use final, newest or best:METRIC (e.g. best:loss)",
    )


def _key(rule: str, metric: str | None, ckpt: CheckpointRecord) -> tuple[float, ...] | None:
    """Sort key, smallest wins; None when the checkpoint does not qualify under the rule."""
    if rule == "final":
        return (-ckpt.created_at,) if ckpt.final else None
    if rule == "newest":
        return (-ckpt.step, -ckpt.created_at)
    value = ckpt.metrics.get(metric or "")
    if value is None:  # not recorded, or not finite when it was
        return None
    return (float(value), -ckpt.step, -ckpt.created_at)


def choose_members(
    units: Iterable[int],
    checkpoints: Iterable[CheckpointRecord],
    rule: str,
    picks: Mapping[int, CheckpointRecord] | None = None,
) -> dict[int, str]:
    """{unit: sha256} for every unit in `units`; refused, naming the units, when a unit has no
    checkpoint the rule accepts or a pick names a unit that is not in `units`."""
    kind, metric = parse_rule(rule)
    wanted = sorted(set(units))
    picks = dict(picks or {})
    unknown = sorted(set(picks) - set(wanted))
    if unknown:
        have = f"{wanted[0]}..{wanted[-1]}" if wanted else "none"
        raise CatalogueError(
            "invalid_argument",
            f"picks name units {unknown}, which the job does not have (its units: {have})",
        )
    best: dict[int, tuple[tuple[float, ...], str]] = {}
    for ckpt in checkpoints:
        if not ckpt.in_use:
            continue
        key = _key(kind, metric, ckpt)
        if key is None:
            continue
        entry = (key, ckpt.sha256)
        if ckpt.unit not in best or entry < best[ckpt.unit]:
            best[ckpt.unit] = entry
    chosen: dict[int, str] = {}
    missing = []
    for unit in wanted:
        if unit in picks:
            chosen[unit] = picks[unit].sha256
        elif unit in best:
            chosen[unit] = best[unit][1]
        else:
            missing.append(unit)
    if missing:
        what = {
            "final": "no final checkpoint (still training?)",
            "newest": "no usable checkpoint",
            "best": f"no checkpoint that recorded {metric!r}",
        }[kind]
        raise CatalogueError(
            "failed_precondition",
            f"units {missing} have {what}; pick their checkpoints explicitly or use another rule",
        )
    return chosen
