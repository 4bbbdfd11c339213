"""Export a trained embedding model as a TorchScript black box, plus what BCT needs.

An exported model directory holds:
- ``extractor.pt``: TorchScript, uint8 images (N, C, H, W) -> features (N, dim);
- ``model.json``: name, version, dim, input shape, sha256 of ``extractor.pt``;
- ``classifier.pt``: the cosine classifier's weight and the classes it covers.
  Only the BCT baseline reads it; NIFCL never does.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from raycompat.storage import artifacts
from raycompat.errors import DataError


def export_model(
    model: torch.nn.Module,
    classifier_weight: torch.Tensor,
    classes: list[int],
    image_shape: tuple[int, int, int],
    out_dir: str | Path,
    name: str,
    version: str,
) -> Path:
    """Trace ``model`` to TorchScript and write the model directory; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    example = torch.zeros((2, *image_shape), dtype=torch.uint8)
    with torch.no_grad():
        scripted = torch.jit.trace(model, example)
        dim = int(scripted(example).shape[1])
    tmp = out / "extractor.pt.tmp"
    scripted.save(str(tmp))
    tmp.replace(out / "extractor.pt")
    torch.save({"weight": classifier_weight.detach().cpu(), "classes": list(classes)}, out / "classifier.pt")
    meta = {
        "name": name, "version": version, "dim": dim, "input_shape": list(image_shape),
        "input_dtype": "uint8", "sha256": artifacts.sha256(out / "extractor.pt"),
    }
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    return out


def load_model_meta(model_dir: str | Path) -> dict:
    """Read ``model.json`` of an exported model directory (a local path or a storage URI)."""
    path = artifacts.child(artifacts.as_location(model_dir), "model.json")
    if not artifacts.is_file(path):
        raise DataError(f"exported model metadata not found: {path} (run `raycompat train-old` first)")
    return json.loads(artifacts.read_text(path))


def load_classifier(model_dir: str | Path) -> tuple[torch.Tensor, list[int]]:
    """The exported cosine classifier ``(weight [C, dim], classes)`` (BCT's old classifier).

    ``model_dir`` may be a storage URI: the file is then fetched into this node's cache.
    """
    path = artifacts.child(artifacts.as_location(model_dir), "classifier.pt")
    if not artifacts.is_file(path):
        raise DataError(f"old classifier not found: {path} (BCT needs the real old classifier)")
    return load_classifier_file(path)


def load_classifier_file(path: str | Path) -> tuple[torch.Tensor, list[int]]:
    """A classifier file ``(weight [C, dim], classes)``: a float tensor (row j = class j) or ``classifier.pt``.

    ``classifier.pt`` is what :func:`export_model` writes, ``{"weight": tensor, "classes": [...]}``.
    ``path`` may be a storage URI. Only tensors are unpickled (``weights_only``), never code.
    """
    location = artifacts.as_location(path)
    if not artifacts.is_file(location):
        raise DataError(f"old classifier not found: {location}")
    try:
        state = torch.load(artifacts.fetch(location), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{location}: not a torch.save'd classifier ({str(exc).splitlines()[0]})") from None
    if isinstance(state, torch.Tensor):
        weight, classes = state, None
    elif isinstance(state, dict) and isinstance(state.get("weight"), torch.Tensor) and "classes" in state:
        weight, classes = state["weight"], [int(c) for c in state["classes"]]
    else:
        raise DataError(f"{location}: expected a tensor (num_old_classes, d_old) or "
                        '{"weight": tensor, "classes": [...]}')
    if weight.ndim != 2 or not weight.is_floating_point():
        raise DataError(f"{location}: classifier weight must be a 2-D float tensor, got {weight.dtype} "
                        f"{tuple(weight.shape)}")
    return weight, list(range(weight.shape[0])) if classes is None else classes
