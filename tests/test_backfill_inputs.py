"""Backfill config inputs: counts, sizes and bandwidths with units, and config validation errors."""

from __future__ import annotations

import copy

import pytest
import yaml

from raycompat.backfill.config import load_backfill_config
from raycompat.backfill.units import format_bytes, parse_bandwidth, parse_bytes, parse_count, parse_positive
from raycompat.configio import dump_config
from raycompat.errors import ConfigError

BASE = {
    "title": "t",
    "gallery": {"size": "1e9", "bytes_per_image": "50 kB", "bytes_per_vector": 384},
    "cluster": [{"name": "gpu-node", "accelerator": "gpu", "count": 8, "dollars_per_hour": 1.2}],
    "costs": {"source": "test", "nodes": {"gpu-node": {"backbone_images_per_s": 2000,
                                                       "transform_vectors_per_s": "5e5",
                                                       "read_bandwidth": "1 GB/s"}}},
    "quality": {"path": "quality.json"},
    "strategies": [{"name": "c", "kind": "compatible", "method": "nifcl"}],
}


def write(tmp_path, data, text=None):
    path = tmp_path / "bf.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("value, expected", [
    (10**9, 10**9), (1e9, 10**9), ("1e9", 10**9), ("1_000_000_000", 10**9),
    ("1e10", 10**10), ("2.5e12", 2_500_000_000_000), ("1e20", 10**20),
])
def test_parse_count_accepts_numbers_and_strings(value, expected):
    got = parse_count(value, "gallery.size")
    assert got == expected and isinstance(got, int)


@pytest.mark.parametrize("value", [0, -5, "0", "-1e9", 1.5, "1.5", "abc", True, None, "nan", float("inf")])
def test_parse_count_rejects_non_positive_and_non_whole(value):
    with pytest.raises(ConfigError, match=r"^gallery\.size: "):
        parse_count(value, "gallery.size")


@pytest.mark.parametrize("value, expected", [
    ("500 MB/s", 5e8), ("1 GB/s", 1e9), ("1GB/s", 1e9), ("1 GiB/s", 2**30), ("10 Gbit/s", 1.25e9),
    ("250 kB/s", 2.5e5), (250, 2.5e8), ("250", 2.5e8), (0.5, 5e5),
])
def test_parse_bandwidth(value, expected):
    assert parse_bandwidth(value, "k") == pytest.approx(expected)


@pytest.mark.parametrize("value, match", [
    ("5 XB/s", "unknown unit 'XB/s'"), ("1 GB", "unknown unit 'GB'"), ("1 Gb/s", "unknown unit"),
    ("0 MB/s", "must be positive"), ("-1 GB/s", "cannot read"), (0, "must be positive"), ("fast", "cannot read"),
])
def test_parse_bandwidth_rejects(value, match):
    with pytest.raises(ConfigError, match=rf"^costs\.read_bandwidth: .*{match}"):
        parse_bandwidth(value, "costs.read_bandwidth")


def test_parse_bytes_and_positive():
    assert parse_bytes("50 kB", "k") == 5e4
    assert parse_bytes("4 KiB", "k") == 4096
    assert parse_bytes(320, "k") == 320
    assert parse_bytes("320", "k") == 320
    assert parse_positive("2e6", "k") == 2e6
    with pytest.raises(ConfigError, match="unknown unit 'parsec'"):
        parse_bytes("5 parsec", "k")
    with pytest.raises(ConfigError, match="expected a size, got a rate"):
        parse_bytes("1 GB/s", "k")
    with pytest.raises(ConfigError, match="^k: must be positive"):
        parse_positive(0, "k")
    assert format_bytes(5e4) == "50 kB" and format_bytes(384) == "384 B" and format_bytes(5e13) == "50 TB"


def test_config_loads_and_normalises_units(tmp_path):
    cfg = load_backfill_config(write(tmp_path, BASE))
    assert cfg.gallery.size == 10**9 and isinstance(cfg.gallery.size, int)
    assert cfg.gallery.bytes_per_image == 5e4
    node = cfg.costs.nodes["gpu-node"]
    assert node.read_bytes_per_s == 1e9 and node.transform_vectors_per_s == 5e5


def test_config_dumps_back_unchanged(tmp_path):
    cfg = load_backfill_config(write(tmp_path, BASE))
    path = tmp_path / "again.yaml"
    dump_config(cfg, path)
    again = load_backfill_config(path)
    assert again == cfg
    assert again.costs.nodes["gpu-node"].read_bandwidth == "1 GB/s"


