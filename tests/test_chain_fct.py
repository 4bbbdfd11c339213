"""FCT in a chain, the core: composing transformations, the links they must keep, training subsets, the gap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycompat.chain.fct_composition import check_route, compose, fct_pairs, gap_closed, write_subset
from raycompat.data.feature_store import FeatureStore, FeatureStoreWriter
from raycompat.errors import DataError
from raycompat.models.config import TransformationConfig
from raycompat.models.transformation import build_transformation


def h(d_old: int, d_new: int, seed: int):
    cfg = TransformationConfig(use_side_info=False, hidden=[8], old_width=6)
    return build_transformation(cfg, d_old, 0, d_new, seed).eval()


def test_composition_applies_the_transformations_in_sequence():
    h12, h23 = h(4, 5, 0), h(5, 3, 1)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = h23(h12(x)[0])[0]
    # A batch smaller than the rows: batching does not change the result (eval mode).
    assert torch.allclose(compose([h12, h23], x, batch_size=3), expected, atol=1e-6)
    assert torch.allclose(compose([h12], x), h12(x)[0].detach(), atol=1e-6)
    with pytest.raises(DataError, match="transformation 2 reads features of dim 4, its input has dim 5"):
        compose([h12, h(4, 3, 2)], x)


def test_linear_maps_compose_to_their_product():
    # h reduced to its linear head (identity branch, no hidden layer): W1 then W2 is the single map W2 W1.
    def linear(weight):
        model = h(weight.shape[1], weight.shape[0], 0)
        model.old_branch, model.trunk = torch.nn.Identity(), torch.nn.Sequential()
        model.head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            model.head.weight.copy_(weight)
        return model.eval()

    w1, w2 = torch.randn(5, 6), torch.randn(4, 5)
    x = torch.randn(7, 6)
    assert torch.allclose(compose([linear(w1), linear(w2)], x), x @ (w2 @ w1).T, atol=1e-4)


def meta(old, new):
    return {"old": {"name": old[0], "version": old[1]}, "new": {"name": new[0], "version": new[1]}}


def test_route_must_chain_from_the_gallery_to_the_queries():
    g1, g3 = {"name": "gen1", "version": "1-a"}, {"name": "gen3", "version": "3-c"}
    composed = [meta(("gen1", "1-a"), ("gen2", "2-b")), meta(("gen2", "2-b"), ("gen3", "3-c"))]
    check_route(composed, g1, g3, "composed")
    with pytest.raises(DataError, match=r"^composed: transformation 2 maps from gen2 v2-old, but its input is gen2 v2-b$"):
        check_route([composed[0], meta(("gen2", "2-old"), ("gen3", "3-c"))], g1, g3, "composed")
    with pytest.raises(DataError, match="direct: ends at gen2 v2-b, but the queries are gen3 v3-c"):
        check_route(composed[:1], g1, g3, "direct")


def test_pairs_and_gap():
    assert fct_pairs(3) == ([(0, 1), (1, 2)], (0, 2))
    assert gap_closed(55.0, 10.0, 90.0) == pytest.approx(45 / 80)
    assert gap_closed(5.0, 10.0, 10.0) is None


def store(path, version="1", ids=("a", "b", "c", "d")):
    writer = FeatureStoreWriter(path, "gen1", version, 2)
    writer.write_part("00000", list(ids), list(range(len(ids))), np.arange(2 * len(ids), dtype=np.float32).reshape(-1, 2))
    writer.finalize()
    return str(path)


def test_training_subset_keeps_model_and_version_and_follows_its_source(tmp_path):
    source = store(tmp_path / "src")
    out = str(tmp_path / "out")
    assert write_subset(source, np.array(["c", "a"]), out)
    sub = FeatureStore.open(out, expect_model="gen1", expect_version="1")
    cols = sub.to_numpy(["id", "label", "feature"])
    assert cols["id"].tolist() == ["c", "a"] and cols["label"].tolist() == [2, 0]
    assert cols["feature"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert not write_subset(source, np.array(["c", "a"]), out), "an up-to-date subset is rewritten"
    # Other ids, or a retrained source (another version): replaced.
    assert write_subset(source, np.array(["b"]), out)
    assert FeatureStore.open(out).to_numpy(["id"])["id"].tolist() == ["b"]
    assert write_subset(store(tmp_path / "src2", version="2"), np.array(["b"]), out)
    assert FeatureStore.open(out).version == "2"
    with pytest.raises(DataError, match="lacks 1 of the 2 training ids"):
        write_subset(source, np.array(["a", "zz"]), str(tmp_path / "bad"))
