"""The table from ONNX op type (default domain) to its torch handler.

Each ops_* module owns a small ``OPS`` dict; this module only merges them, so adding an op
means writing one handler and one dict entry, and docs/ops.md lists it for people.
"""

from __future__ import annotations

from toco_core.analysis.graph_eval import (
    ops_activation,
    ops_conv,
    ops_elementwise,
    ops_norm,
    ops_pool,
    ops_resample,
    ops_shape,
)
from toco_core.analysis.graph_eval.node import Handler

_MODULES = (ops_conv, ops_activation, ops_elementwise, ops_shape, ops_pool, ops_norm, ops_resample)


def _merge() -> dict[str, Handler]:
    table: dict[str, Handler] = {}
    for module in _MODULES:
        clash = table.keys() & module.OPS.keys()
        if clash:  # a programming error in this package, caught by the tests at import
            raise RuntimeError(f"{module.__name__} registers {sorted(clash)} a second time")
        table.update(module.OPS)
    return table


OPS: dict[str, Handler] = _merge()


def supported_ops() -> list[str]:
    """The op types the evaluator supports, sorted."""
    return sorted(OPS)
