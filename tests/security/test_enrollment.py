"""Enrolled device identities: the server's group wins over the claimed one, unknown devices are
quarantined (shown, never deployed to, their drift triggers nothing), revoked ones are ignored;
``toco-fleet devices enroll/revoke`` offline with a real mosquitto_passwd."""

from __future__ import annotations

import shutil
import stat

import numpy as np
import pytest
from typer.testing import CliRunner

from fleet_server.broker_passwords import has_user
from fleet_server.cli import app
from fleet_server.enrollment import enroll, revoke
from tests.fleet.conftest import device_json, succeed, wait_until
from toco_core.cli_support import console


def test_a_claimed_group_is_ignored_and_an_unknown_device_is_quarantined(fleet, devices, monkeypatch):
    analysis_id, bundle_id = fleet.analysis["analysis_id"], fleet.analysis["bundle_id"]
    mismatches = fleet.server.ingest.stats["group_mismatch"]
    # enrolled in sec-a, its own config says sec-b: it stays in sec-a
    member = devices("sec-member", group="sec-b", enrolled=False, responder=succeed)
    enroll(fleet.server.db, "sec-member", "sec-a")
    member.send(member.birth())
    assert wait_until(lambda: device_json(fleet, "sec-member").get("enrollment") == "enrolled")
    assert wait_until(lambda: fleet.server.ingest.stats["group_mismatch"] > mismatches)
    assert device_json(fleet, "sec-member")["group"] == "sec-a"
    # never enrolled, claims sec-a: recorded and shown as quarantined, in no group of its choosing
    intruder = devices("sec-intruder", group="sec-a", enrolled=False, responder=succeed)
    assert wait_until(lambda: device_json(fleet, "sec-intruder").get("online"))
    seen = device_json(fleet, "sec-intruder")
    assert seen["enrollment"] == "quarantined" and seen["state"] == "quarantined" and seen["group"] != "sec-a"
    listed = {d["device_id"]: d for d in fleet.api.get("/api/devices").json()}
    assert listed["sec-intruder"]["state"] == "quarantined"
    monkeypatch.setattr(console, "width", 200)  # the whole table, not an 80-column terminal's
    out = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}).invoke(app, ["devices", "list", "--server", fleet.http.url])
    assert out.exit_code == 0 and "sec-intruder" in out.output and "quarantined" in out.output

    # deploys go to the enrolled group only; the quarantined device gets no command, by group, --all or by name
    assert fleet.api.post("/api/deployments", json={"analysis_id": analysis_id, "target": {"group": "sec-b"}}
                          ).status_code == 404
    dep = fleet.api.post("/api/deployments", json={"analysis_id": analysis_id, "target": {"group": "sec-a"},
                                                   "canary_share": 1.0}).json()
    assert [d["device_id"] for d in dep["devices"]] == ["sec-member"]
    everyone = fleet.api.post("/api/deployments", json={"analysis_id": analysis_id, "target": {"all": True}}).json()
    assert "sec-intruder" not in {d["device_id"] for d in everyone["devices"]}
    named = fleet.api.post("/api/deployments", json={"analysis_id": analysis_id, "target": {"device": "sec-intruder"}})
    assert named.status_code == 409 and "quarantined" in named.text
    assert wait_until(lambda: len(member.commands) >= 1)
    assert intruder.commands == []

    # its drift alerts and samples trigger nothing (no re-analysis, nothing stored for one)
    before = len(fleet.api.get("/api/reanalyses").json())
    intruder.drift(1, bundle_id, alert=True, agreement=0.5)
    intruder.samples(np.zeros((2, 1, 28, 28)), window=1)
    assert wait_until(lambda: any(p["device_id"] == "sec-intruder" for p in fleet.api.get("/api/drift").json()))
    assert len(fleet.api.get("/api/reanalyses").json()) == before  # stored in the drift's own transaction
    assert wait_until(lambda: fleet.server.ingest.stats["ignored.quarantined_samples"] >= 1)

    # revoked: whatever it sends from now on is ignored
    ignored = fleet.server.ingest.stats["ignored.revoked"]
    revoke(fleet.server.db, "sec-member")
    member.send(member.birth())
    assert wait_until(lambda: fleet.server.ingest.stats["ignored.revoked"] > ignored)
    gone = device_json(fleet, "sec-member")
    assert gone["enrollment"] == "revoked" and not gone["online"]


@pytest.fixture
def fleet_cli(tmp_path, monkeypatch):
    """Runs ``toco-fleet devices ARGS --data-dir tmp/fleet``; returns the CliRunner result."""
    monkeypatch.delenv("TOCO_FLEET_DB_URL", raising=False)
    (tmp_path / "fleet").mkdir()

    def run(*args: str):
        return CliRunner().invoke(app, ["devices", *args, "--data-dir", str(tmp_path / "fleet")])

    return run


