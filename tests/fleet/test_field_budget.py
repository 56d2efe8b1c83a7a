"""The budget a re-analysis with field samples is held to: scaled to their share of the pool, and
scaled from the operator's budget, never from an earlier re-analysis's scaled one."""

from __future__ import annotations

import pytest

from fleet_server.db import AnalysisRow, Database, ModelRow, ReanalysisRow
from fleet_server.field_budget import field_budget, operator_budget


@pytest.mark.parametrize(("pool", "field", "held"), [
    (120, 32, 0.05 * 32 / 152),  # the field samples' share of the pool
    (120, 0, 0.05),              # no field samples: nothing to hold apart
    (0, 10, 0.05),               # a pool of field samples only
])
def test_the_pool_budget_holds_the_budget_on_the_field_samples(pool, field, held):
    assert field_budget(0.05, pool, field) == pytest.approx(held)


@pytest.mark.parametrize(("heldout", "held"), [
    (1000, 0.05 * 32 / 152),  # 2 / 1000 is finer than the scaled budget: the scaled budget holds
    (76, 2 / 76),             # the scaled 1.05% would leave only the base model plannable on 76 samples
    (20, 0.05),               # never above the operator's budget
])
def test_the_pool_budget_never_falls_below_what_the_heldout_samples_resolve(heldout, held):
    assert field_budget(0.05, 120, 32, heldout) == pytest.approx(held)


def test_a_second_reanalysis_scales_the_operators_budget_not_the_first_reanalysiss(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    with db.session(write=True) as s:
        s.add(ModelRow(id="m-1", name="lenet5", sha256="0" * 64, weights=1, size_bytes=1, pool_size=120, path="m",
                       pool_path="p"))
        s.flush()
        s.add_all([AnalysisRow(id="a-1", model_id="m-1", settings={"budget": 0.05}),
                   AnalysisRow(id="a-2", model_id="m-1", settings={"budget": 0.0105}, field_sample_ids=[1, 2]),
                   AnalysisRow(id="a-3", model_id="m-1", settings={"budget": 0.001}, field_sample_ids=[3]),
                   AnalysisRow(id="a-4", model_id="m-1", settings={"budget": 0.02}, field_sample_ids=[4])])
        s.add_all([ReanalysisRow(id="r-1", model_id="m-1", parent_analysis_id="a-1", group="g", trigger_devices=[],
                                 why="", status="deployed", analysis_id="a-2"),
                   ReanalysisRow(id="r-2", model_id="m-1", parent_analysis_id="a-2", group="g", trigger_devices=[],
                                 why="", status="deployed", analysis_id="a-3")])
    with db.session() as s:
        assert [operator_budget(s, s.get(AnalysisRow, a)) for a in ("a-1", "a-2", "a-3")] == [0.05, 0.05, 0.05]
        assert operator_budget(s, s.get(AnalysisRow, "a-4")) == 0.02  # field samples but no re-analysis names it
