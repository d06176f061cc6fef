"""Model directories: making the tiny random-weight model, finding the default one, loading one component.

Each stage loads only its own components with the real diffusers/transformers ``from_pretrained`` code
(SPEC §3). Nothing here builds a pipeline.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.settings import Settings

log = logging.getLogger("triptych.models")

TINY_MODEL_NAME = "tiny-sd-random-v1"


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of a random-weight SD-1.x-shaped model. The VAE's downsampling factor is
    ``2 ** (len(vae_channels) - 1)``, as diffusers computes it."""

    text_hidden: int
    text_layers: int
    text_heads: int
    unet_channels: tuple[int, int]
    unet_heads: int
    sample_size: int
    vae_channels: tuple[int, ...]
    layers_per_block: int = 1
    norm_num_groups: int = 4
    text_intermediate: int | None = None  # default 4 x text_hidden

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae_channels) - 1))


PRESETS: dict[str, TinyPreset] = {
    # 64x64 images from 8x8 latents (VAE factor 8): the whole loop runs in milliseconds on a CPU.
    "tiny": TinyPreset(32, 2, 4, (8, 16), 4, 8, (8, 8, 8, 8)),
    # The payloads of SD-1.5 (77x768 embeddings, 4x64x64 latents, 512x512 images) with little compute.
    "sd15": TinyPreset(768, 1, 12, (32, 64), 8, 64, (8, 16, 16, 16)),
    # The sizes of diffusers' own pipeline tests (StableDiffusionPipelineFastTests.get_dummy_components):
    # a VAE that downsamples by 2, so 64x64 images come from 32x32 latents.
    "diffusers-tiny": TinyPreset(
        32, 5, 4, (32, 64), 8, 32, (32, 64), layers_per_block=2, norm_num_groups=32, text_intermediate=37
    ),
}


def _clip_byte_chars() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _write_tokenizer(path: Path) -> Any:
    """A CLIP tokenizer with a byte-level vocabulary and no merges, made locally (no hub)."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in _clip_byte_chars():
            vocab[ch + suffix] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def create_tiny(path: str | Path, *, preset: str = "tiny", inpainting: bool = False, seed: int = 0) -> Path:
    """Write a random-weight SD-1.x-shaped diffusers directory that StableDiffusionPipeline can load."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=p.text_hidden,
            intermediate_size=p.text_intermediate or p.text_hidden * 4,
            num_attention_heads=p.text_heads,
            num_hidden_layers=p.text_layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=p.text_hidden,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=p.sample_size,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        block_out_channels=p.unet_channels,
        layers_per_block=p.layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=p.text_hidden,
        attention_head_dim=p.unet_heads,
        norm_num_groups=p.norm_num_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=list(p.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * len(p.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(p.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(p.norm_num_groups, *p.vae_channels),
        sample_size=p.sample_size * p.vae_scale_factor,
        scaling_factor=0.18215,
    )
    # SD-1.5's own scheduler configuration.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))  # type: ignore[attr-defined]
    (out / "TRIPTYCH_RANDOM_WEIGHTS").write_text(
        f"random weights, preset={preset}, seed={seed}, inpainting={inpainting}: not a trained model\n"
    )
    return out


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_model(cache_dir: Path) -> Path:
    """The tiny model in the cache folder, made once. Safe when four services start at the same time."""
    target = cache_dir / "models" / TINY_MODEL_NAME
    if (target / "model_index.json").exists():
        return target
    with _file_lock(cache_dir / "models" / f".{TINY_MODEL_NAME}.lock"):
        if (target / "model_index.json").exists():
            return target
        log.warning("no model configured: creating a tiny RANDOM-WEIGHT model in %s (images will be noise)", target)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        try:
            create_tiny(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(settings: Settings) -> str:
    """The model to load: the configured path or hub id, or the default tiny model."""
    if settings.model:
        return settings.model
    path = default_model(settings.cache_dir)
    log.warning("using the tiny random-weight default model at %s; set TRIPTYCH_MODEL for a real one", path)
    return str(path)


def public_model_id(model: str) -> str:
    """How a model is named in public answers (``/v1/info``, ``/v1/models``, metrics labels): a hub id as it
    is, a local directory by its last component. Server paths (a home directory, the user the services run
    as) stay in the logs."""
    path = Path(model)
    if path.is_absolute() or path.exists() or model.startswith((".", "~")):
        return path.name or model
    return model


def is_random_weights(model: str) -> bool:
    return (Path(model) / "TRIPTYCH_RANDOM_WEIGHTS").exists()


def load_component(cls: Any, model: str, subfolder: str) -> Any:
    """Load one component with its class's own ``from_pretrained``, as the pipeline would."""
    local = Path(model)
    if local.exists() and not (local / subfolder).is_dir():
        raise FileNotFoundError(f"model directory has no `{subfolder}/` component")
    return cls.from_pretrained(model, subfolder=subfolder)


def vae_scale_factor(model: str) -> int:
    """How many pixels one latent covers along each side, from the model's VAE config as the pipelines compute
    it (``2 ** (len(vae.config.block_out_channels) - 1)``: 8 for SD, 2 for diffusers' tiny test models). Only
    the config is read, never the VAE's weights. A model directory without a ``vae/`` falls back to 8, the
    pipelines' own default without a VAE; central's compatibility check compares it with the VAE stage's."""
    from diffusers import AutoencoderKL

    local = Path(model)
    if local.exists() and not (local / "vae").is_dir():
        log.warning("model has no vae/ folder: assuming a VAE scale factor of 8")
        return 8
    config = AutoencoderKL.load_config(model, subfolder="vae")
    return int(2 ** (len(config["block_out_channels"]) - 1))  # type: ignore[call-overload]


def fingerprint(module: torch.nn.Module | None = None, *extra: Any) -> str:
    """A short content hash of a component: its config and every weight's name, dtype, shape and bytes.

    Computed on the weights as loaded, before any dtype cast, so the same checkpoint served in fp16 or
    fp32 has one fingerprint; ``extra`` folds in JSON-able state such as a tokenizer's vocabulary.
    """
    h = hashlib.sha256()
    for item in extra:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
    if module is not None:
        config = getattr(module, "config", None)
        if config is not None:
            cfg = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version",)}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for name, tensor in module.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
