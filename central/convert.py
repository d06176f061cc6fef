"""``triptych models convert``: a single-file Stable Diffusion 1.x checkpoint to a diffusers directory, offline.

The checkpoint is in the original LDM/A1111 layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). diffusers' own single-file loader (``from_single_file``) converts it; we
only make sure it can do so offline and that nothing is silently wrong:

1. the file is ``.safetensors`` (a pickle is refused unopened) and its header passes
   ``shared.serving.adapters.check_safetensors``;
2. the architecture comes from a local config directory: ``--config`` (a diffusers model directory), or a
   built-in ``create-tiny`` preset whose tensor shapes the checkpoint has exactly. Only its configs and
   tokenizer are copied into a scratch folder, so no weight can come from anywhere but the checkpoint;
3. the checkpoint's tensor shapes must be the ones the configs describe, component by component: diffusers
   itself leaves a missing text-encoder tensor uninitialised and fails on a missing UNet tensor with a torch
   error;
4. ``from_single_file(..., config=<scratch>, local_files_only=True)`` loads it in the checkpoint's dtype
   (diffusers would upcast to float32), without a safety checker or feature extractor, and the pipeline is
   written next to ``OUT_DIR`` and renamed into place.

Every failure is a ``ConversionError`` with a one-line message.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The original layout's prefix of each component diffusers converts.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
#: diffusers reads the text encoder only when this key is there (``is_clip_model``).
CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
#: UNet input channels -> the pipeline diffusers builds (behaviour follows the UNet's config).
PIPELINES = {4: "StableDiffusionPipeline", 9: "StableDiffusionInpaintPipeline"}
#: Files of a diffusers directory that describe it without weights (diffusers' own allow-list for configs).
CONFIG_SUFFIXES = (".json", ".txt", ".model")
#: What is written, in this order.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

Shapes = dict[str, Counter[tuple[int, ...]]]


class ConversionError(Exception):
    """Why a checkpoint was not converted, in one line."""


@dataclass(frozen=True)
class Component:
    name: str
    cls: str
    fingerprint: str | None = None  # what the stage serving it reports in /v1/info


@dataclass(frozen=True)
class Converted:
    out_dir: Path
    pipeline: str
    dtype: str
    architecture: str  # where the configs came from
    components: list[Component]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.out_dir} ({self.pipeline}, {self.dtype}; configs from {self.architecture})"]
        for c in self.components:
            fp = f"  fingerprint {c.fingerprint}" if c.fingerprint else ""
            lines.append(f"  {c.name:<13} {c.cls:<22}{fp}".rstrip())
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"serve it with TRIPTYCH_MODEL={self.out_dir}")
        return "\n".join(lines)


def convert_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, config: str | Path | None = None, force: bool = False
) -> Converted:
    """Convert ``checkpoint`` into a diffusers directory at ``out_dir`` that Triptych (and diffusers) serve."""
    ckpt, out = Path(checkpoint), Path(out_dir)
    config_dir = Path(config) if config is not None else None
    tensors = read_header(ckpt)
    in_channels = check_layout(ckpt.name, tensors)
    check_out_dir(out, force=force, keep=[ckpt, *([config_dir] if config_dir else [])])
    if config_dir is not None:
        check_config_dir(config_dir)
    dtype = checkpoint_dtype(tensors)
    found = checkpoint_shapes(tensors)
    notes = []
    if sum(k.startswith("model_ema.") for k in tensors) > 100:
        notes.append(
            "the checkpoint also holds EMA weights; its non-EMA UNet weights were converted (diffusers' default)"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triptych-convert-") as scratch_name:
        scratch = Path(scratch_name)
        if config_dir is not None:
            architecture = f"--config {config_dir}"
            configs = copy_configs(config_dir, scratch / "config")
            check_unet_channels(configs, in_channels, ckpt.name, architecture)
            compare_shapes(found, config_shapes(configs), ckpt.name, architecture)
        else:
            configs, preset = infer_configs(ckpt.name, found, tensors, in_channels, scratch)
            architecture = f"the built-in `{preset}` preset (recognised by its tensor shapes)"
        pipe = load_pipeline(ckpt, configs, PIPELINES[in_channels], dtype)
        pipeline = type(pipe).__name__
        classes = {n: type(getattr(pipe, n)).__name__ for n in COMPONENTS if getattr(pipe, n, None) is not None}
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            pipe.save_pretrained(str(staging), safe_serialization=True)
            del pipe  # before the components are read back one by one
            if out.exists():  # empty, or --force
                shutil.rmtree(out)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    prints = fingerprints(out)
    components = [Component(name, cls, prints.get(name)) for name, cls in classes.items()]
    return Converted(out, pipeline, dtype, architecture, components, notes)


# ---------------------------------------------------------------------------------------------- checks
def read_header(ckpt: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The checkpoint's tensors (dtype, shape) from its checked header; a pickle format is never opened."""
    from shared.errors import InvalidValue
    from shared.serving.adapters import PICKLE_SUFFIXES, SUFFIX, check_safetensors

    if ckpt.suffix.lower() in PICKLE_SUFFIXES:
        raise ConversionError(
            f"refusing {ckpt.name}: {ckpt.suffix} is a pickle format, which can run code when loaded; "
            "only .safetensors checkpoints are converted"
        )
    if ckpt.suffix != SUFFIX:
        # diffusers picks its reader by the name: anything but `.safetensors` goes to torch.load.
        raise ConversionError(f"{ckpt.name} is not a {SUFFIX} file; only {SUFFIX} checkpoints are converted")
    if not ckpt.is_file():
        raise ConversionError(f"checkpoint {ckpt} does not exist or is not a file")
    try:
        return check_safetensors(ckpt, ckpt.name)
    except InvalidValue as exc:
        raise ConversionError(exc.message) from None


