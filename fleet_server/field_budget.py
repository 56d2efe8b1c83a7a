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


def field_budget(budget: float, pool_size: int, field_samples: int) -> float:
    """The pool budget that holds ``budget`` on the field samples (see the module docstring).

    Takes the operator's budget, the model's pool size and the number of field samples. Returns
    ``budget * field / (pool + field)``, or ``budget`` itself without field samples.
    """
    if field_samples <= 0:
        return budget
    return budget * field_samples / (max(pool_size, 0) + field_samples)
