"""Wire schemas and topics: every kind round-trips, bad payloads are refused with a clear MessageError."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from toco_core.errors import ConfigError
from toco_core.messages import (
    SCHEMA_VERSION,
    ActiveModel,
    BundleManifest,
    Chunk,
    ChunkRequest,
    DeployCommand,
    DisputedRef,
    DriftCheck,
    DriftMessage,
    FailureReason,
    FileEntry,
    HardwareInfo,
    MessageError,
    MessageKind,
    Phase,
    PlanSummary,
    RecompressCommand,
    RollbackCommand,
    Sample,
    SamplesMessage,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    UploadSamplesCommand,
    encode,
    encode_chunk,
    kind_of,
    parse_message,
)
from toco_core.topics import Topics, parse_broker_url

BID = "ab" * 32
DEV = "cam-07"
HARDWARE = HardwareInfo(device_id=DEV, total_memory=256 << 20, available_memory=120 << 20, free_storage=2 << 30,
                        physical_cores=1, logical_cores=1, cpu_model="Cortex-A53", ort_version="1.20.1",
                        formats=["fp32", "qdq_int8"], storage_budget=100_000)
PLAN = PlanSummary(label="prune 60% / fp32", model_name="lenet5", runtime="fp32", prune_scale=0.6, quant_scale=0.0,
                   predicted_disagreement=0.008, predicted_storage_bytes=80_000, base_file_bytes=248_433,
                   storage_bytes=74_000, runnable_bytes=120_000, measured_disagreement=0.01, session_rss=9 << 20,
                   p50_ms=0.4, layer_formats={"fp32": 5}, attempts=1)


def examples() -> list:
    return [
        StateMessage(device_id=DEV, state="online", birth=3, agent_version="0.1.0", hardware=HARDWARE, group="line-1",
                     active=ActiveModel(bundle_id=BID, model_name="lenet5", slot="a", plan=PLAN)),
        StateMessage(device_id=DEV, state="offline", birth=3),
        TelemetryMessage(device_id=DEV, seq=5, mem_available=10**8, disk_free=10**9, cpu_load=0.2,
                         temperature_c=51.5, inferences=1200, latency_ms_p50=1.2, latency_ms_p99=3.4),
        StatusMessage(device_id=DEV, phase=Phase.DOWNLOADING, bundle_id=BID, deployment_id="dep-1", progress=0.4),
        StatusMessage(device_id=DEV, phase=Phase.FAILED, reason=FailureReason.SELF_TEST_FAILED, detail="3% > 1%"),
        StatusMessage(device_id=DEV, phase=Phase.ACTIVE, bundle_id=BID, deployment_id="dep-1", progress=1.0,
                      predicted_agreement=0.992, measured_agreement=0.99, plan=PLAN),
        DriftMessage(device_id=DEV, window_index=7, opened_at=1.0, closed_at=61.0, n_samples=500, n_shadowed=50,
                     n_labeled=0, bundle_id=BID, predicted_agreement=0.99, measured_agreement=0.91,
                     mean_confidence=0.8, mean_entropy=0.4, input_mean=0.13, input_std=0.3, alert=True,
                     consecutive_out_of_band=3, out_of_band=["agreement"],
                     checks=[DriftCheck(name="agreement", value=0.91, reference=0.99, low=0.97, high=1.0, n=50,
                                        in_band=False)],
                     disputed=[DisputedRef(ref="w7-12", reason="disagreement", confidence=0.4, model_class=3,
                                           base_class=5)]),
        SamplesMessage(device_id=DEV, cmd_id="c1", window=7, samples=[
            Sample(ref="w7-12", dtype="float32", shape=[1, 1, 28, 28], data_b64="AAAA")]),
        DeployCommand(cmd_id="c1", deployment_id="dep-1", bundle_id=BID, fidelity_budget=0.01),
        RecompressCommand(cmd_id="c2", memory_bytes=64_000_000),
        RollbackCommand(cmd_id="c3", reason="operator"),
        UploadSamplesCommand(cmd_id="c4", window=7, max_bytes=100_000),
        ChunkRequest(device_id=DEV, bundle_id=BID, chunks=[0, 1, 2]),
        BundleManifest(bundle_id=BID, size=70_000, chunk_size=65536, chunks=["cd" * 32, "ef" * 32], files=[],
                       created_at=1.5, metadata={"model": "lenet5"}, signature="c2ln"),
    ]


@pytest.mark.parametrize("msg", examples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    back = parse_message(kind_of(msg), encode(msg))
    assert back == msg and type(back) is type(msg)
    wire = zlib.decompress(encode(msg)) if isinstance(msg, BundleManifest) else encode(msg)
    assert json.loads(wire)["schema_version"] == SCHEMA_VERSION


def test_a_manifest_travels_deflated_and_plain_json_still_parses() -> None:
    files = [FileEntry(name=f"band/{c}", offset=100 * c, size=100, sha256=f"{c:064x}") for c in range(40)]
    m = examples()[-1].model_copy(update={"files": files})
    plain = m.model_dump_json().encode()
    assert len(encode(m)) < len(plain) / 2
    assert parse_message("manifest", encode(m)) == m == parse_message("manifest", plain)
    with pytest.raises(MessageError, match="cut short"):
        parse_message("manifest", encode(m)[:-20])
    with pytest.raises(MessageError, match="does not inflate"):
        parse_message("manifest", b"\x78\x9c" + b"garbage" * 10)
    bomb = zlib.compress(b'{"a":"' + b"0" * (5 * 1024 * 1024) + b'"}', 9)  # 5 MiB from a few KB
    with pytest.raises(MessageError, match="beyond"):
        parse_message("manifest", bomb)


def test_chunk_is_binary_framed() -> None:
    data = bytes(range(256)) * 4 + b"\n\n"  # newlines inside the data must survive
    payload = encode_chunk(BID, 9, data)
    chunk = parse_message("chunk", payload)
    assert isinstance(chunk, Chunk) and chunk.index == 9 and chunk.data == data
    assert encode(chunk) == payload


def good_status() -> dict:
    return json.loads(encode(StatusMessage(device_id=DEV, phase=Phase.ACTIVE)))


@pytest.mark.parametrize(("change", "needle"), [
    ({"surprise": 1}, "surprise"),                                  # extra="forbid"
    ({"schema_version": SCHEMA_VERSION + 1}, "newer"),
    ({"device_id": "a/b"}, "device_id"),                            # would break the topic scheme
    ({"device_id": "#"}, "device_id"),
    ({"phase": "exploded"}, "phase"),
    ({"phase": "failed"}, "reason"),                                # failing phase without a reason
    ({"reason": "bad_signature"}, "reason"),                        # a reason on a healthy phase
    ({"seq": -1}, "seq"),
    ({"progress": 1.5}, "progress"),
])
def test_status_rejections(change: dict, needle: str) -> None:
    body = good_status() | change
    with pytest.raises(MessageError, match=needle):
        parse_message("status", json.dumps(body).encode())


def test_missing_field_and_bad_json_and_unknown_kind() -> None:
    body = good_status()
    del body["device_id"]
    with pytest.raises(MessageError, match="device_id"):
        parse_message("status", json.dumps(body).encode())
    with pytest.raises(MessageError, match="not valid JSON"):
        parse_message("status", b"{nope")
    with pytest.raises(MessageError, match="not valid JSON"):
        parse_message("telemetry", b"\xff\xfe")
    with pytest.raises(MessageError, match="unknown message kind"):
        parse_message("weather", b"{}")
    with pytest.raises(MessageError, match="exceeds"):
        parse_message("drift", b" " * (5 * 1024 * 1024))


def test_command_union_rejections() -> None:
    ok = json.loads(encode(DeployCommand(cmd_id="c1", deployment_id="d", bundle_id=BID)))
    assert isinstance(parse_message("cmd", json.dumps(ok).encode()), DeployCommand)
    with pytest.raises(MessageError, match="command"):
        parse_message("cmd", json.dumps(ok | {"command": "format-disk"}).encode())
    with pytest.raises(MessageError, match="bundle_id"):
        parse_message("cmd", json.dumps(ok | {"bundle_id": "not-a-hash"}).encode())
    with pytest.raises(MessageError, match="memory_bytes"):
        parse_message("cmd", json.dumps({"command": "recompress", "cmd_id": "x", "memory_bytes": -5}).encode())


def test_manifest_and_request_rejections() -> None:
    m = json.loads(zlib.decompress(encode(examples()[-1])))
    with pytest.raises(MessageError, match="expected 4"):
        parse_message("manifest", json.dumps(m | {"size": 200_000}).encode())
    with pytest.raises(MessageError, match="chunk_size"):
        parse_message("manifest", json.dumps(m | {"chunk_size": 1024}).encode())
    with pytest.raises(MessageError, match="chunks"):
        parse_message("manifest", json.dumps(m | {"chunks": ["XY" * 32, "cd" * 32]}).encode())
    req = {"device_id": DEV, "bundle_id": BID, "chunks": list(range(65))}
    with pytest.raises(MessageError, match="chunks"):
        parse_message("get", json.dumps(req).encode())


@pytest.mark.parametrize("payload", [b"no header", b"[1,2]\nxx", b"{bad\nxx", b'{"index":1}\nxx',
                                     b'{"bundle_id":"' + BID.encode() + b'","index":-1}\nxx',
                                     b'{"bundle_id":"' + BID.encode() + b'","index":1,"data":"x"}\nxx'])
def test_chunk_rejections(payload: bytes) -> None:
    with pytest.raises(MessageError):
        parse_message("chunk", payload)


def test_topics_build_and_parse() -> None:
    t = Topics("plant1")
    assert t.device("drift", DEV) == "toco/v1/plant1/devices/cam-07/drift"
    assert t.parse(t.device(MessageKind.STATE, DEV)) == (MessageKind.STATE, DEV, None, None)
    assert t.parse(t.manifest(BID)) == (MessageKind.MANIFEST, None, BID, None)
    assert t.parse(t.get(BID, DEV)) == (MessageKind.GET, DEV, BID, None)
    assert t.parse(t.chunk(BID, 12)) == (MessageKind.CHUNK, None, BID, 12)
    for bad in ["toco/v1/other/devices/x/state", "toco/v1/plant1/devices/x/shell", "toco/v1/plant1/bundles/zz/manifest",
                "toco/v1/plant1/bundles/" + BID + "/chunk/-1", "toco/v1/plant1/devices/x/state/extra"]:
        with pytest.raises(MessageError):
            t.parse(bad)
    with pytest.raises(ConfigError):
        Topics("a/b")
    acl = t.acl_lines()
    assert "pattern write toco/v1/plant1/devices/%u/drift" in acl
    assert "pattern read toco/v1/plant1/devices/%u/cmd" in acl
    assert "pattern write toco/v1/plant1/bundles/+/get/%u" in acl


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://127.0.0.1") == ("127.0.0.1", 1883, False, None, None)
    assert parse_broker_url("mqtts://u:p%40ss@broker:9000") == ("broker", 9000, True, "u", "p@ss")
    for bad in ["http://x", "mqtt://", "mqtt://h:99999", "mqtt://h/path"]:
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_protocol_modules_import_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
            "import toco_core.messages, toco_core.topics, toco_core.bundle, toco_core.transfer\n"
            "import agent.mqtt_link, agent.bundle_download, fleet_server.bundle_publisher\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_drift_message_carries_the_drift_monitors_report() -> None:
    from toco_core.drift import DriftReport  # the agent's drift monitor output, sent as-is

    report = DriftReport(opened_at=0.0, closed_at=60.0, n_samples=300, n_shadowed=30, n_labeled=0,
                         predicted_agreement=0.99, measured_agreement=0.9, accuracy=None, mean_confidence=0.7,
                         mean_entropy=0.5, input_mean=0.1, input_std=0.3, checks=[], out_of_band=["agreement"])
    msg = DriftMessage.from_report(report, device_id=DEV, bundle_id=BID)
    assert parse_message("drift", encode(msg)) == msg
    assert msg.model_dump(exclude={"schema_version", "device_id", "seq", "sent_at", "bundle_id"}) == \
        report.model_dump(exclude={"schema_version"})


def test_drift_message_takes_its_fields_from_the_report() -> None:
    """Not a mirror: every report field is a message field, with the same bounds."""
    from toco_core.drift import DriftReport

    own = {"device_id", "seq", "sent_at", "bundle_id"}
    assert set(DriftMessage.model_fields) - own == set(DriftReport.model_fields)
    body = json.loads(encode(next(m for m in examples() if isinstance(m, DriftMessage))))
    for change, needle in [({"n_samples": -1}, "n_samples"), ({"measured_agreement": 1.2}, "measured_agreement"),
                           ({"checks": [body["checks"][0] | {"n": -1}]}, "checks"),
                           ({"disputed": [body["disputed"][0] | {"ref": ""}]}, "disputed")]:
        with pytest.raises(MessageError, match=needle):
            parse_message("drift", json.dumps(body | change).encode())


# ---------------------------------------------------------------- typed plan and hardware

def state_body(**change) -> dict:
    return json.loads(encode(examples()[0])) | change


def test_plan_summary_refuses_unknown_and_out_of_range_figures() -> None:
    plan = PLAN.model_dump(mode="json")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"size": 74_000}, "size"), ({"measured_agreement": 0.99}, "measured_agreement"),
        ({"storage_bytes": -1}, "storage_bytes"), ({"predicted_disagreement": 2}, "disagreement"),
        ({"label": ""}, "label"), ({"runtime": "fp16"}, "runtime")]
    for change, needle in cases:
        body = state_body(active={"bundle_id": BID, "plan": plan | change})
        with pytest.raises(MessageError, match=needle):
            parse_message("state", json.dumps(body).encode())


def test_an_older_agents_loose_plan_and_hardware_are_accepted() -> None:
    """An agent from before the typed fields: group inside hardware, the plan's old spellings."""
    old_plan = {"label": "prune 60% / fp32", "model_name": "lenet5", "storage_bytes": 74_000, "file_bytes": 120_000,
                "base_file_bytes": 248_433, "predicted_disagreement": 0.008, "measured_disagreement": 0.01,
                "p50_ms": 0.4, "session_rss": 9 << 20, "attempts": 1, "seconds": 2.5, "peak_rss_child": 80 << 20}
    old_hardware = HARDWARE.model_dump(mode="json") | {"group": "line-1"}
    body = state_body(hardware=old_hardware, active={"bundle_id": BID, "plan": old_plan})
    del body["group"]
    msg = parse_message("state", json.dumps(body).encode())
    assert msg.group == "line-1" and msg.hardware == HARDWARE
    assert msg.active is not None and msg.active.plan is not None
    assert (msg.active.plan.runnable_bytes, msg.active.plan.recompress_seconds,
            msg.active.plan.recompress_peak_rss) == (120_000, 2.5, 80 << 20)
    status = json.loads(encode(examples()[5])) | {"plan": {"label": "sim", "predicted_storage": 60_000}}
    status_plan = parse_message("status", json.dumps(status).encode()).plan
    assert status_plan is not None and status_plan.predicted_storage_bytes == 60_000
    # the birth's own group field wins over one an old-style hardware dict also carries
    both = state_body(hardware=old_hardware | {"group": "elsewhere"})
    assert parse_message("state", json.dumps(both).encode()).group == "line-1"