def check_layout(name: str, tensors: dict[str, Any]) -> int:
    """Check the original SD 1.x layout; return the UNet's input channels (4, or 9 for inpainting)."""
    if any(k.startswith("conditioner.embedders.") for k in tensors):
        raise ConversionError(f"{name} is an SDXL checkpoint; only SD 1.x checkpoints are converted")
    if any(k.startswith("cond_stage_model.model.") for k in tensors):
        raise ConversionError(f"{name} is an SD 2.x checkpoint (OpenCLIP); only SD 1.x checkpoints are converted")
    missing = [p for p in PREFIXES.values() if not any(k.startswith(p) for k in tensors)]
    if missing:
        raise ConversionError(
            f"{name} is not an SD 1.x checkpoint in the original layout: no tensors under {', '.join(missing)}"
        )
    if CLIP_KEY not in tensors:
        raise ConversionError(f"{name} has no {CLIP_KEY}, which diffusers needs to read the text encoder")
    if UNET_CONV_IN not in tensors or len(tensors[UNET_CONV_IN][1]) != 4:
        raise ConversionError(f"{name} has no 4-d {UNET_CONV_IN} (the UNet's first convolution)")
    in_channels = tensors[UNET_CONV_IN][1][1]
    if in_channels not in PIPELINES:
        raise ConversionError(
            f"{name}'s UNet takes {in_channels} input channels; only text-to-image (4) and inpainting (9) "
            "SD 1.x models are converted"
        )
    return int(in_channels)


