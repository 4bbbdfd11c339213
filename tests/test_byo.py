"""Your own gallery and black box: ``raycompat init``, no old model trained, BCT's ``old.classifier``.

The Ray test runs the documented path end to end: an image folder written from
scikit-learn's digits, an old model served by ``raycompat serve-extractor`` on
127.0.0.1, ``raycompat init`` writing the config, then the pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from PIL import Image
from ray.train import ScalingConfig
from sklearn.datasets import load_digits

from fixtures.training import small_cfg, write_store

from raycompat.cli import main
from raycompat.models.config import ModelConfig
from raycompat.pipeline.config import PipelineConfig, load_pipeline_config, with_absolute_paths
from raycompat.configio import from_dict
from raycompat.data.datasets import decode_image, load_digits as load_digits_dataset
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import ConfigError, DataError
from raycompat.storage.layout import Layout
from raycompat.models.backbones import CosineClassifier, EmbeddingClassifier, EmbeddingModel
from raycompat.models.export import export_model, load_classifier_file
from raycompat.models.extractor import load_extractor
from raycompat.models.http_server import serve_in_thread
from raycompat.pipeline.run import run_pipeline, stage_names, stage_train_old
from raycompat.pipeline.train import old_classifier, run_training
from raycompat.training.loop import make_loader, seed_everything, train_epoch

REPO = Path(__file__).resolve().parents[1]
OLD_DIM = 16


def write_digits_folder(root: Path, n_train: int, n_test: int) -> Path:
    """``root/{train,test}/digit-<k>/<i>.png``: digits' 8x8 images scaled to 0-255, the first n_train + n_test."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    for i in range(n_train + n_test):
        folder = root / ("train" if i < n_train else "test") / f"digit-{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


def folder_images(root: Path, split: str) -> dict[str, np.ndarray]:
    """Every image of a split as the pipeline decodes it (8x8, grey), by id (path relative to root)."""
    return {str(f.relative_to(root)): decode_image(f.read_bytes(), 8, 1, str(f))
            for f in sorted((root / split).glob("*/*.png"))}


def old_team_model(gallery: Path, out: Path, epochs: int = 3) -> Path:
    """The platform team's old model: trained in plain torch on digits 0-4 of the folder, exported."""
    seed_everything(0)
    classes = [f"digit-{k}" for k in range(5)]
    files = [f for c in classes for f in sorted((gallery / "train" / c).glob("*.png"))]
    images = np.stack([decode_image(f.read_bytes(), 8, 1, str(f)) for f in files])
    labels = np.array([classes.index(f.parent.name) for f in files], dtype=np.int64)
    net = EmbeddingClassifier(EmbeddingModel(ModelConfig(width=8, embed_dim=OLD_DIM), (1, 8, 8)),
                              CosineClassifier(OLD_DIM, len(classes), 16.0))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    loader = make_loader(images, labels, 64, shuffle=True, seed=0)
    for _ in range(epochs):
        train_epoch(net, loader, opt, torch.device("cpu"))
    return export_model(net.model, net.classifier.weight, list(range(5)), (1, 8, 8), out, "team-old", "1")


def byo_cfg(tmp_path: Path, **old) -> PipelineConfig:
    return from_dict(PipelineConfig, {"output_dir": str(tmp_path / "run"), "data": {"name": "digits"},
                                      "old": {"extractor": "http://127.0.0.1:1/extract", **old}})


# --- raycompat init ---------------------------------------------------------------------------

