"""Field samples of a model with several inputs: agents upload one array per input of a disputed
sample, ref ``REF/NAME``; here they are joined again into one ModelInputs batch.
"""

from __future__ import annotations

import logging

import numpy as np

from fleet_server.db import SampleRow
from toco_core.model_inputs import ModelInputs
from toco_core.onnx_model import InputSpec

log = logging.getLogger("toco.fleet.jobs")


def field_sample_inputs(rows: list[SampleRow], specs: list[InputSpec]) -> ModelInputs | None:
    """The samples that arrived for every input and fit each (shape and dtype, see
    jobs.field_samples_array), as one batch; None when none did. Incomplete or unfitting samples
    are skipped (logged)."""
    from fleet_server.jobs import field_samples_array  # jobs imports this module when it needs it

    names = [s.name for s in specs]
    groups: dict[str, dict[str, SampleRow]] = {}
    for r in rows:
        ref, _, name = r.ref.rpartition("/")
        if ref and name in names:
            groups.setdefault(ref, {})[name] = r
    kept = []
    for ref, group in groups.items():
        arrays = {s.name: field_samples_array([group[s.name]], list(s.shape), s.dtype)
                  for s in specs if s.name in group}
        if len(arrays) == len(specs) and all(len(a) == 1 for a in arrays.values()):
            kept.append(ModelInputs(arrays))
        else:
            log.warning("field sample lacks an input or does not fit", extra={"fields": {"ref": ref}})
    if not kept:
        return None
    return ModelInputs({n: np.concatenate([k.arrays[n] for k in kept]) for n in names})