def check_out_dir(out: Path, *, force: bool, keep: Iterable[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConversionError(f"{out} exists and is not empty; pass --force to replace it")
        real = out.resolve()
        for path in keep:
            if path.resolve() == real or real in path.resolve().parents:
                raise ConversionError(f"refusing to replace {out}: it holds {path}")


def check_config_dir(config: Path) -> None:
    needed = [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer",
    ]
    if not config.is_dir():
        raise ConversionError(f"--config {config} is not a directory (a local diffusers model directory)")
    missing = [n for n in needed if not (config / n).exists()]
    if missing:
        raise ConversionError(f"--config {config} is not a diffusers SD directory: it has no {', '.join(missing)}")


def checkpoint_dtype(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """The one float dtype of the converted components, or float32 when they mix several."""
    found = {d for k, (d, _) in tensors.items() if d in _DTYPES and k.startswith(tuple(PREFIXES.values()))}
    return _DTYPES[found.pop()] if len(found) == 1 else "float32"


def _norm(shape: Iterable[int]) -> tuple[int, ...]:
    # The original VAE's attention projections are 1x1 convolutions where diffusers has linear layers.
    dims = list(shape)
    while dims and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def checkpoint_shapes(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Shapes:
    """Each component's tensor shapes, as a multiset: names differ between the layouts, shapes do not."""
    out: Shapes = {name: Counter() for name in PREFIXES}
    for key, (_, shape) in tensors.items():
        if key.endswith("position_ids"):  # a buffer older transformers saved; not a weight
            continue
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                out[name][_norm(shape)] += 1
    return out


def config_shapes(configs: Path) -> Shapes:
    """The tensor shapes the configs in ``configs`` describe, from models built on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        with torch.device("meta"):
            models = {
                "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(configs / "unet"))),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs / "vae"))),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder"))),
            }
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"cannot read the configs: {_first_line(exc)}") from exc
    return {name: Counter(_norm(t.shape) for t in m.state_dict().values()) for name, m in models.items()}


def check_unet_channels(configs: Path, in_channels: int, name: str, source: str) -> None:
    """The one mismatch worth its own message: an inpainting checkpoint with a text-to-image config, or back."""
    import json

    want = json.loads((configs / "unet" / "config.json").read_text()).get("in_channels")
    if want != in_channels:
        kind = {4: "a text-to-image", 9: "an inpainting"}[in_channels]
        raise ConversionError(
            f"{name}'s UNet takes {in_channels} input channels ({kind} model) but {source} has "
            f"unet/config.json in_channels={want}; pass the configs of {kind} model"
        )


def compare_shapes(found: Shapes, expected: Shapes, name: str, source: str) -> None:
    for component, have in found.items():
        want = expected[component]
        if have != want:
            raise ConversionError(
                f"{name}'s {component} does not match {source}: {sum(have.values())} tensors in the checkpoint, "
                f"{sum(want.values())} in the configs; shapes only in the checkpoint: {_shapes(have - want)}; "
                f"only in the configs: {_shapes(want - have)}"
            )


def _shapes(counts: Counter[tuple[int, ...]]) -> str:
    if not counts:
        return "none"
    items = [f"{list(shape)} x{n}" for shape, n in sorted(counts.items())]
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


# ---------------------------------------------------------------------------------------------- configs
def copy_configs(src: Path, dst: Path) -> Path:
    """Copy a diffusers directory's configs and tokenizer files, never a weight (nor a weight index)."""
    for path in src.rglob("*"):
        if path.is_file() and path.suffix in CONFIG_SUFFIXES and not path.name.endswith(".index.json"):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return dst


def infer_configs(
    name: str, found: Shapes, tensors: dict[str, tuple[str, tuple[int, ...]]], in_channels: int, scratch: Path
) -> tuple[Path, str]:
    """The configs of the built-in preset whose shapes the checkpoint has exactly; else ask for ``--config``.

    Shapes are all a checkpoint says about its architecture; a real model's tokenizer cannot be made offline,
    so anything but our own presets needs its configs passed in."""
    import torch

    from shared.serving.models import PRESETS, create_tiny

    conv_in = tensors[UNET_CONV_IN][1]
    hidden = tensors[CLIP_KEY][1][-1]
    for preset, sizes in PRESETS.items():
        if sizes.unet_channels[0] != conv_in[0] or sizes.text_hidden != hidden:
            continue  # cheap first look, before building the preset
        with torch.random.fork_rng(devices=[]):  # create_tiny seeds the global generator
            full = create_tiny(scratch / f"{preset}-weights", preset=preset, inpainting=in_channels == 9)
        configs = copy_configs(full, scratch / f"{preset}-config")
        shutil.rmtree(full)
        if config_shapes(configs) == found:
            return configs, preset
    raise ConversionError(
        f"cannot tell {name}'s architecture: its tensor shapes match none of the built-in presets "
        f"({', '.join(PRESETS)}); pass --config DIR, a diffusers SD 1.x directory of the same architecture "
        "(only its *.json/*.txt configs and tokenizer are read, e.g. those of stable-diffusion-v1-5/"
        "stable-diffusion-v1-5" + (" or of an inpainting model" if in_channels == 9 else "") + ")"
    )


# ---------------------------------------------------------------------------------------------- load, describe
def load_pipeline(ckpt: Path, configs: Path, pipeline: str, dtype: str) -> Any:
    import diffusers
    import torch

    cls = getattr(diffusers, pipeline)
    try:
        pipe = cls.from_single_file(
            str(ckpt),
            config=str(configs),
            local_files_only=True,
            torch_dtype=getattr(torch, dtype),
            # Triptych has no safety checker; its image processor would only feed one.
            safety_checker=None,
            feature_extractor=None,
        )
    except Exception as exc:  # the library's many failure types, reported in one line
        raise ConversionError(f"diffusers could not convert {ckpt.name}: {_first_line(exc)}") from exc
    for component in PREFIXES:
        module = getattr(pipe, component)
        empty = [n for n, t in module.state_dict().items() if t.is_meta]
        if empty:
            raise ConversionError(f"{ckpt.name}: the {component}'s {empty[0]} was not in the checkpoint")
    return pipe


def fingerprints(out: Path) -> dict[str, str]:
    """The fingerprints the stages will report for ``out``'s components (in /v1/info), computed as the
    text_encoder, diffusion_unet and vae_decoder runtimes do, on the components read back one at a time."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from shared.serving.models import fingerprint, load_component

    model = str(out)
    tokenizer = load_component(CLIPTokenizer, model, "tokenizer")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    scheduler.pop("_diffusers_version", None)
    return {
        "unet": fingerprint(load_component(UNet2DConditionModel, model, "unet"), scheduler),
        "vae": fingerprint(load_component(AutoencoderKL, model, "vae")),
        "text_encoder": fingerprint(
            load_component(CLIPTextModel, model, "text_encoder"), tokenizer.get_vocab(), tokenizer.model_max_length
        ),
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
