"""Training h on cached synthetic features: side-info helps, sigma learns where h is unreliable."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raycompat.retrieval.backfill_order import order_by_uncertainty, order_oracle, order_random
from raycompat.errors import ConfigError, DataError
from raycompat.models.config import TransformationConfig
from raycompat.training.fct import train_transformation, transform_features
from raycompat.models.transformation import build_transformation

SMALL = {"hidden": [64], "old_width": 64, "side_width": 32, "epochs": 20, "batch_size": 128, "lr": 3e-3}


pytestmark = pytest.mark.usefixtures("one_thread")


def split_latent(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """new = tanh(C u) of an 8-d latent u; old features see only u[:4], side-info only u[4:]."""
    u = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    maps = torch.Generator().manual_seed(123)  # the same maps for train and test
    a, b, c = torch.randn(4, 16, generator=maps), torch.randn(4, 6, generator=maps), torch.randn(8, 12, generator=maps)
    return u[:, :4] @ a, u[:, 4:] @ b, torch.tanh(u @ c)


def noisy_targets(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """new = tanh(C u) plus noise on the items with u_0 > 0 (visible to h through the old features)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 6, generator=gen)
    maps = torch.Generator().manual_seed(123)
    a, c = torch.randn(6, 16, generator=maps), torch.randn(6, 12, generator=maps)
    noisy = u[:, 0] > 0
    return u @ a, torch.tanh(u @ c) + 0.5 * noisy[:, None] * torch.randn(n, 12, generator=gen), noisy


def test_side_info_beats_old_features_alone():
    old, side, new = split_latent(2048, 0)
    old_t, side_t, new_t = split_latent(1024, 1)
    target = F.normalize(new_t, dim=1)
    variance = (target - target.mean(0)).pow(2).sum(1).mean().item()
    errors = {}
    for use_side in (True, False):
        cfg = TransformationConfig(use_side_info=use_side, **SMALL)
        model = build_transformation(cfg, 16, 6, 12, seed=0)
        history = train_transformation(model, old, side if use_side else None, new, None, None, cfg, seed=0)
        assert [row["epoch"] for row in history] == list(range(1, 21))
        assert history[-1]["distance"] < 0.6 * history[0]["distance"]
        h, sigma = transform_features(model, old_t, side_t if use_side else None, batch_size=300)
        assert sigma is None
        errors[use_side] = (target - h).pow(2).sum(1).mean().item() / variance
    # Held-out error relative to predicting the mean: with side-info ~0.15, without ~0.55.
    assert errors[True] < 0.3
    assert errors[True] < 0.5 * errors[False]


def test_uncertainty_finds_the_noisy_items():
    old, new, _ = noisy_targets(2048, 0)
    old_t, new_t, noisy = noisy_targets(1024, 1)
    cfg = TransformationConfig(use_side_info=False, uncertainty=True, **SMALL)
    model = build_transformation(cfg, 16, 0, 12, seed=0)
    train_transformation(model, old, None, new, None, None, cfg, seed=0)
    h, sigma = transform_features(model, old_t)
    assert sigma.shape == (1024,)
    assert sigma[noisy].mean() > sigma[~noisy].mean() + 0.5
    # Half the gallery backfilled by sigma catches mostly noisy items; at random, about half.
    by_sigma, at_random = order_by_uncertainty(sigma)[:512], order_random(1024, seed=0)[:512]
    assert noisy[by_sigma].float().mean() > 0.8
    assert noisy[at_random].float().mean() < 0.6
    # sigma ranks items like the real error the oracle sorts by (Spearman correlation).
    oracle_rank = np.empty(1024)
    oracle_rank[order_oracle(new_t, h)] = np.arange(1024)
    sigma_rank = np.empty(1024)
    sigma_rank[order_by_uncertainty(sigma)] = np.arange(1024)
    assert np.corrcoef(oracle_rank, sigma_rank)[0, 1] > 0.5


def test_discriminative_term_trains():
    old, side, new = split_latent(512, 0)
    weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(7))
    labels = (F.normalize(new, dim=1) @ F.normalize(weight, dim=1).T).argmax(1)
    cfg = TransformationConfig(mu_disc=1.0, uncertainty=True, **(SMALL | {"epochs": 10}))
    model = build_transformation(cfg, 16, 6, 12, seed=0)
    history = train_transformation(model, old, side, new, labels, weight, cfg, seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    h, _ = transform_features(model, old, side)
    accuracy = ((F.normalize(h, dim=1) @ F.normalize(weight, dim=1).T).argmax(1) == labels).float().mean()
    assert accuracy > 0.8


def test_seeded_runs_repeat():
    old, side, new = split_latent(256, 0)
    cfg = TransformationConfig(**(SMALL | {"epochs": 2}))
    runs = []
    for _ in range(2):
        model = build_transformation(cfg, 16, 6, 12, seed=5)
        history = train_transformation(model, old, side, new, None, None, cfg, seed=5)
        runs.append((history, transform_features(model, old, side)[0]))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_transform_features_batching_and_empty():
    old, side, _ = split_latent(50, 0)
    model = build_transformation(TransformationConfig(uncertainty=True, **SMALL), 16, 6, 12, seed=0)
    h_all, s_all = transform_features(model, old, side, batch_size=4096)
    h_chunks, s_chunks = transform_features(model, old, side, batch_size=7)
    torch.testing.assert_close(h_chunks, h_all)
    torch.testing.assert_close(s_chunks, s_all)
    h, s = transform_features(model, old[:0], side[:0])
    assert h.shape == (0, 12) and s.shape == (0,)
    with pytest.raises(DataError, match="49 side-info rows for 50"):
        transform_features(model, old, side[:49])


def test_training_errors():
    old, side, new = split_latent(64, 0)
    cfg = TransformationConfig(**(SMALL | {"epochs": 1}))
    model = build_transformation(cfg, 16, 6, 12, seed=0)
    with pytest.raises(ConfigError, match="use_side_info"):
        build_transformation(cfg, 16, 0, 12, seed=0)
    with pytest.raises(DataError, match=r"new features must be \(64, 12\), got \[64, 10\]"):
        train_transformation(model, old, side, new[:, :10], None, None, cfg, seed=0)
    with pytest.raises(DataError, match="needs side-info"):
        train_transformation(model, old, None, new, None, None, cfg, seed=0)
    disc = TransformationConfig(mu_disc=1.0, **(SMALL | {"epochs": 1}))
    with pytest.raises(DataError, match="needs labels"):
        train_transformation(model, old, side, new, None, None, disc, seed=0)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 3\)"):
        train_transformation(model, old, side, new, torch.full((64,), 3), torch.randn(3, 12), disc, seed=0)
