"""The server's check of a drift report: does it trigger, and is it fidelity or data drift?

The box says what kind of alert it raised (toco_core.drift_kind); the server does not take the
word for it but classifies again from the window's own checks, and adds the fleet's floor: a
measured agreement below ``1 - budget - margin`` beyond its sampling noise is fidelity drift
whether or not the box alerted. A box that shadows nothing cannot measure agreement: its alert
is ``unclassified`` until the server has scored its uploaded samples against the base
(fleet_server.sample_scoring). A model without classes (regression, score, embedding) has no
confidence or entropy: a report of one whose alert rests on those checks alone triggers nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toco_core.drift_kind import CLASS_CHECKS, DATA, FIDELITY, classify
from toco_core.messages import DriftMessage
from toco_core.task_kind import TaskKind

MIN_SHADOWED = 20
UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class Verdict:
    """A report that triggers: its kind (fidelity | data | unclassified) and why, in words."""

    kind: str
    why: str


def agreement_upper_bound(agreement: float, n: int, z: float = 2.0) -> float:
    """Wilson score upper bound of an agreement measured on n inputs (z = 2: ~98% one-sided).

    (p + z^2/2n + z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    """
    n = max(n, 1)
    p = min(max(agreement, 0.0), 1.0)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p + z * z / (2 * n) + spread) / (1 + z * z / n)


def below_floor(agreement: float | None, n: int, floor: float) -> bool:
    """Whether an agreement on n inputs is below ``floor`` beyond its sampling noise (n >= MIN_SHADOWED)."""
    return agreement is not None and n >= MIN_SHADOWED and agreement_upper_bound(agreement, n) < floor


def classless_alert(msg: DriftMessage) -> bool:
    """Whether a report of a kind without classes is out of band only on checks its kind does not
    have (confidence, entropy): a constant confidence is no evidence of anything."""
    return (msg.task_kind not in (None, TaskKind.CLASSIFIER) and bool(msg.out_of_band)
            and all(name in CLASS_CHECKS for name in msg.out_of_band))


def verdict(msg: DriftMessage, budget: float, margin: float) -> Verdict | None:
    """The server's verdict on one drift report, or None when it triggers nothing.

    Takes the report, the fleet budget and the agreement margin. Fidelity: agreement below the
    fleet floor beyond noise, or an alert whose agreement check is out of band. Data: an alert
    whose input/confidence/entropy/output checks are out while agreement was judged and held.
    Unclassified: an alert without any agreement measured. None also for an alert of a kind without
    classes that rests on classifier-only checks (classless_alert).
    """
    floor = 1.0 - budget - margin
    a = msg.measured_agreement
    bad = ", ".join(msg.out_of_band) or "checks"
    held = f"drift alert held for {msg.consecutive_out_of_band} windows ({bad} out of band)"
    if below_floor(a, msg.n_shadowed, floor):
        low = (f"agreement {a:.1%} on {msg.n_shadowed} inputs, clearly below the fleet floor {floor:.1%} "
               f"(budget {budget:.1%})")
        return Verdict(FIDELITY, f"{held}; {low}" if msg.alert else low)
    if not msg.alert or classless_alert(msg):
        return None
    kind = classify(msg)  # from the checks, not from msg.kind
    if kind == FIDELITY:
        return Verdict(FIDELITY, held)
    if kind == DATA:
        seen = f"; agreement {a:.1%} holds" if a is not None else ""
        return Verdict(DATA, f"{held}{seen}: the base model sees new data")
    return Verdict(UNCLASSIFIED, f"{held}; agreement not measured on the box: scoring its samples against the base")
