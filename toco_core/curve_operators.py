"""The curve operators: what each calibration curve applies to the model, as one registry.

A calibration curve (toco_core.calibration) measures one operator on a grid of scales. The
operator decides which scale orders the curve's points, whether they span both scales (made
monotone in both, never cut short), and whether plans are taken from them or they are a
runtime form's own cost, added to a planned point's (toco_core.runtime_forms). The names are
wire strings (stored analyses, the bundle head's ``analysis/calibration.json``) and stay as
they are; CurveOperator is a ``str`` enum, so a member equals and hashes as its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from toco_core.errors import UnregisteredNameError


class CurveOperator(StrEnum):
    """A curve's operator; its value is the name on the wire and the curve's key in an analysis."""

    PRUNE = "prune"
    QUANTIZE = "quantize"
    PRUNE_QUANTIZE = "prune+quantize"
    INT8 = "int8"  # the full QDQ int8 runtime's own cost (one point)

    @property
    def spec(self) -> OperatorSpec:
        """This operator's entry in OPERATORS."""
        return OPERATORS[self]


@dataclass(frozen=True)
class OperatorSpec:
    """How a curve of one operator is ordered, fitted and used.

    ``scale``: the CurvePoint field that orders a 1-D curve; ``joint``: the points span both
    scales (made monotone in both; a sweep is never stopped early, as a bad corner says nothing
    about the rest); ``planned``: plans are taken from its points (else it is a runtime form's
    cost, read by that form).
    """

    scale: Literal["prune_scale", "quant_scale"]
    joint: bool = False
    planned: bool = True


OPERATORS: dict[CurveOperator, OperatorSpec] = {
    CurveOperator.PRUNE: OperatorSpec(scale="prune_scale"),
    CurveOperator.QUANTIZE: OperatorSpec(scale="quant_scale"),
    CurveOperator.PRUNE_QUANTIZE: OperatorSpec(scale="quant_scale", joint=True),
    CurveOperator.INT8: OperatorSpec(scale="quant_scale", planned=False),
}

# the curves a plan is taken from, in the order analyses list them
PLANNED: tuple[CurveOperator, ...] = tuple(op for op, spec in OPERATORS.items() if spec.planned)


def curve_operator(name: str) -> CurveOperator:
    """The operator called ``name`` on the wire.

    Takes a name such as ``"prune+quantize"``; returns its CurveOperator. Raises
    UnregisteredNameError naming the known operators for any other name.
    """
    try:
        return CurveOperator(name)
    except ValueError:
        raise UnregisteredNameError("curve operator", name, [op.value for op in CurveOperator]) from None
