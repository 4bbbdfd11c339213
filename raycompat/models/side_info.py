"""FCT side-information model psi: a small convolutional autoencoder, trained without labels.

psi(x) is computed once per gallery item next to the old model and stored with
it; the future transformation h(phi_old, psi) uses it to recover what the old
model threw away. psi must therefore keep generic information about the image,
not just what the old task needed.

Why an autoencoder and not SimCLR-style contrastive learning: on 28x28 grey
images in a few CPU epochs the autoencoder's dense MSE target converges fast to
a code of the whole image, including classes the old model never saw, while
contrastive learning needs big batches, colour augmentations (absent here) and
many epochs, and learns invariances that can discard detail the new model later
uses. Measured on Fashion-MNIST (trained on the 30k training images of classes
0-4, d_s = 32, 3 epochs, 2 CPU cores; kNN top-1, k = 10, cosine, 10k test
images, all classes / unseen classes 5-9): autoencoder 82.3 / 82.6 in 13 s;
SimCLR with the same encoder (random crop+flip, brightness, noise, batch 256,
temperature 0.2) 79.7 / 80.0 in 32 s; PCA-32 of the pixels 81.4 / 81.1.

The exported interface is the black-box one: uint8 images (N, C, H, W) in,
float features (N, dim) out; :meth:`SideInfoModel.forward` is TorchScript
scriptable and traceable, so psi ships like the old model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from raycompat.errors import ConfigError, DataError
from raycompat.models.config import SideInfoConfig

logger = logging.getLogger(__name__)


def _halved(size: int) -> int:
    """Spatial size after a 3x3 conv with stride 2 and padding 1."""
    return (size - 1) // 2 + 1


class SideInfoModel(nn.Module):
    """Conv encoder -> ``dim`` bottleneck (``forward``), plus an MLP decoder for training.

    Encoder: two stride-2 3x3 convs (``width``, ``2 * width`` channels) and a
    linear layer to ``dim``. Decoder: an MLP to sigmoid pixels in [0, 1]; a conv
    decoder reconstructed no better on Fashion-MNIST (same loss and kNN quality
    of the code) at 8x the training time. Works for any square ``image_size``
    (8x8 digits, 28x28 Fashion-MNIST, 32x32 CIFAR).
    """

    def __init__(self, in_channels: int, image_size: int, dim: int, width: int = 32) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("dim", dim), ("width", width)):
            if value <= 0:
                raise ConfigError(f"SideInfoModel {name}: must be positive, got {value}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.dim = dim
        small = _halved(_halved(image_size))
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(2 * width * small * small, dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(dim, 8 * width),
            nn.ReLU(inplace=True),
            nn.Linear(8 * width, in_channels * image_size * image_size),
            nn.Sigmoid(),
            nn.Unflatten(1, (in_channels, image_size, image_size)),
        )

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float pixels in [0, 1], checking dtype and shape."""
        if images.dtype != torch.uint8:
            raise DataError(f"side-info model expects uint8 images, got {images.dtype}")
        # A trace cannot keep a shape check (it records one branch, with a warning); scripting can.
        if not torch.jit.is_tracing() and (
            images.dim() != 4 or images.shape[1] != self.in_channels or images.shape[2] != self.image_size
            or images.shape[3] != self.image_size
        ):
            raise DataError(
                f"side-info model expects images (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {list(images.shape)}"
            )
        return images.to(torch.float32) / 255.0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> side-info codes; inputs are centred to [-1, 1] for the ReLU convs."""
        return self.encoder(pixels * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> side-info features (N, dim)."""
        return self.encode(self.pixels(images))

    @torch.jit.unused
    def reconstruction_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Mean squared pixel error of decode(encode(x)) against x in [0, 1]."""
        x = self.pixels(images)
        return nn.functional.mse_loss(self.decoder(self.encode(x)), x)


def build_side_info_model(cfg: SideInfoConfig, in_channels: int, image_size: int, seed: int) -> SideInfoModel:
    """A freshly initialised :class:`SideInfoModel`, deterministic in ``seed``, leaving global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SideInfoModel(in_channels, image_size, cfg.dim, cfg.width)


def train_side_info(
    model: SideInfoModel, images: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int
) -> list[float]:
    """Train ``model`` as an autoencoder on uint8 ``images``; returns each epoch's mean loss per image.

    Plain torch loop (Adam), on the device the model lives on; shuffling is
    seeded by ``seed`` so a run repeats exactly on CPU. The model is left in
    eval mode, ready to export.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value <= 0:
            raise ConfigError(f"train_side_info {name}: must be positive, got {value}")
    model.pixels(images[:1])  # dtype and shape check before any work
    if images.shape[0] == 0:
        raise DataError("side-info training images: empty")
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    losses: list[float] = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            batch = images[perm[start:start + batch_size]].to(device)
            loss = model.reconstruction_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.shape[0]
        losses.append(total / n)
        logger.info("side-info epoch %d/%d: reconstruction MSE %.5f", epoch + 1, epochs, losses[-1])
    model.eval()
    return losses
