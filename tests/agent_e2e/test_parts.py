"""Parts bundles end to end: one real agent, a real mosquitto, the demo CNN's signed parts bundle.

In file order, sharing the agent: a first deployment whose download is tampered with once and
interrupted by a kill -9 (resumed, nothing verified fetched twice), a recompress to a roomier
plan that fetches only the parts it adds, and a bundle whose head is always tampered with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent_e2e.conftest import CHUNK, FLEET, AgentProcess, wait_for
from tests.support.broker import Listener
from toco_core.bundle import make_manifest, pack_bundle
from toco_core.messages import RecompressCommand
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import load_model, model_hash
from toco_core.parts_bundle import pack_parts
from toco_core.preprocessing import Preprocessing
from toco_core.topics import Topics

DEVICE, OTHER = "parts-1", "parts-2"
FIRST = ("head", "calib/heldout")  # what a box plans with
T = Topics(FLEET)
state: dict = {}


def make_bundle(lenet5_path, analysis, key, reason: str):
    info = BundleInfo(model_name="lenet5", model_sha256=model_hash(Path(lenet5_path).read_bytes()), reason=reason,
                      preprocessing=Preprocessing(size=(28, 28), color="grayscale"))
    data = pack_bundle(pack_parts(load_model(lenet5_path), analysis, info, include_base=True))
    return make_manifest(data, CHUNK, private_key=key), data


class PartFaults:
    """Per-bundle part faults: fn(part, offset, payload) -> payload or None (drop)."""

    def __init__(self) -> None:
        self.by_bundle: dict = {}

    def __call__(self, bundle_id: str, part: str, offset: int, payload: bytes) -> bytes | None:
        fn = self.by_bundle.get(bundle_id)
        return payload if fn is None else fn(part, offset, payload)


def tamper(payload: bytes) -> bytes:
    raw = bytearray(payload)
    raw[-1] ^= 0x55  # the last data byte: the frame still parses, the part's hash does not match
    return bytes(raw)


@pytest.fixture(scope="module")
def faults(fleet):
    f = PartFaults()
    fleet.publisher.part_fault = f
    return f


@pytest.fixture(scope="module")
def agent(fleet, keys, tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("parts1"), DEVICE, fleet.broker.url, keys[1], storage_cap="13KB",
                     bundle_disk_cap="24MB")
    a.start()
    yield a
    code = a.stop()
    assert code == 0, (code, a.log_text())


def sizes(manifest) -> dict[str, int]:
    return {f.name: f.size for f in manifest.files}


def held(agent, bundle_id: str) -> set[str]:
    folder = agent.state_dir / "parts" / bundle_id
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
            and p.name not in ("manifest.json", "received.json") and not p.name.endswith((".partial", ".ranges.json"))}


def sent(fleet, bundle_id: str, device: str = DEVICE) -> dict[str, int]:
    return {part: n for (b, d, part), n in fleet.publisher.part_bytes.items() if b == bundle_id and d == device}


def test_first_deploy_refuses_a_tampered_part_resumes_after_kill9_and_fetches_only_its_plan(
        agent, fleet, faults, keys, lenet5_path, lenet5_analysis):
    manifest, data = make_bundle(lenet5_path, lenet5_analysis, keys[0], "parts-initial")
    bid = manifest.bundle_id
    other = Listener(fleet.broker.port, [T.part(bid, OTHER), T.chunk(bid)])  # another box of the fleet
    tampered: list[int] = []
    stalled = {"on": True}

    def fault(part: str, offset: int, payload: bytes) -> bytes | None:
        if part == "head" and not tampered:
            tampered.append(offset)
            return tamper(payload)
        if stalled["on"] and part not in FIRST:
            return None  # the plan's parts do not arrive: the download hangs there
        return payload

    faults.by_bundle[bid] = fault
    fleet.announce(manifest, data)
    fleet.deploy(DEVICE, bid, "p1")
    assert wait_for(lambda: len(sent(fleet, bid)) == len(FIRST) and fleet.publisher.stats["ranges_sent"] > 0
                    and set(FIRST) <= held(agent, bid), 60), agent.log_text()
    # the job asked for the plan's parts, which are dropped: kill the agent mid-download
    assert wait_for(lambda: any(p.name.endswith(".partial") for p in (agent.state_dir / "parts" / bid).rglob("*")),
                    60), agent.log_text()
    agent.kill9()
    first = sent(fleet, bid)
    stalled["on"] = False
    agent.start()
    active = fleet.wait_phase(DEVICE, "p1", {"active", "failed", "refused", "rolled_back"}, 120)
    assert active.phase.value == "active", (active.reason, active.detail, agent.log_text())
    size = sizes(manifest)
    after = sent(fleet, bid)
    # the tampered part was refused and fetched again; what was verified before the kill never again
    assert after["head"] == 2 * size["head"] and len(tampered) == 1
    assert all(after[p] == first[p] for p in FIRST)
    assert "base" not in after  # the fp32 part is never fetched by default
    have = held(agent, bid)
    # the codes of the prune classes the plan keeps, not of those it zeroes (bands, docs/bundles.md)
    bands = {f.name for f in manifest.files if f.name.startswith("band/")}
    top = max(bands, key=lambda n: int(n.split("/")[1]))  # the class no plan prunes
    assert set(FIRST) <= have and "base" not in have and top in have and bands - have, (active.plan.label, have)
    # received = each held part once (+ the tampered copy), and only what the plan needs
    assert active.download_bytes == sum(size[p] for p in have) + size["head"]
    assert active.download_bytes < manifest.size - size["base"]
    assert active.shadow == _shadow(manifest, have)
    assert active.state_dir_bytes and active.state_dir_bytes > 0
    assert not other.messages, "another box received part replies or chunks it did not ask for"
    other.close()
    # bounded state: no candidate left, nothing over 10 KB but the slots, the parts and the references
    assert not (agent.state_dir / "jobs" / "current").exists()
    big = [p.relative_to(agent.state_dir).as_posix() for p in agent.state_dir.rglob("*")
           if p.is_file() and p.stat().st_size > 10_000]
    assert all(b.split("/")[0] in ("slots", "parts", "references") or b.startswith("outbox.sqlite3") for b in big), big
    state.update(bid=bid, manifest=manifest, have=have, plan=active.plan.label)


def _shadow(manifest, have: set[str]) -> str:
    """The master is the shadow exactly when every code part and prune mask (which place the codes)
    of the bundle is on the box."""
    codes = {f.name for f in manifest.files if f.name.startswith(("band/", "fine/", "prune/"))}
    return "master" if codes <= have else "none"


def test_a_roomier_recompress_fetches_only_the_parts_it_adds(agent, fleet):
    bid, manifest = state["bid"], state["manifest"]
    before, have = sent(fleet, bid), state["have"]
    cmd = RecompressCommand(cmd_id="r-roomy", storage_bytes=200_000)
    fleet.command(DEVICE, cmd)
    active = fleet.wait_phase(DEVICE, "r-roomy", {"active", "failed", "refused", "rolled_back"}, 120)
    assert active.phase.value == "active", (active.reason, active.detail, agent.log_text())
    new = held(agent, bid) - have
    assert new, (state["plan"], active.plan.label)
    after = sent(fleet, bid)
    delta = {p: after.get(p, 0) - before.get(p, 0) for p in after}
    size = sizes(manifest)
    assert sum(delta.values()) == sum(size[p] for p in new), (delta, new)
    assert {p for p, n in delta.items() if n} == new
    assert active.download_bytes == sum(size[p] for p in new)
    assert active.shadow == _shadow(manifest, held(agent, bid))
    state["measured"] = {"first": {p: size[p] for p in sorted(have)}, "roomier": {p: size[p] for p in sorted(new)}}
    print("parts bytes", state["measured"], "first", sum(state["measured"]["first"].values()), "roomier",
          sum(state["measured"]["roomier"].values()))


def test_a_part_tampered_every_time_fails_the_download_and_the_old_model_keeps_serving(
        agent, fleet, faults, keys, lenet5_path, lenet5_analysis):
    manifest, data = make_bundle(lenet5_path, lenet5_analysis, keys[0], "parts-tampered")
    faults.by_bundle[manifest.bundle_id] = lambda part, offset, payload: tamper(payload) if part == "head" else payload
    version = agent.get("/v1/health")[1].get("model_version")
    fleet.announce(manifest, data)
    fleet.deploy(DEVICE, manifest.bundle_id, "p-bad")
    failed = fleet.wait_phase(DEVICE, "p-bad", {"active", "failed", "refused", "rolled_back"}, 60)
    assert failed.phase.value == "failed" and failed.reason.value == "corrupt_chunk", (failed, agent.log_text())
    assert "head" in failed.detail
    # each refused copy was asked for again at once as a refetch, which the server never coalesces
    assert fleet.publisher.stats["ranges_coalesced"] == 0, fleet.publisher.stats
    assert agent.get("/v1/health")[1].get("model_version") == version
    assert not (agent.state_dir / "parts" / manifest.bundle_id / "head").exists()
