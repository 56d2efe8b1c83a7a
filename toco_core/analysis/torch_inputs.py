"""Model input batches (an array, or toco_core.model_inputs.ModelInputs) as the torch side takes them.

The graph evaluator takes a tensor for a one-input model and a dict of tensors by input name
for several; torch.func's vmap and grad map over either (a dict is a pytree).
"""

from __future__ import annotations

import numpy as np
import torch

from toco_core.model_inputs import Batch, ModelInputs

TorchBatch = torch.Tensor | dict[str, torch.Tensor]


def to_torch(x: Batch) -> TorchBatch:
    """Tensors sharing ``x``'s memory where numpy allows (C-contiguous), in the arrays' own dtypes."""
    if isinstance(x, ModelInputs):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.arrays.items()}
    return torch.from_numpy(np.ascontiguousarray(x))


def with_batch_axis(xi: TorchBatch) -> TorchBatch:
    """One sample (as vmap hands it over) back to a batch of one."""
    if isinstance(xi, dict):
        return {k: v[None] for k, v in xi.items()}
    return xi[None]


def rows(x: TorchBatch) -> int:
    """The batch length."""
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
