"""Record llama.cpp's tokenization and logits of Gemma 3 270M into ``tests/fixtures/gemma_llamacpp.json``.

llama-cpp-python is *not* a jaxprune dependency; run this once in a separate venv:

    python3 -m venv /tmp/llamavenv
    OMP_WAIT_POLICY=PASSIVE /tmp/llamavenv/bin/pip install llama-cpp-python numpy
    /tmp/llamavenv/bin/python scripts/record_gemma_fixture.py \\
        --gguf ~/.cache/jaxprune/gemma3-270m-q4_k_m.gguf

Building llama.cpp takes ~5 min on an idle machine; on a busy one, build only the ``llama`` library
target of its CMake build and point ``LLAMA_CPP_LIB_PATH`` at it. The GGUF is assembled by
``jaxprune.zoo.models.gguf_loader.gguf_path()``. For every prompt the script stores the token ids
(``add_bos=True``, special tokens not parsed) and, per position, the top-``k`` logits; for the
tokenizer-only strings, the token ids. The KV cache is float32 (``type_k = type_v = 0``) to
keep llama.cpp's own noise small; llama.cpp still quantizes activations in its quantized matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "One, two, three, four, five, six,",
    "The Python programming language was created by Guido van",
    "Water boils at a temperature of 100 degrees",
]
TOKENIZE_ONLY = [
    "Hello, world!",
    "  leading spaces and   runs\tof\t\twhitespace\n\n\nthree newlines",
    "naïve café – “quotes” — 日本語のテキスト 🙂🚀",
    "x = {'a': [1, 2, 3]}  # comment\r\n\tindented()",
    "<bos> is not parsed from text; <start_of_turn> neither",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "ʻŌlelo Hawaiʻi, Ελληνικά, Русский, العربية, हिन्दी",
    "\x00\x01 control bytes \x7f and a lone emoji part \U0001f9d1\u200d\U0001f4bb",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"
                                         / "gemma_llamacpp.json"))
    ap.add_argument("--topk", type=int, default=8)
    args = ap.parse_args()
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=256, n_batch=256, logits_all=True, n_threads=2,
                          type_k=0, type_v=0, flash_attn=False, verbose=False, seed=0)
    prompts = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)  # one decode of the whole prompt, logits of every position
        logits = np.asarray(llm.scores[: len(ids)], np.float32)
        top = np.argsort(-logits, axis=-1, kind="stable")[:, : args.topk]
        prompts.append({"text": text, "ids": [int(i) for i in ids],
                        "top_ids": top.tolist(),
                        "top_logits": np.take_along_axis(logits, top, -1).round(4).tolist()})
    toks = [{"text": t, "ids": [int(i) for i in llm.tokenize(t.encode(), add_bos=True, special=False)]}
            for t in TOKENIZE_ONLY]
    out = {"source": f"llama-cpp-python {llama_cpp.__version__}",
           "gguf": os.path.basename(args.gguf),
           "gguf_bytes": os.path.getsize(args.gguf), "kv_cache": "f32", "python": platform.python_version(),
           "topk": args.topk, "prompts": prompts, "tokenize": toks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {args.out}: {len(prompts)} prompts, {len(toks)} tokenizer strings")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
