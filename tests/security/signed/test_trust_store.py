"""The agent's trust.json (agent.trust_store) and command guard without a broker: seeding and
re-provisioning, persistence, the downgrade rule (unsequenced manifests count as 0), refusal order."""

from __future__ import annotations

import hashlib

import pytest

from agent.command_guard import CommandGuard
from agent.trust_store import TrustStore
from toco_core.errors import ConfigError, SignatureError
from toco_core.messages import BundleManifest, TrustedKey, UploadSamplesCommand


def key(i: int) -> TrustedKey:
    raw = bytes([i]) * 32
    return TrustedKey(fingerprint=hashlib.sha256(raw).hexdigest()[:16], public_key=raw.hex())


def manifest(i: int, model_id: str | None = None, sequence: int | None = None) -> BundleManifest:
    return BundleManifest(bundle_id=f"{i:064x}", size=1, chunk_size=64 * 1024, chunks=["0" * 64], files=[],
                          created_at=0.0, model_id=model_id, sequence=sequence)


def test_key_set_is_seeded_kept_across_restarts_and_reset_by_a_new_provisioned_key(tmp_path):
    store = TrustStore(tmp_path, key(1))
    store.replace_keys([key(1), key(2)])
    store.accept_command(42)
    again = TrustStore(tmp_path, key(1))  # a restart: the config still names the seed
    assert again.fingerprints() == [key(1).fingerprint, key(2).fingerprint]
    assert again.state.highest_command == 42
    reprovisioned = TrustStore(tmp_path, key(3))  # provisioned again: that key alone, the counters stay
    assert reprovisioned.fingerprints() == [key(3).fingerprint] and reprovisioned.state.highest_command == 42
    (tmp_path / "trust.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        TrustStore(tmp_path, key(3))


def test_older_bundles_are_refused_unless_a_rollback_allowed_them(tmp_path):
    store = TrustStore(tmp_path, key(1))
    assert store.admit_manifest(manifest(1)) is None  # nothing sequenced yet: an old server's bundle is fine
    assert store.admit_manifest(manifest(2, "m-a", 5)) is None
    assert store.admit_manifest(manifest(3, "m-b", 1)) is None  # another model has its own counter
    assert "below the 5" in store.admit_manifest(manifest(4, "m-a", 4))
    assert store.admit_manifest(manifest(5, "m-a", 5)) is None  # equal is not older
    assert "sequence 0" in store.admit_manifest(manifest(6))  # unsequenced, once sequenced ones were taken
    assert store.stored_downgrade(f"{1:064x}") is not None  # stored before: counts as 0 too
    store.allow_rollback(f"{4:064x}")
    assert TrustStore(tmp_path, key(1)).admit_manifest(manifest(4, "m-a", 4)) is None  # persisted
    assert store.stored_downgrade(f"{2:064x}") is None


def test_guard_checks_in_order_and_never_verifies_a_command_that_fails_a_cheap_check(tmp_path):
    store = TrustStore(tmp_path, key(1))
    verified: list = []

    def verify(cmd):
        verified.append(cmd.cmd_id)
        if cmd.signature != "good":
            raise SignatureError("bad")

    guard = CommandGuard("box", store, verify, clock=lambda: 1_000.0)
    envelope = dict(device_id="box", expires_at=2_000.0, sequence=10, signer=key(1).fingerprint, signature="good")
    make = lambda cmd_id, **kw: UploadSamplesCommand(cmd_id=cmd_id, **{**envelope, **kw})  # noqa: E731
    assert guard.admit(make("ok")) and store.state.highest_command == 10
    for cmd, reason in [(make("u", signature=None), "unsigned"), (make("f", device_id="other"), "foreign_device"),
                        (make("e", expires_at=999.0), "expired"), (make("r"), "replay"),
                        (make("k", sequence=11, signer=key(2).fingerprint), "untrusted_key"),
                        (make("b", sequence=12, signature="forged"), "bad_signature")]:
        assert not guard.admit(cmd)
        assert store.state.refused.get(reason) == 1, reason
    assert verified == ["ok", "b"]  # a child is spent only on commands that passed every cheap check
    assert store.state.highest_command == 10  # refusals never move the high-water mark
