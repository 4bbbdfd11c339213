"""An untrained black box for the robustness benchmark and the protocol suite: an old model raycompat did not train.

:class:`RandomConvFeatures` is an untrained, fixed random-convolution feature
extractor (seeded): two random 3x3 convolutions with ReLU and average pooling,
then per-channel means and maxima. Its features are not normalised and not
centred (ReLU outputs: every coordinate is >= 0, so all features share one large
mean direction) and have ``dim`` (96) dimensions, unlike the 64 of the models
raycompat trains. Usable as ``old.extractor: raycompat.models.random_features:RandomConvFeatures``
(uint8 images (N, C, H, W) in, float32 (N, dim) out; see
:mod:`raycompat.models.extractor`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class RandomConvFeatures:
    """A fixed random-convolution extractor: uint8 (N, C, H, W) -> float32 (N, ``dim``), ``dim`` even."""

    def __init__(self, dim: int = 96, seed: int = 0, hidden: int = 32) -> None:
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        self.dim, self.seed, self.hidden = dim, seed, hidden
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _convs(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn on first use per channel count, from the seed alone: the same box on every call and host.
        if channels not in self._weights:
            gen = torch.Generator().manual_seed(self.seed)
            w1 = torch.randn(self.hidden, channels, 3, 3, generator=gen) / (3.0 * channels ** 0.5)
            w2 = torch.randn(self.dim // 2, self.hidden, 3, 3, generator=gen) / (3.0 * self.hidden ** 0.5)
            self._weights[channels] = (w1, w2)
        return self._weights[channels]

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of uint8 ``images`` (N, C, H, W) as float32 (N, dim)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
        w1, w2 = self._convs(x.shape[1])
        h = F.avg_pool2d(F.relu(F.conv2d(x, w1, padding=1)), 2)
        h = F.relu(F.conv2d(h, w2, padding=1))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1).numpy().astype(np.float32)