def test_init_detects_an_image_folder_probes_the_black_box_and_writes_a_loadable_config(tmp_path, capsys):
    gallery = write_digits_folder(tmp_path / "gallery", 60, 30)
    model = export_model(EmbeddingModel(ModelConfig(width=4, embed_dim=12), (1, 8, 8)), torch.randn(3, 12),
                         [0, 1, 2], (1, 8, 8), tmp_path / "bb", "bb", "1")
    server, url = serve_in_thread(load_extractor(str(model), device="cpu"))
    try:
        out = tmp_path / "cfg" / "byo.yaml"
        assert main(["init", "--gallery", str(gallery), "--old-extractor", url, "--out", str(out)]) == 0
    finally:
        server.shutdown()
        server.server_close()
    cfg = load_pipeline_config(out)
    assert (cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.channels) == \
        ("imagefolder", str(gallery.resolve()), 8, 1)
    assert cfg.old.extractor == url and cfg.old.classifier is None
    # The probed dim: the compatible slice (and the backfill section's mixed gallery) need it.
    assert cfg.new.method == "nifcl" and cfg.new.model.embed_dim == 12
    text = out.read_text()
    n_classes = len({int(p.parent.name.split("-")[1]) for p in gallery.glob("train/*/*.png")})
    assert f"{n_classes} classes, 60 train / 30 test images" in text
    assert "#" in text.splitlines()[0]
    assert f"{n_classes} classes" in capsys.readouterr().out


def test_init_detects_parquet_flat_colour_images_and_a_callable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        (tmp_path / "pq" / split).mkdir(parents=True)
        table = pa.table({"id": [f"{split}-{i}" for i in range(n)],
                          "image": [rng.integers(0, 255, 3 * 10 * 10, dtype=np.uint8).tolist() for _ in range(n)],
                          "label": [i % 4 for i in range(n)]})
        pq.write_table(table, tmp_path / "pq" / split / "part-0.parquet")
    out = tmp_path / "c.yaml"
    assert main(["init", "--gallery", str(tmp_path / "pq"), "--old-extractor", "fixtures.blackbox:mean_rows",
                 "--out", str(out)]) == 0
    cfg = load_pipeline_config(out)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.channels) == ("parquet", 10, 3)
    assert cfg.new.model.embed_dim == 10  # mean_rows: one feature per image row
    assert "4 classes, 12 train / 6 test images" in out.read_text()


def test_init_with_an_unreachable_black_box_says_to_set_the_dim_and_never_overwrites(tmp_path, capsys):
    gallery = write_digits_folder(tmp_path / "g", 20, 10)
    out = tmp_path / "c.yaml"
    args = ["init", "--gallery", str(gallery), "--old-extractor", "http://127.0.0.1:1/extract", "--out", str(out)]
    assert main(args) == 0
    assert "SET TO THE BLACK BOX'S FEATURE DIM" in out.read_text()
    load_pipeline_config(out)
    out.write_text("mine")
    assert main(args) == 2
    assert "exists (pass --force" in capsys.readouterr().err and out.read_text() == "mine"
    assert main([*args, "--force"]) == 0 and out.read_text() != "mine"


def test_init_refuses_a_folder_that_is_no_gallery(tmp_path, capsys):
    (tmp_path / "g" / "train").mkdir(parents=True)
    (tmp_path / "g" / "test").mkdir()
    (tmp_path / "g" / "train" / "notes.txt").write_text("x")
    assert main(["init", "--gallery", str(tmp_path / "g"), "--old-extractor", "x:y", "--out",
                 str(tmp_path / "c.yaml")]) == 2
    assert "neither class folders nor *.parquet" in capsys.readouterr().err
    assert not (tmp_path / "c.yaml").exists()


# --- no old model trained with old.extractor ---------------------------------------------------

def test_old_extractor_set_trains_no_old_model_and_says_so(tmp_path, capsys):
    cfg = byo_cfg(tmp_path)
    line = "old model: black box http://127.0.0.1:1/extract, not trained"
    assert stage_names(cfg)[0] == line
    assert stage_train_old(cfg) == {}
    assert not (tmp_path / "run").exists()
    # `raycompat train-old` has nothing to train: refused before Ray starts.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "digits"}, "old": {"extractor": "http://127.0.0.1:1/x"}}))
    assert main(["train-old", "--config", str(path)]) == 2
    assert "old.extractor is set" in capsys.readouterr().err
    assert not ray.is_initialized()
    cfg.old.extractor = None
    assert stage_names(cfg)[0] == "train old model"


# --- BCT and old.classifier --------------------------------------------------------------------