def test_an_old_and_a_new_spelling_of_one_figure_together_are_refused() -> None:
    body = state_body(active={"bundle_id": BID, "plan": {"label": "x", "file_bytes": 1, "runnable_bytes": 2}})
    with pytest.raises(MessageError, match="file_bytes"):
        parse_message("state", json.dumps(body).encode())


def test_hardware_is_the_probes_profile() -> None:
    from toco_core.device import DeviceProfile

    cases: list[tuple[dict[str, Any], str]] = [({"cores": 1}, "cores"), ({"total_memory": 0}, "total_memory"),
                                                ({"formats": ["tpu"]}, "formats")]
    for change, needle in cases:
        with pytest.raises(MessageError, match=needle):
            parse_message("state", json.dumps(state_body(hardware=HARDWARE.model_dump(mode="json") | change)).encode())
    profile = HARDWARE.to_profile()
    assert type(profile) is DeviceProfile and HardwareInfo.from_profile(profile) == HARDWARE
    with pytest.raises(MessageError, match="group"):
        parse_message("state", json.dumps(state_body(group="a/b")).encode())


def test_plan_summary_from_a_compression_report() -> None:
    from toco_core.plan import CompressionPlan, CompressionReport, LayerDecision, SelfTestResult

    plan = CompressionPlan(prune_scale=0.5, quant_scale=0.2, runtime="int8", predicted_disagreement=0.009,
                           predicted_storage=40_000, predicted_memory=3 << 20, sparsity=0.5, entropy_bits=3.1)

    def layer(name: str, fmt: str) -> LayerDecision:
        return LayerDecision(name=name, op_type="Conv", weights=100, sparsity=0.5, mean_bits=8, channels_kept=4,
                             channels=8, runtime_format=fmt)

    report = CompressionReport(model_sha256="0" * 64, plan=plan,
                               layers=[layer("c1", "qdq_int8"), layer("c2", "qdq_int8"), layer("fc", "fp32")],
                               base_file_bytes=248_433, file_bytes=130_000, storage_bytes=41_800,
                               base_session_rss=12 << 20, session_rss=9 << 20, base_p50_s=0.001, p50_s=0.0004,
                               self_test=SelfTestResult(passed=True, samples=200, predicted=0.009, measured=0.011,
                                                        margin=0.01, kl=0.02),
                               attempts=2, seconds=3.21789)
    s = PlanSummary.from_report(report, model_name="lenet5", recompress_peak_rss=90 << 20)
    assert (s.label, s.runtime, s.model_name) == (plan.label, "int8", "lenet5")
    # predictions and measurements under their own names, never one for the other
    assert (s.predicted_storage_bytes, s.storage_bytes, s.runnable_bytes, s.base_file_bytes) == \
        (40_000, 41_800, 130_000, 248_433)
    assert (s.predicted_disagreement, s.measured_disagreement) == (0.009, 0.011)
    assert (s.session_rss, s.base_session_rss, s.predicted_memory_bytes) == (9 << 20, 12 << 20, 3 << 20)
    assert s.p50_ms == pytest.approx(0.4) and s.base_p50_ms == pytest.approx(1.0)
    assert s.layer_formats == {"qdq_int8": 2, "fp32": 1}
    assert (s.attempts, s.recompress_seconds, s.recompress_peak_rss) == (2, 3.218, 90 << 20)
    predicted = PlanSummary.from_plan(plan, base_file_bytes=248_433)
    assert predicted.storage_bytes is None and predicted.measured_disagreement is None
    assert predicted.predicted_storage_bytes == s.predicted_storage_bytes
