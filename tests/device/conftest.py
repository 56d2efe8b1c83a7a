"""One real probe of this box, shared by the device tests."""

from __future__ import annotations

import pytest

from toco_core.device import DeviceProfile
from toco_core.probe import probe_device


@pytest.fixture(scope="session")
def probed(tmp_path_factory) -> DeviceProfile:
    return probe_device(tmp_path_factory.mktemp("store"), benchmark=True)
