"""Where each stage writes under ``output_dir`` (one storage root per pipeline run).

    models/<name>/        exported black-box models (extractor.pt, model.json, classifier.pt)
    features/<name>-<split>/  Parquet feature stores (see raycompat.data.feature_store)
    ray/                  Ray Train / Tune run state and checkpoints (stable run names: resumable)
    eval/                 metrics.json, report.md
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def of(cls, output_dir: str | Path) -> "Layout":
        return cls(Path(output_dir).absolute())

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def store(self, model_name: str, split: str) -> Path:
        return self.root / "features" / f"{model_name}-{split}"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"
