"""Gemma's SentencePiece-BPE tokenizer from GGUF metadata, exactly as llama.cpp runs it.

The GGUF holds ``tokenizer.ggml.tokens`` / ``scores`` / ``token_type`` (no merges). Encoding
follows llama.cpp's ``llm_tokenizer_spm`` for ``tokenizer.ggml.model = 'llama'``:

1. user-defined tokens (type 4: newline runs, tab runs, ...) are cut out of the text first, longest
   first, leftmost occurrences (control tokens such as ``<bos>`` are *not* parsed from text);
2. in every remaining fragment spaces become ``▁`` (no space prefix unless
   ``tokenizer.ggml.add_space_prefix``), the fragment is split into UTF-8 characters and the adjacent
   pair whose concatenation is a token with the highest score is merged (ties: leftmost), until no
   pair forms a token;
3. a symbol that is not a token falls back to its UTF-8 bytes (``<0xNN>`` tokens).

``<bos>`` is prepended when ``add_bos`` (the metadata's ``add_bos_token``). Decoding maps ``▁`` back
to spaces, byte tokens to bytes and drops control tokens, so ``decode(encode(s)) == s``.

Example:
    >>> tok = GemmaTokenizer(["<pad>", "<eos>", "<bos>", "a", "b", "ab", "▁", "▁ab", "<0x21>", "\\n"],
    ...                      [0, 0, 0, -1, -1, -2, -1, -3, 0, 0], [3, 3, 3, 1, 1, 1, 1, 1, 6, 4])
    >>> tok.encode("ab ab!\\n")
    [2, 5, 7, 8, 9]
    >>> tok.decode(tok.encode("ab ab!\\n"))
    'ab ab!\\n'
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["GemmaTokenizer"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"


class GemmaTokenizer:
    """SentencePiece BPE with byte fallback over ``tokens`` / ``scores`` / ``types`` (GGUF codes)."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                 bos: int = 2, eos: int = 1, add_bos: bool = True, add_space_prefix: bool = False):
        if not len(tokens) == len(scores) == len(types):
            raise ValueError(f"jaxprune.zoo gemma tokenizer: {len(tokens)} tokens, {len(scores)} "
                             f"scores and {len(types)} types must have one length")
        self.tokens = list(tokens)
        self.scores = [float(s) for s in scores]
        self.types = [int(t) for t in types]
        self.bos, self.eos, self.add_bos, self.add_space_prefix = bos, eos, add_bos, add_space_prefix
        self.ids: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            self.ids.setdefault(t, i)
        self.bytes_ = {}
        for i, (t, ty) in enumerate(zip(self.tokens, self.types, strict=True)):
            if ty == BYTE:
                self.bytes_[int(t[3:5], 16)] = i
        user = [i for i, ty in enumerate(self.types) if ty == USER_DEFINED]
        self.user = sorted(user, key=lambda i: -len(self.tokens[i].encode()))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> GemmaTokenizer:
        """From GGUF metadata (``tokenizer.ggml.*``); only ``model = 'llama'`` (SentencePiece) is
        supported."""
        model = meta.get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError(f"jaxprune.zoo gemma tokenizer: tokenizer.ggml.model is {model!r}, "
                             f"only SentencePiece ('llama') is supported")
        g = lambda k, d: meta.get(f"tokenizer.ggml.{k}", d)  # noqa: E731
        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                   meta["tokenizer.ggml.token_type"], bos=int(g("bos_token_id", 2)),
                   eos=int(g("eos_token_id", 1)), add_bos=bool(g("add_bos_token", True)),
                   add_space_prefix=bool(g("add_space_prefix", False)))

    def __len__(self) -> int:
        return len(self.tokens)

    # -- encoding ---------------------------------------------------------------------------------

    def _fragments(self, text: str) -> list[str | int]:
        frags: list[str | int] = [text]
        for tid in self.user:
            piece = self.tokens[tid]
            out: list[str | int] = []
            for fr in frags:
                if isinstance(fr, int) or piece not in fr:
                    out.append(fr)
                    continue
                parts = fr.split(piece)
                for j, part in enumerate(parts):
                    if j:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def _spm(self, text: str, out: list[int]) -> None:
        sym = list(text)  # UTF-8 characters
        n = len(sym)
        if not n:
            return
        prev, nxt = list(range(-1, n - 1)), list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, str]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = sym[left] + sym[right]
            tid = self.ids.get(s)
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], left, right, s))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, s = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != s or nxt[left] != right:
                continue
            sym[left], sym[right] = s, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        i = 0
        while i != -1:
            tid = self.ids.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:
                for b in sym[i].encode():
                    if b not in self.bytes_:
                        raise ValueError(f"jaxprune.zoo gemma tokenizer: {sym[i]!r} is not a token and the "
                                         f"vocabulary has no byte-fallback token '<0x{b:02X}>' (type {BYTE})")
                    out.append(self.bytes_[b])
            i = nxt[i]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (``<bos>`` first when ``add_bos``, default: the metadata's)."""
        out: list[int] = [self.bos] if (self.add_bos if add_bos is None else add_bos) else []
        prev_special = True
        for fr in self._fragments(text):
            if isinstance(fr, int):
                out.append(fr)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                fr = " " + fr
            self._spm(fr.replace(" ", _SPACE), out)
            prev_special = False
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (control tokens dropped, byte tokens joined as UTF-8)."""
        buf = bytearray()
        for i in ids:
            ty = self.types[int(i)]
            if ty == CONTROL or ty == UNKNOWN:
                continue
            if ty == BYTE:
                buf.append(int(self.tokens[int(i)][3:5], 16))
            else:
                buf.extend(self.tokens[int(i)].replace(_SPACE, " ").encode())
        return buf.decode("utf-8", errors="replace")
