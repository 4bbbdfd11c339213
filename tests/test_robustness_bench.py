"""The robustness benchmark's pieces: the foreign black box and the validation carve."""

import numpy as np
import pytest
import torch

from raycompat.models.random_features import RandomConvFeatures
from benchmarks.robustness import carve_validation, old_geometry
from raycompat.data.datasets import ImageSet
from raycompat.models.extractor import load_extractor


def _images(n=6, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, 12, 12), dtype=np.uint8)


def test_random_conv_box_is_fixed_by_its_seed_and_not_centred():
    x = _images()
    a, b = RandomConvFeatures(seed=3)(x), RandomConvFeatures(seed=3)(x)
    assert a.shape == (6, 96) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.allclose(a, RandomConvFeatures(seed=4)(x))
    # ReLU means and maxima: every coordinate >= 0, so normalised features share one mean direction.
    assert (a >= 0).all()
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    assert np.linalg.norm(unit.mean(axis=0)) > 0.8
    # Per image: the same features alone or in a batch (no batch statistics).
    assert np.allclose(RandomConvFeatures(seed=3)(x[2:3]), a[2:3], atol=1e-6)
    assert RandomConvFeatures(dim=10, seed=0)(_images(c=3)).shape == (6, 10)
    with pytest.raises(ValueError, match="even"):
        RandomConvFeatures(dim=7)


def test_random_conv_box_loads_as_a_module_callable():
    torch.set_num_threads(1)
    box = load_extractor("raycompat.models.random_features:RandomConvFeatures")
    x = _images()
    assert np.array_equal(box(x), RandomConvFeatures()(x)) and box.dim == 96


def test_carve_validation_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), [20, 40, 60])
    split = ImageSet(np.zeros((120, 1, 2, 2), np.uint8), labels, np.array([f"i{k}" for k in range(120)]))
    train, val = carve_validation(split, 0.1, seed=0)
    assert np.bincount(val.labels).tolist() == [2, 4, 6]
    assert not set(train.ids) & set(val.ids) and len(train) + len(val) == 120
    assert np.array_equal(carve_validation(split, 0.1, seed=0)[1].ids, val.ids)
    assert not np.array_equal(carve_validation(split, 0.1, seed=1)[1].ids, val.ids)


def test_old_geometry_matches_hand_values():
    # Two classes on two axes plus a shared offset: unit features, their mean and prototypes by hand.
    feats = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], np.float32)
    g = old_geometry(feats, np.array([0, 0, 1, 1]))
    assert g["unit_mean_norm"] == pytest.approx(np.sqrt(0.5))
    assert g["spread_rms"] == pytest.approx(np.sqrt(0.5))
    assert g["prototype_cos_mean"] == pytest.approx(0.0, abs=1e-7)
    assert g["cos_mean"] == pytest.approx(1 / 3)
