"""Sparse random walk vs the dense closed form (1 - alpha)(I - alpha P)^-1 F0."""

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from raycompat.compat.knn_graph import knn_transition_matrix
from raycompat.compat.random_walk import dense_random_walk, propagate_labels, random_walk, refine
from raycompat.compat.config import RandomWalkConfig
from raycompat.errors import ConfigError, DataError


def brute_force_transition(z, k, tau, labels=None):
    """Dense P from a numpy kNN on normalised z: the reference, independent of faiss."""
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    if labels is not None:
        s[labels[:, None] != labels[None, :]] = -np.inf
    P = np.zeros_like(s, dtype=np.float64)
    for i, row in enumerate(s):
        nbrs = [j for j in np.argsort(-row)[:k] if np.isfinite(row[j])]
        if not nbrs:
            P[i, i] = 1.0
            continue
        w = np.exp(row[nbrs].astype(np.float64) / tau)
        P[i, nbrs] = w / w.sum()
    return P


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    num_classes = 6
    labels = np.concatenate([rng.integers(0, 5, 297), [5, 2, 1]])  # class 5 is a singleton
    rng.shuffle(labels)
    centers = rng.standard_normal((num_classes, 16))
    x = (centers[labels] + 0.8 * rng.standard_normal((labels.size, 16))).astype(np.float32)
    return x, labels, num_classes


def _normalised(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("graph", ["intra_class", "global"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.97])
def test_sparse_walk_matches_dense_closed_form(data, graph, alpha):
    x, labels, _ = data
    z = _normalised(x)
    P = knn_transition_matrix(z, 10, 0.05, graph, labels)
    walk = random_walk(P, torch.from_numpy(z), alpha, iterations=1500, tol=1e-6)
    dense = dense_random_walk(P.toarray(), z, alpha)
    err = np.abs(walk.values.numpy() - dense).max()
    assert err < 1e-4
    assert walk.error_bound <= 1e-6 or walk.iterations == 1500
    if alpha == 0.0:
        assert walk.iterations == 1 and err == 0.0


def test_error_bound_holds_when_capped(data, caplog):
    x, labels, _ = data
    z = _normalised(x)
    P = knn_transition_matrix(z, 10, 0.05, "global")
    with caplog.at_level(logging.WARNING, logger="raycompat.compat.random_walk"):
        walk = random_walk(P, z, 0.9, iterations=5, tol=1e-6)
    assert walk.iterations == 5 and walk.error_bound > 1e-6
    assert "iteration cap 5" in caplog.text
    err = np.abs(walk.values.numpy() - dense_random_walk(P.toarray(), z, 0.9)).max()
    assert 1e-4 < err <= walk.error_bound * (1 + 1e-4)


@pytest.mark.parametrize("graph", ["intra_class", "global"])
def test_refine_matches_dense_pipeline(data, graph):
    x, labels, C = data
    cfg = RandomWalkConfig(enabled=True, k=8, tau=0.1, alpha=0.8, iterations=1000, graph=graph)
    out = refine(torch.from_numpy(x), torch.from_numpy(labels), C, cfg, tol=1e-6, soft_label_top_k=C,
                 block_size=4)
    z = _normalised(x)
    P = brute_force_transition(z, cfg.k, cfg.tau, labels if graph == "intra_class" else None)
    feats = dense_random_walk(P, z, cfg.alpha)
    np.testing.assert_allclose(out.features.numpy(), feats, atol=1e-4)
    protos = np.stack([feats[labels == c].mean(0) for c in range(C)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_allclose(out.prototypes.numpy(), protos, atol=1e-4)
    soft = dense_random_walk(P, np.eye(C)[labels], cfg.alpha)
    np.testing.assert_allclose(out.soft_targets(torch.arange(len(labels))).numpy(), soft, atol=1e-4)
    # The singleton class has no neighbour: its item keeps its own feature and label.
    single = int(np.flatnonzero(labels == 5)[0])
    if graph == "intra_class":
        np.testing.assert_allclose(out.features[single].numpy(), z[single], atol=1e-6)
        assert out.soft_label_values.shape[1] == 1
    else:
        assert np.abs(soft - np.eye(C)[labels]).max() > 0.1  # the global walk does move labels


def test_soft_labels_top_k_keeps_largest_and_renormalises(data):
    x, labels, C = data
    cfg = RandomWalkConfig(enabled=True, k=8, tau=0.1, alpha=0.9, iterations=1000, graph="global")
    P = knn_transition_matrix(x, cfg.k, cfg.tau, "global")
    full = dense_random_walk(P.toarray(), np.eye(C)[labels], cfg.alpha)
    idx, vals, _, _ = propagate_labels(P, torch.from_numpy(labels), C, cfg.alpha, cfg.iterations, 1e-6,
                                       top_k=2, block_size=4)
    top = np.sort(full, axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(vals.numpy(), top / top.sum(1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(full, idx.numpy(), 1), top, atol=1e-4)


def test_refine_without_soft_labels(data):
    x, labels, C = data
    out = refine(x, labels, C, RandomWalkConfig(enabled=True, graph="global"), soft_labels=False)
    assert out.soft_label_indices is None
    with pytest.raises(ConfigError, match="soft labels were not computed"):
        out.soft_targets(torch.arange(3))
    torch.testing.assert_close(out.prototypes.norm(dim=1), torch.ones(C))


def test_refine_errors(data):
    x, labels, C = data
    cfg = RandomWalkConfig(enabled=True)
    bad = x.copy()
    bad[11, 0] = np.inf
    with pytest.raises(DataError, match="row 11 is not finite"):
        refine(bad, labels, C, cfg)
    with pytest.raises(DataError, match="class 6 has no samples"):
        refine(x, labels, C + 1, cfg)
    with pytest.raises(DataError, match="outside 0..4"):
        refine(x, labels, C - 1, cfg)
    with pytest.raises(ConfigError, match="alpha must be in"):
        refine(x, labels, C, RandomWalkConfig(enabled=True, alpha=1.0))
    with pytest.raises(ConfigError, match="does not match"):
        random_walk(sp.identity(3, format="csr", dtype=np.float32), np.zeros((4, 2)), 0.5, 10)
    with pytest.raises(ConfigError, match="iterations must be positive"):
        random_walk(sp.identity(3, format="csr", dtype=np.float32), np.zeros((3, 2)), 0.5, 0)


def test_unsorted_input_order_is_restored(data):
    """refine sorts by class internally; outputs must come back in the caller's order."""
    x, labels, C = data
    cfg = RandomWalkConfig(enabled=True, k=8, alpha=0.5, iterations=200, graph="global")
    perm = np.random.default_rng(5).permutation(len(labels))
    a = refine(x, labels, C, cfg, tol=1e-7)
    b = refine(x[perm], labels[perm], C, cfg, tol=1e-7)
    torch.testing.assert_close(b.features, a.features[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.soft_targets(torch.arange(len(perm))),
                               a.soft_targets(torch.from_numpy(perm)), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.prototypes, b.prototypes, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.prototypes, F.normalize(a.prototypes, dim=1))
