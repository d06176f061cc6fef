"""Model directories: the tiny model, the default cache, per-stage loading, fingerprints, settings."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from central.cli import build_parser, main
from diffusion_unet.runtime import UNetRuntime
from shared.protocol import DecodeRequest, DenoiseRequest, EncodeRequest
from shared.serving.models import create_tiny, default_model, fingerprint, resolve_model
from shared.settings import Settings
from text_encoder.runtime import TextEncoderRuntime
from vae_decoder.runtime import VaeRuntime


def test_create_tiny_cli_writes_a_diffusers_directory(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    assert main(["models", "create-tiny", str(tmp_path / "m")]) == 0
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        assert (tmp_path / "m" / part).is_dir()
    assert (tmp_path / "m" / "TRIPTYCH_RANDOM_WEIGHTS").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert pipe.unet.config.in_channels == 4


def test_create_tiny_inpainting_has_nine_input_channels(tmp_path: Path) -> None:
    assert main(["models", "create-tiny", str(tmp_path / "inp"), "--inpainting"]) == 0
    config = json.loads((tmp_path / "inp" / "unet" / "config.json").read_text())
    assert config["in_channels"] == 9 and config["out_channels"] == 4


def test_default_model_is_made_once_even_when_raced(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    target = results[0]
    assert (target / "model_index.json").exists()
    stamp = (target / "unet" / "config.json").stat().st_mtime_ns
    assert resolve_model(Settings(cache_dir=tmp_path)) == str(target)
    assert (target / "unet" / "config.json").stat().st_mtime_ns == stamp  # not rewritten
    # No half-written temporary directories are left behind.
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".partial-")] == []


def test_each_stage_loads_only_its_own_components(tiny_model: Path, tmp_path: Path) -> None:
    only_text = tmp_path / "only-text"
    only_text.mkdir()
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(tiny_model / part, only_text / part)
    te = TextEncoderRuntime(Settings(model=str(only_text), device="cpu"))
    te.load()
    assert te.encode(EncodeRequest(prompt=["ok"])).prompt_embeds.shape == (1, 77, 32)
    te.close()

    unet = UNetRuntime(Settings(model=str(only_text), device="cpu"))
    with pytest.raises(FileNotFoundError, match="unet"):
        unet.load()
    assert not unet.ready
    with pytest.raises(Exception, match="failed to load"):
        unet.check_ready()
    unet.close()


def test_fingerprint_follows_weights_not_serving_dtype(tiny_model: Path, tmp_path: Path, te_runtime) -> None:  # type: ignore[no-untyped-def]
    bf16 = TextEncoderRuntime(Settings(model=str(tiny_model), device="cpu", dtype="bfloat16"))
    bf16.load()
    assert bf16.fingerprint == te_runtime.fingerprint
    assert bf16.info().dtype == "bfloat16"
    bf16.close()

    other = create_tiny(tmp_path / "other", seed=1)
    te_other = TextEncoderRuntime(Settings(model=str(other), device="cpu"))
    te_other.load()
    assert te_other.fingerprint != te_runtime.fingerprint
    te_other.close()

    module = torch.nn.Linear(2, 2)
    before = fingerprint(module)
    with torch.no_grad():
        module.weight[0, 0] += 1
    assert fingerprint(module) != before


def test_info_reports_random_weights_and_agreeing_config(te_runtime, unet_runtime, vae_runtime) -> None:  # type: ignore[no-untyped-def]
    te, un, va = te_runtime.info(), unet_runtime.info(), vae_runtime.info()
    assert te.random_weights and un.random_weights and va.random_weights
    assert te.config["hidden_size"] == un.config["cross_attention_dim"] == 32
    assert un.config["out_channels"] == va.config["latent_channels"] == 4
    assert un.config["vae_scale_factor"] == va.config["vae_scale_factor"] == 8
    assert un.config["default_scheduler"] == "PNDMScheduler"
    assert "EulerAncestralDiscreteScheduler" in un.config["schedulers"]


def test_bfloat16_stages_run_end_to_end(tiny_model: Path) -> None:
    """The reduced-precision path a GPU uses, exercised on CPU: runs and gives sane images."""
    settings = Settings(model=str(tiny_model), device="cpu", dtype="bfloat16")
    te, un, va = TextEncoderRuntime(settings), UNetRuntime(settings), VaeRuntime(settings)
    for rt in (te, un, va):
        rt.load()
    enc = te.encode(EncodeRequest(prompt=["a cat"]))
    assert enc.prompt_embeds.dtype == torch.bfloat16
    den = un.denoise(
        DenoiseRequest(
            prompt_embeds=enc.prompt_embeds,
            negative_prompt_embeds=enc.negative_prompt_embeds,
            height=64,
            width=64,
            num_inference_steps=2,
            seeds=[0],
        )
    )
    images = va.decode(DecodeRequest(latents=den.latents)).images
    assert images.dtype == torch.uint8 and tuple(images.shape) == (1, 64, 64, 3)
    assert images.float().std() > 0
    for rt in (te, un, va):
        rt.close()


def test_settings_come_from_env_and_flags_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from shared.serving.launcher import FLAG_ENV, apply_flags

    # apply_flags exports what it sets (so `serve all` children see it): register every variable it may
    # touch with monkeypatch so they are restored and do not leak into later tests' processes.
    for env in FLAG_ENV.values():
        monkeypatch.setenv(env, "")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(env)
    monkeypatch.setenv("TRIPTYCH_MODEL", "/from/env")
    monkeypatch.setenv("TRIPTYCH_DIFFUSION_UNET_URL", "http://unet:8002/")
    assert Settings().model == "/from/env"
    assert Settings().diffusion_unet_url == "http://unet:8002"  # trailing slash removed
    args = build_parser().parse_args(["serve", "central", "--model", str(tmp_path), "--dtype", "bfloat16"])
    settings = apply_flags(args)
    assert settings.model == str(tmp_path) and settings.dtype == "bfloat16"
    monkeypatch.setenv("TRIPTYCH_VAE_DECODER_URL", "ftp://nope")
    with pytest.raises(ValueError, match="http"):
        Settings()


def test_every_setting_is_documented() -> None:
    """docs/api.md's configuration table names every TRIPTYCH_* variable the code reads."""
    from tests.conftest import REPO

    text = (REPO / "docs" / "api.md").read_text()
    missing = [name for name in Settings.model_fields if f"`TRIPTYCH_{name.upper()}`" not in text]
    assert not missing, f"undocumented settings: {missing}"
