"""The integer codes of a model after its dead channels and unread features were removed.

A build removes channels and input features no output depends on (structured.py, input_gather.py).
The storage form then codes the model that runs rather than the one it came from: the removed rows
cost no side information (step, non-zero count, code range), their biases no float, the readers'
zero columns no mask bits. On the five LeNet-5 variants' size plans that is 3-6% of the storage form.

Removal only deletes entries and rewrites biases, so every kept weight is still ``code * step`` of
its channel: the codes are read back by w / step and checked to give the weights bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx

from toco_core.compression.storage import QuantizedTensor, dequantize
from toco_core.onnx_model import compressible_weights, read_weights


def reduced_codes(reduced: onnx.ModelProto, tensors: list[QuantizedTensor],
                  dropped: dict[str, np.ndarray]) -> list[QuantizedTensor] | None:
    """The codes of ``reduced``'s weights, from the full model's ``tensors``.

    Takes the reduced model, the QuantizedTensors of the model it was cut from and the output
    channels removed per weight (bool masks over the full model's channels; a weight missing from
    it lost none). Returns one QuantizedTensor per coded weight of ``reduced``, its steps those of
    the kept channels, or None when a weight is not exactly codes * steps (a rewrite changed its
    values): the caller then stores the full model.
    """
    weights = read_weights(reduced)
    infos = {i.name: i for i in compressible_weights(reduced)}
    out = []
    for q in tensors:
        w, info = weights.get(q.name), infos.get(q.name)
        if w is None or info is None or info.out_axis != q.out_axis:
            return None
        keep = ~np.asarray(dropped.get(q.name, np.zeros(len(q.steps), dtype=bool)))
        steps = q.steps[keep]
        if len(steps) != w.shape[q.out_axis]:
            return None
        shape = [1] * w.ndim
        shape[q.out_axis] = -1
        codes = np.rint(w.astype(np.float64) / steps.reshape(shape).astype(np.float64))
        coded = QuantizedTensor(q.name, codes.astype(q.codes.dtype), steps, q.out_axis)
        if not np.array_equal(dequantize(coded), w):
            return None
        out.append(coded)
    return out
