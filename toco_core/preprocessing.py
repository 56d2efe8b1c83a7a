"""Image preprocessing a bundle declares, and the pure function that applies it.

A decoded image (``[H, W]`` or ``[H, W, C]`` with C = 1, 3 or 4, uint8 or float) becomes
one model input sample::

    x = (resize(color(image)) * scale - mean) / std        per channel, then laid out

with ``layout`` "nchw" -> ``[C, H, W]`` or "nhwc" -> ``[H, W, C]`` (no batch axis).
Decoding (PNG/JPEG bytes -> array) is the caller's job; this module does no I/O.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from toco_core.errors import ConfigError

# ITU-R 601-2 luma, the weights Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Preprocessing(BaseModel):
    """How an image becomes a model input; shipped with a bundle, applied on the device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: tuple[int, int] = Field(description="target (height, width) in pixels", examples=[(28, 28)])
    color: Literal["grayscale", "rgb"] = Field("rgb", description="channels the model expects")
    channel_order: Literal["rgb", "bgr"] = Field("rgb", description="order of colour channels")
    scale: float = Field(1.0 / 255.0, gt=0, description="multiplies the raw pixel value first")
    mean: tuple[float, ...] = Field((0.0,), min_length=1, description="subtracted after scaling")
    std: tuple[float, ...] = Field((1.0,), min_length=1, description="divides after the mean")
    layout: Literal["nchw", "nhwc"] = Field("nchw", description="axis order of the model input")

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if min(self.size) < 1 or max(self.size) > 8192:
            raise ValueError(f"size {self.size} must be between 1 and 8192 pixels per side")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} has {len(values)} values; give 1 or {self.channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self

    @property
    def channels(self) -> int:
        """1 for grayscale, 3 for rgb."""
        return 1 if self.color == "grayscale" else 3

    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed sample (without batch axis)."""
        h, w = self.size
        return (self.channels, h, w) if self.layout == "nchw" else (h, w, self.channels)


def _as_hwc(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ConfigError(f"image array has shape {img.shape}; expected [H, W] or [H, W, C] with C in 1, 3, 4",
                          "decode the image to a 2-D grayscale or 3-D RGB array")
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise ConfigError(f"image array has dtype {img.dtype}", "pass integer or float pixels")
    return img[:, :, :3].astype(np.float32)  # alpha is dropped, not composited


def convert_color(img: np.ndarray, color: Literal["grayscale", "rgb"]) -> np.ndarray:
    """``[H, W, 1|3]`` -> ``[H, W, 1]`` (L = 0.299 R + 0.587 G + 0.114 B) or ``[H, W, 3]``."""
    if color == "grayscale":
        return img if img.shape[2] == 1 else (img @ _LUMA)[:, :, None]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _box_shrink(img: np.ndarray, fy: int, fx: int) -> np.ndarray:
    h, w = (img.shape[0] // fy) * fy, (img.shape[1] // fx) * fx
    c = img.shape[2]
    result: np.ndarray = img[:h, :w].reshape(h // fy, fy, w // fx, fx, c).mean(axis=(1, 3))
    return result


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Half-pixel centres: output pixel j samples input coordinate (j + 0.5) * n_in / n_out - 0.5.
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[H, W, C]`` to ``size`` = (height, width), half-pixel centres.

    Shrinking by 2x or more first averages integer blocks (box filter) so that thin strokes
    are not skipped (aliasing); the bilinear step then covers the remaining factor.
    """
    th, tw = size
    if img.shape[:2] == (th, tw):
        return img
    fy, fx = max(img.shape[0] // th, 1), max(img.shape[1] // tw, 1)
    if fy > 1 or fx > 1:
        img = _box_shrink(img, fy, fx)
    y0, y1, wy = _axis_weights(img.shape[0], th)
    x0, x1, wx = _axis_weights(img.shape[1], tw)
    rows = img[y0] * (1 - wy)[:, None, None] + img[y1] * wy[:, None, None]
    result: np.ndarray = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return result


def preprocess(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Turn one decoded image into one model input sample (float32, no batch axis).

    Takes ``[H, W]`` or ``[H, W, C]`` (C = 1, 3 or 4; alpha dropped) pixels; returns
    ``prep.input_shape()``. Raises ConfigError for an array that is not an image.
    """
    img = convert_color(_as_hwc(image), prep.color)
    img = resize(img, prep.size)
    if prep.color == "rgb" and prep.channel_order == "bgr":
        img = img[:, :, ::-1]
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    x = (img * np.float32(prep.scale) - mean) / std
    if prep.layout == "nchw":
        x = np.transpose(x, (2, 0, 1))
    return np.ascontiguousarray(x, dtype=np.float32)
