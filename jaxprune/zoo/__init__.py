"""Reference models, offline datasets, training loops and the demo.

The zoo stands apart from the library: it uses jaxprune like any user code does, and no library
module imports it (``tests/test_layering.py`` enforces this).

* :mod:`~jaxprune.zoo.models` — MLP/CNN (linen + nnx), a byte-level GPT, MiniLM, a toy transformer,
  a tiny LM.
* :mod:`~jaxprune.zoo.data` — digits and text as offline tfds ``array_record`` datasets.
* :mod:`~jaxprune.zoo.loops` — small training / evaluation loops.
* :mod:`~jaxprune.zoo.demo` — ``jaxprune demo``.
"""
