"""Embedding backbones: a small CNN for 8x8/28x28 images, torchvision ResNets for natural images.

Every model takes uint8 images (N, C, H, W) and does its own preprocessing, so an
exported model is a complete black box: images in, features out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycompat.models.config import ModelConfig


class Preprocess(nn.Module):
    """uint8 [0, 255] -> float, centred and scaled to about [-1, 1]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div(127.5).sub(1.0)


class SmallCNN(nn.Module):
    """Three conv layers (stride 1, 2, 2; width, 2x, 4x channels), global average pool, linear embedding.

    Sized for 8x8 to 32x32 inputs and for CPU training: a 60k-image epoch of
    Fashion-MNIST takes about a minute on 2 cores at width 16.
    """

    def __init__(self, in_channels: int, embed_dim: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(block(in_channels, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2))
        # channels_last: oneDNN's faster layout for these convolutions on CPU (~12% per training step on 2 cores).
        self.features.to(memory_format=torch.channels_last)
        self.embed = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        return self.embed(x.mean(dim=(2, 3)))


def _resnet(arch: str, in_channels: int, embed_dim: int, image_size: int) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if image_size <= 64:
        # CIFAR-style stem: the ImageNet stem would shrink a 32x32 image to 1x1.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Linear(net.fc.in_features, embed_dim)
    return net


class EmbeddingModel(nn.Module):
    """uint8 images -> embedding (not normalised: consumers L2-normalise)."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        in_channels, height, _ = image_shape
        self.embed_dim = cfg.embed_dim
        self.preprocess = Preprocess()
        if cfg.arch == "small_cnn":
            self.backbone = SmallCNN(in_channels, cfg.embed_dim, cfg.width)
        else:
            self.backbone = _resnet(cfg.arch, in_channels, cfg.embed_dim, height)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images))


class CosineClassifier(nn.Module):
    """Logits ``scale * <normalize(w_c), normalize(f)>`` (NormFace); no bias.

    A cosine head keeps the embedding's geometry the one retrieval uses, and its
    rows are directly comparable with class prototypes of normalised features.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.scale = scale

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(feats, dim=1) @ F.normalize(self.weight, dim=1).t()


class EmbeddingClassifier(nn.Module):
    """Backbone + classifier in one module (so DDP syncs both): images -> (features, logits)."""

    def __init__(self, model: EmbeddingModel, classifier: CosineClassifier):
        super().__init__()
        self.model = model
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model(images)
        return feats, self.classifier(feats)
