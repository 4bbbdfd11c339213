"""Where each stage writes under ``output_dir`` (one storage root per pipeline run).

    models/<name>/        exported black-box models (extractor.pt, model.json, classifier.pt)
    features/<name>-<split>/  Parquet feature stores (see raycompat.data.feature_store)
    gallery/<split>/      built-in datasets and packed image folders as Parquet shards
    ray/                  Ray Train / Tune run state and checkpoints (stable run names: resumable)
    eval/                 metrics.json, report.md
    tune/<name>/          Ray Tune searches (see raycompat.pipeline.tune)

``output_dir`` is a local path or a storage URI (``s3://bucket/run``, ``gs://...``,
``file:///abs/path``). For a local path every location is a ``pathlib.Path``; for a
URI it is a URI string, opened with :mod:`raycompat.storage.filesystem` (bulk data) or
:mod:`raycompat.storage.artifacts` (small files), never as a local file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from raycompat.storage import filesystem
from raycompat.storage.artifacts import Location, child


@dataclass(frozen=True)
class Layout:
    # An absolute local path, or a URI.
    root: str

    @classmethod
    def of(cls, output_dir: str | os.PathLike[str]) -> "Layout":
        text = os.fspath(output_dir)
        return cls(text if filesystem.is_uri(text) else str(Path(text).absolute()))

    def _at(self, *parts: str) -> Location:
        return child(self.root, *parts)

    def model_dir(self, name: str) -> Location:
        return self._at("models", name)

    def store(self, model_name: str, split: str) -> Location:
        return self._at("features", f"{model_name}-{split}")

    def gallery(self, split: str) -> Location:
        return self._at("gallery", split)

    def tune_dir(self, name: str) -> Location:
        return self._at("tune", name)

    @property
    def ray_storage(self) -> Location:
        return self._at("ray")

    @property
    def eval_dir(self) -> Location:
        return self._at("eval")
