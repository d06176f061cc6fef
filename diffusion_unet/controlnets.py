"""ControlNets in the UNet service (SPEC §10): the named ones a request may use, and their residuals in a step.

``TRIPTYCH_CONTROLNETS`` names diffusers ControlNet directories (``name=path,...``). Their configs are read at
start (so a request that names a ControlNet of another architecture gets its 422 before it is queued); the
weights are loaded on first use, on the model thread, and at most ``TRIPTYCH_CONTROLNET_CACHE_SIZE`` stay
loaded (least recently used out first). A job holds the modules it uses, so an eviction never pulls a
ControlNet from under a running request; it is freed when that request ends.

In a step, ``StableDiffusionControlNetPipeline``'s loop runs every ControlNet on the UNet's input (the latents,
doubled for guidance), its timestep and the prompt embeddings, with the control image repeated per image and
per guidance branch; a ControlNet acts between ``start`` and ``end`` (``controlnet_keep``), the residuals of
several are summed in order (``MultiControlNetModel``), and the UNet adds them to its skip connections and mid
block. A lone job does exactly that (``alone``), so it is bit-identical to the pipeline. In a batch
(``mixed``), each ControlNet runs once on the rows of the jobs that use it, and its scaled residuals are added
into zero tensors for the whole batch: rows without a ControlNet get exact zeros, which change nothing, so
requests with different ControlNets, or none, share one UNet forward.

A ControlNet whose scale is 0 at a step (outside its window) is skipped: the pipeline would add its residuals
times 0.0, and adding zeros is exact.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from shared.errors import InvalidValue, NotFound, StageUnavailable
from shared.serving.adapters import NAME_PATTERN, check_name, check_safetensors, file_fingerprint
from shared.settings import parse_named_paths

log = logging.getLogger("triptych.controlnets")

PARAM = "controlnets"
WEIGHTS = "diffusion_pytorch_model.safetensors"
#: Keyword arguments of the UNet forward that carry ControlNet residuals.
Residuals = dict[str, Any]


def parse_controlnets(spec: str) -> dict[str, str]:
    """``"canny=/models/cn-canny,depth=/models/cn-depth"`` -> ``{"canny": "/models/cn-canny", ...}``; names
    match the adapter name pattern (SPEC §10)."""
    return parse_named_paths(spec, "TRIPTYCH_CONTROLNETS", lambda name: bool(NAME_PATTERN.match(name)))


def _config(name: str, source: str) -> dict[str, Any]:
    """A ControlNet's config with ``ControlNetModel``'s defaults filled in. A local directory must hold
    ``.safetensors`` weights: pickle weights are never loaded (SPEC §10)."""
    from diffusers import ControlNetModel

    local = Path(source)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"ControlNet {name!r}: {source} is not a diffusers ControlNet directory (no config.json)")
        if not any((local / f).is_file() for f in (WEIGHTS, f"{WEIGHTS}.index.json")):
            raise ValueError(f"ControlNet {name!r}: {source} has no {WEIGHTS} (pickle weights are never loaded)")
    defaults = {k: p.default for k, p in inspect.signature(ControlNetModel.__init__).parameters.items() if k != "self"}
    config = dict(ControlNetModel.load_config(source))  # type: ignore[arg-type]
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def fit_problems(config: dict[str, Any], unet: Any, vae_scale_factor: int) -> list[str]:
    """How a ControlNet's config does not fit a UNet (its ``config``) and the model's VAE factor: its residuals
    must have the UNet's shapes, and it must take the pipelines' 3-channel control image at the latents' size."""
    problems = []
    pairs = [
        ("in_channels", config["in_channels"], "latent channels", unet.out_channels),
        ("cross_attention_dim", config["cross_attention_dim"], "cross_attention_dim", unet.cross_attention_dim),
        ("block_out_channels", config["block_out_channels"], "block_out_channels", unet.block_out_channels),
        ("layers_per_block", config["layers_per_block"], "layers_per_block", unet.layers_per_block),
        ("down blocks", len(config["down_block_types"]), "down blocks", len(unet.down_block_types)),
        ("class_embed_type", config["class_embed_type"], "class_embed_type", unet.class_embed_type),
        ("addition_embed_type", config["addition_embed_type"], "addition_embed_type", unet.addition_embed_type),
    ]
    for what, mine, theirs, value in pairs:
        if _as_tuple(mine) != _as_tuple(value):
            problems.append(f"its {what} is {mine} but the UNet's {theirs} is {value}")
    cond = config["conditioning_embedding_out_channels"] or (16, 32, 96, 256)
    downsample = 2 ** (len(cond) - 1)
    if downsample != vae_scale_factor:
        problems.append(
            f"it downsamples the control image by {downsample} but the VAE scale factor is {vae_scale_factor}"
        )
    if config["conditioning_channels"] != 3:
        problems.append(f"it takes {config['conditioning_channels']}-channel control images; the pipelines make RGB")
    if config["global_pool_conditions"]:
        problems.append("it pools its conditions globally (guess mode), which is not supported yet")
    if config["controlnet_conditioning_channel_order"] not in ("rgb", "bgr"):
        problems.append(f"unknown channel order {config['controlnet_conditioning_channel_order']!r}")
    return problems


