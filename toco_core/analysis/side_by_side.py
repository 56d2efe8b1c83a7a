"""Calibration points measured side by side, in threads of this process.

A point's measurement is a few onnxruntime runs of the model on a few hundred samples. On a
small model one run gains little from a second intra-op thread, while two runs of one thread
each keep both cores busy: onnxruntime releases the GIL while it runs. On a large model one
run already keeps every core busy, and two would hold two sets of activations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from toco_core.analysis.nested_calibration import GridMap
from toco_core.runtime import intra_op_threads

_T = TypeVar("_T")
_R = TypeVar("_R")
# Below this many weights a point is measured on one thread, one point per core (LeNet-5: 61k
# weights, the MLP 266k); from it up (the 1.57M-weight 224x224 model) one point at a time on all cores.
SIDE_BY_SIDE_WEIGHTS = 1_000_000


def side_by_side(workers: int) -> Callable[[Callable[[_T], _R], Iterable[_T]], Iterator[_R]]:
    """A map running ``fn`` on ``workers`` threads, each creating its sessions with one intra-op
    thread; results in the items' order (a GridMap of toco_core.analysis.nested_calibration).

    ``fn`` must not change state another call reads (NestedCalibration.measure_point records
    nothing). Raises what ``fn`` raises, when its result is reached.
    """

    def one(fn: Callable[[_T], _R], item: _T) -> _R:
        with intra_op_threads(1):
            return fn(item)

    def grid_map(fn: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calibrate") as pool:
            yield from pool.map(lambda item: one(fn, item), items)

    return grid_map


def local_map(weights: int, cores: int | None = None) -> GridMap:
    """How this process measures independent points of a model with ``weights`` compressible
    weights: side by side on ``cores`` threads (default: the cores this process may use) below
    SIDE_BY_SIDE_WEIGHTS, else the builtin, sequential ``map``."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return side_by_side(cores) if weights < SIDE_BY_SIDE_WEIGHTS and cores > 1 else map
