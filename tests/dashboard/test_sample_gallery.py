"""The device page's sample gallery: the field inputs a device uploaded, image inputs drawn as PNGs
(evidence for a "new data" alert); other inputs listed without a picture."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from fleet_server.db import SampleRow
from tests.dashboard.conftest import screenshot
from tests.dashboard.test_dashboard import open_view
from toco_core.demo.data import mnist_splits


def test_uploaded_samples_are_listed_and_image_inputs_drawn(fleet, devices, page, tmp_path):
    digit = mnist_splits().x_heldout[:1].astype(np.float32)  # (1, 1, 28, 28), as the agent uploads it
    dimmed = digit * 0.35  # a failed lamp: the same digit, darker; the PNG stretches it back to full range
    vector = np.arange(10, dtype=np.float32)[None]  # a tabular input: listed, not drawn
    with fleet.server.db.session(write=True) as s:
        rows = [SampleRow(device_id="box-64", ref=f"gal-{k}", window=7, dtype="float32", shape=list(x.shape),
                          data=x.tobytes(), reason=reason, t=time.time())
                for k, (x, reason) in enumerate([(digit, "disputed"), (dimmed, "drift"), (vector, "drift")])]
        s.add_all(rows)
        s.flush()
        ids = [r.id for r in rows]
    listed = {x["sample_id"]: x for x in fleet.api.get("/api/devices/box-64/samples").json()}
    assert [listed[i]["image"] for i in ids] == [True, True, False]
    png = fleet.api.get(f"/api/samples/{ids[0]}/image.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(png.content)))
    assert drawn.shape == (28, 28) and drawn.dtype == np.uint8
    expected = np.round((digit[0, 0] - digit.min()) / (digit.max() - digit.min()) * 255)
    assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 1
    not_image = fleet.api.get(f"/api/samples/{ids[2]}/image.png")
    assert not_image.status_code == 404 and "not an image" in not_image.json()["detail"]
    assert fleet.api.get("/api/samples/999999/image.png").status_code == 404
    assert fleet.api.get("/api/devices/no-such-box/samples").status_code == 404

    open_view(page, fleet.url + "/devices/box-64")
    page.wait_for_selector("#samples figure")
    for i in ids[:2]:
        img = page.locator(f"#samples figure[data-sample='{i}'] img")
        page.wait_for_function(f"document.querySelector(\"#samples figure[data-sample='{i}'] img\")"
                               ".naturalWidth === 28",
                               timeout=10_000)
        assert img.get_attribute("alt") == f"sample {i}"
    assert page.locator(f"#samples figure[data-sample='{ids[2]}'] img").count() == 0
    assert "[1,10]" in page.locator(f"#samples figure[data-sample='{ids[2]}']").inner_text()
    screenshot(page, tmp_path, "device-sample-gallery")
