"""The text-encoder stage: CLIP tokenizer + text encoder, nothing else."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from shared.operations import ENCODE, Operation
from shared.protocol import EncodeRequest, EncodeResponse
from shared.serving.batching import Batcher, MicroBatcher
from shared.serving.models import fingerprint, load_component
from shared.serving.runtime import StageRuntime


class EmbeddingCache:
    """An LRU of prompt embeddings keyed by (model fingerprint, exact token ids), bounded in bytes.

    Keys are token ids, not text: two spellings that tokenize alike share an entry, and a different model
    (fingerprint) never sees another's embeddings. The empty negative prompt is the usual first hit.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, tuple[int, ...]]) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[str, tuple[int, ...]], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}  # fmt: skip


class TextEncoderRuntime(StageRuntime):
    """Turns prompts into ``prompt_embeds`` exactly as ``StableDiffusionPipeline.encode_prompt`` does."""

    stage = "text_encoder"

    def _load(self, model: str) -> None:
        self.cache = EmbeddingCache(self.settings.embedding_cache_bytes)
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = load_component(CLIPTokenizer, model, "tokenizer")
        text_encoder = load_component(CLIPTextModel, model, "text_encoder")
        self.fingerprint = fingerprint(text_encoder, self.tokenizer.get_vocab(), self.tokenizer.model_max_length)
        self.text_encoder = text_encoder.to(self.device, self.dtype).eval()  # no convolutions: no memory format

    def _make_batchers(self) -> dict[Operation[Any, Any], Batcher[Any, Any]]:
        # Every prompt is padded to the same length: any requests can share a forward.
        self.batcher = MicroBatcher(
            "text-encode", self.worker, self.encode_batch, size=lambda r: len(r.prompt), max_items=self.max_batch
        )
        return {ENCODE: self.batcher}

    def _warm_up(self) -> None:
        self.encode_batch([EncodeRequest(prompt=["warm up"])])

    def stats(self) -> dict[str, tuple[str, str, float]]:
        c = self.cache
        return {
            **super().stats(),
            "text_encode_batches": ("counter", "Text-encoder batches run", self.batcher.batches),
            "embedding_cache_hits": ("counter", "Prompt embeddings served from the cache", c.hits),
            "embedding_cache_misses": ("counter", "Prompt embeddings computed", c.misses),
            "embedding_cache_bytes": ("gauge", "Bytes held by the embedding cache", c.bytes),
            "embedding_cache_entries": ("gauge", "Embeddings held by the cache", len(c)),
        }

    def config(self) -> dict[str, Any]:
        cfg = self.text_encoder.config
        return {
            "hidden_size": cfg.hidden_size,
            "max_length": self.tokenizer.model_max_length,
            "vocab_size": cfg.vocab_size,
        }

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (len(texts), L, D). Rows already in the cache are reused; the rest are computed
        together in one forward, as the pipeline computes a prompt list."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        keys = [(self.fingerprint, tuple(row.tolist())) for row in tokens.input_ids]
        rows: list[torch.Tensor | None] = [self.cache.get(k) for k in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            ids = tokens.input_ids[missing].to(self.device)
            attention_mask = None
            # Like diffusers: only models trained with an attention mask get one.
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                attention_mask = tokens.attention_mask[missing].to(self.device)
            out = self.text_encoder(ids, attention_mask=attention_mask)[0].to(dtype=self.dtype)
            for j, i in enumerate(missing):
                rows[i] = out[j : j + 1]
                self.cache.put(keys[i], out[j : j + 1].clone())
        return torch.cat([r for r in rows if r is not None])

    def encode(self, request: EncodeRequest) -> EncodeResponse:
        """``ENCODE`` through the batcher, blocking this thread until it is done."""
        return self.run(ENCODE, request)

    @torch.inference_mode()
    def encode_batch(self, requests: list[EncodeRequest]) -> list[EncodeResponse]:
        """Embed each request's ``prompt`` and, when guidance is on, its ``negative_prompt`` (empty strings when
        absent): all prompts of all requests go through the text encoder together."""
        start = time.perf_counter()
        counts = [len(r.prompt) for r in requests]
        positives = self._embed([p for r in requests for p in r.prompt]).split(counts)
        guided = [r for r in requests if r.do_classifier_free_guidance]
        negatives: Iterator[torch.Tensor] = iter(())
        if guided:
            texts = [t for r in guided for t in (r.negative_prompt or [""] * len(r.prompt))]
            negatives = iter(self._embed(texts).split([len(r.prompt) for r in guided]))
        elapsed = (time.perf_counter() - start) * 1000
        return [
            EncodeResponse(
                prompt_embeds=positive,
                negative_prompt_embeds=next(negatives) if r.do_classifier_free_guidance else None,
                encode_ms=elapsed,
            )
            for r, positive in zip(requests, positives, strict=True)
        ]
