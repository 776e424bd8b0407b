"""The 8x8 digits images that scikit-learn ships (1797 real images, 10 classes), split 80/20.

* :func:`load_digits` returns ``(images float32 (n, 8, 8, 1) in [0, 1], labels int32)`` as numpy
  arrays. With ``source="auto"`` it reads the offline tfds ``array_record`` copy
  (:mod:`jaxprune.zoo.data.digits_tfds`) when tensorflow-datasets is installed and scikit-learn's arrays
  otherwise; both give identical arrays and the same split.
* :func:`digits_batches` is a `grain <https://github.com/google/grain>`_ pipeline over the tfds
  source: shuffled per epoch, batched, repeated.

The data directory is ``$JAXPRUNE_DATA_DIR`` if set, else ``~/.cache/jaxprune/tfds``; every
function also takes ``data_dir=``. tensorflow-datasets and grain are imported lazily.

Example:
    >>> x, y = load_digits("train", source="sklearn")
    >>> x.shape, y.dtype.name
    ((1438, 8, 8, 1), 'int32')
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SPLITS",
    "SOURCES",
    "default_data_dir",
    "split_indices",
    "raw_arrays",
    "load_digits",
    "digits_batches",
]

SPLIT_SEED = 0
TEST_FRACTION = 0.2
SPLITS = ("train", "test", "all")
SOURCES = ("auto", "tfds", "sklearn")
ENV_DATA_DIR = "JAXPRUNE_DATA_DIR"


def default_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir`` if given, else ``$JAXPRUNE_DATA_DIR``, else ``~/.cache/jaxprune/tfds``.

    >>> default_data_dir("/tmp/x")
    PosixPath('/tmp/x')
    """
    if data_dir is not None:
        return Path(data_dir).expanduser().absolute()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser().absolute()
    return Path("~/.cache/jaxprune/tfds").expanduser().absolute()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"jaxprune: unknown digits split '{split}'; valid: {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=1)
def raw_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images uint8 (1797, 8, 8) in 0..16, labels int64)``.

    >>> im, lab = raw_arrays()
    >>> im.shape, int(im.max())
    ((1797, 8, 8), 16)
    """
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    images = d.images.astype(np.uint8)
    images.setflags(write=False)
    target = np.asarray(d.target)
    target.setflags(write=False)
    return images, target


def split_indices(split: str) -> np.ndarray:
    """Rows of scikit-learn's array in ``split`` (a fixed permutation: 359 test, 1438 train).

    >>> len(split_indices("test")), len(split_indices("train")), len(split_indices("all"))
    (359, 1438, 1797)
    """
    _check_split(split)
    n = len(raw_arrays()[0])
    if split == "all":
        return np.arange(n)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    return perm[:n_test] if split == "test" else perm[n_test:]


def _to_model_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float32).reshape(-1, 8, 8, 1) / np.float32(16.0)
    return x, np.asarray(labels).astype(np.int32).reshape(-1)


def _sklearn_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = raw_arrays()
    idx = split_indices(split)
    return _to_model_arrays(images[idx], labels[idx])


def _records_to_arrays(records: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([int(r["label"]) for r in records])
    index = np.asarray([int(r["index"]) for r in records])
    return images, labels, index


@functools.lru_cache(maxsize=8)
def _tfds_split(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    from jaxprune.zoo.data import digits_tfds

    parts = [split] if split != "all" else ["train", "test"]
    images, labels, index = [], [], []
    for s in parts:
        src = digits_tfds.data_source(s, root)
        im, lab, ind = _records_to_arrays(src.__getitems__(list(range(len(src)))))
        images.append(im)
        labels.append(lab)
        index.append(ind)
    im, lab, ind = np.concatenate(images), np.concatenate(labels), np.concatenate(index)
    if split == "all":  # restore scikit-learn's order from the stored row index
        order = np.argsort(ind)
        im, lab = im[order], lab[order]
    return _to_model_arrays(im, lab)


def _tfds_available() -> bool:
    try:
        import array_record  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_digits(
    split: str = "train",
    *,
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Digits as numpy arrays for ``split`` in ``{"train", "test", "all"}`` (fixed 80/20 split).

    Args:
      split: ``"train"`` (1438), ``"test"`` (359) or ``"all"`` (1797, scikit-learn's order).
      source: ``"tfds"`` (the array_record copy, built on first use), ``"sklearn"`` or ``"auto"``
        (tfds if installed, else sklearn; a data dir that cannot be written falls back to sklearn
        with a warning). All give identical arrays.
      data_dir: where the tfds copy lives (default :func:`default_data_dir`).

    Returns:
      ``(x, y)``: float32 images ``(n, 8, 8, 1)`` in ``[0, 1]`` and int32 labels ``(n,)``.

    >>> x, y = load_digits("test")
    >>> len(x), int(y.max())
    (359, 9)
    """
    _check_split(split)
    if source not in SOURCES:
        raise ValueError(f"jaxprune: unknown digits source '{source}'; valid: {', '.join(SOURCES)}")
    if source == "auto":
        source = "tfds" if _tfds_available() else "sklearn"
        if source == "tfds":
            try:
                x, y = _tfds_split(split, str(default_data_dir(data_dir)))
                return x.copy(), y.copy()
            except OSError as e:
                warnings.warn(
                    f"jaxprune: could not use the tfds digits under {default_data_dir(data_dir)} "
                    f"({e}); using scikit-learn's arrays",
                    stacklevel=2,
                )
                source = "sklearn"
    if source == "tfds":
        x, y = _tfds_split(split, str(default_data_dir(data_dir)))
        return x.copy(), y.copy()
    return _sklearn_split(split)


def _decode(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(record["image"], np.float32) / np.float32(16.0)
    return x, np.int32(record["label"])


def digits_batches(
    split: str,
    batch_size: int,
    seed: int = 0,
    *,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """A ``grain.MapDataset`` of ``(x (b, 8, 8, 1) float32, y (b,) int32)`` batches of ``split``.

    Each epoch is a fresh permutation of the split (seeded by ``seed`` and the epoch); batches
    never cross an epoch boundary, and with ``drop_remainder`` every batch has ``batch_size``
    rows (``len(split) // batch_size`` per epoch). ``num_epochs=None`` repeats forever. The result
    supports ``len``, indexing and iteration. Needs tensorflow-datasets and grain.

    >>> ds = digits_batches("test", 100, seed=0, num_epochs=2)
    >>> len(ds), ds[0][0].shape, ds[0][1].dtype.name
    (6, (100, 8, 8, 1), 'int32')
    """
    if split not in ("train", "test"):
        raise ValueError(f"jaxprune: digits_batches split must be 'train' or 'test', got '{split}'")
    if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
        raise ValueError(
            f"jaxprune: digits_batches batch_size must be a positive int, got {batch_size!r}"
        )
    if num_epochs is not None and (not isinstance(num_epochs, int | np.integer) or num_epochs <= 0):
        raise ValueError(
            "jaxprune: digits_batches num_epochs must be a positive int or None, "
            f"got {num_epochs!r}"
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"jaxprune: digits_batches seed must be in [0, 2**32), got {seed}")
    import grain

    from jaxprune.zoo.data import digits_tfds

    src = digits_tfds.data_source(split, data_dir)
    if batch_size > len(src) and drop_remainder:
        raise ValueError(
            f"jaxprune: digits_batches batch_size={batch_size} exceeds the {len(src)} examples of "
            f"'{split}', so drop_remainder=True would yield no batches"
        )
    ds = grain.MapDataset.source(src)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.map(_decode).batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.repeat(num_epochs)
