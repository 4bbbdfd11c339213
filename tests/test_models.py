
import warnings

import numpy as np
import pytest
import torch

from raycompat.models.config import ModelConfig
from raycompat.errors import DataError
from raycompat.models.backbones import CosineClassifier, EmbeddingModel
from raycompat.models.export import export_model, load_classifier, load_model_meta
from raycompat.storage.artifacts import sha256
from raycompat.models.extractor import load_extractor
from raycompat.models.http_server import serve_in_thread


@pytest.mark.parametrize("arch, shape", [("small_cnn", (1, 28, 28)), ("small_cnn", (1, 8, 8)), ("resnet18", (3, 32, 32))])
def test_backbones_embed_uint8_images(arch, shape):
    model = EmbeddingModel(ModelConfig(arch=arch, width=8, embed_dim=24), shape).eval()
    out = model(torch.randint(0, 256, (3, *shape), dtype=torch.uint8))
    assert out.shape == (3, 24) and torch.isfinite(out).all()


def test_cosine_classifier_is_scaled_cosine():
    clf = CosineClassifier(4, 3, scale=10.0)
    f = torch.randn(5, 4)
    expected = 10.0 * torch.nn.functional.cosine_similarity(f[:, None], clf.weight[None], dim=2)
    torch.testing.assert_close(clf(f), expected)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(width=8, embed_dim=16), (1, 8, 8))
    out = export_model(model, torch.randn(3, 16), [1, 4, 6], (1, 8, 8), tmp_path_factory.mktemp("m"), "old", "7")
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images)).numpy()
    return out, images, expected


def test_export_writes_black_box_and_metadata(exported):
    out, images, expected = exported
    meta = load_model_meta(out)
    assert (meta["name"], meta["version"], meta["dim"], meta["input_shape"]) == ("old", "7", 16, [1, 8, 8])
    assert meta["sha256"] == sha256(out / "extractor.pt")
    weight, classes = load_classifier(out)
    assert weight.shape == (3, 16) and classes == [1, 4, 6]


def test_torchscript_adapter_matches_model(exported):
    out, images, expected = exported
    for spec in (str(out), str(out / "extractor.pt")):
        feats = load_extractor(spec, device="cpu")(images)
        assert feats.dtype == np.float32
        np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)


def test_torchscript_adapter_takes_read_only_arrays_without_warning(exported):
    # Ray's object store hands tasks read-only arrays (the cost measurement's images).
    out, images, expected = exported
    frozen = images.copy()
    frozen.flags.writeable = False
    extractor = load_extractor(str(out), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats = extractor(frozen)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)


def test_python_callable_adapter():
    images = np.random.default_rng(1).integers(0, 256, (4, 1, 6, 6), dtype=np.uint8)
    np.testing.assert_allclose(load_extractor("fixtures.blackbox:mean_rows")(images), images[:, 0].mean(axis=2))
    assert load_extractor("fixtures.blackbox:Halves")(images).shape == (4, 2)


def test_http_adapter_against_real_local_server(exported):
    out, images, expected = exported
    server, url = serve_in_thread(load_extractor(str(out), device="cpu"))
    try:
        assert url.startswith("http://127.0.0.1:")
        np.testing.assert_allclose(load_extractor(url)(images), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(DataError, match="HTTP 400"):
            load_extractor(url)(np.zeros((2, 3, 8, 8), np.uint8))  # wrong channel count for the model
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(DataError, match="unreachable after 1 tries"):
        load_extractor(url, retries=0, timeout_s=2)(images)


@pytest.mark.parametrize("spec, fragment", [
    ("/nonexistent/extractor.pt", "extractor file not found"),
    ("no_such_module_xyz:fn", "cannot import"),
    ("plainword", "not a TorchScript file, model directory"),
])
def test_bad_extractor_specs(spec, fragment):
    with pytest.raises(DataError, match=fragment):
        load_extractor(spec)


def test_corrupt_torchscript_file(tmp_path):
    (tmp_path / "extractor.pt").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a loadable TorchScript file"):
        load_extractor(str(tmp_path / "extractor.pt"))


def test_extractor_rejects_wrong_output_shape():
    ex = load_extractor("fixtures.blackbox:mean_rows")
    with pytest.raises(DataError, match="expects uint8 images"):
        ex(np.zeros((2, 1, 4, 4), np.float32))
