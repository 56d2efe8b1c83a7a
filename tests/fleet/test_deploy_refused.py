"""A deploy command the MQTT client refuses (PublishRefused: no packet id free) is not marked sent: its
member stays pending, the wave is judged only once all of it went out, and the next status message or
the tick sends it again. ``send_command`` here is a recorder that refuses while told to (the real
refusal through paho and mosquitto is tests/fleet/test_part_serving.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from fleet_server.db import Database, DeviceRow, TimelineRow
from fleet_server.deployments import Deployments
from fleet_server.events import EventBus
from fleet_server.mqtt_client import PublishRefused
from tests.support.fleet_seed import seed_deployable
from toco_core.messages import StatusMessage


class _Publisher:
    def announce(self, manifest, data) -> None:
        self.announced = manifest.bundle_id


class RefusingSender:
    """Records the devices commanded; refuses every command once ``budget`` sends are used (None: no limit)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.sent: list[str] = []

    def __call__(self, device_id: str, command) -> None:
        if self.budget is not None and len(self.sent) >= self.budget:
            raise PublishRefused("no packet id free", "sent again later")
        self.sent.append(device_id)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    database = Database(url)
    yield database
    database.close()


def succeed(db: Database, deployments: Deployments, dep: dict, devices: list[str]) -> None:
    after: list = []
    with db.session(write=True) as s:
        for d in devices:
            row = s.get(DeviceRow, d)
            assert row is not None
            deployments.on_status(s, row, StatusMessage(
                device_id=d, phase="active", deployment_id=dep["deployment_id"], bundle_id=dep["bundle_id"]), after)


def test_a_refused_canary_command_stays_pending_and_goes_out_before_the_rest(db, tmp_path):
    analysis_id = seed_deployable(db, tmp_path, 10)
    send = RefusingSender(budget=3)
    deployments = Deployments(db, EventBus(), publisher=_Publisher(), send_command=send, timeout_s=600)
    dep = deployments.create(analysis_id=analysis_id, target={"group": "deploy"}, canary_share=0.5,
                             failure_threshold=0.5)
    canary = [d["device_id"] for d in dep["devices"] if d["wave"] == "canary"]
    assert len(canary) == 5 and send.sent == canary[:3]
    assert dep["counts"] == {"pending": 7, "in_progress": 3, "succeeded": 0, "failed": 0}
    with db.session() as s:
        assert sorted(s.scalars(select(TimelineRow.device_id).where(TimelineRow.phase == "sent"))) == canary[:3]

    # the three succeed while the client still refuses: the canary is not judged, the rest not sent
    succeed(db, deployments, dep, canary[:3])
    view = deployments.get(deployment_id=dep["deployment_id"])
    assert view["stage"] == "canary" and view["counts"]["pending"] == 7 and send.sent == canary[:3]

    # packet ids free again: the tick sends the canary's last two, and only them
    send.budget = None
    deployments.tick()
    assert send.sent == canary
    assert deployments.get(deployment_id=dep["deployment_id"])["stage"] == "canary"
    succeed(db, deployments, dep, canary[3:])
    view = deployments.get(deployment_id=dep["deployment_id"])
    rest = [d["device_id"] for d in dep["devices"] if d["wave"] == "rest"]
    assert view["stage"] == "rest" and send.sent == canary + rest
    assert view["counts"] == {"pending": 0, "in_progress": 5, "succeeded": 5, "failed": 0}


def test_a_wave_refused_whole_is_sent_by_the_tick(db, tmp_path):
    analysis_id = seed_deployable(db, tmp_path, 4)
    send = RefusingSender(budget=0)
    deployments = Deployments(db, EventBus(), publisher=_Publisher(), send_command=send, timeout_s=600)
    dep = deployments.create(analysis_id=analysis_id, target={"group": "deploy"}, canary_share=1.0,
                             failure_threshold=0.5)
    assert dep["counts"]["pending"] == 4 and dep["stage"] == "rest"
    deployments.tick()  # still refused: nothing marked
    assert deployments.get(deployment_id=dep["deployment_id"])["counts"]["pending"] == 4
    send.budget = None
    deployments.tick()
    view = deployments.get(deployment_id=dep["deployment_id"])
    assert view["counts"]["in_progress"] == 4 and sorted(send.sent) == sorted(d["device_id"] for d in view["devices"])
    deployments.tick()  # nothing left unsent: nothing sent twice
    assert len(send.sent) == 4
