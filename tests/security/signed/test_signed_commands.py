"""Signed commands, anti-rollback and key rotation against a real mosquitto and a real agent process.

The agent refuses replayed, expired, foreign-device, unsigned and badly signed commands
(counted in its status, logged with a reason), an older validly signed bundle after a newer one
(unless a signed rollback names it), and, after a key rotation, the retired key.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fleet_server.command_signer import CommandSigner
from fleet_server.keys import retire_key, rotate_key
from tests.agent_e2e.conftest import REPO, AgentProcess, signed, wait_for
from toco_core.bundle import generate_private_key, make_manifest, save_private_key
from toco_core.messages import (
    DeployCommand,
    MessageKind,
    RollbackCommand,
    TrustKeysCommand,
    UploadSamplesCommand,
    encode,
)

DEVICE = "box-sec"
MODEL = "m-lenet5"


@pytest.fixture(scope="module")
def agent(fleet, keys, tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("sec"), DEVICE, fleet.broker.url, keys[1], upload_samples=True)
    a.start()
    yield a
    assert a.stop() == 0, a.log_text()


def refused(agent) -> dict[str, int]:
    return json.loads((agent.state_dir / "status.json").read_text()).get("refused_commands", {})


def answered(fleet, cmd_id: str) -> bool:
    """Whether the agent ran upload-samples command ``cmd_id`` (it answers with a samples message)."""
    return any(m.cmd_id == cmd_id for m in fleet.messages(DEVICE, "samples"))


def publish_raw(fleet, payload: bytes) -> None:
    fleet.listener.publish(fleet.topics.device(MessageKind.CMD, DEVICE), payload)


def test_replayed_expired_foreign_unsigned_and_forged_commands_are_refused_and_counted(agent, fleet, keys):
    ok = signed(keys[0], DEVICE, UploadSamplesCommand(cmd_id="ok-1", max_bytes=4096))
    publish_raw(fleet, encode(ok))
    assert wait_for(lambda: answered(fleet, "ok-1"), 15), agent.log_text()
    before = refused(agent)
    attacks = {
        "replay": encode(ok),  # the very bytes the server sent, again
        "expired": encode(signed(keys[0], DEVICE, UploadSamplesCommand(cmd_id="old-1"), expires_in=-5)),
        "foreign_device": encode(signed(keys[0], "box-other", UploadSamplesCommand(cmd_id="foreign-1"))),
        "unsigned": encode(UploadSamplesCommand(cmd_id="unsigned-1")),
        "untrusted_key": encode(signed(generate_private_key(), DEVICE, UploadSamplesCommand(cmd_id="forged-1"))),
        # signed, then altered on the way: the envelope is intact, the signature is not over these bytes
        "bad_signature": encode(signed(keys[0], DEVICE, UploadSamplesCommand(cmd_id="tamper-1", max_bytes=4096))
                                .model_copy(update={"max_bytes": 8192})),
    }
    for payload in attacks.values():
        publish_raw(fleet, payload)
    expected = {k: before.get(k, 0) + 1 for k in attacks}
    assert wait_for(lambda: all(refused(agent).get(k, 0) >= n for k, n in expected.items()), 30), \
        (refused(agent), agent.log_text())
    for cmd_id in ("old-1", "foreign-1", "unsigned-1", "forged-1", "tamper-1"):
        assert not answered(fleet, cmd_id)
    assert sum(m.cmd_id == "ok-1" for m in fleet.messages(DEVICE, "samples")) == 1
    log = agent.log_text(None)
    for reason in attacks:
        assert f"refused command: {reason}:" in log
    # a later, properly signed command still runs; the counts reach telemetry and `toco-agent status`
    publish_raw(fleet, encode(signed(keys[0], DEVICE, UploadSamplesCommand(cmd_id="ok-2", max_bytes=4096))))
    assert wait_for(lambda: answered(fleet, "ok-2"), 15)
    assert wait_for(lambda: any(t.refused_commands.get("replay") for t in fleet.messages(DEVICE, "telemetry")), 10)
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--config", str(agent.config)], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "refused commands" in out.stdout and "replay" in out.stdout, out


def sequenced(bundles, reason: str, sequence: int):
    """A LeNet-5 bundle whose signed manifest carries model MODEL at ``sequence``."""
    manifest, data = bundles.make(reason)
    return make_manifest(data, manifest.chunk_size, private_key=bundles.key, model_id=MODEL, sequence=sequence), data


def test_older_bundle_after_newer_is_refused_until_a_signed_rollback_names_it(agent, fleet, bundles):
    old, old_data = sequenced(bundles, "seq-1", 1)
    new, new_data = sequenced(bundles, "seq-2", 2)
    for m, d in ((old, old_data), (new, new_data)):
        fleet.announce(m, d)
    fleet.deploy(DEVICE, new.bundle_id, "ar-new")
    assert fleet.wait_phase(DEVICE, "ar-new", {"active", "failed", "refused"}, 90).phase.value == "active"
    fleet.deploy(DEVICE, old.bundle_id, "ar-old")
    down = fleet.wait_phase(DEVICE, "ar-old", {"active", "failed", "refused"}, 30)
    assert (down.phase.value, down.reason.value) == ("refused", "downgrade"), down
    assert agent.get("/v1/ready")[1]["model_version"].startswith(new.bundle_id)
    fleet.command(DEVICE, RollbackCommand(cmd_id="rb-old", deployment_id="ar-rollback", bundle_id=old.bundle_id,
                                          reason="operator rollback"))
    back = fleet.wait_phase(DEVICE, "ar-rollback", {"active", "failed", "refused"}, 90)
    assert back.phase.value == "active", back
    assert agent.get("/v1/ready")[1]["model_version"].startswith(old.bundle_id)


def test_rotation_keeps_the_device_working_and_the_retired_key_is_refused(agent, fleet, keys, bundles, tmp_path):
    key_path = tmp_path / "keys" / "server.pem"
    key_path.parent.mkdir(mode=0o700)
    save_private_key(keys[0], key_path)  # the server's original key: the one the agent was provisioned with
    rotate_key(key_path, overlap_s=3600)
    signer = CommandSigner(key_path, ttl_s=60)
    old_fp, new_fp = signer.ring.keys[0].fingerprint, signer.ring.active
    # the server tells the device: signed by the old key, which the device trusts
    push = signer.sign(DEVICE, TrustKeysCommand(cmd_id="keys-1", keys=signer.ring.trusted_keys(time.time())))
    assert push.signer == old_fp
    publish_raw(fleet, encode(push))
    status = lambda: json.loads((agent.state_dir / "status.json").read_text())  # noqa: E731
    assert wait_for(lambda: set(status()["trusted_keys"]) == {old_fp, new_fp}, 15), agent.log_text()
    # commands and bundles signed with the new key work
    publish_raw(fleet, encode(signer.sign(DEVICE, UploadSamplesCommand(cmd_id="new-key-1", max_bytes=4096))))
    assert wait_for(lambda: answered(fleet, "new-key-1"), 15), agent.log_text()
    manifest, data = bundles.make("rotated", key=signer.active_key)
    manifest = make_manifest(data, manifest.chunk_size, private_key=signer.active_key, model_id=MODEL, sequence=3)
    fleet.announce(manifest, data)
    publish_raw(fleet, encode(signer.sign(DEVICE, DeployCommand(cmd_id="c-rot", deployment_id="rot-1",
                                                                 bundle_id=manifest.bundle_id))))
    assert fleet.wait_phase(DEVICE, "rot-1", {"active", "failed", "refused"}, 90).phase.value == "active"
    # retire the old key: the next key set (signed by the new key) drops it, and the device refuses it
    retire_key(key_path, old_fp)
    assert signer.reload()
    push = signer.sign(DEVICE, TrustKeysCommand(cmd_id="keys-2", keys=signer.ring.trusted_keys(time.time())))
    assert push.signer == new_fp
    publish_raw(fleet, encode(push))
    assert wait_for(lambda: status()["trusted_keys"] == [new_fp], 15), agent.log_text()
    before = refused(agent).get("untrusted_key", 0)
    fleet.command(DEVICE, UploadSamplesCommand(cmd_id="old-key-1", max_bytes=4096), key=keys[0])
    assert wait_for(lambda: refused(agent).get("untrusted_key", 0) == before + 1, 15), agent.log_text()
    assert not answered(fleet, "old-key-1")
    stale, stale_data = sequenced(bundles, "old-key-bundle", 4)  # signed by the retired key
    fleet.announce(stale, stale_data)
    publish_raw(fleet, encode(signer.sign(DEVICE, DeployCommand(cmd_id="c-stale", deployment_id="rot-2",
                                                                 bundle_id=stale.bundle_id))))
    bad = fleet.wait_phase(DEVICE, "rot-2", {"active", "failed", "refused"}, 30)
    assert (bad.phase.value, bad.reason.value) == ("refused", "bad_signature"), bad
