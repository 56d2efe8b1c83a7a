"""The kind of a drift alert: fidelity drift or data drift.

Re-analysing with field samples fixes *fidelity drift*: the compressed model stops agreeing
with its base on the new inputs, and a new compression fitted on them agrees again. It cannot fix
*data drift*: the base itself sees inputs unlike its training data (inputs shifted, confidence
or entropy out of band) while the compressed model still agrees with it. Only a retrained base
or an operator's decision (accept the new data as normal) fixes that, so the two kinds lead to
different actions on the server (fleet_server.drift_policy).

The box decides first, from the checks of the window that raised the alert; the server checks
again (fleet_server.drift_classify). Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Literal

from toco_core.drift import DriftReport

DriftKind = Literal["fidelity", "data"]
FIDELITY: DriftKind = "fidelity"
DATA: DriftKind = "data"
DATA_CHECKS = ("confidence", "entropy_psi", "input_shift")


def agreement_judged(report: DriftReport) -> bool:
    """Whether the window judged agreement at all (a shadow run fed enough inputs to the check)."""
    return any(c.name == "agreement" and c.in_band is not None for c in report.checks)


def classify(report: DriftReport) -> DriftKind | None:
    """The kind of an alerting window as the box sees it, or None (no alert, or no agreement measured).

    Takes a report whose alert fields are set (toco_core.drift_monitor). Returns ``fidelity`` when
    the agreement check is out of band, ``data`` when only input/confidence/entropy checks are out
    while agreement was judged and held, None otherwise: a box that shadows nothing cannot tell the
    two apart, and the server scores its uploaded samples against the base instead.
    """
    if not report.alert:
        return None
    if "agreement" in report.out_of_band:
        return FIDELITY
    if agreement_judged(report) and any(name in DATA_CHECKS for name in report.out_of_band):
        return DATA
    return None
