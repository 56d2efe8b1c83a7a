"""The storage form of a model after channel removal: its codes read back from the reduced model."""

from __future__ import annotations

import numpy as np

from tests.compression_formats.graphs import init_shapes
from toco_core.compression.reduced_codes import reduced_codes
from toco_core.compression.storage import decode_model, dequantize, encode_model, quantize_to_codes
from toco_core.compression.structured import dead_channels, remove_output_channels
from toco_core.onnx_model import compressible_weights, read_weights, with_weights
from toco_core.runtime import run_model


def test_the_codes_of_a_reduced_model_decode_to_it_and_cost_less(demo, heldout):
    model = demo[("lenet5", "torchscript")]
    infos = compressible_weights(model)
    weights = read_weights(model, infos)
    tensors = []
    for info in infos:
        w = np.moveaxis(weights[info.name], info.out_axis, 0)
        steps = (np.abs(w).reshape(len(w), -1).max(axis=1) / 15).astype(np.float32)
        tensors.append(quantize_to_codes(weights[info.name], steps, info.out_axis, info.name))
    codes = {q.name: q for q in tensors}
    codes["7.weight"].codes[:40] = 0  # 40 of fc1's units rounded away
    codes["9.weight"].codes[:, 100:] = 0  # fc2 reads none of fc1's last 20 units
    values = {q.name: dequantize(q) for q in tensors}
    full = with_weights(model, values)
    drop = dead_channels(full, values)
    assert int(drop["7.weight"].sum()) == 60
    reduced = remove_output_channels(full, drop)
    assert init_shapes(reduced)["7.weight"] == (60, 400)

    coded = reduced_codes(reduced, tensors, drop)
    assert coded is not None
    blob = encode_model(reduced, coded)
    assert len(blob) < len(encode_model(full, tensors))
    np.testing.assert_allclose(run_model(decode_model(blob), heldout), run_model(full, heldout), atol=1e-4, rtol=1e-4)

    # a weight the rewrite changed is no longer codes x steps: the caller keeps the full model's form
    off_grid = read_weights(reduced)
    off_grid["9.weight"] = off_grid["9.weight"] * np.float32(1.001)
    assert reduced_codes(with_weights(reduced, off_grid), tensors, drop) is None
