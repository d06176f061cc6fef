"""Settings for every service, read from ``TRIPTYCH_*`` environment variables (each has a CLI twin)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORTS = {"central": 8000, "text_encoder": 8001, "diffusion_unet": 8002, "vae_decoder": 8003}


class Settings(BaseSettings):
    """One settings object for all four services; each reads the fields it needs."""

    model_config = SettingsConfigDict(env_prefix="TRIPTYCH_", extra="ignore")

    # --- models (SPEC §3)
    model: str | None = Field(
        default=None,
        description="Diffusers model directory or hub id. Unset: a tiny random-weight model made in cache_dir.",
    )
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    cache_dir: Path = Field(default=Path.home() / ".cache" / "triptych")
    embeddings_dir: Path | None = Field(
        default=None,
        description="Text encoder: textual-inversion .safetensors files, loaded at start; the trigger word is "
        "the file stem, as in A1111.",
    )
    lora_dir: Path | None = Field(
        default=None,
        description="Text encoder and UNet: LoRA .safetensors files a request may name (diffusers/PEFT or "
        "kohya/A1111 keys); each stage loads its own keys.",
    )
    lora_cache_size: int = Field(
        default=8, ge=1, description="LoRAs each text encoder / UNet keeps loaded (least recently used out)."
    )
    lora_mixed_batches: bool = Field(
        default=True,
        description="UNet: requests with different LoRA sets share a forward (each row its own LoRAs); false "
        "gives each LoRA set forwards of its own.",
    )
    unet_variants: str = Field(
        default="",
        description="Extra UNets as name=path,... (model dir or bare UNet folder); inpaint uses `inpainting`.",
    )
    controlnets: str = Field(
        default="",
        description="UNet: ControlNets a request may name, as name=path,... (each a diffusers ControlNet "
        "directory with .safetensors weights, or a hub id); loaded on first use.",
    )
    controlnet_cache_size: int = Field(
        default=2, ge=1, description="UNet: ControlNets kept loaded (least recently used out)."
    )

    preview_decoder: str | None = Field(
        default=None,
        description="UNet: a diffusers AutoencoderTiny (TAESD) directory for job previews; unset: the linear "
        "latent -> RGB approximation.",
    )

    # --- central: where the stages are, and how long each hop may take
    text_encoder_url: str = "http://127.0.0.1:8001"
    diffusion_unet_url: str = "http://127.0.0.1:8002"
    vae_decoder_url: str = "http://127.0.0.1:8003"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    encode_timeout_s: float = Field(default=60.0, gt=0)
    denoise_timeout_s: float = Field(default=600.0, gt=0)
    decode_timeout_s: float = Field(default=120.0, gt=0)
    info_timeout_s: float = Field(default=5.0, gt=0)

    # --- request limits
    max_body_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_json_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_num_images: int = Field(default=8, ge=1)
    max_inference_steps: int = Field(default=500, ge=1)
    max_side: int = Field(default=2048, ge=8, description="Largest width or height in pixels.")
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest a request body may take to arrive, in all (slow senders); then 408."
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        description="Requests a service holds open at once, bodies still arriving included; past it: 429 (probes "
        "always pass). uvicorn closes sockets beyond this plus 64.",
    )
    max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="Largest input image file.")
    max_image_pixels: int = Field(default=4096 * 4096, gt=0, description="Largest input image, width x height.")

    # --- security (SPEC §13)
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Central: API keys, comma-separated or @/path/to/file (one per line); set, every route but "
        "/healthz, /readyz, /metrics and the docs needs Authorization: Bearer KEY.",
    )
    stage_token: SecretStr = Field(
        default=SecretStr(""),
        description="Stages: a shared token central sends; set, a stage refuses calls without it.",
    )
    cors_origins: str = Field(
        default="",
        description="Central: origins (https://app.example) whose browser POSTs are allowed, comma-separated.",
    )
    allowed_hosts: str = Field(
        default="", description="Host names a service answers for, comma-separated (DNS rebinding); empty: any."
    )

    # --- throughput (issue 5)
    max_queue: int = Field(default=64, ge=1, description="Requests a stage admits at once; past it: 429.")
    max_batch_size: int = Field(
        default=8, ge=1, description="Images (prompts for the text encoder) sharing one forward in a stage."
    )
    batching: bool = Field(
        default=True, description="Batch concurrent requests (UNet: per step); false runs them one by one."
    )
    channels_last: bool | None = Field(
        default=None, description="UNet/VAE in channels-last memory format; unset: on for CUDA, off for CPU."
    )
    compile: bool = Field(default=False, description="torch.compile the UNet (slow first request per shape).")
    cpu_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; unset: torch's own.")
    embedding_cache_bytes: int = Field(
        default=128 * 1024 * 1024, ge=0, description="Text encoder: LRU cache of prompt embeddings; 0 turns it off."
    )

    malloc_mmap_threshold_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="glibc: buffers below this reuse freed heap memory instead of a fresh mmap, whose page "
        "faults cost 1.4 ms per 786 KB msgpack reply on the benchmark VM; 0 keeps glibc's own threshold.",
    )

    # --- jobs (SPEC §11)
    jobs_db: Path | None = Field(
        default=None, description="Central: the SQLite job database; unset: cache_dir/jobs/jobs.sqlite3."
    )
    jobs_url: str = Field(default="", description="Central: redis://host:6379/0 to share jobs between replicas.")
    jobs_dir: Path | None = Field(
        default=None, description="Central: job images (SQLite store); unset: cache_dir/jobs."
    )
    jobs_ttl_s: float = Field(default=24 * 3600, gt=0, description="How long a finished job and its images are kept.")
    jobs_max_bytes: int = Field(
        default=2 * 1024**3, gt=0, description="Job images kept at most; past it the oldest finished jobs go."
    )
    jobs_max_queued: int = Field(default=256, ge=1, description="Jobs queued or running at once; past it: 429.")
    jobs_concurrency: int = Field(
        default=4, ge=1, description="Jobs central runs at once (the UNet batches them step by step)."
    )
    jobs_max_attempts: int = Field(
        default=3, ge=1, description="Times a job is started; a job interrupted that often fails as interrupted."
    )
    jobs_lease_s: float = Field(
        default=30.0, gt=0, description="A running job not renewed this long is another replica's to re-queue."
    )
    jobs_stage_wait_s: float = Field(
        default=60.0, ge=0, description="How long a job waits for an unavailable stage (run again) before it fails."
    )
    jobs_preview_every: int = Field(default=5, ge=0, le=1000, description="A preview every N steps; 0: none.")

    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="json: one object per line; text: short lines; auto: text at a terminal."
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="After SIGTERM: how long in-flight requests may take before the process exits."
    )

    @field_validator("text_encoder_url", "diffusion_unet_url", "vae_decoder_url")
    @classmethod
    def _stage_urls(cls, v: str) -> str:
        """One URL, several comma-separated (replicas), or ``dns+http://name:port`` (every address of a name)."""
        urls = [part.strip().rstrip("/") for part in v.split(",") if part.strip()]
        if not urls:
            raise ValueError("a stage URL is required")
        for url in urls:
            plain = url.removeprefix("dns+") if len(urls) == 1 else url
            if not plain.startswith(("http://", "https://")):
                raise ValueError(
                    f"stage URL must start with http:// or https:// (or dns+http:// for every address of a name), "
                    f"got {url!r}"
                )
        return ",".join(urls)


def parse_named_paths(spec: str, setting: str, valid: Callable[[str], bool]) -> dict[str, str]:
    """A ``name=path,...`` setting (``TRIPTYCH_UNET_VARIANTS``, ``TRIPTYCH_CONTROLNETS``) as ``{name: path}``.
    ``ValueError`` names the setting for an entry that is not ``name=path`` and for a name that is repeated or
    not ``valid``."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"{setting} entry {item!r} is not name=path")
        if not valid(name) or name in out:
            raise ValueError(f"{setting}: the name {name!r} is repeated or not allowed")
        out[name] = path
    return out


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment. Tests pass a Settings to build_app instead."""
    return Settings()
