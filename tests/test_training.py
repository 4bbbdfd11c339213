"""The training core (plain torch) and the Ray Train stage in local mode (in-process)."""

import numpy as np
import pytest
import torch
from ray.train import ScalingConfig

from fixtures.training import small_cfg, write_store
from raycompat.data.config import DataConfig
from raycompat.training.config import NewConfig
from raycompat.data.datasets import load_digits
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import DataError, FeatureStoreError
from raycompat.storage.layout import Layout
from raycompat.models.extractor import load_extractor
from raycompat.pipeline.train import run_training
from raycompat.training.compat_term import build_compat_term
from raycompat.pipeline.tune_space import ObjectiveConfig, score



def features(n=60, d=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centers = rng.normal(size=(classes, d))
    return (centers[labels] + 0.1 * rng.normal(size=(n, d))).astype(np.float32), labels


@pytest.mark.parametrize("method", ["l2", "bct", "nifcl"])
def test_compat_terms_are_finite_and_fall_when_new_matches_old(method):
    old, labels = features()
    cfg = NewConfig(method=method)
    cfg.model.embed_dim = 12
    clf = (torch.randn(2, 8), [0, 1]) if method == "bct" else None
    term = build_compat_term(cfg, old, labels, 3, torch.device("cpu"), clf)
    idx = torch.arange(20)
    y = torch.from_numpy(labels[:20])
    aligned = torch.cat([torch.from_numpy(old[:20]), torch.randn(20, 4)], dim=1)
    random = torch.randn(20, 12)
    if method == "bct":
        # The old classes' rows are random here; only the synthesised new-class row is the class mean.
        keep = y == 2
        idx, y, aligned, random = idx[keep], y[keep], aligned[keep], random[keep]
    assert term(aligned, idx, y) < term(random, idx, y)


def test_independent_has_no_term():
    old, labels = features()
    assert build_compat_term(NewConfig(method="independent"), old, labels, 3, torch.device("cpu")) is None


def test_linear_pseudo_classifier_is_fitted_with_the_configured_epochs_and_lr(monkeypatch):
    import raycompat.training.compat_term as compat_term

    seen = {}
    real = compat_term.linear_pseudo_classifier
    monkeypatch.setattr(compat_term, "linear_pseudo_classifier",
                        lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    old, labels = features()
    cfg = NewConfig(method="nifcl")
    cfg.model.embed_dim = 12
    cfg.compat.pseudo_classifier = "linear"
    build_compat_term(cfg, old, labels, 3, torch.device("cpu"))
    assert (seen["epochs"], seen["lr"]) == (20, 0.05)
    cfg.compat.linear.epochs, cfg.compat.linear.lr = 2, 0.5
    build_compat_term(cfg, old, labels, 3, torch.device("cpu"))
    assert (seen["epochs"], seen["lr"]) == (2, 0.5)


def test_nifcl_with_random_walk_soft_targets_equals_the_dense_walk_reference():
    """KL(Y* || softmax(s cos(new, W*))), with W* and Y* from the dense closed form of the walk."""
    from raycompat.compat.knn_graph import knn_transition_matrix

    old, labels = features()
    cfg = NewConfig(method="nifcl")
    cfg.model.embed_dim = 12
    cfg.compat.random_walk.enabled = True
    cfg.compat.random_walk.graph = "global"
    cfg.compat.random_walk.k = 5
    cfg.compat.soft_targets = True
    term = build_compat_term(cfg, old, labels, 3, torch.device("cpu"))
    idx = torch.arange(10)
    new = torch.randn(10, 12, generator=torch.Generator().manual_seed(3))
    got = term(new, idx, torch.from_numpy(labels[:10]))

    rw, n = cfg.compat.random_walk, len(labels)
    z = torch.nn.functional.normalize(torch.from_numpy(old).double(), dim=1)
    P = torch.from_numpy(knn_transition_matrix(z.float(), rw.k, rw.tau, "global").toarray()).double()
    inverse = (1 - rw.alpha) * torch.linalg.inv(torch.eye(n, dtype=torch.float64) - rw.alpha * P)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3).double()
    refined, soft = inverse @ z, inverse @ onehot
    protos = torch.nn.functional.normalize(torch.stack([refined[labels == c].mean(0) for c in range(3)]), dim=1)
    logits = cfg.compat.scale * torch.nn.functional.normalize(new[:, :8].double(), dim=1) @ protos.T
    target = soft[:10] / soft[:10].sum(1, keepdim=True)
    kl = (target * (target.clamp_min(1e-300).log() - logits.log_softmax(1))).sum(1).mean()
    # The term is unweighted: the training loop multiplies it by lambda.
    assert got.item() == pytest.approx(kl.item(), rel=1e-3)


def test_nifcl_alignment_adds_the_weighted_prototype_term():
    old, labels = features()
    idx = torch.arange(12)
    y = torch.from_numpy(labels[:12])
    new = torch.randn(12, 12, generator=torch.Generator().manual_seed(5))
    plain = NewConfig(method="nifcl")
    plain.model.embed_dim = 12
    aligned = NewConfig(method="nifcl")
    aligned.model.embed_dim = 12
    aligned.compat.align = 2.5
    base = build_compat_term(plain, old, labels, 3, torch.device("cpu"))(new, idx, y)
    with_align = build_compat_term(aligned, old, labels, 3, torch.device("cpu"))(new, idx, y)
    unit = torch.nn.functional.normalize(torch.from_numpy(old), dim=1)
    protos = torch.nn.functional.normalize(torch.stack([unit[labels == c].mean(0) for c in range(3)]), dim=1)
    expected = (1 - (torch.nn.functional.normalize(new[:, :8], dim=1) * protos[y]).sum(1)).mean()
    assert (with_align - base).item() == pytest.approx(2.5 * expected.item(), rel=1e-5)


def test_nifcl_neighbors_adds_the_weighted_old_neighbourhood_term():
    from raycompat.compat.losses import OldNeighborLoss

    old, labels = features()
    idx = torch.arange(10, 22)
    y = torch.from_numpy(labels[10:22])
    new = torch.randn(12, 12, generator=torch.Generator().manual_seed(6))
    plain = NewConfig(method="nifcl")
    plain.model.embed_dim = 12
    with_nb = NewConfig(method="nifcl")
    with_nb.model.embed_dim = 12
    with_nb.compat.neighbors.weight = 0.5
    with_nb.compat.neighbors.bank = 25
    base = build_compat_term(plain, old, labels, 3, torch.device("cpu"), seed=4)(new, idx, y)
    total = build_compat_term(with_nb, old, labels, 3, torch.device("cpu"), seed=4)(new, idx, y)
    expected = OldNeighborLoss(torch.from_numpy(old), torch.from_numpy(labels), 16.0, bank=25, seed=4)(new, idx, y)
    assert (total - base).item() == pytest.approx(0.5 * expected.item(), rel=1e-5)


def test_cosine_schedule_follows_the_closed_form_and_resumes():
    from raycompat.training.config import OptimConfig
    from raycompat.training.loop import make_schedule

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    assert make_schedule(optimizer(), OptimConfig(epochs=4, schedule="constant")) is None
    opt = optimizer()
    sched = make_schedule(opt, OptimConfig(epochs=4, lr=0.1, schedule="cosine"))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * (1 + np.cos(np.pi * t / 4)) / 2 for t in range(4)])
    # A resumed run (optimizer and schedule from the checkpoint) goes on where it stopped.
    opt2 = optimizer()
    sched2 = make_schedule(opt2, OptimConfig(epochs=4, lr=0.1, schedule="cosine"))
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) == opt.param_groups[0]["lr"]


