"""Image datasets as uint8 arrays with labels and stable ids.

Every loader returns a :class:`Dataset` of two :class:`ImageSet` splits (train,
test). Images are uint8 ``(N, C, H, W)``; every item has a stable string id
(``<dataset>/<split>/<index>`` or the file's relative path), so features stored
by one stage can be joined back to images by another.

Sources: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files,
scikit-learn's bundled digits, CIFAR-100 through torchvision (downloads only
when asked), any ImageFolder tree, and Parquet tables of (id, image, label).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycompat.data.config import DataConfig
from raycompat.data.idx import read_idx
from raycompat.errors import DataError

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """One split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``ids`` str (N,)."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != n or len(self.ids) != n:
            raise DataError(f"split has {n} images, {len(self.labels)} labels and {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "ImageSet":
        """The items at positions ``index`` (ids travel with them)."""
        return ImageSet(self.images[index], self.labels[index], self.ids[index])


@dataclass
class Dataset:
    name: str
    train: ImageSet
    test: ImageSet
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def _ids(prefix: str, n: int) -> np.ndarray:
    return np.array([f"{prefix}/{i:06d}" for i in range(n)], dtype=object)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT) -> Dataset:
    """Fashion-MNIST (60k train / 10k test, 28x28 grey) from IDX files under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST not found: {root} does not exist (apt-get install dataset-fashion-mnist, or set data.root)"
        )
    splits = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        paths = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            cands = [root / f"{stem}-{kind}.gz", root / f"{stem}-{kind}"]
            found = next((p for p in cands if p.is_file()), None)
            if found is None:
                raise DataError(f"Fashion-MNIST file missing: {cands[0]}")
            paths.append(found)
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[0]}: shape {images.shape} does not match labels {paths[1]} shape {labels.shape}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{paths[1]}: label {labels.max()} outside 0..9")
        splits[split] = ImageSet(
            np.ascontiguousarray(images[:, None, :, :].astype(np.uint8)),
            labels.astype(np.int64),
            _ids(f"fashion_mnist/{split}", len(images)),
        )
    return Dataset("fashion_mnist", splits["train"], splits["test"], list(FASHION_MNIST_CLASSES))


def load_digits(test_fraction: float = 0.3) -> Dataset:
    """scikit-learn's bundled digits (1,797 8x8 images), split by a fixed seed.

    Ids are the original index, so they are stable whatever the split.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.clip(bunch.images * 16.0, 0, 255).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    ids = np.array([f"digits/{i:04d}" for i in range(len(labels))], dtype=object)
    test = np.zeros(len(labels), bool)
    rng = np.random.default_rng(0)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test[rng.choice(members, int(round(test_fraction * len(members))), replace=False)] = True
    whole = ImageSet(images, labels, ids)
    return Dataset("digits", whole.subset(np.flatnonzero(~test)), whole.subset(np.flatnonzero(test)),
                   [str(i) for i in range(10)])


def load_cifar100(root: str | Path, download: bool = False) -> Dataset:
    """CIFAR-100 through torchvision; downloads only when ``download`` is set."""
    from torchvision.datasets import CIFAR100

    splits = {}
    for split in ("train", "test"):
        try:
            ds = CIFAR100(str(root), train=split == "train", download=download)
        except RuntimeError as exc:
            raise DataError(
                f"CIFAR-100 not found under {root} ({exc}); set data.download: true to fetch it (needs internet)"
            ) from None
        images = np.ascontiguousarray(np.asarray(ds.data, np.uint8).transpose(0, 3, 1, 2))
        splits[split] = ImageSet(images, np.asarray(ds.targets, np.int64), _ids(f"cifar100/{split}", len(images)))
    return Dataset("cifar100", splits["train"], splits["test"], list(ds.classes))


