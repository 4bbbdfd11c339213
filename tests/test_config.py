from pathlib import Path

import pytest

from raycompat.pipeline.config import PipelineConfig, load_pipeline_config, with_absolute_paths
from raycompat.configio import dump_config, load_config
from raycompat.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "raycompat" / "configs" / "demo.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_pipeline_config(DEMO)
    assert cfg.protocol.old_classes == [0, 1, 2, 3, 4]
    assert cfg.new.model.width == 32
    dump_config(cfg, tmp_path / "again.yaml")
    assert load_pipeline_config(tmp_path / "again.yaml") == cfg


def test_linear_pseudo_classifier_keys_default_to_the_former_constants(tmp_path):
    cfg = load_pipeline_config(write(tmp_path, "new:\n  compat:\n    pseudo_classifier: linear\n"))
    assert (cfg.new.compat.linear.epochs, cfg.new.compat.linear.lr) == (20, 0.05)
    cfg = load_pipeline_config(write(tmp_path, "new:\n  compat:\n    linear: {epochs: 3, lr: 0.1}\n"))
    assert (cfg.new.compat.linear.epochs, cfg.new.compat.linear.lr) == (3, 0.1)


def test_lambda_key_maps_to_weight(tmp_path):
    cfg = load_pipeline_config(write(tmp_path, "new:\n  method: nifcl\n  compat:\n    lambda: 2.5\n"))
    assert cfg.new.compat.weight == 2.5


@pytest.mark.parametrize("text, fragment", [
    ("new:\n  optim:\n    epocs: 3\n", "unknown config key new.optim.epocs"),
    ("new:\n  optim:\n    epochs: three\n", "new.optim.epochs: expected an integer"),
    ("new:\n  method: magic\n", "new.method: 'magic' is not one of"),
    ("protocol:\n  old_fraction: 1.5\n", "protocol.old_fraction: must be in (0, 1]"),
    ("new:\n  compat:\n    random_walk:\n      alpha: 1.0\n", "new.compat.random_walk.alpha"),
    ("new:\n  compat:\n    soft_targets: true\n", "new.compat.soft_targets: needs random_walk.enabled"),
    ("new:\n  method: bct\n  compat:\n    align: 1.0\n", "new.compat.align: only method nifcl"),
    ("new:\n  method: nifcl\n  compat:\n    align: -1\n", "new.compat.align: must be >= 0"),
    ("new:\n  compat:\n    linear: {epochs: 0}\n", "new.compat.linear.epochs: must be positive"),
    ("new:\n  compat:\n    linear: {lr: -0.1}\n", "new.compat.linear.lr: must be positive"),
    ("new:\n  method: l2\n  compat:\n    neighbors: {weight: 1.0}\n", "new.compat.neighbors.weight: only method nifcl"),
    ("new:\n  method: nifcl\n  compat:\n    neighbors: {bank: -2}\n", "new.compat.neighbors.bank: must be >= 0"),
    ("data: [1, 2]\n", "data: expected a mapping"),
    ("old: {model: {embed_dim: -1}}\n", "old.model.embed_dim: must be positive"),
    ("seed: true\n", "seed: expected an integer"),
    ("backfill: {gallery_size: 0}\n", "backfill.gallery_size: must be positive"),
    ("backfill: {read_bandwidth: 3 parsecs}\n", "backfill.read_bandwidth"),
    ("backfill: {fractions: [0.5, 1.5]}\n", "backfill.fractions: must be in (0, 1]"),
])
def test_bad_config_is_one_line_error_naming_the_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    msg = str(info.value)
    assert fragment in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_pipeline_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_pipeline_config(write(tmp_path, "data: {name: [\n"))


def test_overrides_merge_into_sections(tmp_path):
    cfg = load_config(write(tmp_path, "new: {optim: {epochs: 2}}\n"), PipelineConfig,
                      {"new": {"optim": {"lr": 0.5}}, "output_dir": "x"})
    assert (cfg.new.optim.epochs, cfg.new.optim.lr, cfg.output_dir) == (2, 0.5, "x")


@pytest.mark.parametrize("uri", ["s3://bucket/run", "gs://bucket/run", "file:///srv/run",
                                 "s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http"])
def test_output_dir_may_be_a_storage_uri_and_stays_one(tmp_path, uri):
    cfg = load_pipeline_config(write(tmp_path, f"output_dir: '{uri}'\ndata: {{name: parquet, root: 'gs://data/in'}}\n"))
    resolved = with_absolute_paths(cfg)
    assert (resolved.output_dir, resolved.data.root) == (uri, "gs://data/in")


def test_relative_output_dir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_pipeline_config(write(tmp_path, "output_dir: runs/x\n")))
    assert cfg.output_dir == str(tmp_path / "runs" / "x")


def test_a_section_without_keys_takes_its_defaults(tmp_path):
    """``eval:`` with nothing under it is YAML null: the section's defaults, not an error."""
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\neval:\ndata: {name: digits}\n")
    cfg = load_pipeline_config(path)
    assert cfg.eval == PipelineConfig().eval and cfg.data.name == "digits"
