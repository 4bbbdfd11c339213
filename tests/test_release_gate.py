"""The paired bootstrap over queries, the release gate built on it, and the validation split (no Ray)."""

import io

import numpy as np
import pytest

from raycompat.retrieval import release_gate as rg
from raycompat.configio import validate_tree
from raycompat.data.config import DataConfig
from raycompat.data.datasets import Dataset, ImageSet, load_digits
from raycompat.data.protocols import validation_split
from raycompat.errors import ConfigError, DataError
from raycompat.retrieval import bootstrap
from raycompat.retrieval.bootstrap import paired_bootstrap
from raycompat.retrieval.metrics import QueryOutcomes


def slow_paired_bootstrap(a, b, resamples, confidence, seed):
    """Reference: one resample at a time, one query at a time, quantiles by hand (linear interpolation)."""
    rng = np.random.default_rng(seed)
    n = len(a)
    means = []
    for _ in range(resamples):
        total = 0.0
        for _ in range(n):
            i = min(int(rng.random() * n), n - 1)
            total += float(a[i]) - float(b[i])
        means.append(total / n)
    means.sort()

    def quantile(q):
        pos = q * (resamples - 1)
        lo = int(pos)
        hi = min(lo + 1, resamples - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    tail = (1 - confidence) / 2
    return sum(float(x) - float(y) for x, y in zip(a, b)) / n, quantile(tail), quantile(1 - tail)


@pytest.mark.parametrize("n, resamples, confidence, seed", [(37, 200, 0.95, 0), (5, 51, 0.9, 3), (1, 10, 0.95, 1)])
def test_bootstrap_matches_the_slow_reference(n, resamples, confidence, seed):
    rng = np.random.default_rng(n)
    a, b = rng.random(n), (rng.random(n) > 0.5).astype(float)
    got = paired_bootstrap(a, b, resamples=resamples, confidence=confidence, seed=seed)
    diff, low, high = slow_paired_bootstrap(a, b, resamples, confidence, seed)
    assert got.diff == pytest.approx(diff, abs=1e-12)
    assert got.low == pytest.approx(low, abs=1e-12) and got.high == pytest.approx(high, abs=1e-12)
    assert (got.n, got.resamples, got.confidence) == (n, resamples, confidence)


def test_bootstrap_does_not_depend_on_the_block_size(monkeypatch):
    a, b = np.arange(50.0) % 3, np.arange(50.0) % 2
    whole = paired_bootstrap(a, b, resamples=300, seed=7)
    monkeypatch.setattr(bootstrap, "_BLOCK_DRAWS", 50 * 7)  # 7 resamples per block, the last block partial
    assert paired_bootstrap(a, b, resamples=300, seed=7) == whole


def test_bootstrap_known_answers():
    # Every query gains exactly 1 (top-1 hit under new, miss under old): every resample's mean is 1.
    gain = paired_bootstrap(np.ones(40), np.zeros(40), resamples=100, scale=100.0)
    assert (gain.diff, gain.low, gain.high) == (100.0, 100.0, 100.0)
    same = paired_bootstrap(np.linspace(0, 1, 30), np.linspace(0, 1, 30), resamples=100)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    # Independent +1/-1 per-query differences: the mean's sd is ~ 1/sqrt(n), the 95% half-width ~ 1.96/sqrt(n).
    n = 4000
    d = np.where(np.random.default_rng(0).random(n) < 0.5, 1.0, -1.0)
    iv = paired_bootstrap(d, np.zeros(n), resamples=2000, seed=1)
    sd = d.std() / np.sqrt(n)
    assert iv.high - iv.low == pytest.approx(2 * 1.96 * sd, rel=0.08)
    assert iv.low < iv.diff < iv.high and (iv.low + iv.high) / 2 == pytest.approx(iv.diff, abs=0.3 * sd)


def test_bootstrap_is_paired():
    # a and b vary a lot across queries but always by the same +0.01: pairing gives a tight interval above 0.
    base = np.random.default_rng(2).random(200)
    iv = paired_bootstrap(base + 0.01, base, resamples=200)
    assert iv.low == pytest.approx(0.01) and iv.high == pytest.approx(0.01)


def test_bootstrap_bad_inputs():
    with pytest.raises(DataError, match="equal-length"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(DataError, match="resamples must be positive"):
        paired_bootstrap(np.ones(3), np.ones(3), resamples=0)


def outcomes(hit1, ap, evaluated=None):
    hit1 = np.asarray(hit1, bool)
    ev = np.ones(len(hit1), bool) if evaluated is None else np.asarray(evaluated, bool)
    return QueryOutcomes(hit1=hit1, hit5=hit1.copy(), ap=np.asarray(ap, float), evaluated=ev)


def split(gain_top1, gain_ap, n=400, seed=0):
    """old/old and new/old outcomes of n queries; new/old gains the given top-1 share and AP."""
    rng = np.random.default_rng(seed)
    old_hit = rng.random(n) < 0.6
    old_ap = rng.random(n) * 0.8
    new_hit = old_hit | (rng.random(n) < gain_top1)
    return {"old/old": outcomes(old_hit, old_ap), "new/old": outcomes(new_hit, old_ap + gain_ap)}


def test_gate_says_yes_only_when_both_metrics_beat_old_old_on_both_splits():
    better = split(0.3, 0.1)
    yes = rg.release_gate(better, split(0.3, 0.1, seed=1), resamples=200, seed=0)
    assert yes["deploy_without_backfill"]
    for s in ("validation", "test"):
        for m in ("top1", "mAP"):
            assert yes[s][m]["low"] > 0 and yes[s][m]["passed"]
    assert yes["validation"]["mAP"]["diff"] == pytest.approx(10.0)
    # Better on test, but mAP is no better on validation: no.
    val_no_map = split(0.3, 0.0)
    no = rg.release_gate(val_no_map, better, resamples=200, seed=0)
    assert not no["deploy_without_backfill"] and no["test"]["passed"]
    assert no["validation"]["top1"]["passed"] and not no["validation"]["mAP"]["passed"]
    # A gain too small for its interval to clear 0 is not enough either.
    noisy = split(0.0, 0.0, n=30)
    noisy["new/old"] = outcomes(noisy["new/old"].hit1, noisy["new/old"].ap + np.random.default_rng(3).normal(0.01, 0.3, 30))
    weak = rg.split_gate(noisy, resamples=500, seed=0)
    assert weak["mAP"]["diff"] > 0 and weak["mAP"]["low"] < 0 and not weak["mAP"]["passed"]
    # Without a validation split the gate cannot pass.
    assert not rg.release_gate(None, better, resamples=100, seed=0)["deploy_without_backfill"]


def test_gate_counts_only_evaluated_queries_and_needs_the_same_ones():
    ev = [True, True, False, True]
    gate = rg.split_gate({"old/old": outcomes([0, 0, 1, 0], [0, 0, 1, 0], ev),
                          "new/old": outcomes([1, 1, 0, 1], [1, 1, 0, 1], ev)}, resamples=50, seed=0)
    assert gate["n_queries"] == 3 and gate["top1"]["diff"] == 100.0 and gate["top1"]["old/old"] == 0.0
    with pytest.raises(DataError, match="same queries"):
        rg.split_gate({"old/old": outcomes([0, 1], [0, 1]), "new/old": outcomes([0, 1], [0, 1], [True, False])}, 10, 0)


STRATEGIES = [
    {"name": "nifcl compatible model", "kind": "compatible", "dollars": 0.0, "seconds": 0.0, "items_reembedded": 0,
     "final": {"top1": 90.0, "mAP": 90.0}},
    {"name": "full backfill (nifcl)", "kind": "full_backfill", "dollars": 2.0, "seconds": 100.0,
     "items_reembedded": 1000, "final": {"top1": 85.0, "mAP": 70.0}},
    {"name": "partial backfill 25% (nifcl, random)", "kind": "partial_backfill", "dollars": 0.5, "seconds": 25.0,
     "items_reembedded": 250, "final": {"top1": 79.0, "mAP": 55.0}},
    {"name": "partial backfill 50% (nifcl, random)", "kind": "partial_backfill", "dollars": 1.0, "seconds": 50.0,
     "items_reembedded": 500, "final": {"top1": 81.0, "mAP": 62.0}},
]


def test_cheapest_backfill_reaching_old_old():
    best = rg.cheapest_backfill(STRATEGIES, {"top1": 80.0, "mAP": 60.0})
    assert best["name"] == "partial backfill 50% (nifcl, random)" and best["dollars"] == 1.0
    assert rg.cheapest_backfill(STRATEGIES, {"top1": 80.0, "mAP": 75.0}) is None


def test_gate_report_lines_yes_and_no():
    yes = rg.release_gate(split(0.3, 0.1), split(0.3, 0.1, seed=1), resamples=100, seed=0)
    text = "\n".join(rg.gate_lines(yes))
    assert "deploy without backfill: **yes**" in text and "Instead" not in text
    assert text.count("| validation |") == 2 and text.count("| test |") == 2
    assert rg.gate_verdict(yes).splitlines()[0] == "deploy without backfill: yes"
    no = rg.release_gate(split(0.0, 0.0), split(0.3, 0.1), resamples=100, seed=0)
    assert "deploy without backfill: **no**" in "\n".join(rg.gate_lines(no))
    assert "no backfill report in this run" in "\n".join(rg.gate_lines(no))
    no["instead"] = rg.cheapest_backfill(STRATEGIES, {"top1": 80.0, "mAP": 60.0})
    assert "Instead: **partial backfill 50% (nifcl, random)**" in "\n".join(rg.gate_lines(no))
    verdict = rg.gate_verdict(no)
    assert verdict.startswith("deploy without backfill: no") and "partial backfill 50%" in verdict
    none = rg.release_gate(None, split(0.3, 0.1), resamples=100, seed=0)
    assert "no validation split (data.validation: 0)" in "\n".join(rg.gate_lines(none))


def test_outcomes_round_trip():
    saved = split(0.2, 0.1)
    buf = io.BytesIO()
    rg.save_outcomes(buf, saved)
    back = rg.load_outcomes(buf.getvalue())
    assert set(back) == {"old/old", "new/old"}
    for pair in saved:
        for f in ("hit1", "hit5", "ap", "evaluated"):
            assert np.array_equal(getattr(back[pair], f), getattr(saved[pair], f))


def test_validation_split_is_stratified_seeded_and_disjoint():
    ds = load_digits()
    rest, val = validation_split(ds, DataConfig(validation=0.2, validation_seed=3))
    assert len(rest.train) + len(val) == len(ds.train) and not set(rest.train.ids) & set(val.ids)
    assert rest.test is ds.test
    for c in range(10):
        n = int((ds.train.labels == c).sum())
        assert int((val.labels == c).sum()) == round(0.2 * n)
    again = validation_split(ds, DataConfig(validation=0.2, validation_seed=3))[1]
    other = validation_split(ds, DataConfig(validation=0.2, validation_seed=4))[1]
    assert list(again.ids) == list(val.ids) and list(other.ids) != list(val.ids)
    assert list(val.ids) == sorted(val.ids)  # original order
    _, none = validation_split(ds, DataConfig(validation=0.0))
    assert len(none) == 0


def test_validation_split_keeps_one_training_item_per_class():
    images = np.zeros((3, 1, 2, 2), np.uint8)
    ds = Dataset("t", ImageSet(images, np.array([0, 1, 1]), np.array(["a", "b", "c"], dtype=object)),
                 ImageSet(images, np.array([0, 1, 1]), np.array(["x", "y", "z"], dtype=object)), ["0", "1"])
    rest, val = validation_split(ds, DataConfig(validation=0.9))
    assert sorted(rest.train.labels.tolist()) == [0, 1] and val.labels.tolist() == [1]


def test_config_validation_fraction_range():
    with pytest.raises(ConfigError, match="data.validation: must be in"):
        validate_tree(DataConfig(validation=1.0), "data")
