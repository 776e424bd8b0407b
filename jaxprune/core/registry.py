"""Name lookup shared by the registries (criteria, allocations, one-shot layer methods).

One set of rules and messages: a value of the registry's class passes through, a known name
returns its entry, anything else raises naming what was given and what is valid.

>>> lookup("colour", "red", {"red": 1}, int)
1
>>> lookup("colour", "blue", {"red": 1}, int)
Traceback (most recent call last):
...
ValueError: jaxprune: unknown colour 'blue'; valid: ['red']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["lookup", "check_free"]

T = TypeVar("T")


def lookup(kind: str, name: Any, table: Mapping[str, T], cls: type | tuple[type, ...]) -> Any:
    """``name`` itself if it is a ``cls`` value, else ``table[name]`` (a clear error otherwise).

    >>> lookup("size", 3, {"small": 1}, int)
    3
    """
    if isinstance(name, cls):
        return name
    if not isinstance(name, str):
        what = cls.__name__ if isinstance(cls, type) else " or ".join(c.__name__ for c in cls)
        article = "an" if what[0] in "AEIOU" else "a"
        raise TypeError(f"jaxprune: {kind} must be {article} {what} or a name {sorted(table)}, got "
                        f"{type(name).__name__}: {name!r}")
    if name not in table:
        raise ValueError(f"jaxprune: unknown {kind} '{name}'; valid: {sorted(table)}")
    return table[name]


def check_free(kind: str, name: str, table: Mapping[str, Any], value: Any,
               overwrite: bool = False) -> None:
    """Refuse to register ``value`` under a ``name`` already taken by a different value.

    >>> check_free("colour", "red", {"red": 1}, 1)   # the same value again: fine
    >>> check_free("colour", "red", {"red": 1}, 2)
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: a colour named 'red' is already registered (as 1); pass overwrite=True to replace it
    """
    old = table.get(name)
    if old is not None and not overwrite and old is not value and old != value:
        raise ValueError(f"jaxprune: a {kind} named '{name}' is already registered (as {old!r}); "
                         "pass overwrite=True to replace it")
