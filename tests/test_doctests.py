"""Every docstring example in the library runs and gives the output it shows."""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    # the names every example may assume (as in a notebook); anything else the example imports itself
    extraglobs = {"jax": jax, "jnp": jnp, "np": np, "optax": optax, "jp": jaxprune}
    res = doctest.testmod(mod, extraglobs=extraglobs,
                          optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert res.failed == 0, f"{res.failed} doctest failure(s) in {name}"
