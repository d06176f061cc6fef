"""The text-encoder stage: CLIP tokenizer + text encoder, textual-inversion embeddings, and A1111 prompt syntax
(emphasis weights, prompts longer than 77 tokens; ``prompts.py``)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.loaders import TextualInversionLoaderMixin

from shared.errors import InvalidValue, TriptychError
from shared.operations import ENCODE, Operation
from shared.protocol import EncodeRequest, EncodeResponse
from shared.serving.adapters import AdapterRoot
from shared.serving.batching import Batcher, MicroBatcher
from shared.serving.loras import LoraStore, lora_set
from shared.serving.models import fingerprint, load_component
from shared.serving.runtime import StageRuntime
from text_encoder import prompts

log = logging.getLogger("triptych.text_encoder")
CacheKey = tuple[str, tuple[int, ...]]


class EmbeddingCache:
    """An LRU of the text encoder's output for one 77-token row, keyed by (state, exact token ids), bounded in
    bytes. The state is the model fingerprint plus the textual-inversion embeddings loaded: everything else
    that determines the output (weights, chunking) is applied after the cache.

    Keys are token ids, not text: two spellings that tokenize alike share an entry, and a different model
    (fingerprint) never sees another's embeddings. The empty negative prompt is the usual first hit.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: CacheKey, value: torch.Tensor) -> None:
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


class _TextualInversionLoader(TextualInversionLoaderMixin):
    """diffusers' own textual-inversion loader, applied to a bare tokenizer and text encoder (no pipeline)."""

    def __init__(self) -> None:
        self.hf_device_map = None
        self.components: dict[str, Any] = {}  # no pipeline components to offload around the loading


@dataclass(frozen=True)
class PromptPlan:
    """How one prompt is encoded: one or more 77-token rows, per row the token weights (None: all 1) and how
    many of its tokens are not padding (the attention mask of models that use one)."""

    rows: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...] | None, ...]
    lengths: tuple[int, ...]

    def padded(self, n: int, empty: PromptPlan) -> PromptPlan:
        """``n`` rows: the prompt's, then rows of the empty prompt (CFG needs equal lengths)."""
        extra = n - len(self.rows)
        return PromptPlan(
            self.rows + empty.rows * extra, self.weights + empty.weights * extra, self.lengths + empty.lengths * extra
        )


