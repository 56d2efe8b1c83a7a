"""Shared parts of the security suite: a fleet server on the embedded broker with one finished
analysis (a real signed bundle, stored directly: no minute-long analysis), and enrolled or
unknown simulated devices (the fleet tests' SimDevice)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fleet_server.db import AnalysisRow, BundleRow, ModelRow, new_id
from tests.deploy.conftest import deploy_broker  # noqa: F401  (fixture: the shipped mosquitto config, real mosquitto)
from tests.fleet.conftest import Fleet, SimDevice, devices  # noqa: F401  (devices: a pytest fixture, on this fleet)
from toco_core.bundle import make_manifest, pack_bundle


def stored_analysis(fleet: Fleet) -> dict:
    """A finished analysis with a bundle signed by the server's key, written straight into the registry.

    Deployments only need the rows and the bundle file; what is inside the bundle does not matter to
    SimDevices. Returns {"analysis_id", "bundle_id", "model_id"}.
    """
    server = fleet.server
    data = pack_bundle({"model.onnx": b"not a model: the simulated devices never open it"})
    manifest = make_manifest(data, server.settings.chunk_size, private_key=server.key)
    path = server.settings.data_dir / f"{manifest.bundle_id}.bundle"
    path.write_bytes(data)
    mid, aid = new_id("m"), new_id("a")
    with server.db.session(write=True) as s:
        s.add(ModelRow(id=mid, name="placeholder", sha256="0" * 64, weights=1, size_bytes=1, pool_size=1,
                       path=str(path), pool_path=str(path), created_at=time.time()))
        s.flush()
        s.add(AnalysisRow(id=aid, model_id=mid, status="done", phase="done", settings={"budget": 0.05},
                          bundle_id=manifest.bundle_id, created_at=time.time()))
        s.flush()
        s.add(BundleRow(id=manifest.bundle_id, analysis_id=aid, model_id=mid, path=str(path), size=len(data),
                        manifest=manifest.model_dump(mode="json"), created_at=time.time()))
    return {"analysis_id": aid, "bundle_id": manifest.bundle_id, "model_id": mid}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    """A running server on the embedded broker with ``fleet.analysis`` (stored_analysis)."""
    f = Fleet(tmp_path_factory.mktemp("security-fleet"), "embedded")
    f.analysis = stored_analysis(f)
    yield f
    f.stop()
