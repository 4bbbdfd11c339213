"""The old model as a black box: one interface ``images -> features``.

``load_extractor(spec)`` accepts
- a TorchScript file (``.../extractor.pt``) or an exported model directory, as a local
  path or a storage URI (``s3://``, ``gs://``: fetched into the node's cache, see
  :mod:`raycompat.storage.artifacts`; ``file://``: read in place);
- ``package.module:callable``: a callable taking a uint8 array (N, C, H, W) and
  returning features (a class is instantiated with no arguments first);
- ``http://host:port/path``: an endpoint that takes a POSTed ``.npy`` uint8 batch
  and answers with a ``.npy`` float32 feature matrix (see :mod:`.http_server`).

Nothing else about the old model (weights, classifier, training data) is used.
"""

from __future__ import annotations

import http.client
import importlib
import io
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raycompat.errors import DataError
from raycompat.storage import artifacts, filesystem

log = logging.getLogger(__name__)

NPY_MEDIA_TYPE = "application/x-npy"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where}: response is not a .npy array ({exc})") from None


class Extractor:
    """A black-box feature extractor: ``extractor(images_uint8) -> float32 (N, dim)``."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], spec: str):
        self._fn = fn
        self.spec = spec
        self.dim: int | None = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"extractor {self.spec}: expects uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
        feats = self._fn(images)
        if isinstance(feats, torch.Tensor):
            feats = feats.detach().cpu().numpy()
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim != 2 or len(feats) != len(images):
            raise DataError(f"extractor {self.spec}: returned shape {feats.shape} for {len(images)} images")
        if self.dim is not None and feats.shape[1] != self.dim:
            raise DataError(f"extractor {self.spec}: returned dim {feats.shape[1]}, earlier batches had {self.dim}")
        self.dim = feats.shape[1]
        return feats


def _torchscript(path: Path, device: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as exc:
        raise DataError(f"{path}: not a loadable TorchScript file ({str(exc).splitlines()[0]})") from None

    def run(images: np.ndarray) -> np.ndarray:
        # Arrays from Ray's object store are read-only, which torch.from_numpy warns about: copy those.
        batch = torch.from_numpy(np.require(images, requirements="W"))
        with torch.inference_mode():
            try:
                return module(batch.to(device)).float().cpu().numpy()
            except RuntimeError as exc:
                lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                raise DataError(f"{path}: model failed on a batch of shape {images.shape} ({lines[-1] if lines else exc})") from None

    return run


def _python_callable(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"extractor {spec}: cannot import ({exc})") from None
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise DataError(f"extractor {spec}: {attr} is not callable")
    return obj


def _http(url: str, timeout_s: float, retries: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(images: np.ndarray) -> np.ndarray:
        body = npy_bytes(images)
        for attempt in range(retries + 1):
            req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": NPY_MEDIA_TYPE})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                    return npy_load(resp.read(), url)
            except urllib.error.HTTPError as exc:
                # A 4xx is the request's fault: retrying cannot help.
                detail = exc.read()[:200].decode(errors="replace")
                if exc.code < 500 or attempt == retries:
                    raise DataError(f"extractor {url}: HTTP {exc.code} ({detail})") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                if attempt == retries:
                    # urlopen wraps a timeout while connecting in URLError; one while reading is raw.
                    reason = getattr(exc, "reason", exc)
                    if isinstance(reason, TimeoutError):
                        raise DataError(f"extractor {url}: no answer within {timeout_s:g} s, {retries + 1} tries "
                                        "(old.http_timeout_s, old.http_retries)") from None
                    raise DataError(f"extractor {url}: unreachable after {retries + 1} tries ({reason})") from None
            log.warning("extractor %s: attempt %d failed, retrying", url, attempt + 1)
            time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    return run


def load_extractor(spec: str, device: str | None = None, timeout_s: float = 30.0, retries: int = 2) -> Extractor:
    """Turn a TorchScript path, model dir, ``module:callable`` or http(s) URL into an Extractor.

    A TorchScript file or model dir may be a storage URI (``s3://.../models/old``).
    ``timeout_s`` and ``retries`` apply to an http(s) URL: each request waits that long for
    an answer and is tried ``retries`` more times (with backoff) after a timeout, a refused
    connection or a 5xx.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith(("http://", "https://")):
        return Extractor(_http(spec, timeout_s, retries), spec)
    # Any other URI is stored TorchScript: this process fetches it into its node's cache.
    path = artifacts.fetch(spec) if filesystem.is_uri(spec) else Path(spec)
    if path.is_dir():
        path = path / "extractor.pt"
    if path.suffix in (".pt", ".pth", ".ts") or path.exists():
        if not path.is_file():
            raise DataError(f"extractor file not found: {path}")
        return Extractor(_torchscript(path, device), str(path))
    if ":" in spec:
        return Extractor(_python_callable(spec), spec)
    raise DataError(f"extractor {spec!r}: not a TorchScript file, model directory, module:callable or http URL")
