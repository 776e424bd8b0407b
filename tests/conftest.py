"""Test configuration: 8 virtual CPU devices (for mesh tests) before any backend use.

Most of the suite's CPU time is XLA compiling many small programs, not running them; the two
flags below cut compile time by about a third on CPU and did not slow the compute-heavy tests
(MiniLM, demo) in a side-by-side run. They reach notebook kernels too (inherited environment).
Set ``JAXPRUNE_TEST_XLA_OPT=1`` to test with XLA's default optimisation instead.
"""

import os

if os.environ.get("JAXPRUNE_TEST_XLA_OPT") != "1":
    _fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_fast}".strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
