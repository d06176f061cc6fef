"""The scheduler catalogue: A1111 aliases map to what diffusers documents, and every entry runs end to end."""

from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

from shared import schedulers as S
from shared.errors import InvalidValue
from shared.protocol import DecodeRequest, DenoiseRequest, EncodeRequest

# Transcribed from the "A1111/k-diffusion | Diffusers | Usage" table of diffusers' scheduler overview
# (docs/source/en/api/schedulers/overview.md): alias -> (class, the "init with" options).
DOCUMENTED = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}
# Ours (A1111 names the table lacks): alias -> (class, options).
OURS = {
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}
STOCHASTIC_ALIASES = {"DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM2 a", "DPM2 a Karras", "Euler a"}


@pytest.fixture(scope="module")
def base_config() -> dict:
    """SD 1.5's scheduler config (the one `create_tiny` writes)."""
    sched = diffusers.PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return {**sched.config, "_class_name": "PNDMScheduler"}  # as `load_config` reads it from the model


@pytest.fixture(scope="module")
def compatible(base_config) -> list[str]:  # type: ignore[no-untyped-def]
    return S.usable_compatibles("PNDMScheduler", base_config)


def _default(cls: str, key: str):  # type: ignore[no-untyped-def]
    return inspect.signature(getattr(diffusers, cls).__init__).parameters[key].default


# ---------------------------------------------------------------------------------------------- the mapping
def test_alias_table_is_the_documented_one_plus_ours() -> None:
    assert {a.name: a.cls for a in S.ALIASES} == {k: v[0] for k, v in {**DOCUMENTED, **OURS}.items()}


@pytest.mark.parametrize("alias", [*DOCUMENTED, *OURS])
def test_alias_builds_the_documented_configuration(alias, compatible, base_config) -> None:  # type: ignore[no-untyped-def]
    cls, documented = {**DOCUMENTED, **OURS}[alias]
    assert cls in compatible
    name, overrides = S.resolve(alias, compatible)
    assert name == cls
    sched = S.build(alias, compatible, base_config, seeds=[0])
    assert type(sched).__name__ == cls
    for key, value in documented.items():
        assert sched.config[key] == value, key
    # Anything beyond the documented option is the class's own default, set explicitly (no deviation).
    for key, value in overrides.items():
        if key not in documented:
            assert value == _default(cls, key), key
            assert sched.config[key] == value
    # And the model's own config still underlies it.
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == 0.012


def test_non_karras_alias_is_not_karras_on_a_karras_model(compatible) -> None:  # type: ignore[no-untyped-def]
    karras = dict(
        diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++").config
    )
    plain = S.build("DPM++ 2M", compatible, karras)
    assert plain.config.use_karras_sigmas is False and plain.config.algorithm_type == "dpmsolver++"
    # ...while the class name keeps the model's configuration as it is.
    assert S.build("DPMSolverMultistepScheduler", compatible, karras).config.use_karras_sigmas is True


@pytest.mark.parametrize(
    ("spelling", "cls"),
    [
        ("dpm++ 2m karras", "DPMSolverMultistepScheduler"),
        ("  DPM++   2M  Karras ", "DPMSolverMultistepScheduler"),
        ("EULER A", "EulerAncestralDiscreteScheduler"),
        ("euler\ta", "EulerAncestralDiscreteScheduler"),
        ("unipc", "UniPCMultistepScheduler"),
        ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
    ],
)
def test_alias_matching_ignores_case_and_spaces(spelling, cls, compatible) -> None:  # type: ignore[no-untyped-def]
    assert S.resolve(spelling, compatible)[0] == cls


def test_karras_alias_resolves_with_karras_case_insensitively(compatible) -> None:  # type: ignore[no-untyped-def]
    assert S.resolve("dpm++ 2m karras", compatible)[1]["use_karras_sigmas"] is True
    assert S.resolve("dpm++ 2m", compatible)[1]["use_karras_sigmas"] is False


@pytest.mark.parametrize("bad", ["foo", "Euler b", "eulerdiscretescheduler", "DPM fast", "DPM++ 2S a", ""])
def test_unknown_name_is_invalid_and_lists_valid_names(bad, compatible) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidValue) as info:
        S.resolve(bad, compatible)
    err = info.value
    assert err.param == "scheduler" and err.status == 422
    for name in S.valid_names(compatible):
        assert name in err.message
    if bad == "eulerdiscretescheduler":
        assert "'EulerDiscreteScheduler'?" in err.message


