"""A1111 prompt syntax: emphasis weights and prompts longer than CLIP's 77 tokens.

Semantics (what ``docs/api.md`` documents):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:w)`` multiplies it
  by ``w``; they nest (``((a))`` is 1.21). ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters.
  An opening bracket never closed applies to the rest of the prompt; a closing one never opened is literal.
* ``BREAK`` (upper case, a word of its own) ends the current chunk: what follows starts a new one.
* Tokens go into chunks of 75; each chunk is encoded as its own 77-token sequence laid out as the tokenizer
  lays out a short prompt (BOS, tokens, EOS, padding), and the chunks' embeddings are concatenated, so a
  prompt of 76-150 tokens gives ``(1, 154, D)``. (A1111 also moves the words after a late comma into the next
  chunk; Triptych cuts at exactly 75 tokens.)
* Weights scale each token's embedding; then the chunk is rescaled so the mean of its embeddings is what it
  was unweighted (A1111's "restore mean"). Where either mean is 0 (possible with random weights) or not
  finite, the rescale is left out rather than dividing by 0.
* A prompt whose weights are all 1 and that fits one chunk takes exactly diffusers' path (``encode_prompt``):
  same tokens, same embeddings, bit for bit; so ``(word:1.0)`` is ``word``.
* With classifier-free guidance the prompt and the negative prompt get the same number of chunks, the
  shorter padded with chunks of the empty prompt, as A1111 does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

EMPHASIS = 1.1
CHUNK_TOKENS = 75
MAX_CHUNKS = 16  # 1,200 tokens: far past what CLIP-conditioned models were trained to use

# One piece of prompt syntax: an escape, a bracket, ":<number>)" closing a weighted group, or plain text.
_SYNTAX = re.compile(r"\\[\\()\[\]]|\\|\(|\[|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; ``text=None`` marks a BREAK."""

    text: str | None
    weight: float


def parse(prompt: str) -> list[Fragment]:
    """``"a (red:1.3) [cat]"`` -> ``[("a ", 1), ("red", 1.3), (" ", 1), ("cat", 1/1.1)]``; equal neighbours merged."""
    texts: list[str | None] = []
    weights: list[float] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= factor

    for match in _SYNTAX.finditer(prompt):
        piece, weight = match.group(0), match.group(1)
        if piece == "(":
            round_open.append(len(texts))
        elif piece == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif piece == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:
            literal = piece[1] if len(piece) == 2 and piece[0] == "\\" else piece
            for i, part in enumerate(_BREAK.split(literal)):
                if i:
                    texts.append(None)
                    weights.append(1.0)
                if part:
                    texts.append(part)
                    weights.append(1.0)
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)

    merged: list[Fragment] = []
    for text, w in zip(texts, weights, strict=True):
        if text is not None and merged and merged[-1].text is not None and merged[-1].weight == w:
            merged[-1] = Fragment(f"{merged[-1].text}{text}", w)
        else:
            merged.append(Fragment(text, w))
    return merged


def is_plain(fragments: list[Fragment]) -> bool:
    """No emphasis other than 1 and no BREAK: diffusers' path, as long as the tokens fit one chunk."""
    return all(f.text is not None and f.weight == 1.0 for f in fragments)


def plain_text(fragments: list[Fragment]) -> str:
    return "".join(f.text or "" for f in fragments)


@dataclass(frozen=True)
class Chunk:
    """Up to CHUNK_TOKENS token ids and their weights (without BOS/EOS)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def chunks(fragments: list[Fragment], tokenize: Callable[[str], list[int]]) -> list[Chunk]:
    """Token ids of each fragment (no special tokens) in chunks of CHUNK_TOKENS; BREAK closes a chunk."""
    out: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal ids, weights
        out.append(Chunk(tuple(ids), tuple(weights)))
        ids, weights = [], []

    for fragment in fragments:
        if fragment.text is None:
            close()
            continue
        for token in tokenize(fragment.text):
            if len(ids) == CHUNK_TOKENS:
                close()
            ids.append(token)
            weights.append(fragment.weight)
    if ids or not out:
        close()
    return out
