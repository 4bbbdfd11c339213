"""Turn measured benchmark numbers into the ``costs`` section of a backfill config."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from raycompat.errors import DataError

EXTRACTION_KEYS = ("images", "ray_images_per_s", "plain_images_per_s", "ratio")


def read_extraction(path: str | Path) -> dict[str, Any]:
    """The extraction benchmark's JSON ``{"images", "ray_images_per_s", "plain_images_per_s", "ratio"}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: extraction benchmark results not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with {', '.join(EXTRACTION_KEYS)}")
    for key in EXTRACTION_KEYS:
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise DataError(f"{path}: {key}: expected a positive number, got {v!r}")
    return data


def cost_inputs_from_measurements(
    extraction_json: str | Path,
    transform_vectors_per_s: float,
    *,
    node: str,
    read_bandwidth: str,
    transform_source: str,
    throughput_key: str = "ray_images_per_s",
) -> dict[str, Any]:
    """The ``costs`` section (YAML-ready mapping) for one node type, from measured numbers.

    ``extraction_json`` gives the backbone's images/s per node (``throughput_key``:
    through Ray, or the plain loop); ``transform_vectors_per_s`` is the measured
    throughput of h per node, ``transform_source`` says where it came from.
    ``read_bandwidth`` ("1 GB/s") is the node's storage read rate, which the
    extraction benchmark does not measure.
    """
    if throughput_key not in ("ray_images_per_s", "plain_images_per_s"):
        raise ValueError(f"throughput_key must be ray_images_per_s or plain_images_per_s, got {throughput_key!r}")
    data = read_extraction(extraction_json)
    images_per_s = float(data[throughput_key])
    source = (f"backbone images/s per node: {extraction_json} ({throughput_key} = {images_per_s:.1f}, "
              f"over {int(data['images'])} images); transformation vectors/s per node: {transform_source}; "
              f"read bandwidth {read_bandwidth}: given, not measured")
    return {
        "source": source,
        "nodes": {
            node: {
                "backbone_images_per_s": images_per_s,
                "transform_vectors_per_s": float(transform_vectors_per_s),
                "read_bandwidth": read_bandwidth,
            }
        },
    }