def test_incompatible_class_and_alias_are_invalid() -> None:
    compatible = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]
    with pytest.raises(InvalidValue, match="not compatible") as info:
        S.resolve("DDIMScheduler", compatible)
    assert info.value.param == "scheduler"
    assert "EulerDiscreteScheduler" in info.value.message and "Euler a" in info.value.message
    assert "DDIM," not in info.value.message and "DPM++ 2M" not in info.value.message
    with pytest.raises(InvalidValue, match=r"'dpm\+\+ 2m karras' \(DPMSolverMultistepScheduler\) is not compatible"):
        S.resolve("dpm++ 2m karras", compatible)
    with pytest.raises(InvalidValue):
        S.build("DDIMScheduler", compatible, dict(diffusers.EulerDiscreteScheduler().config))


def test_build_default_and_fresh_instances(compatible, base_config) -> None:  # type: ignore[no-untyped-def]
    a = S.build(None, compatible, base_config)
    b = S.build("", compatible, base_config)
    assert type(a) is type(b) is diffusers.PNDMScheduler and a is not b
    a.set_timesteps(5)
    b.set_timesteps(20)
    assert a.num_inference_steps == 5 and b.num_inference_steps == 20
    # Overrides handed out are copies: changing them touches neither the table nor later builds.
    _, overrides = S.resolve("DPM++ 2M Karras", compatible)
    overrides["use_karras_sigmas"] = False
    assert S.build("DPM++ 2M Karras", compatible, base_config).config.use_karras_sigmas is True
    x, y = (S.build("DPMSolverSDEScheduler", compatible, base_config, seeds=s) for s in ([1], [2]))
    assert x.config.noise_sampler_seed == [1] and y.config.noise_sampler_seed == [2]


def test_sde_scheduler_gets_per_image_seeds(compatible, base_config) -> None:  # type: ignore[no-untyped-def]
    seeds = [7, 8, 9]
    sched = S.build("DPMSolverSDEScheduler", compatible, base_config, seeds=seeds)
    assert sched.config.noise_sampler_seed == seeds
    seeds.append(10)  # the scheduler keeps its own copy
    assert sched.config.noise_sampler_seed == [7, 8, 9]
    assert S.build("DPMSolverSDEScheduler", compatible, base_config).config.noise_sampler_seed is None
    assert "noise_sampler_seed" not in S.build("Euler a", compatible, base_config, seeds=[1]).config


def test_conflicting_model_config_is_a_clear_422(compatible) -> None:  # type: ignore[no-untyped-def]
    exponential = dict(diffusers.LMSDiscreteScheduler(use_exponential_sigmas=True).config)
    with pytest.raises(InvalidValue, match="cannot be built") as info:
        S.build("LMS Karras", compatible, exponential)
    assert info.value.param == "scheduler"


def test_usable_compatibles_leaves_out_dummy_classes(monkeypatch, base_config) -> None:  # type: ignore[no-untyped-def]
    dummy = type("MissingBackendScheduler", (), {"__module__": "diffusers.utils.dummy_torch_and_torchsde_objects"})
    real = diffusers.PNDMScheduler

    class FakeScheduler(real):  # type: ignore[misc, valid-type]
        @property
        def compatibles(self):  # type: ignore[no-untyped-def]
            return [dummy, diffusers.DDIMScheduler]

    monkeypatch.setattr(diffusers, "FakeScheduler", FakeScheduler, raising=False)
    assert S.usable_compatibles("FakeScheduler", base_config) == ["DDIMScheduler", "FakeScheduler"]
    real_list = S.usable_compatibles("PNDMScheduler", base_config)
    assert "PNDMScheduler" in real_list and "EulerAncestralDiscreteScheduler" in real_list
    assert real_list == sorted(real_list)


