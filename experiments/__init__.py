"""The experiments: one module per study, each with ``main(argv) -> int``; plumbing in ``_common``.

In the repository this is the ``experiments/`` folder (``python -m experiments.<name>`` from the
root); the wheel ships it as the package ``jaxprune_experiments``, which ``jaxprune run <name>``
imports, so modules import each other relatively (``from . import _common``). Results go to
``./results`` of the current directory unless ``--results-dir`` / ``$JAXPRUNE_RESULTS_DIR`` say
otherwise.
"""
