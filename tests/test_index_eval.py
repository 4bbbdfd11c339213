"""Evaluation through a faiss index: flat equals exact evaluation, ivf at nprobe = nlist equals flat, hnsw recall,
seeded query samples, config errors naming the key, non-finite features refused, the report section."""

from __future__ import annotations

import numpy as np
import pytest

from raycompat.configio import from_dict
from raycompat.errors import ConfigError, DataError
from raycompat.pipeline.config import EvalConfig, PipelineConfig
from raycompat.pipeline.eval_report import index_eval_lines
from raycompat.retrieval import evaluate
from raycompat.retrieval.index_eval import IndexConfig, index_evaluate, sample_queries


def clustered(rng, n, d=16, classes=5, noise=0.8):
    centres = rng.standard_normal((classes, d))
    labels = rng.integers(0, classes, n)
    return centres[labels] + noise * rng.standard_normal((n, d)), labels


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    x, labels = clustered(rng, 300, noise=1.5)
    return {"x": x, "y": x + 0.3 * rng.standard_normal(x.shape), "labels": labels, "ids": np.arange(300)}


def loo(d, cfg, **kw):
    return index_evaluate({"x": d["x"], "y": d["y"]}, d["labels"], d["x"], d["labels"], cfg,
                          query_ids=d["ids"], gallery_ids=d["ids"], chunk_size=64, resamples=200, **kw)


@pytest.mark.parametrize("ties", [False, True])
def test_flat_equals_exact_evaluation(data, ties):
    d = dict(data)
    if ties:  # +-1 vectors and duplicates: exact ties, broken by gallery position as in evaluate
        rng = np.random.default_rng(4)
        d["x"] = rng.choice([-1.0, 1.0], size=(300, 16))
        d["x"][10:20] = d["x"][0]
        d["y"] = d["x"][::-1].copy()
    full = loo(d, IndexConfig(kind="flat", k=300))
    for name in ("x", "y"):
        exact = evaluate(d[name], d["labels"], d["x"], d["labels"], query_ids=d["ids"], gallery_ids=d["ids"])
        r = full["results"][name]
        assert (r["top1"], r["top5"]) == (exact["top1"], exact["top5"])
        assert (r["n_queries"], r["n_skipped"]) == (exact["n_queries"], exact["n_skipped"])
        assert r["mAP"] == exact["mAP"]
        # k >= every query's relevant count: AP@k is the full AP.
        assert r["mAP@k"] == pytest.approx(exact["mAP"], rel=1e-12)
        assert r["recall@k"] == 100.0
        low, high = r["intervals"]["top1"]
        assert low <= r["top1"] <= high
    short = loo(d, IndexConfig(kind="flat", k=10))["results"]["x"]
    assert short["top1"] == full["results"]["x"]["top1"] and short["mAP@k"] != full["results"]["x"]["mAP@k"]


def test_ivf_with_every_list_probed_equals_flat(data):
    flat = loo(data, IndexConfig(kind="flat", k=20))
    ivf = loo(data, IndexConfig(kind="ivf", k=20, nlist=8, nprobe=8))
    assert ivf["index"]["build_seconds"] > 0
    for name in ("x", "y"):
        f, i = flat["results"][name], ivf["results"][name]
        for m in ("top1", "top5", "mAP@k", "n_queries"):
            assert i[m] == pytest.approx(f[m], rel=1e-9), m
        assert i["recall@k"] == 100.0
    whole = loo(data, IndexConfig(kind="ivf", k=300, nlist=8, nprobe=8))  # k = gallery size: own item left out
    assert whole["results"]["x"]["mAP@k"] == pytest.approx(loo(data, IndexConfig(kind="flat", k=300))["results"]["x"]["mAP"])
    few = loo(data, IndexConfig(kind="ivf", k=20, nlist=8, nprobe=1))
    assert few["results"]["x"]["recall@k"] < 100.0
    # The exact ids of a flat run stand in for the exact search: the same recall.
    exact_ids = loo(data, IndexConfig(kind="flat", k=20), return_ids=True)["ids"]
    again = loo(data, IndexConfig(kind="ivf", k=20, nlist=8, nprobe=1), reference=exact_ids)
    assert again["results"]["x"]["recall@k"] == few["results"]["x"]["recall@k"]
    assert again["results"]["x"]["exact_seconds"] == 0.0


