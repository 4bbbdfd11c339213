"""``raycompat init``: a commented starting config for your own gallery and old black-box model.

It looks at the gallery folder (an ``imagefolder`` tree ``root/{train,test}/<class>/<image>``
or ``parquet`` tables ``root/{train,test}/*.parquet``), counts classes and images, reads
the first image's size and channels, and sends that one image to the black box to learn
its feature dim, which the new model's ``embed_dim`` must match (the compatible slice,
and the backfill section's mixed gallery, need it). The text it writes is validated
with the pipeline's own config loader before it is written.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from raycompat.configio import from_dict
from raycompat.data.datasets import IMAGE_SUFFIXES, decode_image
from raycompat.errors import ConfigError, DataError, RaycompatError
from raycompat.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

# Used when the black box cannot be probed; the comment in the config says to set it.
FALLBACK_EMBED_DIM = 64


@dataclass
class GalleryInfo:
    """What ``init`` found in a gallery folder."""

    kind: str  # "imagefolder" or "parquet"
    root: Path
    num_classes: int
    counts: dict[str, int]  # images (or rows) per split
    image_size: int
    channels: int
    first_image: str  # where the size came from, e.g. "train/cat/1.png (28x28, L)"
    sample: np.ndarray  # that image decoded as the pipeline decodes it, uint8 (1, C, S, S)


def _channels_of(mode: str) -> int:
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def _from_encoded(data: bytes, where: str) -> tuple[int, int, str]:
    """``(image_size, channels, description)`` of encoded image bytes: the shorter side, grey or colour."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h, mode = img.width, img.height, img.mode
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from None
    return min(w, h), _channels_of(mode), f"{where} ({w}x{h}, {mode})"