def decode_image(data: bytes, image_size: int, channels: int, where: str) -> np.ndarray:
    """Decode encoded image bytes to uint8 (C, S, S); ``where`` names the record for errors."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size))
            arr = np.asarray(img, np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_imagefolder(root: str | Path, image_size: int, channels: int) -> Dataset:
    """An ImageFolder tree: ``root/<split>/<class>/<file>`` with splits train and test.

    Ids are paths relative to ``root``; classes are the sorted folder names of train.
    """
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"image folder {root} must contain train/ and test/ subfolders of class folders")
    class_names = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not class_names:
        raise DataError(f"image folder {root / 'train'} has no class folders")
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split in ("train", "test"):
        images, labels, ids = [], [], []
        for cdir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if cdir.name not in index:
                raise DataError(f"{cdir}: class folder not present in {root / 'train'}")
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(decode_image(f.read_bytes(), image_size, channels, str(f)))
                    labels.append(index[cdir.name])
                    ids.append(str(f.relative_to(root)))
        if not images:
            raise DataError(f"image folder {root / split} has no images")
        splits[split] = ImageSet(np.stack(images), np.asarray(labels, np.int64), np.asarray(ids, dtype=object))
    return Dataset("imagefolder", splits["train"], splits["test"], class_names)


def load_parquet_images(root: str | Path, image_size: int, channels: int) -> Dataset:
    """Parquet tables of (id, image, label) under ``root/train`` and ``root/test``.

    ``image`` is either encoded bytes (PNG/JPEG/...) or a flat uint8 list of
    length channels * image_size**2 in C, H, W order.
    """
    import pyarrow.parquet as pq

    root = Path(root)
    splits = {}
    for split in ("train", "test"):
        files = sorted((root / split).glob("*.parquet"))
        if not files:
            raise DataError(f"no Parquet files under {root / split}")
        images, labels, ids = [], [], []
        for f in files:
            table = pq.read_table(f)
            missing = {"id", "image", "label"} - set(table.column_names)
            if missing:
                raise DataError(f"{f}: missing column(s) {', '.join(sorted(missing))}")
            for rid, img, lab in zip(*(table.column(c).to_pylist() for c in ("id", "image", "label"))):
                where = f"{f} record {rid}"
                if isinstance(img, (bytes, bytearray)):
                    images.append(decode_image(img, image_size, channels, where))
                else:
                    arr = np.asarray(img, np.uint8)
                    if arr.size != channels * image_size * image_size:
                        raise DataError(f"{where}: image has {arr.size} values, expected {channels}x{image_size}x{image_size}")
                    images.append(arr.reshape(channels, image_size, image_size))
                if lab is None:
                    raise DataError(f"{where}: label is null")
                labels.append(int(lab))
                ids.append(str(rid))
        splits[split] = ImageSet(np.stack(images), np.asarray(labels, np.int64), np.asarray(ids, dtype=object))
    n_classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    return Dataset("parquet", splits["train"], splits["test"], [str(i) for i in range(n_classes)])


def stratified_subsample(split: ImageSet, n: int, seed: int) -> ImageSet:
    """At most ``n`` items, the same share of every class, chosen by ``seed``, in original order."""
    if n >= len(split):
        return split
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(split.labels):
        members = np.flatnonzero(split.labels == c)
        keep.append(rng.choice(members, max(1, int(round(n * len(members) / len(split)))), replace=False))
    return split.subset(np.sort(np.concatenate(keep)))


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load the dataset ``cfg`` names, with the configured fallback and subsampling."""
    try:
        ds = _load(cfg.name, cfg)
    except DataError as exc:
        if cfg.fallback is None:
            raise
        log.warning("%s; falling back to the bundled %s dataset (data.fallback)", exc, cfg.fallback)
        ds = _load(cfg.fallback, cfg)
    if cfg.max_train is not None:
        ds.train = stratified_subsample(ds.train, cfg.max_train, seed)
    if cfg.max_test is not None:
        ds.test = stratified_subsample(ds.test, cfg.max_test, seed + 1)
    log.info("dataset %s: %d train, %d test, %d classes, images %s",
             ds.name, len(ds.train), len(ds.test), ds.num_classes, ds.image_shape)
    return ds


def _load(name: str, cfg: DataConfig) -> Dataset:
    if name == "fashion_mnist":
        return load_fashion_mnist(cfg.root or FASHION_MNIST_ROOT)
    if name == "digits":
        return load_digits()
    if name == "cifar100":
        return load_cifar100(cfg.root or "data/cifar100", cfg.download)
    if cfg.root is None:
        raise DataError(f"data.root is required for data.name: {name}")
    if name == "imagefolder":
        return load_imagefolder(cfg.root, cfg.image_size, cfg.channels)
    if name == "parquet":
        return load_parquet_images(cfg.root, cfg.image_size, cfg.channels)
    raise DataError(f"unknown dataset {name!r}")
