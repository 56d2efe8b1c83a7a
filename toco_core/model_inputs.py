"""A batch of inputs for a model with several graph inputs: one array per input name (numpy only).

A model with one input keeps taking a plain array everywhere (``Batch`` is either); a model
with several takes a ModelInputs, which indexes, slices and concatenates along the batch axis
like an array does, so pools, analysis sets and self-test samples are handled alike. ``feed``
is the one place either becomes an onnxruntime feed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toco_core.errors import PoolError


@dataclass(frozen=True)
class ModelInputs:
    """One array per graph input name, in the graph's input order, all with the same batch length.

    Raises PoolError at construction for no arrays, a 0-d array or differing batch lengths.
    """

    arrays: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if not self.arrays:
            raise PoolError("a batch of model inputs holds no arrays", "give one array per model input")
        lengths = {k: (len(v) if np.ndim(v) else None) for k, v in self.arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise PoolError(f"model inputs differ in their number of samples: {lengths}",
                            "give every input the same samples, batch axis first")

    @property
    def names(self) -> list[str]:
        """The input names, in order."""
        return list(self.arrays)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: Any) -> ModelInputs:
        """The samples ``index`` selects (a slice, an index array or a mask), from every input."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1 or None)  # keep the batch axis
        return ModelInputs({k: v[index] for k, v in self.arrays.items()})

    def __iter__(self) -> Iterator[ModelInputs]:
        """The samples one by one, each a batch of one."""
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes held by all arrays (as an array's ``nbytes``: batch sizing reads ``x[0].nbytes``)."""
        return sum(v.nbytes for v in self.arrays.values())


Batch = np.ndarray | ModelInputs


def feed(x: Batch, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The onnxruntime feed of ``x`` for a session whose inputs are ``names`` (graph order).

    A plain array feeds the first input. Raises PoolError when a ModelInputs lacks an input the
    session needs or brings one it does not know.
    """
    if not isinstance(x, ModelInputs):
        return {names[0]: x}
    if set(x.arrays) != set(names):
        raise PoolError(f"the samples hold inputs {x.names}, the model takes {list(names)}",
                        "give one array per model input, named as the model's inputs")
    return dict(x.arrays)


def concat(batches: Iterable[Batch]) -> Batch:
    """The batches one after the other (all plain arrays, or all ModelInputs of the same names)."""
    parts = list(batches)
    named = [p for p in parts if isinstance(p, ModelInputs)]
    if not named:
        return np.concatenate([p for p in parts if isinstance(p, np.ndarray)])
    if len(named) != len(parts):
        raise PoolError("plain arrays and named model inputs cannot be joined", "give every batch the same form")
    return ModelInputs({k: np.concatenate([p.arrays[k] for p in named]) for k in named[0].names})


def shapes(x: Batch) -> dict[str, tuple[int, ...]] | tuple[int, ...]:
    """The array shape of a plain batch, or the shape per input name."""
    if isinstance(x, ModelInputs):
        return {k: tuple(v.shape) for k, v in x.arrays.items()}
    return tuple(x.shape)


def to_arrays(key: str, x: Batch) -> dict[str, np.ndarray]:
    """Flat arrays for an .npz or a parts blob: ``{key: x}``, or ``{key/name: array}`` per input."""
    if isinstance(x, ModelInputs):
        return {f"{key}/{k}": v for k, v in x.arrays.items()}
    return {key: x}


def from_arrays(key: str, arrays: dict[str, Any]) -> Batch:
    """Inverse of to_arrays (``arrays`` may be an open .npz). Raises KeyError when ``key`` is in neither form."""
    if key in arrays:
        return np.asarray(arrays[key])
    prefix = f"{key}/"
    named = {k[len(prefix):]: np.asarray(arrays[k]) for k in arrays if k.startswith(prefix)}
    if not named:
        raise KeyError(key)
    return ModelInputs(named)


def flat_values(x: Batch) -> np.ndarray:
    """What drift statistics read: a plain batch as it is; several inputs as float64 ``[N, D]``,
    each sample's values of every input flattened and joined in input order."""
    if not isinstance(x, ModelInputs):
        return x
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in x.arrays.values()], axis=1)
