"""The agent's parts store: a part of 0 bytes is complete as soon as it is opened, and verified."""

from __future__ import annotations

import hashlib

from agent.parts_store import PartialPart
from toco_core.messages import FileEntry


def test_an_empty_part_needs_no_range_and_verifies(tmp_path):
    partial = PartialPart(tmp_path / "fine" / "3" / "0", 0, 65536)
    assert partial.bitmap.complete
    assert partial.finish(FileEntry(name="fine/3/0", offset=10, size=0, sha256=hashlib.sha256(b"").hexdigest()))
    assert (tmp_path / "fine" / "3" / "0").read_bytes() == b""


def test_a_part_is_complete_only_when_every_range_is_written(tmp_path):
    data = bytes(range(256)) * 300
    partial = PartialPart(tmp_path / "band" / "7", len(data), 65536)
    assert not partial.bitmap.complete and partial.bitmap.n == 2
    partial.write(0, data[:65536])
    assert not partial.bitmap.complete
    partial.write(1, data[65536:])
    assert partial.bitmap.complete
    entry = FileEntry(name="band/7", offset=0, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert partial.finish(entry) and (tmp_path / "band" / "7").read_bytes() == data
