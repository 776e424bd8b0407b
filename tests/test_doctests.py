"""Every docstring example in the library runs and gives the output it shows."""

import doctest
import importlib
import pkgutil

import pytest

import jaxprune

SKIP_PREFIXES = ("jaxprune.cli",)


def _modules():
    names = ["jaxprune"]
    for m in pkgutil.walk_packages(jaxprune.__path__, "jaxprune."):
        if not m.name.startswith(SKIP_PREFIXES):
            names.append(m.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                          verbose=False)
    assert res.failed == 0, f"{res.failed} doctest failure(s) in {name}"
