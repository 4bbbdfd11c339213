"""FCT in a chain, on stored features: the training subsets of each h, composition, and the evaluation.

Generations 1..T (0-based ``0..T-1`` here). Each upgrade ``t -> t+1`` has a forward
transformation h(t -> t+1) trained on both generations' features of generation t+1's
training increment; the direct h(1 -> T) is trained on generation 1's and generation T's
features of generation T's increment. The generation-1 test gallery is then moved to
generation T two ways: composed, h(T-1 -> T) o ... o h(1 -> 2), or by the direct h, and
generation T's test queries search it (leave-one-out, as the chain matrix). Reference
points: the raw generation-1 gallery (the matrix's ``M[T][1]``) and generation T's own
(``M[T][T]``, the upper bound of any transformation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch

from raycompat.chain.evaluate_chain import load_aligned
from raycompat.data.feature_store import FeatureStore, FeatureStoreWriter, require_finite
from raycompat.errors import DataError, FeatureStoreError
from raycompat.models.export import load_transformation
from raycompat.models.transformation import Transformation
from raycompat.retrieval.mixed_gallery import evaluate_mixed
from raycompat.storage import filesystem
from raycompat.training.fct import transform_features

log = logging.getLogger(__name__)

# Rows per forward pass of h (an MLP on features: large batches are cheap).
TRANSFORM_BATCH = 8192
METRICS = ("top1", "mAP")


def fct_pairs(generations: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The (old, new) generation pairs (0-based) of the consecutive transformations, and the direct one's."""
    return [(t, t + 1) for t in range(generations - 1)], (0, generations - 1)


def write_subset(source: str, ids: np.ndarray, out: str) -> bool:
    """Write the rows of store ``source`` for ``ids`` (in that order) as store ``out``; False when it holds them already.

    ``out`` keeps ``source``'s model and version, so a transformation trained on it maps
    between those exact models. A store at ``out`` of another version or other ids (the
    source model was retrained, or the increment changed) is replaced. Raises DataError
    when ``source`` lacks an id.
    """
    src = FeatureStore.open(source)
    ids = np.asarray(ids, dtype=object)
    fs, root = filesystem.resolve(out)
    if filesystem.exists(fs, root):
        try:
            held = FeatureStore.open(out, expect_model=src.model, expect_version=src.version, expect_dim=src.dim)
            if held.to_numpy(["id"])["id"].tolist() == ids.tolist():
                return False
        except FeatureStoreError as exc:
            log.info("replacing %s: %s", out, exc)
        fs.delete_dir(root)
    cols = src.to_numpy(["id", "label", "feature"])
    position = {i: k for k, i in enumerate(cols["id"].tolist())}
    missing = [i for i in ids.tolist() if i not in position]
    if missing:
        raise DataError(f"{source} lacks {len(missing)} of the {len(ids)} training ids (first: {missing[0]!r})")
    rows = np.fromiter((position[i] for i in ids.tolist()), dtype=np.int64, count=len(ids))
    writer = FeatureStoreWriter(out, src.model, src.version, src.dim)
    writer.write_part("00000", ids, cols["label"][rows], cols["feature"][rows], sources=[str(source)])
    writer.finalize()
    return True


def check_route(metas: Sequence[Mapping], source: Mapping[str, str], target: Mapping[str, str], route: str) -> None:
    """Refuse transformations that do not chain from ``source`` to ``target`` (each ``{"name", "version"}``).

    h_1 must read ``source``'s features, h_k what h_{k-1} gives, and the last give ``target``'s
    (the queries' model). DataError names the route and the first link that breaks.
    """
    expected = dict(source)
    for k, meta in enumerate(metas):
        found = {"name": meta["old"]["name"], "version": meta["old"]["version"]}
        if found != expected:
            raise DataError(f"{route}: transformation {k + 1} maps from {found['name']} v{found['version']}, "
                            f"but its input is {expected['name']} v{expected['version']}")
        expected = {"name": meta["new"]["name"], "version": meta["new"]["version"]}
    if expected != dict(target):
        raise DataError(f"{route}: ends at {expected['name']} v{expected['version']}, but the queries are "
                        f"{target['name']} v{target['version']}")


def compose(models: Sequence[Transformation], old: torch.Tensor, batch_size: int = TRANSFORM_BATCH) -> torch.Tensor:
    """``h_k(... h_2(h_1(old)))`` for ``models = [h_1, ..., h_k]`` (side-info-free, eval mode); DataError on a dim mismatch."""
    x = old
    for k, h in enumerate(models):
        if x.shape[1] != h.d_old:
            raise DataError(f"transformation {k + 1} reads features of dim {h.d_old}, its input has dim {x.shape[1]}")
        x, _ = transform_features(h, x, None, batch_size)
    return x


def gap_closed(value: float, raw: float, upper: float) -> Optional[float]:
    """The share of the gap from the raw old gallery to the new model's own that ``value`` closes (None: no gap)."""
    return None if upper == raw else (value - raw) / (upper - raw)


def _scores(queries: np.ndarray, gallery: np.ndarray, generation: int, labels: np.ndarray, ids: np.ndarray,
            chunk_size: int) -> dict[str, float]:
    # As the chain matrix scores one entry: a gallery all at one generation, leave-one-out by id.
    n = len(ids)
    found = evaluate_mixed(queries, labels, 1, {generation: gallery}, np.full(n, generation), labels,
                           query_ids=ids, gallery_ids=ids, chunk_size=chunk_size)
    return {m: float(found[m]) for m in METRICS}


def evaluate_fct(gallery_store: str, query_store: str, routes: Mapping[str, Sequence[str]],
                 chunk_size: int = 1024) -> dict:
    """Queries of ``query_store`` against the gallery of ``gallery_store``: raw, the new model's own, and per route.

    ``routes`` maps a name (``composed``, ``direct``) to the transformation directories
    applied in order to the stored gallery features. Returns ``{"raw", "upper", <route>...:
    {"top1", "mAP"}, "gap_closed": {<route>: {"top1", "mAP"}}, "n_items"}`` (percent; the
    gap of :func:`gap_closed`). The raw gallery is searched through the compatible slice.
    """
    (old, new), labels, ids = load_aligned([gallery_store, query_store])
    stores = [FeatureStore.open(uri) for uri in (gallery_store, query_store)]
    source, target = ({"name": store.model, "version": store.version} for store in stores)
    result = {"raw": _scores(new, old, 0, labels, ids, chunk_size),
              "upper": _scores(new, new, 1, labels, ids, chunk_size)}
    gaps = {}
    for route, dirs in routes.items():
        loaded = [load_transformation(d) for d in dirs]
        check_route([meta for _, meta in loaded], source, target, route)
        moved = compose([model for model, _ in loaded], torch.from_numpy(old)).numpy()
        require_finite(f"{route} transformation of {gallery_store}", ids, moved)
        result[route] = _scores(new, moved, 1, labels, ids, chunk_size)
        gaps[route] = {m: gap_closed(result[route][m], result["raw"][m], result["upper"][m]) for m in METRICS}
        log.info("chain fct %s: %s (raw %s, upper %s)", route, result[route], result["raw"], result["upper"])
    result.update(gap_closed=gaps, n_items=int(len(ids)))
    return result
