"""Sample pools for analysis and evaluation: .npy / .npz arrays or an image folder.

A pool holds unlabeled inputs in the model's input layout and dtype; labels are optional
(a ``y`` array in the .npz, or a separate .npy). A model with several inputs takes an .npz
with one array per input name. Every problem is a PoolError that says
what is wrong with which file and what the model expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toco_core.errors import PoolError
from toco_core.model_inputs import Batch, ModelInputs
from toco_core.onnx_model import InputSpec

if TYPE_CHECKING:
    from toco_core.preprocessing import Preprocessing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if not keys:
                    raise PoolError(f"pool {path} holds no arrays", "save the inputs as array 'x'")
                x = z["x"] if "x" in z else z[keys[0]]
                y = z.get("y")
                return x, y
    except PoolError:
        raise
    except Exception as exc:  # numpy raises ValueError/OSError/zipfile errors
        raise PoolError(f"pool {path} is not a readable numpy file: {exc}", "write it with numpy.save/savez") from None
    raise PoolError(f"pool {path} has an unknown suffix {path.suffix!r}", "use .npy, .npz or an image folder")


def _load_images(folder: Path, preprocessing: Preprocessing) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from toco_core.preprocessing import preprocess

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PoolError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(preprocess(np.asarray(im.convert("RGB")), preprocessing))
        except (UnidentifiedImageError, OSError) as exc:
            raise PoolError(f"image {f} cannot be read: {exc}", "remove or replace it") from None
    return np.concatenate(out, axis=0)


def fit_to_input(x: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    """Check ``x`` against the model input (batch axis first) and cast to its dtype.

    Raises PoolError when the pool is empty, a fixed dimension differs, or an integer input
    (e.g. uint8) would not hold the values exactly.
    """
    if x.ndim == 0 or len(x) == 0:
        raise PoolError(f"pool {source} is empty", "give at least a few dozen samples")
    want = spec.shape[1:]
    got = x.shape[1:]
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        shown = "x".join("?" if d is None else str(d) for d in spec.shape)
        raise PoolError(
            f"pool {source} has samples shaped {tuple(got)}, but model input {spec.name!r} is {shown}",
            "reshape the pool to the model's input layout (batch first)",
        )
    if not np.issubdtype(x.dtype, np.number):
        raise PoolError(f"pool {source} has non-numeric dtype {x.dtype}")
    fitted = np.ascontiguousarray(x.astype(spec.dtype, copy=False))
    # an integer input (uint8 camera bytes) given floats scaled to 0..1 would be analysed on zeros
    if spec.dtype.kind in "iu" and not np.array_equal(fitted, x):
        raise PoolError(f"pool {source} holds {x.dtype} values the {spec.dtype} model input {spec.name!r} "
                        "cannot hold exactly", f"save the pool as {spec.dtype}, as the device feeds it")
    return fitted


def _load_named(path: Path, specs: list[InputSpec]) -> tuple[ModelInputs, np.ndarray | None]:
    """A pool of several inputs: an .npz with one array per input name (and optional ``y``)."""
    names = [s.name for s in specs]
    if path.suffix != ".npz" or path.is_dir():
        raise PoolError(f"pool {path} is not an .npz, but the model takes several inputs {names}",
                        "save one array per input name with numpy.savez(f, **{name: array}, y=labels)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # numpy raises ValueError/OSError/zipfile errors
        raise PoolError(f"pool {path} is not a readable numpy file: {exc}", "write it with numpy.savez") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise PoolError(f"pool {path} holds {sorted(arrays)}, not the model inputs {missing}",
                        "save one array per input name with numpy.savez(f, **{name: array}, y=labels)")
    x = ModelInputs({s.name: fit_to_input(arrays[s.name], s, f"{path}[{s.name!r}]") for s in specs})
    return x, arrays.get("y")


def load_pool(
    source: str | Path,
    spec: InputSpec | list[InputSpec],
    labels: str | Path | None = None,
    preprocessing: Preprocessing | None = None,
) -> tuple[Batch, np.ndarray | None]:
    """Load a pool for the model inputs: returns (x, y or None).

    ``spec`` is the model's input, or its inputs (toco_core.onnx_model.input_specs). For one input
    ``source`` is a .npy/.npz file (array ``x`` or the first) or an image folder (then
    ``preprocessing``, a toco_core.preprocessing.Preprocessing, is required) and x an array; for
    several it is an .npz with one array per input name (plus optional ``y``) and x a ModelInputs.
    ``labels`` is an optional .npy. Raises PoolError for a missing, unreadable, empty or
    mis-shaped pool or labels.
    """
    specs = spec if isinstance(spec, list) else [spec]
    path = Path(source)
    if not path.exists():
        raise PoolError(f"pool {path} does not exist", "check the path")
    if len(specs) > 1:
        named, y = _load_named(path, specs)
        return _with_labels(named, y, labels)
    if path.is_dir():
        if preprocessing is None:
            raise PoolError(f"pool {path} is an image folder but no preprocessing was declared",
                            "pass --size/--scale/--mean/--std")
        x, y = _load_images(path, preprocessing), None
    else:
        x, y = _load_arrays(path)
    return _with_labels(fit_to_input(x, specs[0], str(path)), y, labels)


def _with_labels(x: Batch, y: np.ndarray | None, labels: str | Path | None) -> tuple[Batch, np.ndarray | None]:
    if labels is not None:
        lpath = Path(labels)
        if not lpath.is_file():
            raise PoolError(f"labels {lpath} do not exist", "check the path")
        y, _ = _load_arrays(lpath)
    if y is not None and len(y) != len(x):
        raise PoolError(f"{len(y)} labels for {len(x)} pool samples", "give one label per sample")
    return x, (None if y is None else np.asarray(y).astype(np.int64))
