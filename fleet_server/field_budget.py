"""The fidelity budget a re-analysis with field samples is held to.

An analysis holds its budget on its whole pool: the model's pool plus the field samples, which are a
minority of it (32 disputed inputs next to a pool of hundreds). Its top-1 disagreement on the pool is
at least ``share * d_field``, so a plan at the full budget may flip ``budget / share`` of the field
inputs: with a sixth of the pool from the field, a 5% budget allows 30% on the inputs the re-analysis
is for. The trigger devices see nothing but those inputs, so the bundle built for them would break the
budget there, the box's agreement check would fall out of band again, and the drift would never
converge. Holding the pool to ``share * budget`` keeps the field inputs within the budget.
"""

from __future__ import annotations

from sqlalchemy import select

from fleet_server.db import AnalysisRow, ReanalysisRow
from toco_core.analysis.settings import AnalysisSettings


def operator_budget(s, analysis: AnalysisRow) -> float:
    """The budget the operator asked for, behind any re-analyses' scaled ones.

    Takes a session and an analysis. Returns the budget of the first analysis of its chain that is
    not a re-analysis with field samples (so a second re-analysis scales that one, not the first's).
    """
    seen: set[str] = set()
    while analysis.field_sample_ids and analysis.id not in seen:
        seen.add(analysis.id)
        r = s.scalars(select(ReanalysisRow).where(ReanalysisRow.analysis_id == analysis.id)).first()
        parent = s.get(AnalysisRow, r.parent_analysis_id) if r is not None else None
        if parent is None:
            break
        analysis = parent
    return AnalysisSettings.model_validate(analysis.settings).budget


def field_budget(budget: float, pool_size: int, field_samples: int, heldout: int | None = None) -> float:
    """The pool budget that holds ``budget`` on the field samples (see the module docstring), but
    never below what the analysis' ``heldout`` samples resolve.

    Takes the operator's budget, the model's pool size, the number of field samples and the held-out
    samples the re-analysis will calibrate on. Returns ``max(budget * field / (pool + field),
    min(budget, 2 / heldout))``, or ``budget`` itself without field samples. Below 2 / heldout the
    solver's bound on even a zero-disagreement point (toco_core.solver) exceeds the budget and only the
    base model is left: measured in the demo (1% over ~1,000 digits + 32 field samples scaled to
    0.03%), whose canary then stopped and the group kept its drifting bundle.
    """
    if field_samples <= 0:
        return budget
    scaled = budget * field_samples / (max(pool_size, 0) + field_samples)
    return scaled if not heldout else max(scaled, min(budget, 2.0 / heldout))


def heldout_size(settings: AnalysisSettings, pool_samples: int) -> int:
    """The held-out samples an analysis of ``pool_samples`` calibrates on (toco_core.analysis.pipeline)."""
    return min(settings.max_heldout, max(10, int(pool_samples * settings.heldout_share)))
