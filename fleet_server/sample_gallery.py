"""The field samples a device uploaded, as evidence an operator can look at: a list per device and,
for image inputs, each sample as a PNG (the dashboard's sample gallery on the device page).

A drift alert of kind "data" says the base model sees inputs unlike its training data; the
numbers (input shift, confidence) say how much, the pictures say what: a failed lamp, a rotated
camera, a new product. Only inputs shaped like images are drawn: (..., H, W) with one or three
channels in front and H, W of at least 8 pixels; the rest are listed without a picture.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from sqlalchemy import select

from fleet_server.db import Database, SampleRow
from fleet_server.registry import NotFoundError

MIN_SIDE = 8


def image_array(dtype: str, shape: list[int], data: bytes) -> np.ndarray | None:
    """The sample as a uint8 (H, W) or (H, W, 3) picture, or None when it is not image-shaped.

    Takes the stored dtype, shape and raw bytes. Values are stretched to 0..255 between the
    sample's own minimum and maximum (inputs are often normalised floats). Raises ValueError
    when the bytes do not fit the dtype and shape.
    """
    x = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    while x.ndim > 3 and x.shape[0] == 1:  # a batch axis of one
        x = x[0]
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    elif x.ndim == 3 and x.shape[-1] in (1, 3):  # NHWC layouts
        x = x[..., 0] if x.shape[-1] == 1 else x
    if x.ndim not in (2, 3) or min(x.shape[:2]) < MIN_SIDE or not np.issubdtype(x.dtype, np.number):
        return None
    x = np.nan_to_num(x.astype(np.float64))
    lo, hi = float(x.min()), float(x.max())
    return np.zeros(x.shape, np.uint8) if hi <= lo else np.round((x - lo) / (hi - lo) * 255).astype(np.uint8)


def sample_png(dtype: str, shape: list[int], data: bytes) -> bytes | None:
    """PNG bytes of an image-shaped sample (image_array), or None. Raises ValueError for bytes that
    do not fit the dtype and shape."""
    picture = image_array(dtype, shape, data)
    if picture is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def recent_samples(db: Database, device_id: str, limit: int = 24) -> list[dict]:
    """The device's newest uploaded samples: id, window, reason, time, shape, dtype and whether
    it can be drawn (newest first)."""
    with db.session() as s:
        rows = s.scalars(select(SampleRow).where(SampleRow.device_id == device_id)
                         .order_by(SampleRow.id.desc()).limit(limit)).all()
        out = []
        for r in rows:
            try:
                drawable = image_array(r.dtype, list(r.shape), r.data) is not None
            except (ValueError, TypeError):
                drawable = False
            out.append({"sample_id": r.id, "window": r.window, "reason": r.reason, "t": r.t, "shape": list(r.shape),
                        "dtype": r.dtype, "image": drawable})
        return out


def sample_image(db: Database, sample_id: int) -> bytes:
    """The PNG of one sample. Raises NotFoundError for an unknown sample or one that is not an image."""
    with db.session() as s:
        row = s.get(SampleRow, sample_id)
        if row is None:
            raise NotFoundError(f"no field sample {sample_id}", "list a device's samples first")
        try:
            png = sample_png(row.dtype, list(row.shape), row.data)
        except (ValueError, TypeError):
            png = None
        if png is None:
            raise NotFoundError(f"field sample {sample_id} is not an image (shape {list(row.shape)}, {row.dtype})",
                                "only image-shaped inputs are drawn")
        return png
