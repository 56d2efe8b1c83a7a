"""Train the demo models on the CPU in seconds and export them to ONNX (server side: torch).

- ``lenet5``: LeNet-5-style CNN, about 61.7k weights;
- ``mlp``: LeNet-300-100, about 266k weights;
- ``wide_cnn``: a ~5M-parameter CNN for size/latency/RSS benchmarks (random init is fine).

``lenet5_variant(seed, batchnorm)`` trains more LeNet-5s (another init and batch order, optionally
BatchNorm after each conv) so a benchmark is not read off one model; seed 0 without BatchNorm is
the demo model itself.
"""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from toco_core.demo.data import mnist_splits

Exporter = Literal["torchscript", "dynamo"]
ARCHITECTURES = ("lenet5", "mlp", "wide_cnn")
_RECIPE_VERSION = "1"  # bump when the architectures or training change: invalidates the cache


def build(arch: str, seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """A fresh model of the named architecture initialised from ``seed``; ``batchnorm`` puts a
    BatchNorm2d after each conv (lenet5 only). Raises ValueError for an unknown one."""
    torch.manual_seed(seed)
    if batchnorm and arch != "lenet5":
        raise ValueError(f"batchnorm is a lenet5 option, not one of {arch!r}")
    if arch == "lenet5":
        def norm(channels: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(channels)] if batchnorm else []
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), *norm(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), *norm(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10),
        )
    if arch == "wide_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(256 * 3 * 3, 1536), nn.ReLU(), nn.Linear(1536, 10),
        )
    raise ValueError(f"unknown architecture {arch!r}: use one of {ARCHITECTURES}")


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 8, batch: int = 64,
          seed: int = 0) -> nn.Module:
    """Adam, cross-entropy, batch order drawn from ``seed``; returns the model in eval mode."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def export(model: nn.Module, path: Path, exporter: Exporter = "torchscript",
           image_shape: tuple[int, ...] = (1, 28, 28)) -> Path:
    """Export to ONNX with a dynamic batch dimension, input ``image`` [N, *image_shape], output ``logits``."""
    dummy = torch.zeros(1, *image_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(input_names=["image"], output_names=["logits"])
    if exporter == "dynamo":
        torch.onnx.export(model, (dummy,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **kwargs)
    else:
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, **kwargs)
    return path


def cache_dir() -> Path:
    """Where trained demo models are cached: $TOCO_CACHE_DIR or ~/.cache/toco."""
    return Path(os.environ.get("TOCO_CACHE_DIR", Path.home() / ".cache" / "toco"))


def made_once(path: Path, make: Callable[[Path], None]) -> Path:
    """``path`` if it exists, else ``make(path)`` run first, by one process at a time.

    Test workers and benches start side by side on a fresh machine: without the lock (an flock on
    ``path`` + ".lock") each trained the same model, and one's file replaced another's under a
    reader that had already hashed the first. ``make`` writes ``path`` whole (a temporary name
    renamed into place). Returns ``path``; raises what ``make`` raises.
    """
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file():  # another process made it while this one waited
            make(path)
    return path


def cached_export(path: Path, make: Callable[[], nn.Module], exporter: Exporter = "torchscript",
                  image_shape: tuple[int, ...] = (1, 28, 28)) -> Path:
    """``path`` if it exists, else ``make()`` (build + train) exported there first (``made_once``).

    The export goes to a per-process temporary name and is renamed into place, so concurrent
    callers never read a half-written file.
    """
    def make_file(out: Path) -> None:
        model = make()
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        export(model.eval(), tmp, exporter, image_shape)
        tmp.replace(out)

    return made_once(path, make_file)


def demo_model(arch: str = "lenet5", exporter: Exporter = "torchscript", trained: bool = True) -> Path:
    """Path of the cached ONNX demo model, training and exporting it on first use."""
    tag = "trained" if trained else "random"
    path = cache_dir() / f"v{_RECIPE_VERSION}" / f"{arch}-{tag}-{exporter}.onnx"

    def make() -> nn.Module:
        model = build(arch)
        if trained:
            s = mnist_splits()
            epochs = 3 if arch == "wide_cnn" else 8
            model = train(model, s.x_train, s.y_train, epochs=epochs)
        return model

    return cached_export(path, make, exporter)


def lenet5_variant(seed: int, batchnorm: bool = False, exporter: Exporter = "torchscript") -> Path:
    """Path of a cached trained LeNet-5 whose init and batch order come from ``seed``, with a
    BatchNorm2d after each conv when ``batchnorm``; same data and recipe as ``demo_model("lenet5")``.

    Exported in eval mode like the demo: the TorchScript exporter folds each BatchNorm into the
    conv before it, so the ONNX graph has the demo's ops (Conv with a bias, Relu, MaxPool, Gemm).
    """
    if seed == 0 and not batchnorm:
        return demo_model("lenet5", exporter)
    path = cache_dir() / f"v{_RECIPE_VERSION}" / f"lenet5{'-bn' if batchnorm else ''}-s{seed}-trained-{exporter}.onnx"

    def make() -> nn.Module:
        s = mnist_splits()
        return train(build("lenet5", seed, batchnorm), s.x_train, s.y_train, epochs=8, seed=seed)

    return cached_export(path, make, exporter)


if __name__ == "__main__":
    for a in ("lenet5", "mlp"):
        t = time.perf_counter()
        p = demo_model(a)
        print(a, p, f"{time.perf_counter() - t:.1f}s")
