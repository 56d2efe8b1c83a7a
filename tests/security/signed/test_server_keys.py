"""The server's side of signed commands, without a broker: the command signer, the keyring and
``toco-fleet keys``, the trust-keys pushes of a rotation, and the per-model bundle sequence."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from fleet_server.bundle_sequence import next_bundle_sequence
from fleet_server.cli import app
from fleet_server.command_signer import CommandSigner
from fleet_server.db import AnalysisRow, BundleRow, Database, DeviceRow, ModelRow
from fleet_server.key_distribution import KeyDistributor
from fleet_server.keys import ensure_signing_key, load_keyring
from toco_core.bundle import make_manifest, pack_bundle, verify_manifest
from toco_core.command_signing import public_keys, verify_command
from toco_core.errors import SignatureError
from toco_core.messages import DeployCommand, RollbackCommand, TrustKeysCommand

BID = "ab" * 32


@pytest.fixture
def key_path(tmp_path):
    path = tmp_path / "keys" / "server.pem"
    ensure_signing_key(path)
    return path


def test_every_command_is_addressed_sequenced_expiring_and_verifies(key_path):
    clock = [1_000.0]
    signer = CommandSigner(key_path, ttl_s=60, clock=lambda: clock[0])
    keys = public_keys(signer.ring.trusted_keys(clock[0]))
    a = signer.sign("box-1", DeployCommand(cmd_id="c1", deployment_id="d1", bundle_id=BID))
    b = signer.sign("box-2", RollbackCommand(cmd_id="c2", deployment_id="d1"))
    assert (a.device_id, a.deployment_id, a.expires_at) == ("box-1", "d1", 1_060.0)
    assert b.sequence > a.sequence >= 1_000 * 10**6  # the clock rule, and above the last one when the clock stalls
    assert verify_command(a, keys) == verify_command(b, keys) == signer.ring.active
    with pytest.raises(SignatureError, match="bad signature"):
        verify_command(a.model_copy(update={"device_id": "box-2"}), keys)  # re-addressing breaks the signature
    with pytest.raises(SignatureError, match="unsigned"):
        verify_command(DeployCommand(cmd_id="c3", deployment_id="d1", bundle_id=BID), keys)


def test_rotation_pushes_the_key_set_signed_by_the_old_key_then_retirement_drops_it(tmp_path, key_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    with db.session(write=True) as s:
        s.add_all([DeviceRow(id="box-1", online=True, birth=1), DeviceRow(id="box-2", online=False, birth=1)])
    clock = [time.time()]
    signer = CommandSigner(key_path, ttl_s=60, clock=lambda: clock[0])
    sent: list = []
    reloaded: list = []
    dist = KeyDistributor(db, signer, signer.sender(lambda dev, cmd: sent.append((dev, cmd))),
                          on_reload=reloaded.append, clock=lambda: clock[0])
    assert dist.tick() == 0 and not sent  # never rotated: nothing to tell
    old = signer.ring.active
    runner = CliRunner()
    out = runner.invoke(app, ["keys", "rotate", "--overlap", "1h", "--data-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert dist.tick() == 1 and reloaded == [signer.active_key]
    (dev, push), = sent
    new = signer.ring.active
    assert dev == "box-1" and isinstance(push, TrustKeysCommand) and push.signer == old != new
    assert [k.fingerprint for k in push.keys] == [old, new]
    assert dist.tick() == 0  # told once per key set and birth
    with db.session(write=True) as s:
        s.get(DeviceRow, "box-2").online = True
        s.get(DeviceRow, "box-1").birth = 2  # reconnected: it may have missed the push
    assert dist.tick() == 2
    # after the overlap the old key is retired: the set shrinks, signed by the new key
    clock[0] += 3601
    sent.clear()
    assert dist.tick() == 2
    assert all(c.signer == new and [k.fingerprint for k in c.keys] == [new] for _, c in sent)
    listing = runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)])
    assert listing.exit_code == 0 and "active" in listing.output
    refused = runner.invoke(app, ["keys", "retire", new, "--data-dir", str(tmp_path)])
    assert refused.exit_code != 0 and "active signing key" in refused.output
    db.close()


def test_bundle_sequence_grows_per_model_and_is_signed(tmp_path, key_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    with db.session(write=True) as s:
        for m in ("m-a", "m-b"):
            s.add(ModelRow(id=m, name=m, sha256="0" * 64, weights=1, size_bytes=1, pool_size=1,
                           path="x", pool_path="y"))
            s.add(AnalysisRow(id=f"a-{m}", model_id=m, settings={}))
    assert next_bundle_sequence(db, "m-a") == 1
    key = ensure_signing_key(key_path)
    for i, (model, seq) in enumerate([("m-a", None), ("m-a", 4), ("m-b", 9)]):
        manifest = make_manifest(pack_bundle({"model.onnx": bytes([i]) * 10}), 64 * 1024, key, model_id=model,
                                 sequence=seq)
        with db.session(write=True) as s:
            s.add(BundleRow(id=manifest.bundle_id, analysis_id=f"a-{model}", model_id=model, path="p", size=1,
                            manifest=manifest.model_dump(mode="json")))
    assert (next_bundle_sequence(db, "m-a"), next_bundle_sequence(db, "m-b")) == (5, 10)
    # the sequence is under the signature; a manifest without one (an older server's) still verifies
    signed = make_manifest(pack_bundle({"model.onnx": b"x"}), 64 * 1024, key, model_id="m-a", sequence=5)
    verify_manifest(signed, key.public_key())
    with pytest.raises(Exception, match="bad signature"):
        verify_manifest(signed.model_copy(update={"sequence": 6}), key.public_key())
    verify_manifest(make_manifest(pack_bundle({"model.onnx": b"x"}), 64 * 1024, key), key.public_key())
    assert load_keyring(key_path).active == signed.signer
    db.close()
