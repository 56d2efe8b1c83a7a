"""The pool's split into held-out and candidate samples, made once and owned by the analysis.

A 400-image RGB 224x224 pool is 241 MB. The analysis needs it in two shuffled halves (held-out
for the curves, candidates for QBC), and fancy indexing copies: a caller that keeps its pool
while the analysis holds the halves pays for the pool twice for the whole run. Splitting first
(``split_pool``) lets the caller drop its array before the analysis starts, so the pool is held
once; ``analyze`` takes either the pool or its split and gives the same result for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toco_core.analysis.settings import AnalysisSettings
from toco_core.errors import PoolError
from toco_core.model_inputs import Batch

MIN_POOL = 20


@dataclass
class PoolSplit:
    """A pool cut into its held-out and candidate halves.

    ``held`` and ``cand`` are the pool indices of each half, in the order of ``held_x`` and
    ``cand_x``; ``size`` is the pool's length. ``cand_x`` is None once taken (take_candidates).
    """

    held: np.ndarray
    cand: np.ndarray
    held_x: Batch
    cand_x: Batch | None
    size: int

    def take_candidates(self) -> Batch:
        """The candidate half, handed over: the split lets go of it, so the analysis can free the
        candidates once QBC has picked from them while its caller still holds the split.

        Raises PoolError when they were taken already (a split serves one analysis).
        """
        cand_x, self.cand_x = self.cand_x, None
        if cand_x is None:
            raise PoolError("this pool split was analysed already", "split the pool again for another analysis")
        return cand_x


def split_pool(pool_x: Batch, settings: AnalysisSettings | None = None) -> PoolSplit:
    """Shuffle ``pool_x`` with ``settings.seed`` and cut it into held-out and candidate halves.

    n_held = min(max_heldout, max(10, floor(len * heldout_share))); the first n_held of the
    permutation are held out. The halves are copies: drop ``pool_x`` afterwards to hold the pool
    once. Raises PoolError for a pool of fewer than MIN_POOL samples.
    """
    s = settings or AnalysisSettings()
    if len(pool_x) < MIN_POOL:
        raise PoolError(f"the pool has {len(pool_x)} samples; analysis needs at least {MIN_POOL}",
                        "give a larger pool")
    order = np.random.default_rng(s.seed).permutation(len(pool_x))
    n_held = min(s.max_heldout, max(10, int(len(pool_x) * s.heldout_share)))
    held, cand = order[:n_held], order[n_held:]
    return PoolSplit(held=held, cand=cand, held_x=pool_x[held], cand_x=pool_x[cand], size=len(pool_x))


def pool_outputs(split: PoolSplit, held_out: np.ndarray, cand_out: np.ndarray) -> np.ndarray:
    """Per-sample outputs of the two halves (``held_out`` for held_x, ``cand_out`` for cand_x)
    put back in the pool's order, as a run on the whole pool returns them."""
    out = np.empty((split.size, *held_out.shape[1:]), dtype=held_out.dtype)
    out[split.held], out[split.cand] = held_out, cand_out
    return out
