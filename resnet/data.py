"""CIFAR-10 on disk and custom test pickles, as uint8 arrays (N, 32, 32, 3) plus int64 labels.

Every pickle is read with a restricted unpickler that builds numpy arrays and nothing else: a
course-provided file is still a file from the internet, and plain ``pickle.load`` runs any code in it.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the official CIFAR-10 training images, on the 0..1 scale.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


class DataError(ValueError):
    """Bad or missing data; the message names the file and what was expected."""


class Split(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,)


# ------------------------------------------------------------------------------------------------
# Safe unpickling
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
}


class _Refused(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"refused to load {module}.{name}: only numpy arrays are allowed")


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle a file allowing only numpy arrays, dicts, lists, strings and numbers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        # latin1 decodes Python-2 str pickles (the official CIFAR files) without loss.
        return _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str, path: Path, required: bool = True) -> Any:
    """Look a key up as str or bytes (Python-2 pickles read with encoding='bytes' have bytes keys)."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    if required:
        raise DataError(f"{path}: missing key '{key}' (keys present: {sorted(map(str, d))})")
    return None


def to_nhwc(data: Any, path: Path, field: str = "data") -> np.ndarray:
    """Accept (N, 3072) channel-first rows or (N, 32, 32, 3) uint8; return (N, 32, 32, 3) uint8."""
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: field '{field}' must be uint8 pixels, got dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == 3072:
        return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    if arr.ndim == 4 and arr.shape[1:] == (32, 32, 3):
        return np.ascontiguousarray(arr)
    raise DataError(f"{path}: field '{field}' must have shape (N, 3072) or (N, 32, 32, 3), got {arr.shape}")


def _labels(values: Any, n: int, path: Path) -> np.ndarray:
    labels = np.asarray(values)
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path}: field 'labels' must be a list of {n} labels (one per image), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path}: field 'labels' must hold integers 0-9")
    return labels.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# CIFAR-10
def _download(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, download_root=str(root), md5=ARCHIVE_MD5)
    except Exception as e:
        raise DataError(
            f"CIFAR-10 not found in {root / FOLDER} and the download from {URL} failed ({type(e).__name__}: {e}); "
            f"put the official cifar-10-batches-py folder in {root}"
        ) from None


def load_cifar10(root: str | Path, train: bool, download: bool = True) -> Split:
    """Read the official python pickles from ``root/cifar-10-batches-py``, downloading if allowed."""
    root = Path(root).expanduser()
    folder = root / FOLDER
    files = TRAIN_FILES if train else TEST_FILES
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download(root)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        hint = "" if download else " (or pass --download)"
        raise DataError(f"CIFAR-10 {'train' if train else 'test'} files {missing} not found in {folder}: "
                        f"put the official cifar-10-batches-py folder in {root}{hint}")
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = safe_load_pickle(path)
        if not isinstance(batch, dict):
            raise DataError(f"{path}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
        x = to_nhwc(_get(batch, "data", path), path)
        images.append(x)
        labels.append(_labels(_get(batch, "labels", path), len(x), path))
    return Split(np.concatenate(images), np.concatenate(labels))


def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-balanced train/val index split; val gets ``n_val`` images in total."""
    if n_val == 0:
        return np.arange(len(labels)), np.arange(0)
    if not 0 < n_val < len(labels):
        raise DataError(f"--val-split must be between 0 and {len(labels) - 1}, got {n_val}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder apportionment, so per-class shares sum exactly to n_val.
    share = counts * n_val / len(labels)
    per_class = np.floor(share).astype(int)
    per_class[np.argsort(share - per_class)[::-1][: n_val - per_class.sum()]] += 1
    val = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per_class)
    ])
    val = np.sort(val)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def cifar10_splits(root: str | Path, val_split: int, seed: int, download: bool = True,
                   train_subset: int = 0) -> tuple[Split, Split]:
    """Train and validation sets carved from the CIFAR-10 training files."""
    full = load_cifar10(root, train=True, download=download)
    train_idx, val_idx = stratified_split(full.labels, val_split, seed)
    if train_subset:
        train_idx = train_idx[:train_subset]
    return (Split(full.images[train_idx], full.labels[train_idx]),
            Split(full.images[val_idx], full.labels[val_idx]))


# ------------------------------------------------------------------------------------------------
# Custom pickles (course/Kaggle test files)
class CustomSet(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    ids: np.ndarray  # (N,) as given
    labels: np.ndarray | None  # int64 (N,) when the file has 'labels'


def load_custom_pickle(path: str | Path, need_ids: bool = True, need_labels: bool = False) -> CustomSet:
    """Read a dict with 'data' ((N,3072) channel-first or (N,32,32,3) uint8), 'ids' and 'labels'.

    Ids may be left out only where ``need_ids`` is False (then they are 0..N-1).
    """
    path = Path(path)
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'ids', got {type(obj).__name__}")
    images = to_nhwc(_get(obj, "data", path), path)
    ids = _get(obj, "ids", path, required=need_ids)
    if ids is None:
        ids = np.arange(len(images))
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != len(images):
        raise DataError(f"{path}: field 'ids' must have one id per image ({len(images)}), got shape {ids.shape}")
    raw_labels = _get(obj, "labels", path, required=need_labels)
    labels = None if raw_labels is None else _labels(raw_labels, len(images), path)
    return CustomSet(images, ids, labels)
