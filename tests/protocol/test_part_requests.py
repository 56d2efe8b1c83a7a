"""PartRequest / Part frames and the publisher's answers, without a broker: only what was asked, to the asker."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fleet_server.bundle_publisher import BundlePublisher
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle
from toco_core.messages import (
    MessageError,
    MessageKind,
    Part,
    PartRange,
    PartRequest,
    encode,
    encode_part,
    parse_message,
)
from toco_core.topics import Topics
from toco_core.transfer import download_size

T = Topics("plant1")
PARTS = {"head": b"h" * 1000, "codes/top": b"t" * 300_000, "calib/heldout": b"c" * 50, "base": b"b" * 4000}


@pytest.fixture
def served():
    data = pack_bundle(PARTS)
    manifest = make_manifest(data, private_key=generate_private_key())
    out: list = []
    pub = BundlePublisher(T, lambda topic, payload, qos, retain: out.append((topic, payload)))
    pub.announce(manifest, data)
    out.clear()
    return pub, manifest, out


def ask(pub, manifest, device, ranges) -> int:
    req = PartRequest(device_id=device, bundle_id=manifest.bundle_id, ranges=ranges)
    return pub.handle_get(T.get(manifest.bundle_id, device), encode(req))


def test_ranges_go_to_the_asker_alone_and_carry_exactly_the_bytes_asked(served) -> None:
    pub, manifest, out = served
    n = ask(pub, manifest, "cam-1", [PartRange(part="codes/top", offset=262144, length=300_000 - 262144),
                                     PartRange(part="head", offset=0, length=1000)])
    assert n == 2 and {t for t, _ in out} == {T.part(manifest.bundle_id, "cam-1")}
    frames = [parse_message(MessageKind.PART, p) for _, p in out]
    assert [(f.part, f.offset, len(f.data)) for f in frames] == [("codes/top", 262144, 37856), ("head", 0, 1000)]
    assert frames[1].data == PARTS["head"]
    assert pub.part_bytes[(manifest.bundle_id, "cam-1", "codes/top")] == 37856


def test_unknown_parts_ranges_outside_and_malformed_requests_are_dropped(served) -> None:
    pub, manifest, out = served
    assert ask(pub, manifest, "cam-1", [PartRange(part="codes/9", offset=0, length=10),
                                        PartRange(part="head", offset=900, length=101)]) == 0
    assert pub.stats["bad_range"] == 2
    topic = T.get(manifest.bundle_id, "cam-1")
    for bad in (b"{", b'{"device_id":"cam-1","bundle_id":"' + manifest.bundle_id.encode() + b'","ranges":[]}',
                json.dumps({"device_id": "cam-1", "bundle_id": manifest.bundle_id,
                            "ranges": [{"part": "../etc", "offset": 0, "length": 1}]}).encode()):
        assert pub.handle_get(topic, bad) == 0
    req = PartRequest(device_id="cam-2", bundle_id=manifest.bundle_id,
                      ranges=[PartRange(part="head", offset=0, length=1)])
    assert pub.handle_get(topic, encode(req)) == 0  # payload names another device than its topic
    assert pub.stats["dropped"] == 4 and not out


def test_part_frames_and_ranges_are_validated() -> None:
    bid = "a" * 64
    frame = encode_part(bid, "codes/3", 65536, b"xyz")
    # the wire format is compact JSON, whatever makes it (the header prefix is cached per bundle and part)
    for name, offset in (("codes/3", 65536), ("head", 0), ("calib/heldout", 7)):
        header = json.dumps({"schema_version": 1, "bundle_id": bid, "part": name, "offset": offset},
                            separators=(",", ":"))
        assert encode_part(bid, name, offset, b"\x00\n") == header.encode() + b"\n\x00\n"
    part = parse_message(MessageKind.PART, frame)
    assert isinstance(part, Part) and (part.part, part.offset, part.data) == ("codes/3", 65536, b"xyz")
    with pytest.raises(MessageError, match="part payload has no JSON header"):
        parse_message(MessageKind.PART, b"no header")
    with pytest.raises(MessageError, match="exceeds"):
        parse_message(MessageKind.PART, encode_part(bid, "head", 0, b"x" * (256 * 1024 + 1)))
    with pytest.raises(ValidationError):
        PartRange(part="head", offset=0, length=256 * 1024 + 1)
    assert T.parse(T.part(bid, "cam-1")).kind is MessageKind.PART


def test_a_parts_bundle_is_admitted_for_what_a_box_may_fetch_not_the_whole_container(served) -> None:
    _, manifest, _ = served
    assert download_size(manifest) == sum(len(v) for k, v in PARTS.items() if k != "base") < manifest.size
