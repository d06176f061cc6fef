"""The text-encoder stage: CLIP tokenizer + text encoder, nothing else."""

from __future__ import annotations

import time
from typing import Any

import torch

from shared.models import fingerprint, load_component
from shared.protocol import EncodeRequest, EncodeResponse
from shared.runtime import StageRuntime


class TextEncoderRuntime(StageRuntime):
    """Turns prompts into ``prompt_embeds`` exactly as ``StableDiffusionPipeline.encode_prompt`` does."""

    stage = "text_encoder"

    def _load(self, model: str) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = load_component(CLIPTokenizer, model, "tokenizer")
        text_encoder = load_component(CLIPTextModel, model, "text_encoder")
        self.fingerprint = fingerprint(text_encoder, self.tokenizer.get_vocab(), self.tokenizer.model_max_length)
        self.text_encoder = text_encoder.to(self.device, self.dtype).eval()

    def _warm_up(self) -> None:
        self.encode(EncodeRequest(prompt=["warm up"]))

    def config(self) -> dict[str, Any]:
        cfg = self.text_encoder.config
        return {
            "hidden_size": cfg.hidden_size,
            "max_length": self.tokenizer.model_max_length,
            "vocab_size": cfg.vocab_size,
        }

    def _embed(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = None
        # Like diffusers: only models trained with an attention mask get one.
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(self.device)
        out = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=attention_mask)[0]
        return out.to(dtype=self.dtype)

    @torch.inference_mode()
    def encode(self, request: EncodeRequest) -> EncodeResponse:
        """Embed ``prompt`` and, when guidance is on, ``negative_prompt`` (empty strings when absent)."""
        start = time.perf_counter()
        prompt_embeds = self._embed(request.prompt)
        negative = None
        if request.do_classifier_free_guidance:
            negative = self._embed(request.negative_prompt or [""] * len(request.prompt))
        return EncodeResponse(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            encode_ms=(time.perf_counter() - start) * 1000,
        )