def test_bct_with_a_black_box_needs_old_classifier_before_ray_starts(tmp_path, capsys):
    doc = {"data": {"name": "digits"}, "old": {"extractor": "http://127.0.0.1:1/x"}, "new": {"method": "bct"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"c\.yaml: old\.classifier: new\.method bct needs"):
        load_pipeline_config(path)
    for command in (["train"], ["demo"], ["extract"]):
        assert main([*command, "--config", str(path)]) == 2
        assert "error: " in capsys.readouterr().err
    # A bench method is checked the same way, before Ray starts.
    doc["new"] = {"method": "independent"}
    doc["bench"] = {"methods": {"bct": {"new": {"method": "bct"}}}}
    path.write_text(yaml.safe_dump(doc))
    assert main(["bench", "quality", "--config", str(path), "--out-dir", str(tmp_path / "b")]) == 2
    assert "bench.methods.bct: old.classifier" in capsys.readouterr().err
    assert not ray.is_initialized()
    # Without a black box the exported classifier.pt is used: no key needed.
    doc.pop("bench")
    doc["old"], doc["new"] = {}, {"method": "bct"}
    path.write_text(yaml.safe_dump(doc))
    assert load_pipeline_config(path).old.classifier is None


def test_old_classifier_reads_a_plain_tensor_or_an_exported_classifier(tmp_path, monkeypatch):
    weight = torch.randn(4, OLD_DIM)
    torch.save(weight, tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    cfg = byo_cfg(tmp_path, classifier="w.pt")
    # Made absolute on the driver: Train workers run elsewhere.
    assert with_absolute_paths(cfg).old.classifier == str(tmp_path / "w.pt")
    got, classes = old_classifier(cfg)
    assert torch.equal(got, weight) and classes == [0, 1, 2, 3]
    model_dir = export_model(EmbeddingModel(ModelConfig(width=4, embed_dim=8), (1, 8, 8)), torch.ones(2, 8),
                             [3, 7], (1, 8, 8), tmp_path / "m", "m", "1")
    got, classes = load_classifier_file(model_dir / "classifier.pt")
    assert torch.equal(got, torch.ones(2, 8)) and classes == [3, 7]
    # Not the old model of output_dir: with no models/old there, this is the file's classifier.
    assert not (tmp_path / "run" / "models").exists()


def test_bct_trains_through_old_classifier_with_no_old_model_in_output_dir(tmp_path, caplog):
    torch.manual_seed(0)
    team = export_model(EmbeddingModel(ModelConfig(width=4, embed_dim=OLD_DIM), (1, 8, 8)), torch.randn(3, OLD_DIM),
                        [0, 1, 2], (1, 8, 8), tmp_path / "team", "team", "1")
    cfg = small_cfg(tmp_path / "run", "bct", weight=1.0)
    cfg.old.extractor, cfg.old.classifier = str(team), str(tmp_path / "clf.pt")
    cfg.new.optim.epochs = 1
    # The team's classifier for digits 0-3 (row j = class j); classes 4-9 get class means.
    torch.save(torch.randn(4, OLD_DIM), cfg.old.classifier)
    ds, layout, ex = load_digits_dataset(), Layout.of(cfg.output_dir), load_extractor(str(team), device="cpu")
    for split in ("train", "test"):
        s = getattr(ds, split)
        write_store(layout, "old", "1", split, s.ids, s.labels, ex(s.images))
    with caplog.at_level("INFO", logger="raycompat"):
        result = run_training(cfg, "new", scaling=ScalingConfig(num_workers=0))
    assert "BCT classifier: 4 rows from the old classifier, 6 synthesised from class means" in caplog.text
    assert result.metrics["compat"] > 0 and (result.model_dir / "model.json").is_file()
    assert not Path(layout.model_dir("old")).exists()


@pytest.mark.parametrize("content, message", [
    (torch.arange(6).reshape(2, 3), "2-D float tensor"),
    (torch.randn(3), "2-D float tensor"),
    (torch.tensor(1.0), "2-D float tensor"),
    ({"rows": torch.randn(2, 3)}, "expected a tensor"),
])
def test_old_classifier_file_refuses_what_is_not_a_classifier(tmp_path, content, message):
    torch.save(content, tmp_path / "c.pt")
    with pytest.raises(DataError, match=message):
        load_classifier_file(tmp_path / "c.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="not a torch.save'd classifier"):
        load_classifier_file(tmp_path / "junk.pt")
    with pytest.raises(DataError, match="old classifier not found"):
        load_classifier_file(tmp_path / "missing.pt")


# --- end to end on a real local Ray ------------------------------------------------------------

@pytest.fixture
def black_box(tmp_path):
    """The team's old model behind ``raycompat serve-extractor`` on 127.0.0.1 (a port of its choosing)."""
    gallery = write_digits_folder(tmp_path / "gallery", 300, 150)
    model = old_team_model(gallery, tmp_path / "team-old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "raycompat", "serve-extractor", "--model", str(model),
                             "--host", "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), line
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        yield {"gallery": gallery, "model": model, "url": url}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.ray
def test_own_gallery_and_http_black_box_to_a_compatible_model(black_box, tmp_path):
    gallery, url = black_box["gallery"], black_box["url"]
    config = tmp_path / "byo.yaml"
    assert main(["init", "--gallery", str(gallery), "--old-extractor", url, "--out", str(config)]) == 0
    cfg = load_pipeline_config(config, {"output_dir": str(tmp_path / "run")})
    assert cfg.new.model.embed_dim == OLD_DIM
    # Small for 2 CI cores (2 epochs of 10 steps); everything else is what init wrote.
    cfg.new.model.width = 8
    cfg.new.optim.epochs, cfg.new.optim.batch_size = 2, 32
    cfg.extract.concurrency = 1
    cfg.ray.cpus_per_worker = 1
    stages: list[str] = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    try:
        report = run_pipeline(cfg, stages.append)
    finally:
        ray.shutdown()

    layout = Layout.of(cfg.output_dir)
    assert stages[0] == f"old model: black box {url}, not trained"
    assert not Path(layout.model_dir(cfg.old.name)).exists()
    assert (Path(layout.model_dir("new-nifcl")) / "extractor.pt").is_file()
    # The old stores hold the black box's features of every image, at its dim.
    team = load_extractor(str(black_box["model"]), device="cpu")
    for split in ("train", "test"):
        images = folder_images(gallery, split)
        store = FeatureStore.open(layout.store(cfg.old.name, split))
        assert store.dim == OLD_DIM
        ids = store.to_numpy(["id"])["id"]
        assert sorted(ids) == sorted(images)
        some = sorted(images)[:16]
        np.testing.assert_allclose(store.lookup(np.array(some, dtype=object)),
                                   team(np.stack([images[i] for i in some])), rtol=1e-4, atol=1e-5)
    text = Path(report).read_text()
    for pair in ("old/old", "new/new", "new/old"):
        assert f"| {pair} |" in text
    assert "Compatibility criterion M(new, old) > M(old, old): the update **" in text
    metrics = json.loads((Path(layout.eval_dir) / "metrics.json").read_text())
    assert metrics["n_items"] == 150 and metrics["method"] == "nifcl"
    m = metrics["matrix"]
    verdict = "meets" if m["new/old"]["top1"] > m["old/old"]["top1"] and m["new/old"]["mAP"] > m["old/old"]["mAP"] \
        else "does not meet"
    assert f"the update **{verdict}** it" in text
    # The team's old model separates its own digits, and the new model's features land near the old
    # ones of their class: both far above chance (10 classes), where an unconstrained model's new/old is.
    assert m["old/old"]["top1"] > 30 and m["new/old"]["top1"] > 30
    # The backfill section costs vectors of the black box's dim, not of the untrained old.model's.
    backfill = yaml.safe_load((Path(layout.eval_dir) / "backfill" / "config.yaml").read_text())
    assert backfill["gallery"]["bytes_per_vector"] == f"{4 * (OLD_DIM + cfg.side.dim)} B"