def test_bad_inputs_are_clear_errors():
    old, labels = features()
    cfg = NewConfig(method="nifcl")
    bad = old.copy()
    bad[7, 2] = np.nan
    with pytest.raises(DataError, match="row 7 is not finite"):
        build_compat_term(cfg, bad, labels, 3, torch.device("cpu"))
    with pytest.raises(DataError, match="class 3"):
        build_compat_term(cfg, old, labels, 4, torch.device("cpu"))
    cfg.model.embed_dim = 4
    with pytest.raises(DataError, match="dim 8 > new model's embed_dim 4"):
        build_compat_term(cfg, old, labels, 3, torch.device("cpu"))
    with pytest.raises(DataError, match="bct needs the real old classifier"):
        build_compat_term(NewConfig(method="bct"), old, labels, 3, torch.device("cpu"))




def test_old_model_trains_and_exports(trained_old):
    cfg, result = trained_old
    assert result.epochs == 2 and result.metrics["old/old/top1"] > 40
    assert (result.model_dir / "extractor.pt").is_file()


@pytest.mark.parametrize("method, rw", [("nifcl", True), ("bct", False)])
def test_new_model_trains_compatible_in_local_mode(trained_old, method, rw):
    base, old_result = trained_old
    cfg = small_cfg(base.output_dir, method, weight=1.0)
    cfg.new.compat.random_walk.enabled = rw
    cfg.new.compat.random_walk.k = 5
    result = run_training(cfg, "new", scaling=ScalingConfig(num_workers=0))
    m = result.metrics
    assert {"new/new/mAP", "new/old/mAP", "compat", "ce"} <= set(m)
    assert m["compat"] > 0 and m["new/old/top1"] > 20
    assert FeatureStore.open(Layout.of(cfg.output_dir).store("old", "test")).row_count == len(load_digits().test)
    assert (result.model_dir / "model.json").is_file()


def test_new_training_refuses_store_of_other_version(trained_old):
    base, _ = trained_old
    cfg = small_cfg(base.output_dir, "l2")
    cfg.old.version = "2"
    with pytest.raises(FeatureStoreError, match="expected version '2'"):
        run_training(cfg, "new", scaling=ScalingConfig(num_workers=0))


