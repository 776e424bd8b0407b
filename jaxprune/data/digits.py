"""The 8x8 digits images that scikit-learn ships (1797 real images, 10 classes), split 80/20.

``load_digits(split)`` returns ``(images float32 (n, 8, 8, 1) in [0, 1], labels int32)``.
"""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    return x, y


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Digits as numpy arrays for ``split`` in ``{"train", "test", "all"}`` (fixed 80/20 split).

    >>> x, y = load_digits("test")
    >>> len(x), int(y.max())
    (359, 9)
    """
    x, y = _arrays()
    if split == "all":
        return x, y
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(round(TEST_FRACTION * len(x)))
    idx = {"test": perm[:n_test], "train": perm[n_test:]}.get(split)
    if idx is None:
        raise ValueError(f"jaxprune: unknown digits split '{split}'; valid: train, test, all")
    return x[idx], y[idx]