def test_hnsw_and_ivf_pq_recall_on_easy_data():
    rng = np.random.default_rng(5)
    x, labels = clustered(rng, 2000, d=16, classes=20, noise=0.5)
    hnsw = index_evaluate({"x": x}, labels, x, labels, IndexConfig(kind="hnsw", k=10), resamples=100)
    assert hnsw["results"]["x"]["recall@k"] > 95.0
    pq = index_evaluate({"x": x}, labels, x, labels, IndexConfig(kind="ivf_pq", k=10, nlist=16, nprobe=16, pq_m=8,
                                                                 pq_nbits=4), resamples=100)
    assert 20.0 < pq["results"]["x"]["recall@k"] <= 100.0


def test_sampled_queries_are_deterministic_by_seed(data):
    a = sample_queries(300, 50, seed=1)
    assert len(a) == 50 == len(np.unique(a)) and np.all(np.diff(a) > 0)
    assert np.array_equal(a, sample_queries(300, 50, seed=1)) and not np.array_equal(a, sample_queries(300, 50, seed=2))
    assert np.array_equal(sample_queries(300, 0, seed=1), np.arange(300))
    assert np.array_equal(sample_queries(300, 999, seed=1), np.arange(300))
    cfg = IndexConfig(kind="flat", k=10)
    def metrics(seed):
        out = loo(data, cfg, sample=50, seed=seed)
        assert out["n_sampled"] == 50
        return {name: {m: v for m, v in r.items() if not m.endswith("seconds")} for name, r in out["results"].items()}

    assert metrics(1) == metrics(1) != metrics(2)


def test_config_errors_name_the_key(data):
    with pytest.raises(ConfigError, match="eval.index.kind"):
        from_dict(PipelineConfig, {"eval": {"index": {"kind": "lsh"}}})
    with pytest.raises(ConfigError, match=r"eval.index.nprobe: must be <= nlist \(8\), got 16"):
        from_dict(PipelineConfig, {"eval": {"index": {"kind": "ivf", "nlist": 8, "nprobe": 16}}})
    with pytest.raises(ConfigError, match="eval.queries: must be >= 0"):
        from_dict(PipelineConfig, {"eval": {"queries": -1}})
    with pytest.raises(ConfigError, match="eval.index.k: must be >= 5"):
        from_dict(PipelineConfig, {"eval": {"index": {"k": 4}}})
    with pytest.raises(ConfigError, match=r"eval.index.nlist: must be <= the gallery size \(300\)"):
        loo(data, IndexConfig(kind="ivf", nlist=400, nprobe=1))
    with pytest.raises(ConfigError, match="eval.index.pq_m: must divide the feature dimension"):
        loo(data, IndexConfig(kind="ivf_pq", nlist=4, nprobe=1, pq_m=5))
    # Defaults: exact, all queries, nothing added to today's report.
    assert not EvalConfig().at_scale and EvalConfig(queries=10).at_scale


def test_non_finite_features_are_refused(data):
    bad = data["x"].copy()
    bad[7, 3] = np.nan
    with pytest.raises(DataError, match="gallery features: row 7 has NaN"):
        index_evaluate({"x": data["x"]}, data["labels"], bad, data["labels"], IndexConfig(kind="hnsw"))
    bad[7, 3] = np.inf
    with pytest.raises(DataError, match="query features 'x': row 7 has NaN or inf"):
        index_evaluate({"x": bad}, data["labels"], data["x"], data["labels"], IndexConfig())


def test_report_section(data):
    out = loo(data, IndexConfig(kind="ivf", k=10, nlist=4, nprobe=2), sample=40)
    out["results"] = {"old/old": out["results"]["x"], "new/old": out["results"]["y"]}
    text = "\n".join(index_eval_lines(out))
    assert "## Through the served index: ivf (nlist 4, nprobe 2)" in text
    assert "40 sampled queries" in text and "| query/gallery | top-1 | top-5 | mAP@10 | recall@10 |" in text
    assert text.count("| old/old |") == 1 and text.count("| new/old |") == 1
