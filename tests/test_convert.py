"""``triptych models convert``: a single-file SD 1.x checkpoint in the original LDM/A1111 layout to a diffusers
directory, offline.

The checkpoints are made here from tiny diffusers models with our own diffusers -> LDM key mapping
(``to_ldm``), so each conversion can be checked against the model it came from: the same tensors, the same
pixels from ``StableDiffusionPipeline``, the same fingerprints from Triptych's stages.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import pickletools
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from central.cli import main
from shared.serving.models import create_tiny
from shared.settings import Settings
from tests.helpers import load_runtimes

WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


# ------------------------------------------------------------------------------------------- diffusers -> LDM
# The original UNet numbers its blocks flat: input_blocks.0 is conv_in, then each down block has
# layers_per_block (resnet[, attention]) pairs and, but for the last, one downsampler; middle_block is
# resnet, attention, resnet; each output block has layers_per_block + 1 pairs, its upsampler last.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    n = layers_per_block + 1
    up_with_attention = {int(m[1]) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        if module in UNET_FIXED:
            new = f"{UNET_FIXED[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{UNET_RESNET[m[3]]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{param}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", module):
            new = f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}.{param}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{UNET_RESNET[m[3]]}.{param}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            block = int(m[1])
            new = f"output_blocks.{block * n + n - 1}.{2 if block in up_with_attention else 1}.conv.{param}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[f"model.diffusion_model.{new}"] = tensor
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The original decoder numbers its up blocks from the lowest resolution: diffusers' up_blocks.0 is up.<last>.
    last = max(int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
            new = f"{m[1]}.norm_out.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"encoder.down.{m[1]}.downsample.conv.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"decoder.up.{last - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"decoder.up.{last - int(m[1])}.upsample.conv.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{param}"
            if tensor.ndim == 2:  # the original attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        elif module in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out") or module in (
            "quant_conv",
            "post_quant_conv",
        ):
            new = key
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out[f"first_stage_model.{new}"] = tensor
    return out


def text_encoder_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level; the original layout has it.
    out = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": t for k, t in sd.items()}
    # Checkpoints made with older transformers also hold this buffer.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def to_ldm(model: Path) -> dict[str, torch.Tensor]:
    """A diffusers SD 1.x directory's weights under the original LDM/A1111 names, as one state dict."""
    layers_per_block = json.loads((model / "unet" / "config.json").read_text())["layers_per_block"]
    return {
        **unet_to_ldm(load_file(model / WEIGHT_FILES["unet"]), layers_per_block),
        **vae_to_ldm(load_file(model / WEIGHT_FILES["vae"])),
        **text_encoder_to_ldm(load_file(model / WEIGHT_FILES["text_encoder"])),
    }


def write_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------- fixtures
def run_cli(*argv: Any) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["models", "convert", *map(str, argv)])
    return code, out.getvalue()


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a network connection was attempted: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny(tmp_path_factory.mktemp("models") / "tiny-inpaint", inpainting=True, seed=1)