def control_image(
    pixels: torch.Tensor, batch: int, guided: bool, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``StableDiffusionControlNetPipeline.prepare_image`` from the resized pixels (uint8 (1, H, W, 3)): the
    control image processor's ``pil_to_numpy`` (``/ 255``) and ``numpy_to_pt`` (an NHWC array seen as NCHW, a
    layout that decides the CPU kernels), one copy per image, doubled for guidance."""
    array = np.ascontiguousarray(pixels.cpu().numpy()).astype(np.float32) / 255.0
    image = VaeImageProcessor.numpy_to_pt(array).to(dtype=torch.float32)
    image = image.repeat_interleave(batch, dim=0)
    image = image.to(device=device, dtype=dtype)
    if guided:
        image = torch.cat([image] * 2)
    return image


@dataclass(frozen=True)
class ControlNetUse:
    """One ControlNet of one job: the loaded module, its control image (one row per UNet input row), its scale
    and the fraction of the steps it acts on."""

    name: str
    module: Any
    image: torch.Tensor
    scale: float
    start: float
    end: float

    def scale_at(self, i: int, steps: int) -> float:
        """``controlnet_conditioning_scale * controlnet_keep[i]``, as the pipeline computes it for step ``i``."""
        keep = 1.0 - float(i / steps < self.start or (i + 1) / steps > self.end)
        return self.scale * keep


def alone(
    uses: Sequence[ControlNetUse], i: int, steps: int, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor
) -> Residuals:
    """The residuals of one job's ControlNets at step ``i`` of ``steps``, exactly as the pipeline computes them
    (one ControlNet, or a ``MultiControlNetModel`` summing them in order); ``{}`` when none acts."""
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for use in uses:
        scale = use.scale_at(i, steps)
        if scale == 0.0:
            continue
        d, m = use.module(
            x, t, encoder_hidden_states=embeds, controlnet_cond=use.image, conditioning_scale=scale,
            guess_mode=False, return_dict=False,
        )  # fmt: skip
        if down is None or mid is None:
            down, mid = list(d), m
        else:
            down = [prev + cur for prev, cur in zip(down, d, strict=True)]
            mid = mid + m
    if down is None:
        return {}
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


@dataclass(frozen=True)
class RowGroup:
    """The rows of one job in a batched forward, with that job's ControlNets and step."""

    rows: int
    uses: Sequence[ControlNetUse]
    index: int
    steps: int


