"""A tensorflow-datasets builder for scikit-learn's 8x8 digits, stored as ``array_record``.

This module imports ``tensorflow_datasets`` at the top, so the rest of jaxprune only imports it
lazily (inside functions): ``import jaxprune`` works on machines without tfds. No tensorflow is
needed: the builder writes ``file_format="array_record"`` and :func:`data_source` reads it back
with ``tfds.data_source`` (``tfds.load``/``as_numpy`` would need tensorflow).

The "download" step reads the images that scikit-learn ships (nothing is fetched from the
network). The splits are the fixed 80/20 split of :func:`jaxprune.zoo.data.digits.split_indices`,
written in split order (shuffling disabled); each record stores the raw pixel values (``uint8`` in
``0..16``), the label and ``index``, the row in scikit-learn's array.

Example:
    >>> import tempfile
    >>> from jaxprune.zoo.data import digits_tfds
    >>> d = tempfile.mkdtemp()
    >>> src = digits_tfds.data_source("test", data_dir=d)  # builds once, then reads
    >>> len(src), sorted(src[0])
    (359, ['image', 'index', 'label'])
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxprune.zoo.data import digits as digits_lib

__all__ = ["JaxpruneDigits", "NAME", "prepare", "data_source", "is_prepared"]

NAME = "jaxprune_digits"


class JaxpruneDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits (1797 images, 10 classes), split 80/20 into train/test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: sklearn digits, fixed 80/20 split (seed 0)."}
    # tfds derives ``code_path`` through ``importlib_resources``, which tfds 4.9.10 does not declare
    # as a dependency (ModuleNotFoundError without it); pointing it at this file avoids that path.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The 8x8 handwritten digits shipped with scikit-learn (UCI optdigits test set), "
                "split 80/20 with a fixed permutation. Pixels are raw counts in 0..16."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
            # records keep split order: reading a split gives exactly the sklearn split's arrays
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # nothing to download: scikit-learn ships the images
        return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split: str):
        images, labels = digits_lib.raw_arrays()
        for pos, i in enumerate(digits_lib.split_indices(split)):
            yield pos, {
                "image": images[i][..., None],
                "label": int(labels[i]),
                "index": int(i),
            }


def _version_dir(data_dir: Path) -> Path:
    return data_dir / NAME / str(JaxpruneDigits.VERSION)


def is_prepared(data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether the dataset has been written under ``data_dir`` (default: the cache dir).

    >>> import tempfile
    >>> is_prepared(tempfile.mkdtemp())
    False
    """
    return (_version_dir(digits_lib.default_data_dir(data_dir)) / "dataset_info.json").exists()


def prepare(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build the array_record files under ``data_dir`` unless they exist; return the directory.

    Safe against several processes preparing at once: tfds writes into a temporary directory and
    renames it; the loser of the race finds the dataset prepared and uses it.

    >>> import tempfile
    >>> prepare(tempfile.mkdtemp()).name
    '1.0.0'
    """
    root = digits_lib.default_data_dir(data_dir)
    if not is_prepared(root):
        root.mkdir(parents=True, exist_ok=True)
        builder = JaxpruneDigits(data_dir=str(root), file_format="array_record")
        from tensorflow_datasets.core.utils import tqdm_utils

        was_active = getattr(tqdm_utils, "_active", True)
        tfds.display_progress_bar(False)  # a ~1.5 s build: keep the caller's output clean
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # tfds prints a banner
                builder.download_and_prepare()
        except OSError:
            if not is_prepared(root):  # a real failure, not a lost rename race
                raise
        finally:
            tfds.display_progress_bar(was_active)
    return _version_dir(root)


def data_source(split: str, data_dir: str | os.PathLike[str] | None = None) -> Any:
    """A random-access tfds data source (``len``, ``[i]``, ``__getitems__``) for ``split``.

    ``split`` is ``"train"`` or ``"test"``; the dataset is prepared first if needed.

    >>> import tempfile
    >>> len(data_source("train", tempfile.mkdtemp()))
    1438
    """
    if split not in ("train", "test"):
        raise ValueError(
            f"jaxprune: digits tfds split must be 'train' or 'test', got '{split}'"
        )
    root = digits_lib.default_data_dir(data_dir)
    prepare(root)
    return tfds.data_source(NAME, split=split, data_dir=str(root), download=False)
