"""The FCT side-information autoencoder: interface, errors, training, TorchScript export."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from raycompat.errors import ConfigError, DataError
from raycompat.models.config import SideInfoConfig
from raycompat.models.side_info import SideInfoModel, build_side_info_model, train_side_info

FASHION_IMAGES = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


pytestmark = pytest.mark.usefixtures("one_thread")


def fashion_images(n: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST training images as uint8 (n, 1, 28, 28), read from the IDX gzip."""
    if not FASHION_IMAGES.is_file():
        pytest.skip(f"{FASHION_IMAGES} absent (Debian package dataset-fashion-mnist)")
    with gzip.open(FASHION_IMAGES) as f:
        header = np.frombuffer(f.read(16), dtype=">u4")
        assert header[0] == 2051 and header[2] == header[3] == 28
        pixels = np.frombuffer(f.read(n * 28 * 28), dtype=np.uint8)
    return torch.from_numpy(pixels.reshape(n, 1, 28, 28).copy())


@pytest.mark.parametrize("channels,size", [(1, 28), (1, 8), (3, 32)])
def test_features_are_the_encoder_code_of_each_image(channels, size):
    """forward = encoder(2 * pixels / 255 - 1), row by row (no batch coupling); the loss is the decoder's pixel MSE."""
    model = SideInfoModel(channels, size, dim=16, width=4).eval()
    images = torch.randint(0, 256, (5, channels, size, size), dtype=torch.uint8)
    feats = model(images)
    assert feats.shape == (5, 16) and feats.dtype == torch.float32
    with torch.no_grad():
        pixels = images.float() / 255.0
        torch.testing.assert_close(feats, model.encoder(pixels * 2 - 1))
        torch.testing.assert_close(model(images[2:3]), feats[2:3])
        assert not torch.allclose(feats[0], feats[1])
        expected = torch.nn.functional.mse_loss(model.decoder(model.encoder(pixels * 2 - 1)), pixels)
        torch.testing.assert_close(model.reconstruction_loss(images), expected)


def test_input_errors():
    model = SideInfoModel(1, 28, dim=16, width=4)
    with pytest.raises(DataError, match="uint8"):
        model(torch.zeros(2, 1, 28, 28))
    with pytest.raises(DataError, match=r"\(N, 1, 28, 28\), got \[2, 3, 28, 28\]"):
        model(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="dim"):
        SideInfoModel(1, 28, dim=0)
    with pytest.raises(ConfigError, match="epochs"):
        train_side_info(model, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), 0, 2, 1e-3, 0)
    with pytest.raises(DataError, match="empty"):
        train_side_info(model, torch.zeros(0, 1, 28, 28, dtype=torch.uint8), 1, 2, 1e-3, 0)


def test_trains_on_fashion_mnist():
    images = fashion_images(512)
    model = build_side_info_model(SideInfoConfig(dim=16, width=8), 1, 28, seed=0)
    losses = train_side_info(model, images, epochs=5, batch_size=32, lr=3e-3, seed=0)
    assert len(losses) == 5
    assert losses[-1] < 0.5 * losses[0]
    # Better than the best constant image (the per-pixel mean): the code carries per-image information.
    x = images.float() / 255
    assert model.reconstruction_loss(images).item() < 0.6 * (x - x.mean(0)).pow(2).mean().item()
    assert not model.training


def test_build_is_deterministic():
    cfg = SideInfoConfig(dim=16, width=4)
    a, b = build_side_info_model(cfg, 1, 8, seed=3), build_side_info_model(cfg, 1, 8, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_side_info_model(cfg, 1, 8, seed=4)
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_export(tmp_path):
    model = SideInfoModel(1, 28, dim=16, width=4).eval()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    expected = model(images)
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, tmp_path / "psi.pt")
    loaded = torch.jit.load(tmp_path / "psi.pt")
    torch.testing.assert_close(loaded(images), expected)
    with pytest.raises(Exception, match="expects uint8"):
        loaded(images.float())
    # Traced on a batch of 2 like raycompat.models.export does, then run on another batch size.
    traced = torch.jit.trace(model, images[:2])
    torch.testing.assert_close(traced(images), expected)
