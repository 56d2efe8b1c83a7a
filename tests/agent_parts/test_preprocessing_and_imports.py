"""Image preprocessing as a pure function, and the edge-side modules importing without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from toco_core.errors import ConfigError
from toco_core.preprocessing import Preprocessing, preprocess

REPO = Path(__file__).resolve().parents[2]


def test_grayscale_digit_round_trip_and_box_shrink(digits):
    pixels = (digits.x_heldout[0, 0] * 255).round().astype(np.uint8)
    prep = Preprocessing(size=(28, 28), color="grayscale")
    x = preprocess(pixels, prep)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], pixels / 255, atol=1e-6)
    # A 2x upscaled RGB copy shrinks back exactly (box filter of identical 2x2 blocks).
    rgb = np.repeat(np.kron(pixels, np.ones((2, 2), np.uint8))[:, :, None], 3, axis=2)
    np.testing.assert_allclose(preprocess(rgb, prep)[0], pixels / 255, atol=1e-5)


def test_rgb_normalisation_channel_order_and_layout():
    img = np.zeros((4, 6, 4), np.uint8)  # RGBA: alpha is dropped
    img[..., 0], img[..., 1], img[..., 2], img[..., 3] = 255, 128, 0, 7
    prep = Preprocessing(size=(2, 3), mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0), layout="nhwc",
                         channel_order="bgr")
    x = preprocess(img, prep)
    assert x.shape == (2, 3, 3) == prep.input_shape()
    np.testing.assert_allclose(x[0, 0], [(0 - 0.5) / 0.5, (128 / 255 - 0.5) / 0.25, (1 - 0.5) / 1.0], atol=1e-6)
    gray = preprocess(img[..., :3], Preprocessing(size=(4, 6), color="grayscale", scale=1.0))
    np.testing.assert_allclose(gray, 0.299 * 255 + 0.587 * 128, atol=1e-3)


def test_bilinear_upscale_keeps_range_and_bad_inputs_are_refused():
    img = np.array([[0, 255], [255, 0]], np.uint8)
    x = preprocess(img, Preprocessing(size=(5, 5), color="grayscale"))
    assert x.shape == (1, 5, 5) and x.min() >= 0 and x.max() <= 1 and x[0, 0, 0] == 0 and x[0, 0, 4] == 1
    with pytest.raises(ConfigError, match="expected"):
        preprocess(np.zeros((4, 4, 2)), Preprocessing(size=(2, 2)))
    with pytest.raises(ValidationError, match="mean has 2 values"):
        Preprocessing(size=(2, 2), mean=(0.1, 0.2))
    with pytest.raises(ValidationError):
        Preprocessing(size=(2, 2), std=(0.0,))
    with pytest.raises(ValidationError):
        Preprocessing(size=(2, 2), resize="lanczos")


def test_edge_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # importing torch now raises ImportError
        "import agent.model_store, agent.inference, agent.inference_api, toco_core.drift_monitor, "
        "toco_core.preprocessing\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
