"""Every model directory raycompat writes and reads back: save and load in one place.

A black-box model directory (the old and new models, the side-info model psi) holds:
- ``extractor.pt``: TorchScript, uint8 images (N, C, H, W) -> features (N, dim);
- ``model.json``: name, version, dim, input shape, sha256 of ``extractor.pt`` (written last);
- ``classifier.pt`` (embedding models only): the cosine classifier's weight and the
  classes it covers. Only the BCT baseline reads it; NIFCL never does.

A transformation directory (FCT / FastFill's h) holds ``transformation.pt`` (the
state dict) and ``transformation.json`` (written last; its ``version`` is the
state file's sha256 prefix).

Writers write local directories (callers stage them with
:func:`raycompat.storage.artifacts.staged` for URIs); every file goes through a
temporary sibling and a rename, so a name never holds a partial file.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raycompat.configio import from_dict
from raycompat.errors import DataError
from raycompat.models.config import TransformationConfig
from raycompat.models.side_info import SideInfoModel
from raycompat.models.transformation import Transformation, build_transformation
from raycompat.storage import artifacts

SIDE_INFO_KIND = "side_info"
TRANSFORMATION_KIND = "fct_transformation"
TRANSFORMATION_STATE = "transformation.pt"
TRANSFORMATION_META = "transformation.json"
# Hex digits of the state file's sha256 that name a transformation's version.
VERSION_CHARS = 12


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it onto ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def save_black_box(scripted: torch.jit.ScriptModule, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write ``extractor.pt``, then ``model.json`` (``meta`` plus the extractor's sha256), to ``out_dir``.

    ``model.json`` is written last: a directory without it holds no model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "extractor.pt", lambda tmp: scripted.save(str(tmp)))
    meta = {**meta, "sha256": artifacts.sha256(out_dir / "extractor.pt")}
    write_atomically(out_dir / "model.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return out_dir


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
    torch.save({"weight": classifier_weight.detach().cpu(), "classes": list(classes)}, out / "classifier.pt")
    meta = {"name": name, "version": version, "dim": dim, "input_shape": list(image_shape), "input_dtype": "uint8"}
    return save_black_box(scripted, out, meta)


def export_side_model(model: SideInfoModel, out_dir: Path, name: str, version: str, extra: dict[str, Any]) -> Path:
    """Script psi to a black-box model directory (as :func:`export_model` does, minus a classifier).

    Scripted rather than traced so the black box keeps psi's input-shape check.
    """
    meta = {
        "name": name, "version": version, "dim": model.dim,
        "input_shape": [model.in_channels, model.image_size, model.image_size], "input_dtype": "uint8",
        "kind": SIDE_INFO_KIND, **extra,
    }
    return save_black_box(torch.jit.script(model.cpu().eval()), out_dir, meta)


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


def save_transformation(model_dir: Path, model: Transformation, meta: dict[str, Any]) -> Path:
    """Write ``transformation.pt`` then ``transformation.json`` (the commit point) to ``model_dir``.

    ``meta`` gets ``version``: the sha256 prefix of the state file, so every retrained h
    is a new version and stores transformed by another h are never mixed with this one's.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomically(model_dir / TRANSFORMATION_STATE, lambda tmp: torch.save(state, tmp))
    meta = {**meta, "version": artifacts.sha256(model_dir / TRANSFORMATION_STATE)[:VERSION_CHARS]}
    write_atomically(model_dir / TRANSFORMATION_META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return model_dir


def load_transformation(model_dir: str | Path) -> tuple[Transformation, dict[str, Any]]:
    """The trained h of ``model_dir`` (eval mode, CPU) and its ``transformation.json``.

    ``model_dir`` may be a storage URI: it is then fetched into this node's cache. Raises
    DataError when the directory holds no transformation, or its state file is not the one
    its metadata was written for (errors name ``model_dir``, not the cache).
    """
    model_dir = artifacts.as_location(model_dir)
    meta_path = artifacts.child(model_dir, TRANSFORMATION_META)
    state_path = artifacts.child(model_dir, TRANSFORMATION_STATE)
    if not artifacts.is_file(meta_path) or not artifacts.is_file(state_path):
        raise DataError(f"{model_dir} holds no trained transformation ({TRANSFORMATION_META} + "
                        f"{TRANSFORMATION_STATE}): run train-fct")
    local = artifacts.fetch(model_dir)
    meta = json.loads((local / TRANSFORMATION_META).read_text())
    if meta.get("kind") != TRANSFORMATION_KIND:
        raise DataError(f"{meta_path}: not an FCT transformation (kind {meta.get('kind')!r})")
    if artifacts.sha256(local / TRANSFORMATION_STATE)[:VERSION_CHARS] != meta["version"]:
        raise DataError(f"{state_path} is not the state {meta_path} describes (version {meta['version']})")
    return transformation_from_state(meta, torch.load(local / TRANSFORMATION_STATE, map_location="cpu")), meta


def transformation_from_state(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> Transformation:
    """Rebuild h (eval mode) from its ``transformation.json`` content and state dict."""
    fct = from_dict(TransformationConfig, meta["config"])
    model = build_transformation(fct, meta["d_old"], meta["d_side"], meta["d_new"], seed=0)
    model.load_state_dict(state)
    return model.eval()