def restore_mean(z: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """A1111's emphasis on one chunk: scale each token's embedding by its weight, then rescale the chunk so its
    mean is what it was. The rescale is left out where either mean is 0 or not finite (0 / 0)."""
    original = z.mean()
    z = z * torch.tensor(weights, dtype=z.dtype, device=z.device).reshape(1, -1, 1)
    weighted = z.mean()
    if bool(original != 0) and bool(weighted != 0) and bool(torch.isfinite(original / weighted)):
        z = z * (original / weighted)
    return z


class TextEncoderRuntime(StageRuntime):
    """Turns prompts into ``prompt_embeds`` exactly as ``StableDiffusionPipeline.encode_prompt`` does."""

    stage = "text_encoder"

    def _load(self, model: str) -> None:
        self.cache = EmbeddingCache(self.settings.embedding_cache_bytes)
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = load_component(CLIPTokenizer, model, "tokenizer")
        text_encoder = load_component(CLIPTextModel, model, "text_encoder")
        self.fingerprint = fingerprint(text_encoder, self.tokenizer.get_vocab(), self.tokenizer.model_max_length)
        self.embeddings: dict[str, str] = {}  # trigger word -> file fingerprint
        self.embeddings_skipped: dict[str, str] = {}  # trigger word -> why it was not loaded
        self._load_embeddings(text_encoder)
        self._state = hashlib.sha256(f"{self.fingerprint}{sorted(self.embeddings.items())}".encode()).hexdigest()[:16]
        self.text_encoder = text_encoder.to(self.device, self.dtype).eval()  # no convolutions: no memory format
        self.loras = LoraStore(
            AdapterRoot(self.settings.lora_dir, kind="LoRA", param="loras"),
            self.text_encoder,
            "text_encoder",
            capacity=self.settings.lora_cache_size,
        )
        self.loras.root.catalog()  # hash the LoRA files now, not in the first /v1/info a readiness probe sends
        self._empty = self.plan("")

    def _load_embeddings(self, text_encoder: Any) -> None:
        """Every textual inversion in ``TRIPTYCH_EMBEDDINGS_DIR``, with diffusers' ``load_textual_inversion``
        (trigger word = file stem). A file that cannot be used is skipped with its reason (``/v1/info``)."""
        root = AdapterRoot(self.settings.embeddings_dir, kind="embedding", param="prompt")
        loader = _TextualInversionLoader()
        for name in root.names():
            try:
                file = root.resolve(name)
                file.tensors()  # the header, checked by hand before safetensors parses it
                loader.load_textual_inversion(
                    str(file.path), token=name, tokenizer=self.tokenizer, text_encoder=text_encoder,
                    use_safetensors=True,
                )  # fmt: skip
            except (TriptychError, ValueError, OSError) as exc:
                reason = exc.message if isinstance(exc, TriptychError) else f"{type(exc).__name__}: {exc}"
                self.embeddings_skipped[name] = reason[:300]
                log.warning("textual inversion %r not loaded: %s", name, reason)
                continue
            self.embeddings[name] = file.fingerprint()
        if self.embeddings:
            log.info("textual inversions loaded: %s", ", ".join(sorted(self.embeddings)))

    def _make_batchers(self) -> dict[Operation[Any, Any], Batcher[Any, Any]]:
        # Every prompt is padded to the same length: requests with the same LoRAs can share a forward.
        self.batcher = MicroBatcher(
            "text-encode",
            self.worker,
            self.encode_batch,
            key=lambda r: lora_set(r.loras),
            size=lambda r: r.batch_size,
            max_items=self.max_batch,
            check=lambda r: self.loras.check(lora_set(r.loras)),
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
            "lora_loaded": ("gauge", "LoRAs loaded in the text encoder", self.loras.loaded),
            "lora_parameter_bytes": ("gauge", "Bytes of LoRA parameters loaded (fp32)", self.loras.parameter_bytes),
        }

    def config(self) -> dict[str, Any]:
        cfg = self.text_encoder.config
        return {
            "hidden_size": cfg.hidden_size,
            "max_length": self.tokenizer.model_max_length,
            "vocab_size": cfg.vocab_size,
            "embeddings": dict(sorted(self.embeddings.items())),
            "embeddings_skipped": dict(sorted(self.embeddings_skipped.items())),
            "loras": self.loras.root.names(),
            "adapters": {"loras": self.loras.root.catalog()},
        }

    # ------------------------------------------------------------------ prompts
    def plan(self, prompt: str) -> PromptPlan:
        """The rows a prompt is encoded as. A prompt without emphasis that fits one chunk is tokenized exactly
        as ``StableDiffusionPipeline.encode_prompt`` tokenizes it; anything else follows ``prompts.py``."""
        if self.embeddings:  # multi-vector embeddings: "tok" -> "tok tok_1 tok_2", as the pipelines do
            prompt = _TextualInversionLoader().maybe_convert_prompt(prompt, self.tokenizer)
        fragments = prompts.parse(prompt)
        if prompts.is_plain(fragments):
            ids = self._tokenize(prompts.plain_text(fragments))
            if len(ids) <= prompts.CHUNK_TOKENS:
                # BOS, tokens, EOS, padding: the row the tokenizer itself makes with padding="max_length".
                return PromptPlan((self._row(tuple(ids)),), (None,), (len(ids) + 2,))
        chunks = prompts.chunks(fragments, self._tokenize)
        if len(chunks) > prompts.MAX_CHUNKS:
            raise InvalidValue(
                f"the prompt is {len(chunks)} chunks of {prompts.CHUNK_TOKENS} tokens; at most "
                f"{prompts.MAX_CHUNKS} are allowed",
                param="prompt",
            )
        return PromptPlan(
            tuple(self._row(c.ids) for c in chunks),
            tuple((1.0, *c.weights, *[1.0] * (self._width - len(c.ids) - 1)) if c.weighted else None for c in chunks),
            tuple(len(c.ids) + 2 for c in chunks),
        )

    @property
    def _width(self) -> int:
        return int(self.tokenizer.model_max_length)

    def _tokenize(self, text: str) -> list[int]:
        """Token ids without BOS/EOS and without truncation (a long prompt is chunked, not cut)."""
        ids: list[int] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text))
        return ids

    def _row(self, ids: tuple[int, ...]) -> tuple[int, ...]:
        """A chunk laid out as the tokenizer lays out a short prompt: BOS, tokens, EOS, padding."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        row = (tok.bos_token_id, *ids, tok.eos_token_id)
        return row + (pad,) * (self._width - len(row))

    def _embed(self, plans: list[PromptPlan], state: str) -> list[torch.Tensor]:
        """Each plan's embeddings (1, 77 x rows, D). Rows already in the cache (under ``state``: model, embeddings,
        active LoRAs) are reused; the rest are computed together in one forward, as the pipeline computes a
        prompt list; then weights, then the rows of a prompt are concatenated."""
        lengths = {(state, row): n for plan in plans for row, n in zip(plan.rows, plan.lengths, strict=True)}
        outs: dict[CacheKey, torch.Tensor | None] = {key: self.cache.get(key) for key in lengths}
        missing = [key for key, out in outs.items() if out is None]
        if missing:
            ids = torch.tensor([row for _, row in missing], device=self.device)
            attention_mask = None
            # Like diffusers: only models trained with an attention mask get one.
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                attention_mask = torch.tensor(
                    [[1] * lengths[key] + [0] * (self._width - lengths[key]) for key in missing], device=self.device
                )
            computed = self.text_encoder(ids, attention_mask=attention_mask)[0].to(dtype=self.dtype)
            for j, key in enumerate(missing):
                outs[key] = computed[j : j + 1]
                self.cache.put(key, computed[j : j + 1].clone())
        embeds = []
        for plan in plans:
            rows = []
            for row, weights in zip(plan.rows, plan.weights, strict=True):
                out = outs[(state, row)]
                assert out is not None  # every key was filled above
                rows.append(out if weights is None else restore_mean(out, weights))
            embeds.append(rows[0] if len(rows) == 1 else torch.cat(rows, dim=1))
        return embeds

    def encode(self, request: EncodeRequest) -> EncodeResponse:
        """``ENCODE`` through the batcher, blocking this thread until it is done."""
        return self.run(ENCODE, request)

    @torch.inference_mode()
    def encode_batch(self, requests: list[EncodeRequest]) -> list[EncodeResponse]:
        """Embed each request's ``prompt`` and, when guidance is on, its ``negative_prompt`` (empty strings when
        absent): all prompts of all requests go through the text encoder together, then all negative prompts.
        A prompt and its negative prompt come back with the same length (long prompts: the shorter one padded
        with empty-prompt chunks). The batcher groups requests by LoRAs: these all have the same."""
        start = time.perf_counter()
        loras = lora_set(requests[0].loras)
        self.loras.activate(loras)
        state = self._state
        if loras:
            state = hashlib.sha256(f"{state}{loras}{self.loras.fingerprints(loras)}".encode()).hexdigest()[:16]
        positive_plans = [[self.plan(p) for p in r.prompt] for r in requests]
        negative_plans: list[list[PromptPlan]] = []
        for r, positives in zip(requests, positive_plans, strict=True):
            if not r.do_classifier_free_guidance:
                negative_plans.append([])
                continue
            negatives = [self.plan(n) for n in (r.negative_prompt or [""] * len(r.prompt))]
            for i, (pos, neg) in enumerate(zip(positives, negatives, strict=True)):
                n = max(len(pos.rows), len(neg.rows))
                positives[i], negatives[i] = pos.padded(n, self._empty), neg.padded(n, self._empty)
            negative_plans.append(negatives)
        # Prompts then negative prompts, in separate forwards as encode_prompt runs them: the same batch shapes
        # as the pipeline's, so a request alone is bit-identical to it.
        positive_embeds = iter(self._embed([p for plans in positive_plans for p in plans], state))
        negative_embeds = iter(self._embed([p for plans in negative_plans for p in plans], state))
        elapsed = (time.perf_counter() - start) * 1000
        out = []
        for positives, negatives in zip(positive_plans, negative_plans, strict=True):
            prompt_embeds = _stack([next(positive_embeds) for _ in positives])
            negative_embeds_ = _stack([next(negative_embeds) for _ in negatives]) if negatives else None
            out.append(
                EncodeResponse(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds_, encode_ms=elapsed)
            )
        return out


def _stack(embeds: list[torch.Tensor]) -> torch.Tensor:
    """The prompts of one request as (P, L, D); prompts of different lengths are refused."""
    if len({e.shape[1] for e in embeds}) > 1:
        raise InvalidValue(
            "the prompts of one request encode to different lengths (long prompts); send them one per request",
            param="prompt",
        )
    return embeds[0] if len(embeds) == 1 else torch.cat(embeds)