def test_every_epoch_false_validates_only_after_the_last_epoch(tmp_path, monkeypatch):
    import ray.train

    reports, report = [], ray.train.report

    def recording_report(metrics, *args, **kwargs):  # records, then reports as usual
        reports.append(dict(metrics))
        return report(metrics, *args, **kwargs)

    monkeypatch.setattr(ray.train, "report", recording_report)
    cfg = small_cfg(tmp_path)
    cfg.eval.every_epoch = False
    cfg.old.optim.schedule = "cosine"
    result = run_training(cfg, "old", scaling=ScalingConfig(num_workers=0))
    assert [r["epoch"] for r in reports] == [1, 2]
    # Cosine over 2 epochs: lr, then lr (1 + cos(pi / 2)) / 2.
    assert [r["lr"] for r in reports] == pytest.approx([cfg.old.optim.lr, cfg.old.optim.lr / 2])
    assert "old/old/top1" not in reports[0] and "loss" in reports[0]
    assert reports[1]["old/old/top1"] == result.metrics["old/old/top1"] > 40


def _train_new(out, monkeypatch, old_train, poison_test=False):
    """Train a 2-epoch NIFCL model in local mode on digits with stores of ``old_train`` features; with
    ``poison_test`` the test split's images, labels and old features are all replaced by garbage."""
    import raycompat.pipeline.train as train_mod
    from raycompat.data.datasets import ImageSet, load_dataset

    ds = load_digits()
    cfg = small_cfg(out, "nifcl", weight=1.0)
    layout = Layout.of(cfg.output_dir)
    write_store(layout, "old", "1", "train", ds.train.ids, ds.train.labels, old_train)
    rng = np.random.default_rng(9)
    test_labels = rng.permutation(ds.test.labels) if poison_test else ds.test.labels
    test_feats = rng.normal(size=(len(ds.test), 16)).astype(np.float32) if poison_test else old_train[:len(ds.test)]
    write_store(layout, "old", "1", "test", ds.test.ids, test_labels, test_feats)

    def poisoned(data_cfg, seed=0):
        out = load_dataset(data_cfg, seed)
        out.test = ImageSet(255 - out.test.images, test_labels, out.test.ids)
        return out

    monkeypatch.setattr(train_mod, "load_dataset", poisoned if poison_test else load_dataset)
    return run_training(cfg, "new", scaling=ScalingConfig(num_workers=0))


def test_training_reads_validation_never_test(tmp_path, monkeypatch):
    from raycompat.data.protocols import validation_split
    from raycompat.pipeline.train import VALIDATION_OUTCOMES
    from raycompat.retrieval.release_gate import load_outcomes

    ds = load_digits()
    old_train = np.random.default_rng(0).normal(size=(len(ds.train), 16)).astype(np.float32)
    clean = _train_new(tmp_path / "clean", monkeypatch, old_train)
    poisoned = _train_new(tmp_path / "poisoned", monkeypatch, old_train, poison_test=True)
    # Weights, every reported metric (the Tune objective's inputs) and the gate's outcomes: bit-identical.
    assert clean.metrics == poisoned.metrics and "new/old/mAP" in clean.metrics
    objective = ObjectiveConfig()
    assert score(clean.metrics, objective, {1: 50.0}) == score(poisoned.metrics, objective, {1: 50.0})
    images = ds.train.images[:64]
    f_clean = load_extractor(str(clean.model_dir), device="cpu")(images)
    f_poisoned = load_extractor(str(poisoned.model_dir), device="cpu")(images)
    assert np.array_equal(f_clean, f_poisoned)
    assert torch.equal(torch.load(clean.model_dir / "classifier.pt")["weight"],
                       torch.load(poisoned.model_dir / "classifier.pt")["weight"])
    a = load_outcomes((clean.model_dir / VALIDATION_OUTCOMES).read_bytes())
    b = load_outcomes((poisoned.model_dir / VALIDATION_OUTCOMES).read_bytes())
    _, validation = validation_split(ds, DataConfig(name="digits"))
    assert set(a) == {"old/old", "new/old"} and len(a["new/old"].ap) == len(validation)
    assert all(np.array_equal(a[p].ap, b[p].ap) and np.array_equal(a[p].hit1, b[p].hit1) for p in a)
    # Garbage old features of the validation items only: the weights stay the same (the new model never
    # trains on validation items) while the validation metrics move (they are read from there).
    held = np.isin(ds.train.ids, validation.ids)
    swapped = old_train.copy()
    swapped[held] = np.random.default_rng(1).normal(size=(int(held.sum()), 16))
    moved = _train_new(tmp_path / "val", monkeypatch, swapped)
    assert np.array_equal(load_extractor(str(moved.model_dir), device="cpu")(images), f_clean)
    assert moved.metrics["new/new/mAP"] == clean.metrics["new/new/mAP"]
    assert moved.metrics["new/old/mAP"] != clean.metrics["new/old/mAP"]
