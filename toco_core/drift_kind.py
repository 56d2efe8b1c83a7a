"""The kind of a drift alert: fidelity drift or data drift.

Re-analysing with field samples fixes *fidelity drift*: the compressed model stops agreeing
with its base on the new inputs, and a new compression fitted on them agrees again. It cannot fix
*data drift*: the base itself sees inputs unlike its training data (inputs shifted, confidence
or entropy out of band, or for the task kinds without classes the output distribution) while
the compressed model still agrees with it. Only a retrained base
or an operator's decision (accept the new data as normal) fixes that, so the two kinds lead to
different actions on the server (fleet_server.drift_policy).

The box decides first, from the checks of the window that raised the alert; the server checks
again (fleet_server.drift_classify). Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Literal

from toco_core.drift import DriftReport
from toco_core.task_kind import TaskKind

DriftKind = Literal["fidelity", "data"]
FIDELITY: DriftKind = "fidelity"
DATA: DriftKind = "data"
DATA_CHECKS = ("confidence", "entropy_psi", "output_psi", "input_shift")
# checks that mean something only for a classifier: a report of another task kind that has them
# out of band (a hand-made or foreign one: this code does not judge them for such a model) is
# never data drift on their account
CLASS_CHECKS = ("confidence", "entropy_psi")


def agreement_judged(report: DriftReport) -> bool:
    """Whether the window judged agreement at all (a shadow run fed enough inputs to the check)."""
    return any(c.name == "agreement" and c.in_band is not None for c in report.checks)


def data_checks_out(report: DriftReport) -> list[str]:
    """The data-drift checks of a report that are out of band and mean something for its task kind.

    A report of a kind without classes (``task_kind`` regression, score or embedding) never counts
    ``confidence`` or ``entropy_psi``: its confidence is 1 on every sample. Reports without
    ``task_kind`` (classifiers, agents older than the field) count every check.
    """
    classes = report.task_kind in (None, TaskKind.CLASSIFIER)
    return [n for n in report.out_of_band if n in DATA_CHECKS and (classes or n not in CLASS_CHECKS)]


def classify(report: DriftReport) -> DriftKind | None:
    """The kind of an alerting window as the box sees it, or None (no alert, or no agreement measured).

    Takes a report whose alert fields are set (toco_core.drift_monitor). Returns ``fidelity`` when
    the agreement check is out of band, ``data`` when only input/confidence/entropy/output checks
    that mean something for the task kind are out (data_checks_out) while agreement was judged and
    held, None otherwise: a box that shadows nothing cannot tell the two apart, and the server
    scores its uploaded samples against the base instead.
    """
    if not report.alert:
        return None
    if "agreement" in report.out_of_band:
        return FIDELITY
    if agreement_judged(report) and data_checks_out(report):
        return DATA
    return None
