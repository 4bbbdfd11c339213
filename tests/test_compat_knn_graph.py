"""kNN graph and transition matrix vs a brute-force numpy kNN."""

import logging

import numpy as np
import pytest
import torch

from raycompat.compat.knn_graph import knn_search, knn_transition_matrix, transition_matrix
from raycompat.errors import ConfigError, DataError


def brute_force_knn(x, k, labels=None):
    """Per row: {neighbour: cosine} of the k most similar other rows (same class only if labels)."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    if labels is not None:
        s[labels[:, None] != labels[None, :]] = -np.inf
    out = []
    for row in s:
        order = np.argsort(-row)[:k]
        out.append({int(j): float(row[j]) for j in order if np.isfinite(row[j])})
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    # Class sizes 60, 40, 8 (<= k), 1 (singleton), 41: exercises full, short and empty rows.
    labels = np.concatenate([np.full(60, 0), np.full(40, 1), np.full(8, 2), np.full(1, 3), np.full(41, 4)])
    rng.shuffle(labels)
    x = rng.standard_normal((labels.size, 12)).astype(np.float32) + 0.5 * labels[:, None]
    return x, labels


@pytest.mark.parametrize("graph", ["global", "intra_class"])
def test_neighbours_match_brute_force(data, graph):
    x, labels = data
    k = 10
    ids, sims = knn_search(torch.from_numpy(x), k, graph, labels if graph == "intra_class" else None)
    ref = brute_force_knn(x, k, labels if graph == "intra_class" else None)
    assert ids.shape == sims.shape == (x.shape[0], k)
    for i, expected in enumerate(ref):
        got = {int(j): float(s) for j, s in zip(ids[i], sims[i]) if j >= 0}
        assert got.keys() == expected.keys(), i
        np.testing.assert_allclose([got[j] for j in expected], list(expected.values()), atol=1e-5)
        assert i not in got
        assert np.all(np.diff(sims[i][ids[i] >= 0]) <= 1e-6)  # decreasing similarity
        if graph == "intra_class":
            assert all(labels[j] == labels[i] for j in got)


@pytest.mark.parametrize("graph", ["global", "intra_class"])
def test_transition_matrix_rows(data, graph):
    x, labels = data
    k, tau = 10, 0.1
    P = knn_transition_matrix(x, k, tau, graph, labels)
    ref = brute_force_knn(x, k, labels if graph == "intra_class" else None)
    np.testing.assert_allclose(np.asarray(P.sum(axis=1)).ravel(), 1.0, atol=1e-6)
    assert P.has_sorted_indices
    counts = np.diff(P.indptr)
    sizes = np.bincount(labels)[labels]
    expected_counts = np.full(x.shape[0], k) if graph == "global" else np.maximum(np.minimum(k, sizes - 1), 1)
    np.testing.assert_array_equal(counts, expected_counts)
    for i, nbrs in enumerate(ref):
        row = P.getrow(i)
        if not nbrs:  # the singleton class: a self-loop
            assert row.indices.tolist() == [i] and row.data.tolist() == [1.0]
            continue
        w = {j: np.exp(s / tau) for j, s in nbrs.items()}
        total = sum(w.values())
        got = dict(zip(row.indices.tolist(), row.data.tolist()))
        assert got.keys() == w.keys()
        np.testing.assert_allclose([got[j] for j in w], [v / total for v in w.values()], rtol=1e-5)


def test_small_tau_does_not_overflow(data):
    x, _ = data
    P = knn_transition_matrix(x, 5, 1e-4, "global")
    assert np.all(np.isfinite(P.data))
    np.testing.assert_allclose(np.asarray(P.sum(axis=1)).ravel(), 1.0, atol=1e-6)


def test_duplicates_never_give_self_edges():
    x = np.repeat(np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32), 4, axis=0)
    for graph, labels in (("global", None), ("intra_class", np.repeat(np.arange(5), 4))):
        ids, _ = knn_search(x, 3, graph, labels)
        assert np.all(ids >= 0)
        assert not np.any(ids == np.arange(20)[:, None])
        # Each point's 3 nearest others are its 3 exact copies.
        np.testing.assert_array_equal(ids // 4, np.repeat(np.arange(5), 4)[:, None].repeat(3, axis=1))


def test_transition_matrix_self_loop_for_edgeless_rows():
    ids = np.array([[1, -1], [-1, -1], [0, 1]])
    sims = np.array([[0.5, -np.inf], [-np.inf, -np.inf], [0.2, 0.4]], dtype=np.float32)
    P = transition_matrix(ids, sims, 0.5).toarray()
    b = np.exp(0.4 / 0.5) / (np.exp(0.2 / 0.5) + np.exp(0.4 / 0.5))
    np.testing.assert_allclose(P, [[0, 1, 0], [0, 1, 0], [1 - b, b, 0]], rtol=1e-6)


def test_approximate_index_has_high_recall(caplog):
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((20, 16))
    x = (centers[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 16))).astype(np.float32)
    exact, _ = knn_search(x, 10, "global")
    with caplog.at_level(logging.INFO, logger="raycompat.compat.knn_graph"):
        approx, _ = knn_search(x, 10, "global", approximate=True, nlist=32, nprobe=8, chunk_size=500)
    assert "IVF index: nlist 32, nprobe 8" in caplog.text
    assert not np.any(approx == np.arange(3000)[:, None])
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall > 0.9


def test_chunked_global_search_equals_unchunked(data):
    x, _ = data
    a = knn_search(x, 7, "global", chunk_size=13)
    b = knn_search(x, 7, "global")
    np.testing.assert_array_equal(a[0], b[0])


def test_errors(data):
    x, labels = data
    with pytest.raises(ConfigError, match="k must be positive"):
        knn_search(x, 0)
    with pytest.raises(ConfigError, match="needs labels"):
        knn_search(x, 5, "intra_class")
    with pytest.raises(ConfigError, match="'global' only"):
        knn_search(x, 5, "intra_class", labels, approximate=True)
    with pytest.raises(ConfigError, match="graph must be"):
        knn_search(x, 5, "local")
    with pytest.raises(ConfigError, match="tau must be positive"):
        knn_transition_matrix(x, 5, 0.0)
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(DataError, match="row 7 is not finite"):
        knn_search(bad, 5)
    with pytest.raises(DataError, match="label -2 at row 1"):
        knn_search(x, 5, "intra_class", np.r_[0, -2, labels[2:]])