def mixed(groups: Sequence[RowGroup], x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> Residuals:
    """Residuals for a batched forward whose consecutive row groups each carry their own ControlNets (or none):
    each ControlNet runs once on the rows that use it, scaled per row; other rows get zeros. ``{}`` when no
    ControlNet acts at this step."""
    plan: dict[int, tuple[Any, list[tuple[int, int, torch.Tensor, float]]]] = {}
    offset = 0
    for group in groups:
        for use in group.uses:
            scale = use.scale_at(group.index, group.steps)
            if scale != 0.0:
                plan.setdefault(id(use.module), (use.module, []))[1].append((offset, group.rows, use.image, scale))
        offset += group.rows
    if not plan:
        return {}
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for module, entries in plan.values():
        rows = torch.cat([torch.arange(start, start + count, device=x.device) for start, count, _, _ in entries])
        cond = torch.cat([image for _, _, image, _ in entries])
        d, m = module(
            x[rows], t[rows], encoder_hidden_states=embeds[rows], controlnet_cond=cond, conditioning_scale=1.0,
            guess_mode=False, return_dict=False,
        )  # fmt: skip
        scales = torch.cat([torch.full((count,), s, dtype=m.dtype, device=m.device) for _, count, _, s in entries])
        scales = scales.view(-1, 1, 1, 1)
        if down is None or mid is None:
            down = [r.new_zeros((offset, *r.shape[1:])) for r in d]
            mid = m.new_zeros((offset, *m.shape[1:]))
        for acc, r in zip(down, d, strict=True):
            acc.index_add_(0, rows, r * scales)
        mid.index_add_(0, rows, m * scales)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class ControlNetStore:
    """The configured ControlNets: their configs (read at start) and the ones loaded, least recently used first."""

    def __init__(self, sources: dict[str, str], place: Callable[[Any], Any], *, capacity: int) -> None:
        self.sources = sources
        self.place = place
        self.capacity = capacity
        self.configs = {name: _config(name, source) for name, source in sources.items()}
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._bytes: dict[str, int] = {}  # parameter bytes of each loaded one, for /metrics (read on any thread)
        self.catalog()  # hash the weights now, not in the first /v1/info a readiness probe sends

    def catalog(self) -> list[dict[str, Any]]:
        """Every configured ControlNet with its fingerprint (SHA-256 of its weights file; of its shards' hashes
        when sharded) and the bytes of its weights, ``None`` for a hub id (``/v1/info`` → ``config.adapters``)."""
        entries = []
        for name in self.names():
            local = Path(self.sources[name])
            weights = local / WEIGHTS
            index = local / f"{WEIGHTS}.index.json"
            fingerprint, size = None, None
            if weights.is_file():
                fingerprint, size = file_fingerprint(weights), weights.stat().st_size
            elif index.is_file():
                shards = sorted({str(v) for v in json.loads(index.read_text()).get("weight_map", {}).values()})
                files = [local / shard for shard in shards if (local / shard).is_file()]
                fingerprint = hashlib.sha256("".join(map(file_fingerprint, files)).encode()).hexdigest()[:16]
                size = sum(f.stat().st_size for f in files)
            entries.append({"name": name, "fingerprint": fingerprint, "bytes": size})
        return entries

    def names(self) -> list[str]:
        return sorted(self.sources)

    @property
    def loaded(self) -> int:
        return len(self._loaded)

    @property
    def parameter_bytes(self) -> int:
        return sum(list(self._bytes.values()))

    # ------------------------------------------------------------------ on any thread
    def check(self, name: str, unet_name: str, unet: Any, vae_scale_factor: int, *, param: str = PARAM) -> None:
        """422 for a malformed name or a ControlNet that does not fit UNet ``unet_name``; 404 listing the
        configured ones for an unknown name."""
        check_name(name, kind="ControlNet", param=param)
        if name not in self.sources:
            where = "" if self.sources else " (no ControlNets are configured: TRIPTYCH_CONTROLNETS)"
            listing = ", ".join(self.names()) or "none"
            raise NotFound(f"ControlNet {name!r} not found{where}; available: {listing}", param=param)
        problems = fit_problems(self.configs[name], unet.config, vae_scale_factor)
        if problems:
            raise InvalidValue(
                f"ControlNet {name!r} does not fit UNet {unet_name!r}: {'; '.join(problems)}", param=param
            )

    # ------------------------------------------------------------------ on the model thread
    def get(self, name: str) -> Any:
        """The loaded ControlNet ``name``, loading it now if needed (and unloading the least recently used one
        past the capacity)."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        from diffusers import ControlNetModel

        source = self.sources[name]
        weights = Path(source) / WEIGHTS
        if weights.is_file():
            check_safetensors(weights, name)  # the header, checked by hand before safetensors parses the file
        # Not under inference_mode (the batcher runs in it): parameters made there lose requires_grad, and that
        # alone changes which CPU kernels run, versus the pipeline's own loading (docs/architecture.md).
        with torch.inference_mode(False):
            try:
                module = self.place(ControlNetModel.from_pretrained(source, use_safetensors=True))
            except (OSError, RuntimeError, ValueError) as exc:
                # The operator's files, not the request: 503, and the details (paths) only in the log.
                log.error("ControlNet %r failed to load from %s: %s", name, source, exc)
                raise StageUnavailable(f"ControlNet {name!r} could not be loaded; see the UNet service's log") from None
        while len(self._loaded) >= self.capacity:
            old, _ = self._loaded.popitem(last=False)
            self._bytes.pop(old, None)
            log.info("ControlNet %r unloaded (cache of %d)", old, self.capacity)
        self._loaded[name] = module
        self._bytes[name] = sum(p.numel() * p.element_size() for p in module.parameters())
        log.info("ControlNet %r loaded", name)
        return module
