"""LoRA per request (SPEC §10) across the split, against ``pipe.load_lora_weights`` + ``pipe.set_adapters``.

The LoRAs are made here with PEFT on the tiny model's own modules (random, non-zero ``lora_B``, so they change
the image) and saved with diffusers' ``save_lora_weights``: the format users download.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from central.app import build_app
from diffusion_unet.runtime import UNetRuntime
from shared.serving.models import create_tiny
from shared.settings import Settings
from tests.helpers import (
    assert_envelope,
    counted_forwards,
    decode_all,
    gens,
    latent_pixels,
    local_orchestrator,
    max_diff,
    pipeline_pixels,
    step_together,
)
from text_encoder.runtime import TextEncoderRuntime

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(
    model: Path,
    out: Path,
    name: str,
    seed: int,
    *,
    text_encoder: bool = True,
    kohya: bool = False,
    dora: bool = False,
    targets: tuple[str, ...] = (),
    bias: bool = False,
) -> Path:
    """A random LoRA for ``model`` built with PEFT, saved with diffusers as ``out/<name>.safetensors`` (or in
    kohya/A1111 key format, converted with diffusers' ``convert_state_dict_to_kohya``; ``dora``: a DoRA one;
    ``targets``: UNet modules beside the attention projections; ``bias``: PEFT's ``lora_bias``)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS + list(targets), init_lora_weights=False,
                        use_dora=dora, lora_bias=bias)  # fmt: skip
    unet.add_adapter(config)
    if bias:  # PEFT starts lora_B's bias at zero; a random one makes it matter
        for key, param in unet.named_parameters():
            if "lora_B" in key and key.endswith("bias"):
                torch.nn.init.normal_(param, std=0.05)
    peft_layers = {"unet": get_peft_model_state_dict(unet)}
    if text_encoder:
        te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS, init_lora_weights=False)
        peft_layers["text_encoder"] = get_peft_model_state_dict(inject_adapter_in_model(config, te))
    path = out / f"{name}.safetensors"
    if kohya:
        flat = {f"{part}.{k}": v for part, layers in peft_layers.items() for k, v in layers.items()}
        save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(flat).items()}, str(path))
        return path
    layers = {f"{part}_lora_layers": convert_state_dict_to_diffusers(sd) for part, sd in peft_layers.items()}
    StableDiffusionPipeline.save_lora_weights(str(out), weight_name=path.name, **layers)
    return path


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    make_lora(tiny_model, root, "ink", seed=1)
    make_lora(tiny_model, root, "pastel", seed=2)
    make_lora(tiny_model, root, "unet-only", seed=3, text_encoder=False)
    make_lora(tiny_model, root, "kohya-style", seed=5, kohya=True)
    make_lora(tiny_model, root, "dora", seed=6, text_encoder=False, dora=True)
    make_lora(tiny_model, root, "convs", seed=7, text_encoder=False, targets=("conv1", "conv2"))
    make_lora(tiny_model, root, "biased", seed=8, text_encoder=False, bias=True)
    # A LoRA made for another architecture (diffusers' test sizes: other widths) must be refused.
    other = create_tiny(tmp_path_factory.mktemp("other") / "m", preset="diffusers-tiny")
    make_lora(other, root, "foreign", seed=4)
    return root


@pytest.fixture(scope="module")
def lora_settings(settings: Settings, lora_dir: Path) -> Settings:
    return settings.model_copy(update={"lora_dir": lora_dir, "lora_cache_size": 2})


@pytest.fixture(scope="module")
def stages(lora_settings: Settings, vae_runtime: Any) -> Iterator[dict[str, Any]]:
    te, unet = TextEncoderRuntime(lora_settings), UNetRuntime(lora_settings)
    for rt in (te, unet):
        asyncio.run(rt.load_async())
    orch = local_orchestrator(lora_settings, te, unet, vae_runtime)
    with TestClient(build_app(lora_settings, orchestrator=orch)) as client:
        yield {"client": client, "te": te, "unet": unet}
    te.close()
    unet.close()


