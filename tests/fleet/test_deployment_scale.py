"""A deployment to hundreds of devices: every member created, every command sent, in a number of SQL
statements that does not grow with the group (bench/fleet.py's 2,000-device deployment timed out when
``create`` read and wrote one device at a time). Deployments runs here without a broker: its publisher
and ``send_command`` are recorders."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import event, select

from fleet_server.db import Database, DeploymentDeviceRow, DeviceRow, TimelineRow
from fleet_server.deployments import Deployments
from fleet_server.enrollment import revoke
from fleet_server.events import EventBus
from tests.support.fleet_seed import device_id, seed_deployable
from toco_core.messages import DeployCommand, StatusMessage

N = 400


class _Publisher:
    def announce(self, manifest, data) -> None:
        self.announced = manifest.bundle_id


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> Iterator[Database]:
    """An empty fleet database on SQLite or on the session's PostgreSQL cluster."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    database = Database(url)
    yield database
    database.close()


def _statements(db: Database) -> list[str]:
    seen: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda conn, cur, stmt, *rest: seen.append(stmt))
    return seen


def test_a_deployment_to_many_devices_creates_every_member_and_sends_every_command(db, tmp_path):
    analysis_id = seed_deployable(db, tmp_path, N)
    with db.session(write=True) as s:  # not deployed to: offline, or allowed another model only
        s.get(DeviceRow, device_id(1)).online = False
        s.get(DeviceRow, device_id(2)).allowed_models = ["m-other"]
    sent: list[tuple[str, DeployCommand]] = []
    deployments = Deployments(db, EventBus(), publisher=_Publisher(), send_command=lambda d, c: sent.append((d, c)),
                              timeout_s=60)
    statements = _statements(db)
    dep = deployments.create(analysis_id=analysis_id, target={"group": "deploy"}, canary_share=0.1,
                             failure_threshold=0.5)
    assert len(statements) < 40, f"{len(statements)} statements for {N} devices"
    targeted = [device_id(i) for i in range(N) if i not in (1, 2)]
    canary = targeted[:40]  # ceil(0.1 * 398)
    assert [d["device_id"] for d in dep["devices"]] == targeted
    assert [d["device_id"] for d in dep["devices"] if d["wave"] == "canary"] == canary
    assert dep["counts"] == {"pending": len(targeted) - 40, "in_progress": 40, "succeeded": 0, "failed": 0}
    assert [d for d, _ in sent] == canary
    assert all(c.deployment_id == dep["deployment_id"] for _, c in sent) and len({c.cmd_id for _, c in sent}) == 40
    with db.session() as s:
        states = dict(s.execute(select(DeviceRow.id, DeviceRow.deploy_state)).all())
        timeline = s.execute(select(TimelineRow.device_id, TimelineRow.phase)).all()
    assert {d for d, st in states.items() if st == "deploying"} == set(canary)
    assert sorted(timeline) == [(d, "sent") for d in canary]

    # the canary succeeds while one device of the rest is revoked: the rest wave goes out to all but that one
    revoke(db, targeted[100])
    sent.clear()
    after: list = []
    with db.session(write=True) as s:
        for d in canary:
            deployments.on_status(s, s.get(DeviceRow, d), StatusMessage(device_id=d, phase="active",
                                                                        deployment_id=dep["deployment_id"],
                                                                        bundle_id=dep["bundle_id"]), after)
    rest = [d for d in targeted[40:] if d != targeted[100]]
    assert [d for d, _ in sent] == rest
    view = deployments.get(deployment_id=dep["deployment_id"])
    assert view["stage"] == "rest"
    assert view["counts"] == {"pending": 0, "in_progress": len(rest), "succeeded": 40, "failed": 1}
    assert {d["device_id"]: d for d in view["devices"]}[targeted[100]]["reason"] == "revoked: not sent"

    # nobody in the rest answers: the tick fails them all, with their devices' deploy state
    assert deployments.tick(now=view["created_at"] + 3600) == len(rest)
    view = deployments.get(deployment_id=dep["deployment_id"])
    assert view["stage"] == "stopped" and view["counts"]["failed"] == len(rest) + 1
    with db.session() as s:
        failed = set(s.scalars(select(DeviceRow.id).where(DeviceRow.deploy_state == "failed")))
        outcomes = set(s.scalars(select(DeploymentDeviceRow.outcome)))
    assert failed == set(rest) and outcomes == {"succeeded", "failed"}