def test_catalogue_shape(compatible, base_config) -> None:  # type: ignore[no-untyped-def]
    cat = S.catalogue(compatible, base_config)
    json.dumps(cat)  # JSON-ready
    assert [e["name"] for e in cat] == compatible
    by_name = {e["name"]: e for e in cat}
    for entry in cat:
        assert set(entry) == {"name", "aliases", "options", "stochastic"}
        assert list(entry["options"]) == entry["aliases"]
        for alias in entry["aliases"]:
            assert S.resolve(alias, compatible) == (entry["name"], entry["options"][alias]["config"])
            assert entry["options"][alias]["stochastic"] is (alias in STOCHASTIC_ALIASES)
    dpm = by_name["DPMSolverMultistepScheduler"]
    assert dpm["aliases"] == ["DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras"]
    assert dpm["options"]["DPM++ 2M Karras"]["config"]["use_karras_sigmas"] is True
    assert dpm["options"]["DPM++ 2M SDE"]["config"]["algorithm_type"] == "sde-dpmsolver++"
    assert by_name["EulerAncestralDiscreteScheduler"]["stochastic"] is True
    assert by_name["DPMSolverSDEScheduler"]["stochastic"] is True and by_name["DPMSolverSDEScheduler"]["aliases"] == []
    assert by_name["EulerDiscreteScheduler"]["stochastic"] is False
    # Every alias of a compatible class is listed; aliases of other classes are not.
    assert {a for e in cat for a in e["aliases"]} == {a.name for a in S.ALIASES if a.cls in compatible}
    assert [e["aliases"] for e in S.catalogue(["EulerDiscreteScheduler"])] == [["Euler"]]


# ---------------------------------------------------------------------------------------------- end to end
PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE = "a watercolor fox", "blurry", 21, 3, 7.5


def _ours(te_runtime, unet_runtime, vae_runtime, scheduler: str, seed: int = SEED) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Two images (seeds `seed`, `seed+1`) through the stage runtimes, with `scheduler` as the request names it."""
    enc = te_runtime.encode(EncodeRequest(prompt=[PROMPT], negative_prompt=[NEGATIVE]))
    den = unet_runtime.denoise(
        DenoiseRequest(
            prompt_embeds=enc.prompt_embeds,
            negative_prompt_embeds=enc.negative_prompt_embeds,
            num_images_per_prompt=2,
            height=64,
            width=64,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            scheduler=scheduler,
            seeds=[seed, seed + 1],
        )
    )
    return vae_runtime.decode(DecodeRequest(latents=den.latents)).images.numpy()


def _reference(pipe, scheduler: str, compatible: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """diffusers' StableDiffusionPipeline with the scheduler `build` makes from the pipeline's own config."""
    original = pipe.scheduler
    pipe.scheduler = S.build(scheduler, compatible, original.config, seeds=[SEED, SEED + 1])
    try:
        gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
        out = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_images_per_prompt=2,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=gens,
            output_type="pil",
        )
    finally:
        pipe.scheduler = original
    return np.stack([np.asarray(im) for im in out.images])


def _every_catalogue_name() -> list[str]:
    cfg = dict(
        diffusers.PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        ).config
    )
    return S.valid_names(S.usable_compatibles("PNDMScheduler", cfg))


@pytest.mark.parametrize("name", _every_catalogue_name())
def test_every_catalogue_entry_matches_diffusers_end_to_end(
    name, te_runtime, unet_runtime, vae_runtime, sd_pipeline
) -> None:  # type: ignore[no-untyped-def]
    compatible = S.usable_compatibles(type(sd_pipeline.scheduler).__name__, sd_pipeline.scheduler.config)
    assert name in S.valid_names(unet_runtime.config()["schedulers"])
    ours = _ours(te_runtime, unet_runtime, vae_runtime, name)
    ref = _reference(sd_pipeline, name, compatible)
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert int(np.abs(ours.astype(np.int16) - ref.astype(np.int16)).max()) == 0


STOCHASTIC_NAMES = sorted(
    STOCHASTIC_ALIASES | {"EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}
)


@pytest.mark.parametrize("name", STOCHASTIC_NAMES)
def test_stochastic_samplers_are_reproducible_per_image(name, te_runtime, unet_runtime, vae_runtime) -> None:  # type: ignore[no-untyped-def]
    first = _ours(te_runtime, unet_runtime, vae_runtime, name)
    # The same seed gives the same image, in a new request and at another batch position: image i depends on
    # seed i only (the second image of seeds (s, s+1) is the first of (s+1, s+2)), not on what ran before.
    shifted = _ours(te_runtime, unet_runtime, vae_runtime, name, seed=SEED + 1)
    assert np.array_equal(first[1], shifted[0])
    assert not np.array_equal(first[0], first[1])