def _imagefolder(root: Path) -> GalleryInfo:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    counts, first = {}, None
    for split in ("train", "test"):
        files = [f for c in sorted(p for p in (root / split).iterdir() if p.is_dir())
                 for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"image folder {root / split} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        counts[split] = len(files)
        first = first or files[0]
    size, channels, desc = _from_encoded(first.read_bytes(), str(first.relative_to(root)))
    sample = decode_image(first.read_bytes(), size, channels, str(first))[None]
    return GalleryInfo("imagefolder", root, len(classes), counts, size, channels, desc, sample)


def _parquet(root: Path) -> GalleryInfo:
    import pyarrow.parquet as pq

    counts, labels, first = {}, [], None
    for split in ("train", "test"):
        files = sorted((root / split).glob("*.parquet"))
        if not files:
            raise DataError(f"no Parquet files under {root / split}")
        # Only the label column is read whole: classes and counts, without decoding images.
        tables = [pq.read_table(f, columns=["label"]) for f in files]
        counts[split] = sum(t.num_rows for t in tables)
        labels += [v for t in tables for v in t.column("label").to_pylist() if v is not None]
        first = first or files[0]
    if not labels:
        raise DataError(f"{root}: the Parquet tables have no labelled rows")
    row = pq.ParquetFile(first).read_row_group(0, columns=["image"]).column("image")[0].as_py()
    where = f"{first.relative_to(root)} row 0"
    if isinstance(row, (bytes, bytearray)):
        size, channels, desc = _from_encoded(bytes(row), where)
        sample = decode_image(bytes(row), size, channels, where)[None]
    else:
        n = len(row)
        grey, colour = math.isqrt(n), math.isqrt(n // 3)
        if grey * grey == n:
            size, channels = grey, 1
        elif 3 * colour * colour == n:
            size, channels = colour, 3
        else:
            raise DataError(f"{where}: a flat image of {n} values is neither S*S nor 3*S*S")
        desc = f"{where} (flat uint8, {channels}x{size}x{size})"
        sample = np.asarray(row, np.uint8).reshape(1, channels, size, size)
    # As the Parquet loader numbers them: labels 0..max.
    return GalleryInfo("parquet", root, int(max(labels)) + 1, counts, size, channels, desc, sample)


def detect_gallery(root: str | Path) -> GalleryInfo:
    """Inspect a gallery folder: its kind, classes, image counts, and the first image's size and channels."""
    root = Path(root).resolve()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"gallery {root} must contain train/ and test/ (class folders of images, or *.parquet)")
    if any(p.is_dir() for p in (root / "train").iterdir()):
        return _imagefolder(root)
    if any((root / "train").glob("*.parquet")):
        return _parquet(root)
    raise DataError(f"gallery {root / 'train'} holds neither class folders nor *.parquet files")


def probe_dim(extractor: str, sample: np.ndarray) -> tuple[Optional[int], str]:
    """The black box's feature dim from one image, or ``(None, why not)`` when it cannot be asked."""
    from raycompat.models.extractor import load_extractor

    try:
        feats = load_extractor(extractor, device="cpu", timeout_s=10.0, retries=0)(sample)
    except RaycompatError as exc:
        return None, str(exc)
    return int(feats.shape[1]), f"probed: {extractor} returned {feats.shape[1]} dims for one image"


def starter_config(info: GalleryInfo, extractor: str, command: str = "raycompat init") -> str:
    """The commented YAML of a pipeline config for ``info``'s gallery and the black box ``extractor``."""
    dim, probe = probe_dim(extractor, info.sample)
    if dim is None:
        log.warning("could not probe the black box (%s); embed_dim left at %d", probe, FALLBACK_EMBED_DIM)
        dim_note = f"SET TO THE BLACK BOX'S FEATURE DIM: probing it failed ({probe})"
    else:
        dim_note = probe
    # A JSON string is a YAML double-quoted scalar: any URL or path survives.
    s = json.dumps
    return f"""\
# Pipeline config for your own gallery and old black-box model, written by:
#   {command}
# Run everything (extract old features through the black box, train a compatible new model,
# extract its features, evaluate, backfill cost section):
#   raycompat demo --config THIS_FILE [--out DIR]
# Every key is documented in raycompat/pipeline/config.py and the layer configs it composes; an unknown or bad key is an error naming it.
output_dir: {s('runs/' + info.root.name)}
seed: 0
data:
  # Detected: {info.kind}, {info.num_classes} classes, {info.counts['train']} train / {info.counts['test']} test images.
  name: {info.kind}
  root: {s(str(info.root))}
  # Images are decoded and resized to image_size x image_size with `channels` channels, and sent to the
  # black box like that: set what your old model expects. First image: {info.first_image}.
  image_size: {info.image_size}
  channels: {info.channels}
  # Stratified subsample for a first, quick run; null = every image.
  max_train: null
  max_test: null
old:
  # Your old model, a black box: only ever called to extract features, never trained here.
  extractor: {s(extractor)}
  name: old
  # Bump when the black box changes: feature stores of the old version are then refused, not mixed.
  version: "1"
  # Only for new.method bct: the old classifier's weights, a torch.save'd tensor
  # (num_old_classes, d_old) (row j = class j) or an exported model's classifier.pt.
  # classifier: path/to/classifier.pt
new:
  # NIFCL: compatible with the old gallery from old features of the training set alone (no old
  # classifier, no old data). The weights are those of nifcl+rw in
  # benchmarks/results/quality_fashion_mnist.md; `raycompat tune` searches them for your data.
  method: nifcl
  model:
    arch: small_cnn            # or resnet18 / resnet50
    width: 32
    # The first d_old dims are matched against old features: {dim_note}.
    embed_dim: {dim if dim is not None else FALLBACK_EMBED_DIM}
  optim: {{epochs: 6, batch_size: 128, lr: 0.002}}
  compat:
    lambda: 30.0
    scale: 16.0
    pseudo_classifier: mean
    align: 3.0
    neighbors: {{weight: 1.0, scale: 32.0, bank: 4096}}
    random_walk: {{enabled: true, k: 20, tau: 0.05, alpha: 0.9, graph: intra_class}}
extract:
  # Images per call of the black box (one HTTP request per batch for an endpoint).
  batch_size: 256
  # Extraction actors calling the black box at once; null = what the cluster's CPUs allow.
  concurrency: null
ray:
  address: null                # null = $RAY_ADDRESS, else a local runtime
  num_workers: 1               # Train workers
backfill:                      # the report's backfill section: this gallery's upgrade cost per strategy
  gallery_size: null           # null = the test split; set your production gallery's size
  dollars_per_hour: 0.10       # assumed price of one unit of this cluster (not measurable from here)
  read_bandwidth: 500 MB/s     # assumed storage read rate
"""


def write_starter_config(gallery: str | Path, extractor: str, out: str | Path, force: bool = False,
                         command: str = "raycompat init") -> tuple[Path, GalleryInfo]:
    """Detect the gallery, write the commented config to ``out`` (validated first); return it and the gallery."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists (pass --force to overwrite)")
    info = detect_gallery(gallery)
    text = starter_config(info, extractor, command)
    # Checked as every stage will load it: a config init writes always loads.
    try:
        from_dict(PipelineConfig, yaml.safe_load(text))
    except ConfigError as exc:
        raise ConfigError(f"{out}: generated config does not load ({exc})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out, info