def reference(model: Path, lora_dir: Path, loras: list[tuple[str, float]], **call: Any) -> np.ndarray:
    """diffusers: a fresh pipeline, ``load_lora_weights`` for each LoRA, ``set_adapters`` with the weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    for name, _ in loras:
        pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
    if loras:
        pipe.set_adapters([n for n, _ in loras], [w for _, w in loras])
    return pipeline_pixels(pipe(**call))


def body(loras: list[tuple[str, float]], seed: int = 5, **extra: Any) -> dict[str, Any]:
    return {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": seed, "num_inference_steps": 3,
            "loras": [{"name": n, "weight": w} for n, w in loras], **extra}  # fmt: skip


def call(seed: int = 5) -> dict[str, Any]:
    return {"prompt": "a lighthouse", "negative_prompt": "fog", "num_inference_steps": 3, "generator": gens(seed, 1)}


@pytest.mark.parametrize(
    "loras",
    [
        [("ink", 1.0)],
        [("ink", 0.6), ("pastel", -0.4)],
        [("unet-only", 1.5)],
        [("kohya-style", 0.9)],
        [("dora", 0.8)],
        [("convs", 1.0), ("biased", 0.7)],
    ],
    ids=["one", "two-weighted", "unet-only", "kohya-keys", "dora", "conv-and-bias"],
)
def test_loras_match_load_lora_weights(stages: dict[str, Any], tiny_model: Path, lora_dir: Path, loras: Any) -> None:
    r = stages["client"].post("/v1/txt2img", json=body(loras))
    ours = decode_all(r)
    assert r.json()["parameters"]["loras"] == [{"name": n, "weight": w} for n, w in loras]
    assert max_diff(ours, reference(tiny_model, lora_dir, loras, **call())) == 0
    plain = reference(tiny_model, lora_dir, [], **call())
    assert max_diff(ours, plain) > 0  # the LoRA really changed the image


def test_a_plain_request_after_loras_is_plain_diffusers(stages: dict[str, Any], sd_pipeline: Any) -> None:
    client = stages["client"]
    assert client.post("/v1/txt2img", json=body([("pastel", 1.0)])).status_code == 200
    ours = decode_all(client.post("/v1/txt2img", json=body([])))
    assert max_diff(ours, pipeline_pixels(sd_pipeline(**call()))) == 0


def test_the_cache_is_bounded_and_switching_stays_exact(
    stages: dict[str, Any], tiny_model: Path, lora_dir: Path
) -> None:
    """Capacity 2: ink, pastel, unet-only, ink again; each answer still equals diffusers."""
    client = stages["client"]
    for loras in ([("ink", 1.0)], [("pastel", 1.0)], [("unet-only", 1.0)], [("ink", 1.0)]):
        ours = decode_all(client.post("/v1/txt2img", json=body(loras, seed=2)))
        assert max_diff(ours, reference(tiny_model, lora_dir, loras, **call(2))) == 0, loras
        assert stages["unet"].variants["base"].loras.loaded <= 2 and stages["te"].loras.loaded <= 2
    config = client.get("/v1/info").json()["stages"]["diffusion_unet"]["config"]
    assert config["loras"] == ["biased", "convs", "dora", "foreign", "ink", "kohya-style", "pastel", "unet-only"]


MIXED = [[("ink", 1.0)], [("ink", 0.6), ("pastel", -0.4)], [], [("unet-only", 1.5)], [("ink", 0.3)], [("convs", 1.2)]]
# A LoRA with a bias on lora_B is added per row group (the fused path covers plain Linear and Conv2d LoRAs).
MIXED_BIASED = [[("biased", 1.0)], [("ink", 0.8)], []]


def _denoise_requests(te: Any, sets: list[list[tuple[str, float]]], steps: list[int]) -> list[Any]:
    from shared.protocol import DenoiseRequest, EncodeRequest

    reqs = []
    for i, (loras, n_steps) in enumerate(zip(sets, steps, strict=True)):
        spec = [{"name": n, "weight": w} for n, w in loras]
        e = te.encode(EncodeRequest(prompt=["a lighthouse"], negative_prompt=["fog"], loras=spec))
        embeds = {"prompt_embeds": e.prompt_embeds, "negative_prompt_embeds": e.negative_prompt_embeds}
        reqs.append(
            DenoiseRequest(**embeds, height=64, width=64, num_inference_steps=n_steps, seeds=[11 + i], loras=spec)
        )
    return reqs


@pytest.mark.parametrize(("sets", "steps"), [(MIXED, [6, 4, 6, 5, 7, 7]), (MIXED_BIASED, [5, 5, 4])],
                         ids=["fused", "per-group"])  # fmt: skip
def test_different_lora_sets_share_one_forward_each_within_two_levels_of_alone(
    stages: dict[str, Any], vae_runtime: Any, sets: list[list[tuple[str, float]]], steps: list[int]
) -> None:
    """Requests with different LoRA sets (``MIXED``: one LoRA, two weighted, none, UNet-only, the first at
    another weight, one on the resnets' convs) and step counts: every step is one UNet forward for all of them
    (``LoraStore.rows``), with more LoRAs at once than the cache holds (2), and each image is within 2/255 of
    that request served alone (SPEC §8)."""

    unet, te = stages["unet"], stages["te"]
    reqs = _denoise_requests(te, sets, steps=steps)
    alone = [step_together(unet, [r])[0].latents for r in reqs]
    with counted_forwards(unet.variants["base"].unet) as calls:
        jobs = step_together(unet, reqs)
    together = [j.latents for j in jobs]
    # The path meant was taken (by the last steps, of the longest jobs): fused Linear and Conv2d LoRAs, or
    # per group for a lora_bias.
    fused = unet.variants["base"].loras._fused.values()
    if sets is MIXED:
        assert any(f.conv is not None for f in fused) and any(f.a is not None and f.conv is None for f in fused)
    else:
        assert any(f.groups is not None for f in fused)
    # One forward per step of the longest job; the first ones carry every request's 2 guidance rows.
    assert calls == {"n": max(len(j.timesteps) for j in jobs), "rows": 2 * len(sets)}

    def pixels(latents: torch.Tensor) -> np.ndarray:
        return latent_pixels(vae_runtime, latents)

    for loras, a, b in zip(sets, alone, together, strict=True):
        assert int(np.abs(pixels(a) - pixels(b)).max()) <= 2, loras
    # Each row really got its own LoRAs: the LoRA requests differ from the plain one run beside them.
    plain = pixels(together[sets.index([])])
    assert all(int(np.abs(pixels(b) - plain).max()) > 2 for loras, b in zip(sets, together, strict=True) if loras)
    # A lone request afterwards takes the plain path again: exact, and no row hook is left behind.
    assert torch.equal(step_together(unet, reqs[:1])[0].latents, alone[0])
    assert not any(m._forward_hooks for m in unet.variants["base"].unet.modules())


def test_dora_and_mixing_turned_off_keep_one_lora_set_per_forward(stages: dict[str, Any]) -> None:
    """A DoRA LoRA has PEFT's own forward, which the row hooks do not reproduce: its jobs share forwards only
    with the same set. With ``lora_mixed_batches`` off, no two different sets share a forward."""
    unet, te = stages["unet"], stages["te"]
    sets = [[], [("ink", 1.0)], [("pastel", 0.5)], [("dora", 1.0)]]
    reqs = _denoise_requests(te, sets, steps=[3, 3, 3, 3])
    with torch.inference_mode():
        keys = [unet.prepare(r).key for r in reqs]
        assert keys[0] == keys[1] == keys[2] != keys[3]
        saved = unet.settings
        unet.settings = saved.model_copy(update={"lora_mixed_batches": False})
        try:
            assert len({unet.prepare(r).key for r in reqs}) == 4
        finally:
            unet.settings = saved


def test_concurrent_requests_with_different_loras_each_within_two_levels(
    stages: dict[str, Any], tiny_model: Path, lora_dir: Path
) -> None:
    """Through central: concurrent requests with different LoRAs against diffusers each alone (SPEC §8)."""
    client = stages["client"]
    sets = [[("ink", 1.0)], [("pastel", 0.7)], []]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.post, "/v1/txt2img", json=body(s, seed=9, num_inference_steps=8)) for s in sets]
        results = [decode_all(f.result(timeout=120)) for f in futures]
    for loras, ours in zip(sets, results, strict=True):
        assert max_diff(ours, reference(tiny_model, lora_dir, loras, **{**call(9), "num_inference_steps": 8})) <= 2


def test_unknown_bad_duplicate_and_foreign_loras_are_4xx(stages: dict[str, Any], sd_pipeline: Any) -> None:
    client = stages["client"]
    err = assert_envelope(client.post("/v1/txt2img", json=body([("nope", 1.0)])), 404, param="loras")
    assert "available: biased, convs, dora, foreign, ink, kohya-style, pastel, unet-only" in err["message"]
    assert_envelope(client.post("/v1/txt2img", json=body([("../ink", 1.0)])), 422)
    assert_envelope(client.post("/v1/txt2img", json=body([("ink", 1.0), ("ink", 0.5)])), 422)
    assert_envelope(client.post("/v1/txt2img", json=body([("ink", float("1e9"))])), 422)
    err = assert_envelope(client.post("/v1/txt2img", json=body([("foreign", 1.0)])), 422, param="loras")
    assert "foreign" in err["message"] and "does not fit" in err["message"]
    # Nothing was left behind: the next plain request is plain diffusers.
    ours = decode_all(client.post("/v1/txt2img", json=body([])))
    assert max_diff(ours, pipeline_pixels(sd_pipeline(**call()))) == 0


def test_no_lora_folder_configured_is_404(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    orch = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        err = assert_envelope(client.post("/v1/txt2img", json=body([("ink", 1.0)])), 404, param="loras")
    assert "no LoRA folder is configured" in err["message"]


def test_v1_models_lists_every_adapter_with_the_fingerprint_of_its_bytes(
    stages: dict[str, Any], lora_dir: Path
) -> None:
    import hashlib

    client = stages["client"]
    models = client.get("/v1/models").json()
    info = client.get("/v1/info").json()["stages"]
    assert models["base"]["fingerprint"] == info["diffusion_unet"]["model"]["fingerprint"]
    assert {k: v["fingerprint"] for k, v in models["base"]["components"].items()} == {
        stage: info[stage]["model"]["fingerprint"] for stage in ("text_encoder", "diffusion_unet", "vae_decoder")
    }
    assert models["base"]["inpainting"] is False and models["variants"] == []
    by_name = {lora["name"]: lora for lora in models["loras"]}
    assert sorted(by_name) == sorted(p.stem for p in lora_dir.glob("*.safetensors"))
    for name, lora in by_name.items():
        data = (lora_dir / f"{name}.safetensors").read_bytes()
        assert lora["fingerprint"] == hashlib.sha256(data).hexdigest()[:16] and lora["bytes"] == len(data)
        assert lora["stages"] == ["text_encoder", "diffusion_unet"]


def test_a_lora_name_with_other_bytes_in_each_stage_makes_central_not_ready(
    settings: Settings, lora_dir: Path, vae_runtime: Any, tmp_path: Path
) -> None:
    """The text encoder and the UNet read their own LoRA folders; the same name must be the same file in both
    (else each stage would apply a different LoRA): central's compatibility check names it."""
    import shutil

    other = tmp_path / "loras"
    other.mkdir()
    shutil.copy(lora_dir / "pastel.safetensors", other / "ink.safetensors")  # "ink" here is pastel's bytes
    shutil.copy(lora_dir / "pastel.safetensors", other / "pastel.safetensors")
    te = TextEncoderRuntime(settings.model_copy(update={"lora_dir": other}))
    unet = UNetRuntime(settings.model_copy(update={"lora_dir": lora_dir}))
    for rt in (te, unet):
        asyncio.run(rt.load_async())
    try:
        with TestClient(build_app(settings, orchestrator=local_orchestrator(settings, te, unet, vae_runtime))) as c:
            err = assert_envelope(c.get("/readyz"), 503)
            assert "LoRA 'ink': text_encoder fingerprint" in err["message"]
            assert "pastel" not in err["message"]  # the same bytes in both: no problem
    finally:
        te.close()
        unet.close()


def test_a_new_lora_is_read_off_the_model_thread_while_other_requests_go_on(
    settings: Settings, te_runtime: Any, lora_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Katz-style overlap, without giving up parity: a request naming a LoRA not loaded yet waits (not
    admitted) while a reader thread reads and converts the file; the model thread keeps stepping the running
    request, which here finishes while the read is still held, and then injects the LoRA in one go."""
    import shutil
    import threading

    from shared.protocol import DenoiseRequest, EncodeRequest
    from shared.serving import loras as loras_module

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_dir / "ink.safetensors", folder / "ink.safetensors")
    unet = UNetRuntime(settings.model_copy(update={"lora_dir": folder}))
    asyncio.run(unet.load_async())
    release, readers = threading.Event(), []
    real = loras_module.Loader.lora_state_dict

    def held_read(*args: Any, **kwargs: Any) -> Any:
        readers.append(threading.current_thread().name)
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(loras_module.Loader, "lora_state_dict", held_read)
    e = te_runtime.encode(EncodeRequest(prompt=["a lighthouse"], negative_prompt=["fog"]))
    embeds = {"prompt_embeds": e.prompt_embeds, "negative_prompt_embeds": e.negative_prompt_embeds}
    long = DenoiseRequest(**embeds, height=64, width=64, num_inference_steps=40, seeds=[1])
    with_lora = DenoiseRequest(**embeds, height=64, width=64, num_inference_steps=3, seeds=[2],
                               loras=[{"name": "ink", "weight": 1.0}])  # fmt: skip
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(unet.denoise, long)
            deadline = time.monotonic() + 30
            while unet.batcher.active_images == 0:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            second = pool.submit(unet.denoise, with_lora)
            first.result(timeout=60)  # finished while the LoRA read is held (or not even started, on a busy CPU)
            while not readers:
                assert time.monotonic() < deadline + 30
                time.sleep(0.002)
            assert not second.done() and readers[0].startswith("lora-reader")
            release.set()
            second.result(timeout=60)
        assert unet.variants["base"].loras.loaded == 1
    finally:
        release.set()
        unet.close()
