"""Offline datasets. Data packages (tensorflow-datasets, grain) are imported lazily, so
``import jaxprune`` works without them.

* :func:`load_digits` — numpy arrays of scikit-learn's 8x8 digits (fixed 80/20 split), read from an
  offline tfds ``array_record`` copy when tensorflow-datasets is installed.
* :func:`digits_batches` — a grain pipeline (shuffled per epoch, batched) over that copy.
* :mod:`jaxprune.zoo.data.digits_tfds` — the tfds builder itself (imports tfds on import).

>>> from jaxprune.zoo.data import load_digits
>>> x, y = load_digits("train")
>>> x.shape[1:], x.dtype.name
((8, 8, 1), 'float32')
"""

from jaxprune.zoo.data.digits import default_data_dir, digits_batches, load_digits, split_indices

__all__ = ["load_digits", "digits_batches", "default_data_dir", "split_indices"]
