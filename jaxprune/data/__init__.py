"""Offline datasets. Data packages (tensorflow-datasets, grain) are imported lazily, so
``import jaxprune`` works without them.

>>> from jaxprune.data import load_digits
>>> x, y = load_digits("train")
>>> x.shape[1:], x.dtype.name
((8, 8, 1), 'float32')
"""

from jaxprune.data.digits import load_digits

__all__ = ["load_digits"]
