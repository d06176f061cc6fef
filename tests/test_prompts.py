"""A1111 prompt syntax in the text encoder: emphasis weights, BREAK, prompts longer than 77 tokens.

Plain prompts must stay exactly diffusers' (bit for bit); weighted and long prompts follow the semantics
documented in ``text_encoder/prompts.py``, checked here against the text encoder's own outputs computed
independently, and end to end against ``StableDiffusionPipeline`` given the same embeddings.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from central.app import build_app
from shared.protocol import EncodeRequest
from tests.helpers import decode_all, gens, local_orchestrator, max_diff, pipeline_pixels
from text_encoder import prompts
from text_encoder.runtime import restore_mean


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a plain prompt", [("a plain prompt", 1.0)]),
        ("a (red:1.3) [cat]", [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("cat", 1 / 1.1)]),
        ("((a)) b", [("a", 1.1 * 1.1), (" b", 1.0)]),
        ("(a [b]:1.5) c", [("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1.0)]),
        (r"\(literal\) \[too\]", [("(literal) [too]", 1.0)]),
        ("(word:1.0)", [("word", 1.0)]),
        ("x:y and close) and ]", [("x:y and close) and ]", 1.0)]),
        ("(unclosed rest", [("unclosed rest", 1.1)]),
        ("a BREAK b", [("a", 1.0), (None, 1.0), ("b", 1.0)]),
        ("aBREAK b", [("aBREAK b", 1.0)]),
        ("(x:-0.5)", [("x", -0.5)]),
    ],
)
def test_parse(prompt: str, expected: list[tuple[str | None, float]]) -> None:
    got = [(f.text, f.weight) for f in prompts.parse(prompt)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_chunks_of_75_and_break() -> None:
    fragments = prompts.parse("a BREAK (b:2)")
    tokenize = {"a": [1] * 80, "b": [2] * 3}.__getitem__
    out = prompts.chunks(fragments, lambda text: tokenize(text.strip()))
    assert [len(c.ids) for c in out] == [75, 5, 3]
    assert out[2].weights == (2.0, 2.0, 2.0) and out[2].weighted and not out[0].weighted


def test_restore_mean_is_defined_when_a_mean_is_zero() -> None:
    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # mean exactly 0
    out = restore_mean(z, (1.0, 1.5))
    assert torch.isfinite(out).all()
    assert torch.equal(out, z * torch.tensor([1.0, 1.5]).reshape(1, -1, 1))
    y = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    assert restore_mean(y, (1.0, 2.0)).mean() == pytest.approx(y.mean())


def encoder_rows(te_runtime: Any, rows: list[tuple[int, ...]]) -> torch.Tensor:
    """The text encoder's raw output for each row, computed apart from the runtime's own code path."""
    with torch.inference_mode():
        return te_runtime.text_encoder(torch.tensor(rows))[0]


def test_plain_prompts_and_neutral_weights_are_diffusers_bit_for_bit(te_runtime: Any, sd_pipeline: Any) -> None:
    ref, _ = sd_pipeline.encode_prompt(["a red cat"], "cpu", 1, False)
    for prompt in ("a red cat", "a (red:1.0) cat", "(a red cat:1)"):
        ours = te_runtime.encode(EncodeRequest(prompt=[prompt], do_classifier_free_guidance=False)).prompt_embeds
        assert torch.equal(ours, ref), prompt


def test_emphasis_scales_the_tokens_then_restores_the_mean(te_runtime: Any) -> None:
    tok = te_runtime.tokenizer
    ids = tok("a red cat", padding="max_length", max_length=77, truncation=True).input_ids
    n_a, n_red = len(tok("a", add_special_tokens=False).input_ids), len(tok("red", add_special_tokens=False).input_ids)
    weights = [1.0] * 77
    for i in range(1 + n_a, 1 + n_a + n_red):
        weights[i] = 1.3
    z = encoder_rows(te_runtime, [tuple(ids)])
    expected = z * torch.tensor(weights).reshape(1, -1, 1)
    if z.mean() != 0 and expected.mean() != 0:
        expected = expected * (z.mean() / expected.mean())
    ours = te_runtime.encode(EncodeRequest(prompt=["a (red:1.3) cat"], do_classifier_free_guidance=False))
    assert torch.allclose(ours.prompt_embeds, expected, atol=1e-6, rtol=0)
    assert not torch.equal(ours.prompt_embeds, z)  # the weight did something


def test_a_long_prompt_is_encoded_in_chunks_of_75(te_runtime: Any) -> None:
    tok = te_runtime.tokenizer
    words = " ".join(f"w{i}" for i in range(45))  # over 75 tokens with the tiny byte-level vocabulary
    body = tok.convert_tokens_to_ids(tok.tokenize(words))
    assert 75 < len(body) <= 150
    out = te_runtime.encode(EncodeRequest(prompt=[words], negative_prompt=[""]))
    assert out.prompt_embeds.shape == (1, 154, 32)
    assert out.negative_prompt_embeds is not None and out.negative_prompt_embeds.shape == (1, 154, 32)

    def row(chunk: list[int]) -> tuple[int, ...]:
        r = (tok.bos_token_id, *chunk, tok.eos_token_id)
        return r + (tok.pad_token_id,) * (77 - len(r))

    first, second, empty = encoder_rows(te_runtime, [row(body[:75]), row(body[75:]), row([])])
    assert torch.allclose(out.prompt_embeds[0, :77], first, atol=1e-6, rtol=0)
    assert torch.allclose(out.prompt_embeds[0, 77:], second, atol=1e-6, rtol=0)
    # The negative prompt is padded with chunks of the empty prompt to the same length.
    assert torch.allclose(out.negative_prompt_embeds[0, 77:], empty, atol=1e-6, rtol=0)


def test_too_many_chunks_is_422(te_runtime: Any) -> None:
    from shared.errors import InvalidValue

    with pytest.raises(InvalidValue, match="chunks") as err:
        te_runtime.encode(EncodeRequest(prompt=[" BREAK ".join(["x"] * 20)]))
    assert err.value.param == "prompt"


def test_long_and_weighted_prompts_end_to_end_match_diffusers_given_the_same_embeddings(
    settings: Any, te_runtime: Any, unet_runtime: Any, vae_runtime: Any, sd_pipeline: Any
) -> None:
    """The UNet takes embeddings longer than 77 tokens like the pipeline does (diffusers' own
    test_encode_prompt_works_in_isolation, across services)."""
    prompt = "a (lighthouse:1.4) at [dusk], " + ", ".join(f"detail {i}" for i in range(30))
    body = {"prompt": prompt, "negative_prompt": "(blurry:1.2)", "seed": 4, "num_inference_steps": 4}
    orch = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        ours = decode_all(client.post("/v1/txt2img", json=body))
    enc = te_runtime.encode(EncodeRequest(prompt=[prompt], negative_prompt=["(blurry:1.2)"]))
    assert enc.prompt_embeds.shape[1] > 77 and enc.prompt_embeds.shape[1] % 77 == 0
    ref = sd_pipeline(
        prompt_embeds=enc.prompt_embeds,
        negative_prompt_embeds=enc.negative_prompt_embeds,
        num_inference_steps=4,
        generator=gens(4, 1),
    )
    assert max_diff(ours, pipeline_pixels(ref)) == 0
