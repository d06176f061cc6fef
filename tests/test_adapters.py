"""Adapter files (SPEC §10): names and roots that cannot be escaped, safetensors checked before loading, and
textual inversion in the text encoder, bit-exact with ``pipe.load_textual_inversion``."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from central.app import build_app
from shared.errors import InvalidValue, NotFound
from shared.serving.adapters import AdapterRoot, check_name, check_safetensors
from shared.settings import Settings
from tests.helpers import decode_all, gens, local_orchestrator, max_diff, pipeline_pixels
from text_encoder.runtime import TextEncoderRuntime


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", declared: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


# ------------------------------------------------------------------------------------------- names and roots
@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", "", "x" * 101, "a b", "a\x00b", "é"])
def test_bad_names_are_422(name: str) -> None:
    with pytest.raises(InvalidValue) as err:
        check_name(name, kind="LoRA", param="loras")
    assert err.value.param == "loras"


def test_a_root_lists_and_resolves_only_safetensors_inside_it(tmp_path: Path) -> None:
    root, outside = tmp_path / "loras", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    save_file({"w": torch.zeros(2)}, str(root / "good.safetensors"))
    save_file({"w": torch.zeros(2)}, str(outside / "secret.safetensors"))
    (root / "evil.pt").write_bytes(b"\x80\x04 a pickle, never opened")
    (root / "notes.txt").write_text("not an adapter")
    os.symlink(outside / "secret.safetensors", root / "escape.safetensors")
    os.symlink(root / "good.safetensors", root / "alias.safetensors")  # a link that stays inside is fine
    adapters = AdapterRoot(root, kind="LoRA", param="loras")
    assert adapters.names() == ["alias", "good"]
    assert adapters.resolve("good").path == (root / "good.safetensors").resolve()
    for name in ("escape", "evil", "missing"):
        with pytest.raises(NotFound) as err:
            adapters.resolve(name)
        assert "available: alias, good" in err.value.message and str(tmp_path) not in err.value.message
    with pytest.raises(NotFound, match="no LoRA folder is configured"):
        AdapterRoot(None, kind="LoRA", param="loras").resolve("good")


# ------------------------------------------------------------------------------------------- safetensors
def test_a_real_safetensors_file_passes(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(tmp_path / "ok.safetensors"))
    assert check_safetensors(tmp_path / "ok.safetensors", "ok") == {"a": ("F32", (2, 3)), "b": ("F16", (4,))}


@pytest.mark.parametrize(
    ("header", "data", "declared", "match"),
    [
        ({}, b"", 2**62, "declares"),
        (b"{not json", b"", None, "not JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, bytes(8), None, "outside the file"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None, "does not match"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "invalid shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            None,
            "overlap",
        ),
    ],
)
def test_malformed_safetensors_are_422_naming_the_adapter(
    tmp_path: Path, header: Any, data: bytes, declared: int | None, match: str
) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, data, declared)
    with pytest.raises(InvalidValue, match=match) as err:
        check_safetensors(path, "bad")
    assert "'bad'" in err.value.message and str(tmp_path) not in err.value.message


# ------------------------------------------------------------------------------------------- textual inversion
@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two usable embeddings (a diffusers single vector, an A1111 3-vector ``emb_params``) and hostile files."""
    root = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    save_file({"tiny-style": torch.randn(32, generator=g)}, str(root / "tiny-style.safetensors"))
    save_file({"emb_params": torch.randn(3, 32, generator=g)}, str(root / "tri-vec.safetensors"))
    save_file({"emb_params": torch.randn(1, 16, generator=g)}, str(root / "wrong-dim.safetensors"))
    write_raw(root / "absurd.safetensors", {}, declared=2**40)
    (root / "pickled.pt").write_bytes(b"\x80\x04never opened")
    outside = tmp_path_factory.mktemp("outside")
    save_file({"emb_params": torch.randn(1, 32, generator=g)}, str(outside / "x.safetensors"))
    os.symlink(outside / "x.safetensors", root / "escape.safetensors")
    return root


@pytest.fixture(scope="module")
def te_with_embeddings(settings: Settings, embeddings_dir: Path) -> Iterator[TextEncoderRuntime]:
    rt = TextEncoderRuntime(settings.model_copy(update={"embeddings_dir": embeddings_dir}))
    asyncio.run(rt.load_async())
    yield rt
    rt.close()


def test_usable_embeddings_load_and_the_others_are_reported(te_with_embeddings: TextEncoderRuntime) -> None:
    config = te_with_embeddings.info().config
    assert set(config["embeddings"]) == {"tiny-style", "tri-vec"}
    skipped = config["embeddings_skipped"]
    assert set(skipped) == {"wrong-dim", "absurd"}  # the pickle and the link out of the folder are not even seen
    assert "declares" in skipped["absurd"]


def test_textual_inversion_matches_load_textual_inversion(
    settings: Settings,
    te_with_embeddings: TextEncoderRuntime,
    unet_runtime: Any,
    vae_runtime: Any,
    tiny_model: Path,
    embeddings_dir: Path,
) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    for name in ("tiny-style", "tri-vec"):
        pipe.load_textual_inversion(str(embeddings_dir / f"{name}.safetensors"), token=name)
    orch = local_orchestrator(settings, te_with_embeddings, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        # (ours, the same prompt for diffusers, which reads "(x:1.0)" as literal characters)
        for prompt, theirs in (
            ("a house in tiny-style", "a house in tiny-style"),
            ("tri-vec, a (tiny-style:1.0) boat", "tri-vec, a tiny-style boat"),
            ("a plain boat", "a plain boat"),
        ):
            body = {"prompt": prompt, "negative_prompt": "tri-vec", "seed": 8, "num_inference_steps": 3}
            ours = decode_all(client.post("/v1/txt2img", json=body))
            ref = pipe(theirs, negative_prompt="tri-vec", num_inference_steps=3, generator=gens(8, 1))
            assert max_diff(ours, pipeline_pixels(ref)) == 0, prompt
    # The trigger word changes the image: the embedding is really used.
    plain = te_with_embeddings.encode_batch([te_request("a house in style")])[0].prompt_embeds
    styled = te_with_embeddings.encode_batch([te_request("a house in tiny-style")])[0].prompt_embeds
    assert not torch.equal(plain, styled)


def te_request(prompt: str) -> Any:
    from shared.protocol import EncodeRequest

    return EncodeRequest(prompt=[prompt], do_classifier_free_guidance=False)


def test_v1_models_lists_the_loaded_embeddings_with_their_fingerprints(
    settings: Settings,
    te_with_embeddings: TextEncoderRuntime,
    unet_runtime: Any,
    vae_runtime: Any,
    embeddings_dir: Path,
) -> None:
    import hashlib

    orch = local_orchestrator(settings, te_with_embeddings, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        models = client.get("/v1/models").json()
    digest = {n: hashlib.sha256((embeddings_dir / f"{n}.safetensors").read_bytes()).hexdigest()[:16] for n in
              ("tiny-style", "tri-vec")}  # fmt: skip
    assert models["embeddings"] == [{"name": n, "fingerprint": fp} for n, fp in digest.items()]
    assert models["loras"] == [] and models["controlnets"] == []
