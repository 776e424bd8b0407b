"""The Gemma part of ``jaxprune run sparse_quant``, end to end on a tiny random Gemma GGUF.

The tiny model (fan-ins 128, two scale groups of 64 rows) is written with ``gguf``'s writer and read
back through the real loader, as in ``tests/test_gemma.py``; the text is a small folder of
``.rst.txt`` files. Checked against independent references: stored bits per weight against the
arithmetic of the format (values, 2:4 positions, float32 scales), the dense row against
``perplexity`` on the documented test windows, exact 2:4 masks, quantized values on an int4 grid,
and that an earlier run's rows of the other models survive into the CSV, JSON and plot.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest

from tests.test_gemma import TINY, write_tiny_gguf

GROUP = 64
CFG = dataclasses.replace(TINY, d=128, head_dim=32, ffn=128)  # every fan-in 128 = 2 groups


def test_nm_quant_check_counts_bytes_and_catches_bad_masks():
    """Packed bits = 2:4 nibbles + 2-bit positions + float32 scales; a 3:4 mask and unquantized
    values are caught."""
    from jaxprune_experiments.sparse_quant import nm_quant_check

    rng = np.random.default_rng(0)
    k, n = 128, 8
    mask = np.zeros((k, n), bool)
    mask[0::4] = mask[2::4] = True
    w = np.where(mask, rng.normal(size=(k, n)), 0.0).astype(np.float32)
    got = nm_quant_check({"k": w}, {"k": mask}, {"k": k}, 4, GROUP)
    by_hand = (k // 2 * n * 4 + k // 2 * n * 2 + (k // GROUP) * n * 32) / (k * n)
    assert got["packed_bits"] == by_hand == 3.5
    assert got["nm_exact"] and got["max_levels"] == GROUP // 2  # 32 distinct unquantized values
    q = np.round(w * 2) / 2  # on a grid of step 0.5: few levels
    levels = max(len(np.unique(q[g:g + GROUP, j][mask[g:g + GROUP, j]]))
                 for g in range(0, k, GROUP) for j in range(n))
    assert nm_quant_check({"k": q}, {"k": mask}, {"k": k}, 4, GROUP)["max_levels"] == levels < 16
    bad = mask.copy()
    bad[1::4] = True  # 3 of every 4 kept
    got = nm_quant_check({"k": np.where(bad, 1.0, 0.0)}, {"k": bad}, {"k": k}, 4, GROUP)
    assert not got["nm_exact"] and math.isnan(got["packed_bits"])
    leak = w.copy()
    leak[3, 0] = 1.0  # a pruned weight that is not 0
    assert not nm_quant_check({"k": leak}, {"k": mask}, {"k": k}, 4, GROUP)["nm_exact"]


def test_sparse_quant_gemma_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="the 'llm' extra (gguf) is not installed")
    from jaxprune.zoo.data import pydocs
    from jaxprune.zoo.models.gemma import perplexity
    from jaxprune.zoo.models.gguf_loader import load_gemma
    from jaxprune_experiments import sparse_quant

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, CFG)
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        (docs / f"f{i}.rst.txt").write_text(" ".join(rng.choice(["abc", "bca", "a", "bc", "ca"], 400)))
    monkeypatch.setenv("JAXPRUNE_PYDOCS", str(docs))
    out = tmp_path / "res"
    out.mkdir()
    old = [{"model": "gpt", "family": "dense f32", "config": "dense f32", "bits": 32.0, "error": 9.0,
            "seconds": 0.0},
           {"model": "gpt", "family": "dense GPTQ", "config": "int4 GPTQ", "bits": 4.25, "error": 9.3,
            "seconds": 1.0}]
    (out / "sparse_quant_quick.json").write_text(json.dumps({"rows": old, "gpt": {"metric": "ppl"}}))

    assert sparse_quant.main(["--quick", "--models", "gemma", "--skip-bench", "--gguf", str(path),
                              "--results-dir", str(out), "--group", str(GROUP)]) == 0
    res = json.loads((out / "sparse_quant_quick.json").read_text())
    rows = res["rows"]
    assert rows[:2] == old and res["gpt"] == {"metric": "ppl"}  # the earlier run's GPT rows kept
    g = {r["config"]: r for r in rows if r["model"] == "gemma"}
    assert list(g) == ["dense f32", "int4 RTN", "int4 GPTQ", "2:4 fp16", "2:4+int4 sparsegpt+rtn",
                       "2:4+int4 joint", "2:4+int4 sparsegpt+obr"]
    assert all(np.isfinite(r["error"]) and r["error"] > 1 and r["peak_rss_mb"] > 0 for r in g.values())
    # the dense row is the documented evaluation: --quick = 2 test windows of 64 tokens after <bos>
    model, params, tok = load_gemma(path)
    text = pydocs.split_text("test", max_chars=8 * 2 * 64)
    ev = pydocs.token_windows(tok.encode(text, add_bos=False), 64, tok.bos, 2)
    assert g["dense f32"]["error"] == pytest.approx(perplexity(model, params, ev), rel=1e-5)
    # bits per weight: int4 codes + a float32 scale per 64 rows; 2:4 keeps half, 2 position bits each
    assert g["int4 RTN"]["bits"] == g["int4 GPTQ"]["bits"] == 4 + 32 / GROUP
    assert g["2:4 fp16"]["bits"] == 0.5 * (16 + 2)
    for c in ["2:4+int4 sparsegpt+rtn", "2:4+int4 joint", "2:4+int4 sparsegpt+obr"]:
        r = g[c]
        assert r["bits"] == r["packed_bits"] == 0.5 * (4 + 2) + 32 / GROUP, r
        assert r["nm_exact"] and r["sparsity"] == 0.5
        assert 2 < r["max_levels"] <= 16  # on an int4 grid (unquantized: up to 32 per group)
    assert g["2:4 fp16"]["sparsity"] == 0.5 and g["int4 GPTQ"]["sparsity"] == 0.0
    assert any(line.startswith("gemma: 2:4+int4 joint") for line in res["verdict"])
    assert res["gemma"]["calib_windows"] == 4 and res["gemma"]["eval_windows"] == 2
    table = list(csv.DictReader(open(out / "sparse_quant_quick.csv")))
    assert [r["model"] for r in table] == ["gpt"] * 2 + ["gemma"] * 7
    assert table[0]["peak_rss_mb"] == "" and float(table[-1]["packed_bits"]) == 3.5
    assert (out / "sparse_quant_quick.png").stat().st_size > 0
    le = res["gemma_layer_errors"]
    assert {r["layer"] for r in le} == {"layer_0/attn/q_einsum", "layer_0/attn/kv_einsum",
                                        "layer_0/attn/attn_vec_einsum", "layer_0/mlp/gating_einsum",
                                        "layer_0/mlp/linear"}
    assert len(le) == 5 * 5 and all(0 < r["rel_error"] < 1 for r in le)

    # --configs re-runs one configuration and the dense row, keeping every other row
    assert sparse_quant.main(["--quick", "--models", "gemma", "--skip-bench", "--gguf", str(path),
                              "--results-dir", str(out), "--group", str(GROUP),
                              "--configs", "2:4+int4 joint"]) == 0
    again = json.loads((out / "sparse_quant_quick.json").read_text())

    def measured(rs: list[dict]) -> list[dict]:  # without the times and memory
        return [{k: v for k, v in r.items() if k not in ("seconds", "eval_s", "peak_rss_mb")} for r in rs]

    # same configurations in the same order, the re-run rows reproduced exactly ...
    assert measured(again["rows"]) == measured(rows)
    assert again["rows"][4] == rows[4] and again["rows"][4]["config"] == "int4 GPTQ"  # kept as it was
    with pytest.raises(SystemExit):  # ... and a label that is not a configuration is refused
        sparse_quant.main(["--quick", "--models", "gemma", "--configs", "2:4+int3 joint"])
