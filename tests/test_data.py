"""Tests for jaxprune.zoo.data: the tfds digits builder, load_digits and the grain pipeline."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_load_digits

from jaxprune.zoo.data import digits as digits_lib
from jaxprune.zoo.data import digits_batches, load_digits, split_indices
from tests.helpers import BLOCK_DATA_PACKAGES


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxprune.zoo.data import digits_tfds

    d = tmp_path_factory.mktemp("tfds")
    digits_tfds.prepare(d)
    return d


def _sk():
    d = sk_load_digits()
    return d.images, d.target


def test_split_is_a_partition_with_fixed_sizes():
    tr, te = split_indices("train"), split_indices("test")
    assert len(tr) == 1438 and len(te) == 359
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    # fixed: same permutation every call
    assert np.array_equal(split_indices("test"), te)


@pytest.mark.parametrize("split", ["train", "test"])
def test_builder_records_equal_sklearn(data_dir, split):
    from jaxprune.zoo.data import digits_tfds

    src = digits_tfds.data_source(split, data_dir)
    recs = src.__getitems__(list(range(len(src))))
    images, target = _sk()
    idx = split_indices(split)
    assert len(recs) == len(idx)
    assert [int(r["index"]) for r in recs] == idx.tolist()  # split order, no write shuffling
    got = np.stack([r["image"] for r in recs])
    assert got.dtype == np.uint8 and got.shape == (len(idx), 8, 8, 1)
    np.testing.assert_array_equal(got[..., 0], images[idx])
    np.testing.assert_array_equal([int(r["label"]) for r in recs], target[idx])


def test_builder_files_are_array_record(data_dir):
    files = sorted(p.name for p in (data_dir / "jaxprune_digits" / "1.0.0").iterdir())
    assert any(".array_record-" in f and "-train." in f for f in files), files
    assert any(".array_record-" in f and "-test." in f for f in files), files


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_load_digits_tfds_equals_sklearn(data_dir, split):
    xt, yt = load_digits(split, source="tfds", data_dir=data_dir)
    xs, ys = load_digits(split, source="sklearn")
    images, target = _sk()
    idx = split_indices(split)
    assert xt.dtype == np.float32 and yt.dtype == np.int32
    assert xt.shape == (len(idx), 8, 8, 1)
    np.testing.assert_array_equal(xt, xs)
    np.testing.assert_array_equal(yt, ys)
    # oracle straight from scikit-learn
    np.testing.assert_array_equal(xs[..., 0], (images[idx] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(ys, target[idx])
    assert 0.0 <= xt.min() and xt.max() <= 1.0


def test_load_digits_returns_fresh_copies(data_dir):
    x, _ = load_digits("test", source="tfds", data_dir=data_dir)
    x[:] = -1
    x2, _ = load_digits("test", source="tfds", data_dir=data_dir)
    assert x2.min() >= 0


def test_data_dir_env_and_argument(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPRUNE_DATA_DIR", str(tmp_path / "env"))
    assert digits_lib.default_data_dir() == tmp_path / "env"
    assert digits_lib.default_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("JAXPRUNE_DATA_DIR")
    assert str(digits_lib.default_data_dir()).endswith(".cache/jaxprune/tfds")


def test_auto_source_uses_env_dir(monkeypatch, data_dir):
    from jaxprune.zoo.data import digits_tfds

    monkeypatch.setenv("JAXPRUNE_DATA_DIR", str(data_dir))
    assert digits_tfds.is_prepared()
    x, y = load_digits("test")
    np.testing.assert_array_equal(x, load_digits("test", source="sklearn")[0])


def test_bad_arguments_name_the_problem(data_dir):
    with pytest.raises(ValueError, match="unknown digits split 'val'"):
        load_digits("val")
    with pytest.raises(ValueError, match="unknown digits source 'csv'"):
        load_digits("train", source="csv")
    with pytest.raises(ValueError, match="batch_size"):
        digits_batches("train", 0, data_dir=data_dir)
    with pytest.raises(ValueError, match="exceeds the 359 examples"):
        digits_batches("test", 400, data_dir=data_dir)
    with pytest.raises(ValueError, match="num_epochs"):
        digits_batches("test", 10, num_epochs=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        digits_batches("all", 10, data_dir=data_dir)


def test_grain_batches_shapes_and_epochs(data_dir):
    bs = 64
    ds = digits_batches("test", bs, seed=3, num_epochs=3, data_dir=data_dir)
    per_epoch = 359 // bs
    assert len(ds) == 3 * per_epoch
    batches = list(ds)
    assert len(batches) == 3 * per_epoch
    for x, y in batches:
        assert x.shape == (bs, 8, 8, 1) and x.dtype == np.float32
        assert y.shape == (bs,) and y.dtype == np.int32
    # every row is a test example; within an epoch no example repeats (a permutation, remainder
    # dropped); the epochs are different permutations
    xs, ys = load_digits("test", source="sklearn")
    key = {xs[i].tobytes(): ys[i] for i in range(len(xs))}
    epochs = []
    for e in range(3):
        rows = np.concatenate([b[0] for b in batches[e * per_epoch:(e + 1) * per_epoch]])
        labs = np.concatenate([b[1] for b in batches[e * per_epoch:(e + 1) * per_epoch]])
        ks = [r.tobytes() for r in rows]
        assert all(key[k] == lab for k, lab in zip(ks, labs, strict=True))
        assert len(set(ks)) == len(ks) == per_epoch * bs
        epochs.append(ks)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_grain_without_drop_remainder_covers_split_once(data_dir):
    ds = digits_batches("test", 100, seed=0, num_epochs=1, drop_remainder=False, data_dir=data_dir)
    sizes = [len(y) for _, y in ds]
    assert sizes == [100, 100, 100, 59]
    x = np.concatenate([b[0] for b in ds])
    xs, _ = load_digits("test", source="sklearn")
    assert sorted(r.tobytes() for r in x) == sorted(r.tobytes() for r in xs)


def test_grain_deterministic_and_unshuffled_order(data_dir):
    a = digits_batches("test", 50, seed=7, data_dir=data_dir)
    b = digits_batches("test", 50, seed=7, data_dir=data_dir)
    c = digits_batches("test", 50, seed=8, data_dir=data_dir)
    np.testing.assert_array_equal(a[2][0], b[2][0])
    assert not np.array_equal(a[0][0], c[0][0])
    plain = digits_batches("test", 50, shuffle=False, data_dir=data_dir)
    xs, ys = load_digits("test", source="sklearn")
    np.testing.assert_array_equal(plain[1][0], xs[50:100])
    np.testing.assert_array_equal(plain[1][1], ys[50:100])


def test_grain_infinite_repeat(data_dir):
    ds = digits_batches("test", 100, num_epochs=None, data_dir=data_dir)
    it = iter(ds)
    got = [next(it)[1].shape for _ in range(10)]  # > 3 batches per epoch: crosses epochs
    assert got == [(100,)] * 10


_BLOCK = BLOCK_DATA_PACKAGES


def test_import_jaxprune_does_not_import_data_packages():
    code = (
        "import sys, jaxprune, jaxprune.zoo.data, jaxprune.zoo.models, jaxprune.zoo.loops\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow_datasets', 'grain', 'array_record', 'tensorflow')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_works_without_tfds_and_grain():
    code = _BLOCK + textwrap.dedent(
        """
        import numpy as np
        import jaxprune
        from jaxprune.zoo.data import load_digits, digits_batches
        x, y = load_digits("test")  # auto -> scikit-learn fallback
        assert x.shape == (359, 8, 8, 1) and y.dtype == np.int32
        try:
            load_digits("test", source="tfds")
        except ImportError:
            pass
        else:
            raise AssertionError("tfds source should need tensorflow_datasets")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
