"""A replica restarted while the leader drains its previous MQTT session waits for the drain (one line saying so)
and then starts normally; after ``identity_wait_s`` it gives up with one clear line and a non-zero exit. A second
live process under the same MQTT identity (no drain) still refuses at once. Real serve processes on mosquitto
(passwords, ACL, client id = username) and PostgreSQL, as in test_session_drain.py."""

from __future__ import annotations

import signal
import time

from tests.fleet.test_replicas import Replica, replica_args
from tests.fleet.test_replicas import broker as broker  # noqa: F401 - the module's fixture, used below
from tests.support.waiting import wait_until

DRAINING = "draining the MQTT session of a dead replica"


def env_for(tmp_path, wait_s: float) -> dict[str, str]:
    # a drain that stays open 10 s after its last message: long enough to restart the replica inside it
    return {"TOCO_FLEET_SESSION_DRAIN_GRACE_S": "1", "TOCO_FLEET_SESSION_DRAIN_QUIET_S": "10",
            "TOCO_FLEET_MQTT_PEER_PASSWORD_DIR": str(tmp_path), "TOCO_FLEET_IDENTITY_WAIT_S": str(wait_s)}


def kill_and_wait_for_drain(victim: Replica, leader: Replica, drains_before: int) -> None:
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    assert wait_until(lambda: leader.output().count(DRAINING) > drains_before, 30, 0.1), leader.output()


def test_a_replica_restarted_during_the_drain_of_its_session_waits_then_starts(broker, pg_url, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    env = env_for(tmp_path, 60)
    first = Replica(tmp_path, "r1", *replica_args(broker, data, pg_url, "toco-server", "r1"), env=env)
    replicas = [first]
    try:
        assert wait_until(lambda: first.health().get("broker") == "connected", 30, 0.2), first.output()
        second = Replica(tmp_path, "r2", *replica_args(broker, data, pg_url, "toco-server-2", "r2"), env=env)
        replicas.append(second)
        assert wait_until(lambda: second.health().get("broker") == "connected", 30, 0.2), second.output()

        kill_and_wait_for_drain(first, second, 0)
        again = Replica(tmp_path, "r1-again", *replica_args(broker, data, pg_url, "toco-server", "r1"), env=env)
        replicas.append(again)
        line = "replica r1: its previous session is being drained by replica r2; waiting up to 60 s"
        assert wait_until(lambda: line in again.output(), 30, 0.1), again.output()
        assert again.proc.poll() is None, "it waits instead of refusing"
        # it serves (its HTTP API answers) only once the drain ended and gave the identity back
        assert wait_until(lambda: again.health().get("broker") == "connected", 60, 0.2), again.output()
        drained = second.health()["replica"]["drained_sessions"]
        assert [d["replica"] for d in drained] == ["r1"], drained
        assert again.output().count(line) == 1, "one line, not one per retry"
        assert "another replica already connects" not in again.output()

        # a second live process under the same MQTT identity is no drain: it refuses at once
        twin = Replica(tmp_path, "r1-twin", *replica_args(broker, data, pg_url, "toco-server", "r1-twin"), env=env)
        replicas.append(twin)
        t0 = time.monotonic()
        assert twin.proc.wait(30) == 2, twin.output()
        assert "another replica already connects to the broker as 'toco-server'" in twin.output(), twin.output()
        assert "waiting up to" not in twin.output()
        refused_in = time.monotonic() - t0
        assert again.health().get("broker") == "connected", "the live replica is untouched"

        # a drain that outlasts identity_wait_s: the restart gives up with one line and a non-zero exit
        kill_and_wait_for_drain(again, second, 1)
        late = Replica(tmp_path, "r1-late", *replica_args(broker, data, pg_url, "toco-server", "r1"),
                       env=env_for(tmp_path, 1))
        replicas.append(late)
        assert late.proc.wait(30) == 2, late.output()
        out = late.output()
        assert "waiting up to 1 s" in out, out
        assert "error: replica r1: its previous session was still being drained by replica r2 after 1 s" in out, out
        assert "Traceback" not in out and "Traceback" not in twin.output()
        print(f"duplicate refused {refused_in:.1f} s after start")
    finally:
        for r in replicas:
            r.stop()