@pytest.fixture(scope="module")
def ckpt(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(to_ldm(tiny_model), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def converted(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The txt2img checkpoint through the CLI, without --config (the `tiny` preset's shapes), offline."""
    out = tmp_path_factory.mktemp("out") / "converted"
    with no_network():
        code, stdout = run_cli(ckpt, out)
    assert code == 0, stdout
    return out, stdout


@pytest.fixture(scope="module")
def converted_inpaint(inpaint_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inpainting checkpoint through the CLI with --config: a model of the same architecture but other
    weights, so that equal weights prove they came from the checkpoint and only the configs were read."""
    path = write_checkpoint(to_ldm(inpaint_model), tmp_path_factory.mktemp("ckpt") / "inpaint.safetensors")
    config = create_tiny(tmp_path_factory.mktemp("models") / "other-inpaint", inpainting=True, seed=2)
    out = tmp_path_factory.mktemp("out") / "converted-inpaint"
    with no_network():
        code, stdout = run_cli(path, out, "--config", config)
    assert code == 0, stdout
    assert "StableDiffusionInpaintPipeline" in stdout and f"--config {config}" in stdout
    return out


# ------------------------------------------------------------------------------------------- conversions
def test_the_test_checkpoint_has_the_original_layout(ckpt: Path, tiny_model: Path) -> None:
    state = load_file(ckpt)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",  # the one downsampler of the 2-block tiny UNet
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",  # the upsampler, after resnet and attention
        "model.diffusion_model.out.2.bias",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    sources = sum(len(load_file(tiny_model / f)) for f in WEIGHT_FILES.values())
    assert len(state) == sources + 1  # + position_ids


@pytest.mark.parametrize("which", ["txt2img", "inpaint"])
def test_converted_weights_equal_the_source_tensor_for_tensor(
    which: str, converted: tuple[Path, str], converted_inpaint: Path, tiny_model: Path, inpaint_model: Path
) -> None:
    from transformers import CLIPTokenizer

    out, source = (converted[0], tiny_model) if which == "txt2img" else (converted_inpaint, inpaint_model)
    for component, file in WEIGHT_FILES.items():
        want, got = load_file(source / file), load_file(out / file)
        assert want.keys() == got.keys(), component
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (component, key)
    configs = [json.loads((m / "scheduler" / "scheduler_config.json").read_text()) for m in (out, source)]
    assert configs[0] == configs[1]
    # transformers writes tokenizer.json where the source has vocab.json + merges.txt: compare what they do.
    tokenizers = [CLIPTokenizer.from_pretrained(str(m), subfolder="tokenizer") for m in (out, source)]
    assert tokenizers[0].get_vocab() == tokenizers[1].get_vocab()
    assert tokenizers[0]("a watercolor fox").input_ids == tokenizers[1]("a watercolor fox").input_ids


def test_a_pipeline_from_the_converted_directory_gives_identical_pixels(
    converted: tuple[Path, str], tiny_model: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    def image(model: Path) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(str(model))
        generator = torch.Generator("cpu").manual_seed(7)
        kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
        return pipe("a watercolor fox", generator=generator, **kwargs).images  # type: ignore[no-any-return]

    assert np.array_equal(image(converted[0]), image(tiny_model))


def test_an_inpainting_pipeline_from_the_converted_directory_gives_identical_pixels(
    converted_inpaint: Path, inpaint_model: Path, init_image: PIL.Image.Image, mask_image: PIL.Image.Image
) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    def image(model: Path) -> np.ndarray:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(str(model))
        generator = torch.Generator("cpu").manual_seed(7)
        kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
        out = pipe("a red hat", image=init_image, mask_image=mask_image, generator=generator, **kwargs)
        return out.images  # type: ignore[no-any-return]

    assert np.array_equal(image(converted_inpaint), image(inpaint_model))


def test_triptychs_stages_serve_the_converted_model_with_the_printed_fingerprints(
    converted: tuple[Path, str], tiny_model: Path
) -> None:
    out, stdout = converted
    assert f"TRIPTYCH_MODEL={out}" in stdout and "the built-in `tiny` preset" in stdout
    printed = dict(re.findall(r"^\s+(\w+)\s+\w+\s+fingerprint ([0-9a-f]{16})$", stdout, re.M))
    fingerprints = {}
    for model in (out, tiny_model):
        runtimes = load_runtimes(Settings(model=str(model), device="cpu"))
        fingerprints[model] = {
            "text_encoder": runtimes["te"].fingerprint,
            "unet": runtimes["unet"].fingerprint,
            "vae": runtimes["vae"].fingerprint,
        }
        for rt in runtimes.values():
            rt.close()
    # Same weights, same configs, same tokenizer: Triptych sees the very model the checkpoint was made from.
    assert printed == fingerprints[out] == fingerprints[tiny_model]


def test_a_float16_checkpoint_stays_float16(tiny_model: Path, tmp_path: Path) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in to_ldm(tiny_model).items()}
    code, stdout = run_cli(write_checkpoint(half, tmp_path / "half.safetensors"), tmp_path / "out")
    assert code == 0 and "float16" in stdout
    for file in WEIGHT_FILES.values():
        want, got = load_file(tiny_model / file), load_file(tmp_path / "out" / file)
        assert all(torch.equal(got[k], t.half()) for k, t in want.items()), file


# ------------------------------------------------------------------------------------------- refusals
def assert_refused(capsys: pytest.CaptureFixture[str], argv: list[Any], *needles: str) -> str:
    capsys.readouterr()
    code, stdout = run_cli(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, stdout
    assert err and err[-1].startswith("triptych: ") and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]


@pytest.fixture(scope="module")
def one_text_layer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real architecture but none of the presets: the tiny model with one text-encoder layer, not two."""
    state = {k: v for k, v in to_ldm(tiny_model).items() if ".encoder.layers.1." not in k}
    return write_checkpoint(state, tmp_path_factory.mktemp("ckpt") / "one-layer.safetensors")


def test_an_unrecognised_architecture_without_config_asks_for_config(
    one_text_layer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(capsys, [one_text_layer, tmp_path / "out"], "cannot tell", "pass --config DIR")
    assert not (tmp_path / "out").exists()


def test_configs_that_do_not_match_the_checkpoint_are_refused(
    one_text_layer: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # diffusers itself would leave the missing layer's weights uninitialised (on the meta device).
    message = assert_refused(capsys, [one_text_layer, tmp_path / "out", "--config", tiny_model], "text_encoder")
    assert "20 tensors in the checkpoint, 36 in the configs" in message


def test_an_inpainting_checkpoint_with_text_to_image_configs_is_refused(
    inpaint_model: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_checkpoint(to_ldm(inpaint_model), tmp_path / "inpaint.safetensors")
    assert_refused(capsys, [path, tmp_path / "out", "--config", tiny_model], "9 input channels", "in_channels=4")


class _Trap:
    """Unpickling this touches a file: proof of whether a refused checkpoint was ever loaded."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.sentinel,))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused_unopened(
    suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinel = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": _Trap(sentinel)}))
    assert_refused(capsys, [path, tmp_path / "out"], "pickle format", ".safetensors")
    assert not sentinel.exists()
    # The trap is live (a REDUCE that would call Path.touch), read without executing it: opening the file
    # is what was avoided.
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(path.read_bytes())]
    assert ("REDUCE", None) in ops and ("SHORT_BINUNICODE", "Path.touch") in ops


def test_a_file_not_named_safetensors_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # diffusers picks its reader by the name and would hand anything else to torch.load.
    path = tmp_path / "model.sft"
    path.write_bytes(ckpt.read_bytes())
    assert_refused(capsys, [path, tmp_path / "out"], "not a .safetensors file")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x01\x02", "shorter than its 8-byte header length"),
        (struct.pack("<Q", 10**12) + b"{}", "header in a 10-byte file"),
        (struct.pack("<Q", 4) + b"nope", "its header is not JSON"),
        (struct.pack("<Q", 2) + b"{}", "no tensors under model.diffusion_model."),
    ],
)
def test_a_malformed_safetensors_file_is_a_clear_error(
    content: bytes, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    assert_refused(capsys, [path, tmp_path / "out"], "broken.safetensors", why)


def test_a_non_empty_out_dir_is_refused_unless_forced(
    ckpt: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, [ckpt, out], "exists and is not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"

    code, _ = run_cli(ckpt, out, "--force")
    assert code == 0 and not (out / "keep.txt").exists()
    assert torch.equal(
        load_file(out / WEIGHT_FILES["unet"])["conv_in.weight"],
        load_file(tiny_model / WEIGHT_FILES["unet"])["conv_in.weight"],
    )

    # Never, not even forced, a directory that holds the checkpoint itself.
    inside = tmp_path / "holder"
    inside.mkdir()
    (inside / "model.safetensors").write_bytes(ckpt.read_bytes())
    assert_refused(capsys, [inside / "model.safetensors", inside, "--force"], "it holds")
    assert (inside / "model.safetensors").exists()