def test_enroll_and_revoke_offline_with_a_mosquitto_password(fleet_cli, tmp_path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto_passwd missing: apt-get install mosquitto (make system-deps)")
    passwd, out = tmp_path / "passwd", tmp_path / "cam-07.password"
    r = fleet_cli("enroll", "cam-07", "--group", "line-1", "--allow", "m-1", "--passwd", str(passwd), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "enrolled cam-07 in group line-1 (m-1)" in r.output
    assert has_user(passwd, "cam-07") and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().strip() not in r.output  # never printed
    line = passwd.read_text().strip()
    assert line.startswith("cam-07:$7$")  # mosquitto's PBKDF2-SHA512, made by mosquitto_passwd
    (tmp_path / "given").write_text("given-pw\n")
    assert fleet_cli("enroll", "cam-08", "--group", "line-1", "--passwd", str(passwd),
                     "--password-file", str(tmp_path / "given")).exit_code == 0
    assert has_user(passwd, "cam-08") and has_user(passwd, "cam-07")

    r = fleet_cli("revoke", "cam-07", "--passwd", str(passwd))
    assert r.exit_code == 0 and "revoked cam-07" in r.output, r.output
    assert not has_user(passwd, "cam-07") and has_user(passwd, "cam-08")

    from fleet_server.db import Database
    from fleet_server.enrollment import listing

    db = Database(f"sqlite:///{tmp_path / 'fleet' / 'fleet.db'}")
    try:
        rows = {d["device_id"]: d for d in listing(db)}
    finally:
        db.close()
    assert rows["cam-07"]["enrollment"] == "revoked" and rows["cam-08"]["enrollment"] == "enrolled"
    assert rows["cam-08"]["group"] == "line-1" and rows["cam-08"]["allowed_models"] is None


@pytest.mark.parametrize(("args", "says"), [
    (("enroll", "toco-fleet-plant1", "--group", "g"), "reserved for the fleet server"),
    (("enroll", "toco-server", "--group", "g"), "reserved for the fleet server"),
    (("enroll", "a/b", "--group", "g"), "not usable in MQTT topics"),
    (("enroll", "cam-1", "--group", "g/#"), "not usable in MQTT topics"),
    (("enroll", "cam-1", "--group", "g", "--passwd", "/tmp/x-passwd"), "--out"),
])
def test_enroll_refuses_with_one_line(fleet_cli, args, says):
    r = fleet_cli(*args)
    assert r.exit_code == 2 and r.output.startswith("error:") and says in r.output, r.output
    assert r.output.count("\n") == 1


def test_a_device_revoked_during_a_deployment_is_sent_nothing(fleet, devices):
    canary, *rest = [devices(f"sec-w{i}", group="sec-waves", responder=None if i == 0 else succeed) for i in range(3)]
    assert wait_until(lambda: all(device_json(fleet, d.id).get("online") for d in (canary, *rest)))
    dep = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                   "target": {"group": "sec-waves"}, "canary_share": 0.3}).json()
    assert [d["device_id"] for d in dep["devices"] if d["wave"] == "canary"] == ["sec-w0"]
    revoke(fleet.server.db, "sec-w2")
    assert wait_until(lambda: len(canary.commands) == 1)
    succeed(canary, canary.commands[0])  # the canary succeeds: the rest wave goes out
    url = f"/api/deployments/{dep['deployment_id']}"
    assert wait_until(lambda: {d["device_id"]: d for d in fleet.api.get(url).json()["devices"]}["sec-w2"]["outcome"]
                      == "failed")
    assert wait_until(lambda: len(rest[0].commands) == 1)
    w2 = {d["device_id"]: d for d in fleet.api.get(url).json()["devices"]}["sec-w2"]
    assert w2["reason"] == "revoked: not sent" and rest[1].commands == []


def test_a_device_gets_only_the_models_it_is_allowed(fleet, devices):
    allowed, other = devices("sec-allowed", group="sec-models"), devices("sec-other-model", group="sec-models")
    enroll(fleet.server.db, "sec-other-model", "sec-models", allowed_models=["m-something-else"])
    enroll(fleet.server.db, "sec-allowed", "sec-models", allowed_models=[fleet.analysis["model_id"]])
    assert wait_until(lambda: all(device_json(fleet, d.id).get("online") for d in (allowed, other)))
    dep = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                   "target": {"group": "sec-models"}, "canary_share": 1.0}).json()
    assert [d["device_id"] for d in dep["devices"]] == ["sec-allowed"]
    named = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                     "target": {"device": "sec-other-model"}})
    assert named.status_code == 409 and "not allowed model" in named.text
