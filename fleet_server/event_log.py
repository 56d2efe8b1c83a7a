"""The event log's reader: ``GET /api/event-log``, what happened for people (deployments, analyses,
re-analyses, drift alerts, enrollment), newest first. The rows are written by ``registry.log_event``
inside the transaction that made the change, so every replica's work shows here; the retention
housekeeping (fleet_server.retention) deletes rows older than ``events_keep_days``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select

from fleet_server.db import Database, EventRow

router = APIRouter()


def recent_events(db: Database, *, limit: int = 100, kind: str | None = None,
                  before: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` events (of ``kind`` when given; older than the event id ``before`` when given,
    for paging). Returns ``[{"id", "t", "kind", "data"}]`` newest first. Raises nothing of its own."""
    q = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
    if kind is not None:
        q = q.where(EventRow.kind == kind)
    if before is not None:
        q = q.where(EventRow.id < before)
    with db.session() as s:
        return [{"id": e.id, "t": e.t, "kind": e.kind, "data": e.data} for e in s.scalars(q)]


@router.get("/api/event-log", summary="The event log, newest first (deployments, analyses, drift alerts, ...)")
def event_log(request: Request, limit: int = Query(100, ge=1, le=1000), kind: str | None = Query(None, max_length=32),
              before: int | None = Query(None, ge=1, description="only events with a smaller id (the next page)")
              ) -> list[dict[str, Any]]:
    return recent_events(request.app.state.server.db, limit=limit, kind=kind, before=before)