@pytest.mark.parametrize("text_size", ["1e9", "1.0e+9", "1000000000", "'1e9'"])
def test_yaml_gallery_size_spellings(tmp_path, text_size):
    text = yaml.safe_dump(BASE).replace("size: 1e9", f"size: {text_size}")
    assert f"size: {text_size}" in text
    assert load_backfill_config(write(tmp_path, None, text)).gallery.size == 10**9


@pytest.mark.parametrize("path, value, match", [
    (("gallery", "size"), 0, r"gallery\.size: must be positive"),
    (("gallery", "size"), -1000, r"gallery\.size: must be positive"),
    (("gallery", "size"), "-1e9", r"gallery\.size: must be positive"),
    (("gallery", "bytes_per_image"), "0 kB", r"gallery\.bytes_per_image: must be positive"),
    (("gallery", "bytes_per_image"), "50 kiloblocks", r"gallery\.bytes_per_image: unknown unit"),
    (("costs", "nodes", "gpu-node", "read_bandwidth"), "5 XB/s",
     r"costs\.nodes\.gpu-node\.read_bandwidth: unknown unit 'XB/s'"),
    (("costs", "nodes", "gpu-node", "backbone_images_per_s"), -3, r"backbone_images_per_s: must be positive"),
    (("cluster", 0, "count"), 0, r"cluster\[0\]\.count: must be positive"),
    (("cluster", 0, "dollars_per_hour"), -1.0, r"cluster\[0\]\.dollars_per_hour: must be >= 0"),
    (("cluster", 0, "accelerator"), "tpu", r"cluster\[0\]\.accelerator: 'tpu' is not one of"),
    (("simulation",), {"steps": 1}, r"simulation\.steps"),
])
def test_config_errors_name_file_and_key(tmp_path, path, value, match):
    data = copy.deepcopy(BASE)
    target = data
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    cfg_path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=match) as exc:
        load_backfill_config(cfg_path)
    assert str(exc.value).startswith(str(cfg_path))


@pytest.mark.parametrize("strategy, match", [
    ({"name": "p", "kind": "partial_backfill", "method": "m", "fraction": 0.5}, r"order: partial_backfill needs"),
    ({"name": "p", "kind": "partial_backfill", "method": "m", "order": "random", "fraction": 1.5},
     r"strategies\[0\]\.fraction: must be in \(0, 1\]"),
    ({"name": "p", "kind": "partial_backfill", "method": "m", "order": "random", "fraction": 0},
     r"fraction: must be in \(0, 1\]"),
    ({"name": "c", "kind": "compatible", "method": "m", "order": "random"}, r"compatible takes no order"),
    ({"name": "f", "kind": "full_backfill", "method": "m", "fraction": 0.5}, r"full_backfill takes no fraction"),
    ({"name": "f", "kind": "fct", "method": "m", "fraction": 0.5}, r"needs an order"),
    ({"name": "x", "kind": "magic", "method": "m"}, r"strategies\[0\]\.kind"),
])
def test_strategy_errors(tmp_path, strategy, match):
    data = copy.deepcopy(BASE)
    data["strategies"] = [strategy]
    with pytest.raises(ConfigError, match=match):
        load_backfill_config(write(tmp_path, data))


def test_cross_section_errors(tmp_path):
    data = copy.deepcopy(BASE)
    data["costs"]["nodes"] = {"other": data["costs"]["nodes"]["gpu-node"]}
    with pytest.raises(ConfigError, match=r"costs\.nodes: no measured costs for node type\(s\) \['gpu-node'\]"):
        load_backfill_config(write(tmp_path, data))
    data = copy.deepcopy(BASE)
    data["quality"] = {"path": "q.json", "inline": {}}
    with pytest.raises(ConfigError, match="quality: give exactly one of path, inline"):
        load_backfill_config(write(tmp_path, data))
    data = copy.deepcopy(BASE)
    data["strategies"] = BASE["strategies"] * 2
    with pytest.raises(ConfigError, match="strategy names repeat"):
        load_backfill_config(write(tmp_path, data))
    data = copy.deepcopy(BASE)
    data["gallery"]["colour"] = "blue"
    with pytest.raises(ConfigError, match=r"unknown config key gallery\.colour"):
        load_backfill_config(write(tmp_path, data))
