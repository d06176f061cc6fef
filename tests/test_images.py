"""central.images: hostile and odd input images are refused (413/422/400/415) or converted as documented."""

from __future__ import annotations

import base64
import io
import random
import struct
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

import central.images as images
from central.images import check_size_multiple, decode_image, decode_mask, read_form
from shared.errors import InvalidValue, PayloadTooLarge, install_error_handlers

MB = 1024 * 1024
LIMITS = {"max_bytes": 8 * MB, "max_pixels": 2048 * 2048}


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int] = (37, 23), mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 10_000, height: int = 10_000, idat_bytes: int = 100_000) -> bytes:
    """A ~100 KB PNG whose IHDR declares width x height RGB: a valid header, a real (partial) zlib stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(random.Random(0).randbytes(idat_bytes))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def decode(data: bytes | str, **kw: object) -> Image.Image:
    return decode_image(data, param="image", **{**LIMITS, **kw})  # type: ignore[arg-type]


def forbid_decoding(monkeypatch: pytest.MonkeyPatch, *, allow_open: bool = False) -> None:
    """From here on, fail the test if Pillow decodes any pixels (where it allocates the pixel buffer), and
    unless ``allow_open``, if Pillow even parses the file."""

    def refuse_load(self: Image.Image) -> None:
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    def refuse_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open was called")

    monkeypatch.setattr(Image.Image, "load", refuse_load)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_load)
    if not allow_open:
        monkeypatch.setattr(Image, "open", refuse_open)


# ----------------------------------------------------------------------------------------- allowed formats


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("WEBP", {"lossless": True, "exact": True})])
def test_lossless_formats_round_trip_exactly(fmt: str, kw: dict[str, object]) -> None:
    src = noise()
    out = decode(encode(src, fmt, **kw))
    assert out.mode == "RGB" and out.size == src.size
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_jpeg_decodes_to_rgb() -> None:
    src = Image.new("RGB", (40, 24), (200, 100, 50))
    out = decode(encode(src, "JPEG", quality=95))
    assert out.mode == "RGB" and out.size == (40, 24)
    assert np.abs(np.asarray(out).astype(int) - (200, 100, 50)).max() <= 3


def test_multi_picture_jpeg_gives_first_picture() -> None:
    first, second = Image.new("RGB", (16, 8), (0, 0, 255)), Image.new("RGB", (8, 8), (255, 0, 0))
    out = decode(encode(first, "MPO", save_all=True, append_images=[second]))
    assert out.size == (16, 8) and out.getpixel((4, 4))[2] > 200  # type: ignore[index]


def test_animated_png_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((1, 2, 3), (250, 250, 250))]
    out = decode(encode(frames[0], "PNG", save_all=True, append_images=frames[1:]))
    assert out.getpixel((0, 0)) == (1, 2, 3)


def test_result_is_detached_and_loaded() -> None:
    out = decode(encode(noise(), "PNG"))
    assert type(out) is Image.Image  # a plain in-memory image, not a lazily read file
    out.load()


# ------------------------------------------------------------------------------------------ base64, data URL


def test_base64_and_data_url_inputs() -> None:
    src = noise()
    raw = encode(src, "PNG")
    b64 = base64.b64encode(raw).decode()
    variants = [
        b64,
        "data:image/png;base64," + b64,
        "DATA:image/png;BASE64," + b64,
        "data:;base64," + b64,
        "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),  # MIME-style line breaks
        b64.rstrip("="),  # padding stripped by some clients
    ]
    for text in variants:
        assert np.array_equal(np.asarray(decode(text)), np.asarray(src)), text[:30]


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all!",
        "QUJD*RA==",
        "A",
        "data:image/png,rawtext",
        "data:image/png;base64,@@@@",
        "\u00e9\u00e9\u00e9\u00e9",
    ],
)
def test_invalid_base64_is_422_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidValue) as err:
        decode_image(text, param="init_image", **LIMITS)  # type: ignore[arg-type]
    assert err.value.status == 422 and err.value.param == "init_image"
    assert "`init_image`" in err.value.message


def test_oversized_base64_is_413_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("b64decode was called")

    monkeypatch.setattr(images.pybase64, "b64decode", refuse)
    text = "A" * (4 * 1000)  # decodes to 3000 bytes
    with pytest.raises(PayloadTooLarge) as err:
        decode_image(text, param="image", max_bytes=2999, max_pixels=10**6)
    assert err.value.status == 413 and err.value.param == "image"


def test_base64_exactly_at_the_limit_is_accepted() -> None:
    raw = encode(noise((8, 8)), "PNG")
    assert decode(base64.b64encode(raw).decode(), max_bytes=len(raw)).size == (8, 8)


def test_oversized_bytes_are_413() -> None:
    raw = encode(noise(), "PNG")
    with pytest.raises(PayloadTooLarge) as err:
        decode(raw, max_bytes=len(raw) - 1)
    assert err.value.status == 413 and str(len(raw)) in err.value.message


def test_empty_input_is_422() -> None:
    for empty in (b"", ""):
        with pytest.raises(InvalidValue):
            decode(empty)


# ------------------------------------------------------------------------------------------ pixel bombs


def test_100kb_png_declaring_10000x10000_is_413_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_bomb()
    assert 95_000 < len(bomb) < 110_000
    forbid_decoding(monkeypatch)
    with pytest.raises(PayloadTooLarge) as err:
        decode(bomb, max_bytes=MB, max_pixels=2048 * 2048)
    assert err.value.status == 413 and err.value.param == "image"
    assert "10000x10000" in err.value.message


def test_pillow_size_gate_alone_refuses_the_bomb_before_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # Take away our raw header parse: Pillow's lazily parsed .size must still stop it before .load().
    big, medium = png_bomb(), png_bomb(3000, 3000)
    monkeypatch.setattr(images, "_declared_size", lambda raw: None)
    forbid_decoding(monkeypatch, allow_open=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 10^8 px is above Pillow's warning level
        with pytest.raises(PayloadTooLarge):
            decode(big, max_bytes=MB)
    with pytest.raises(PayloadTooLarge) as err:  # 9 Mpx: below Pillow's own guard, so only ours stops it
        decode(medium, max_bytes=MB, max_pixels=2048 * 2048)
    assert "3000x3000" in err.value.message


def test_jpeg_header_declaring_a_huge_frame_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    real = encode(Image.new("RGB", (16, 16)), "JPEG")
    sof = real.index(b"\xff\xc0")
    bomb = real[: sof + 5] + struct.pack(">HH", 60_000, 60_000) + real[sof + 9 :]
    forbid_decoding(monkeypatch)
    with pytest.raises(PayloadTooLarge) as err:
        decode(bomb)
    assert "60000x60000" in err.value.message


@pytest.mark.parametrize("chunk", ["VP8L", "VP8X"])
def test_webp_header_declaring_a_huge_canvas_is_413_before_the_decoder_exists(
    chunk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow's WEBP parser creates libwebp's decoder, which allocates the canvas, inside Image.open.
    if chunk == "VP8L":
        bits = (16383 - 1) | ((16383 - 1) << 14)
        payload = b"\x2f" + struct.pack("<I", bits) + b"\0" * 64
    else:
        payload = b"\x10\0\0\0" + (16383 - 1).to_bytes(3, "little") + (16383 - 1).to_bytes(3, "little") + b"\0" * 64
    body = b"WEBP" + chunk.encode() + struct.pack("<I", len(payload)) + payload
    bomb = b"RIFF" + struct.pack("<I", len(body)) + body
    forbid_decoding(monkeypatch)
    with pytest.raises(PayloadTooLarge) as err:
        decode(bomb)
    assert "16383x16383" in err.value.message


def test_declared_size_matches_pillow_for_real_files() -> None:
    for fmt, kw in [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("WEBP", {"lossless": True})]:
        raw = encode(noise((45, 19)), fmt, **kw)
        assert images._declared_size(raw) == (45, 19), fmt
    rgba = encode(noise((45, 19), "RGBA"), "WEBP")  # VP8X
    assert images._declared_size(rgba) == (45, 19)


def test_pillow_decompression_bomb_error_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    # If Pillow's process-wide guard is the stricter one, its error still becomes a 413, not a 500.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(PayloadTooLarge):
        decode(encode(noise((32, 32)), "PNG"), max_pixels=10**9)


def test_image_exactly_at_the_pixel_limit_is_accepted() -> None:
    assert decode(encode(noise((40, 25)), "PNG"), max_pixels=1000).size == (40, 25)
    with pytest.raises(PayloadTooLarge):
        decode(encode(noise((40, 25)), "PNG"), max_pixels=999)


# -------------------------------------------------------------------------------------- refused formats


def _refused_samples() -> Iterator[tuple[str, bytes, str]]:
    im = noise((16, 16))
    yield "gif", encode(im, "GIF"), "GIF"
    yield "bmp", encode(im, "BMP"), "BMP"
    yield "tiff", encode(im, "TIFF"), "TIFF"
    yield "ico", encode(im, "ICO"), "ICO"
    yield "svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"
    yield "psd", b"8BPS\x00\x01" + b"\x00" * 64, "PSD"
    yield "garbage", random.Random(1).randbytes(4096), "unrecognized"
    yield "text", b"hello, world", "unrecognized"


@pytest.mark.parametrize("name,raw,named", list(_refused_samples()), ids=[s[0] for s in _refused_samples()])
def test_disallowed_formats_are_422_listing_the_allowed_ones(name: str, raw: bytes, named: str) -> None:
    with pytest.raises(InvalidValue) as err:
        decode(raw)
    assert err.value.status == 422 and err.value.param == "image"
    assert "PNG, JPEG or WEBP" in err.value.message and named in err.value.message


# ------------------------------------------------------------------------------------ truncated, corrupt


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_are_422(fmt: str, keep: float) -> None:
    raw = encode(noise((64, 64)), fmt)
    with pytest.raises(InvalidValue) as err:
        decode(raw[: int(len(raw) * keep)])
    assert err.value.status == 422 and err.value.param == "image"


def test_corrupt_png_data_is_422() -> None:
    raw = bytearray(encode(noise((64, 64)), "PNG"))
    idat = raw.index(b"IDAT")
    raw[idat + 20 : idat + 60] = b"\xff" * 40  # damage the compressed pixel stream
    with pytest.raises(InvalidValue):
        decode(bytes(raw))


def test_header_only_png_is_422() -> None:
    raw = encode(noise((64, 64)), "PNG")
    with pytest.raises(InvalidValue):
        decode(raw[:40])


def test_truncated_images_stay_refused_even_if_someone_flips_the_global(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        decode(encode(noise(), "PNG"))


# ------------------------------------------------------------------------------------------ conversions


def test_rgba_png_drops_alpha() -> None:
    src = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    src.putpixel((1, 1), (200, 150, 100, 255))
    out = decode(encode(src, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 1)) == (200, 150, 100)


def test_la_png_drops_alpha_and_replicates_gray() -> None:
    out = decode(encode(Image.new("LA", (4, 4), (77, 0)), "PNG"))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (77, 77, 77)


def test_grayscale_and_bilevel_pngs() -> None:
    assert decode(encode(Image.new("L", (4, 4), 99), "PNG")).getpixel((0, 0)) == (99, 99, 99)
    assert decode(encode(Image.new("1", (4, 4), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_palette_png_uses_palette_colours() -> None:
    src = Image.new("P", (4, 4), 0)
    src.putpalette([255, 0, 0, 0, 255, 0])
    src.putpixel((3, 3), 1)
    out = decode(encode(src, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((3, 3)) == (0, 255, 0)


def test_palette_png_with_transparency_drops_it_without_warnings() -> None:
    src = Image.new("P", (4, 4), 0)
    src.putpalette([255, 0, 0, 0, 0, 255])
    src.putpixel((3, 3), 1)
    src.info["transparency"] = bytes([0, 128])  # per-entry alpha (tRNS)
    raw = encode(src, "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode(raw)
        mask = decode_mask(raw, param="mask_image", **LIMITS, size=(4, 4))  # type: ignore[arg-type]
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((3, 3)) == (0, 0, 255)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 76  # luma of pure red


def test_cmyk_jpeg_converts_to_rgb() -> None:
    src = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    raw = encode(src, "JPEG", quality=95)
    assert Image.open(io.BytesIO(raw)).mode == "CMYK"
    out = decode(raw)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))  # type: ignore[misc]
    assert r >= 250 and g <= 5 and b <= 5


def test_16_bit_grayscale_png_keeps_the_high_byte() -> None:
    values = np.array([[0, 10 * 257, 65535, 1000, 255]], dtype=np.uint16)
    raw = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(raw)).mode.startswith("I;16")
    out = decode(raw)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0))[0] for x in range(5)] == [0, 10, 255, 3, 0]  # type: ignore[index]
    assert out.getpixel((1, 0)) == (10, 10, 10)


def test_16_bit_rgb_png_is_8_bit_rgb() -> None:
    # Pillow itself reduces 16-bit colour PNGs to 8 bits (high byte); hand-build one to check.
    rgb16 = np.array([[[65535, 257 * 7, 0]]], dtype=">u2")
    rows = b"\x00" + rgb16.tobytes()
    ihdr = struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )
    assert decode(raw).getpixel((0, 0)) == (255, 7, 0)


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (4, 2), (0, 0, 0))
    src.putpixel((0, 0), (255, 255, 255))  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    for fmt in ("PNG", "JPEG"):
        out = decode(encode(src, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {})))
        assert out.size == (2, 4), fmt
        assert out.getpixel((1, 0))[0] > 200, fmt  # top-left moved to top-right  # type: ignore[index]


# ------------------------------------------------------------------------------------------------ masks


def mask(data: bytes | str, size: tuple[int, int]) -> Image.Image:
    return decode_mask(data, param="mask_image", size=size, **LIMITS)  # type: ignore[arg-type]


def test_mask_modes_end_in_l() -> None:
    white_rgb = Image.new("RGB", (8, 8), (255, 255, 255))
    white_rgb.putpixel((0, 0), (0, 0, 0))
    out = mask(encode(white_rgb, "PNG"), (8, 8))
    assert out.mode == "L" and out.getpixel((1, 1)) == 255 and out.getpixel((0, 0)) == 0

    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # alpha is ignored, not used as the mask
    assert mask(encode(rgba, "PNG"), (8, 8)).getpixel((3, 3)) == 255

    colour = Image.new("RGB", (8, 8), (0, 255, 0))
    assert mask(encode(colour, "PNG"), (8, 8)).getpixel((0, 0)) == colour.convert("L").getpixel((0, 0))

    assert mask(encode(Image.new("L", (8, 8), 128), "PNG"), (8, 8)).getpixel((0, 0)) == 128
    assert mask(encode(Image.new("1", (8, 8), 1), "PNG"), (8, 8)).getpixel((0, 0)) == 255
    assert mask(encode(Image.new("LA", (8, 8), (200, 0)), "PNG"), (8, 8)).getpixel((0, 0)) == 200
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert mask(encode(sixteen, "PNG"), (8, 8)).getpixel((0, 0)) == 255
    b64 = "data:image/png;base64," + base64.b64encode(encode(white_rgb, "PNG")).decode()
    assert mask(b64, (8, 8)).mode == "L"


def test_mask_size_mismatch_is_422_with_both_sizes() -> None:
    with pytest.raises(InvalidValue) as err:
        mask(encode(Image.new("L", (64, 32)), "PNG"), (64, 64))
    assert err.value.status == 422 and err.value.param == "mask_image"
    assert "64x32" in err.value.message and "64x64" in err.value.message


def test_mask_limits_and_formats_name_mask_image() -> None:
    with pytest.raises(PayloadTooLarge) as big:
        mask(png_bomb(), (64, 64))
    with pytest.raises(InvalidValue) as gif:
        mask(encode(Image.new("L", (8, 8)), "GIF"), (8, 8))
    assert big.value.param == gif.value.param == "mask_image"


# ------------------------------------------------------------------------------------- size multiples


def test_check_size_multiple() -> None:
    check_size_multiple(512, 768, 8)
    with pytest.raises(InvalidValue) as err:
        check_size_multiple(512, 500, 8)
    assert err.value.message == "`height` and `width` have to be divisible by 8 but are 500 and 512."
    assert err.value.param == "height" and err.value.status == 422
    with pytest.raises(InvalidValue) as err:
        check_size_multiple(500, 512, 8)
    assert err.value.param == "width"
    with pytest.raises(InvalidValue) as err:
        check_size_multiple(0, 512, 8)
    assert err.value.param == "width"
    with pytest.raises(InvalidValue) as err:
        check_size_multiple(100, 64, 64, param_w="image.width", param_h="image.height")
    assert err.value.message == "`image.height` and `image.width` have to be divisible by 64 but are 64 and 100."


# -------------------------------------------------------------------------------------------- multipart


@pytest.fixture
def form_client() -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/form")
    async def form(request: Request, max_field_bytes: int | None = None) -> dict[str, object]:
        fields, files = await read_form(request, max_bytes=64 * 1024, max_files=2, max_field_bytes=max_field_bytes)
        decoded = {k: decode_image(v, param=k, **LIMITS).size for k, v in files.items()}  # type: ignore[arg-type]
        return {"fields": fields, "files": {k: len(v) for k, v in files.items()}, "sizes": decoded}

    with TestClient(app) as client:
        yield client


def test_read_form_returns_fields_and_file_bytes(form_client: TestClient) -> None:
    png = encode(noise((16, 8)), "PNG")
    r = form_client.post(
        "/form",
        data={"prompt": "a cat", "strength": "0.5"},
        files={"image": ("cat.png", png, "image/png")},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "fields": {"prompt": "a cat", "strength": "0.5"},
        "files": {"image": len(png)},
        "sizes": {"image": [16, 8]},
    }


def test_read_form_refuses_a_large_body_by_content_length(form_client: TestClient) -> None:
    r = form_client.post("/form", files={"image": ("big.png", b"\0" * (80 * 1024), "image/png")})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "payload_too_large"


def multipart_body(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, payload in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_read_form_counts_a_chunked_body_without_content_length(form_client: TestClient) -> None:
    body = multipart_body("xyz", [("image", "big.png", b"\0" * (200 * 1024))])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    r = form_client.post("/form", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "payload_too_large"


def test_read_form_text_field_limit_is_413(form_client: TestClient) -> None:
    png = encode(noise((8, 8)), "PNG")
    r = form_client.post("/form?max_field_bytes=100", data={"prompt": "x" * 101}, files={"image": ("i.png", png)})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "payload_too_large"
    r = form_client.post("/form?max_field_bytes=100", data={"prompt": "x" * 100}, files={"image": ("i.png", png)})
    assert r.status_code == 200, r.text
    assert r.json()["fields"] == {"prompt": "x" * 100} and r.json()["sizes"] == {"image": [8, 8]}


def test_read_form_accepts_urlencoded_with_the_same_limits(form_client: TestClient) -> None:
    # Starlette counts a urlencoded field's encoded name and value together ("prompt" + 94 = 100 bytes).
    r = form_client.post("/form?max_field_bytes=100", data={"prompt": "x" * 95})
    assert r.status_code == 413, r.text
    r = form_client.post("/form?max_field_bytes=100", data={"prompt": "x" * 94, "seed": "1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"fields": {"prompt": "x" * 94, "seed": "1"}, "files": {}, "sizes": {}}


def test_read_form_too_many_files_is_400(form_client: TestClient) -> None:
    files = [("a", ("a.png", b"1")), ("b", ("b.png", b"2")), ("c", ("c.png", b"3"))]
    r = form_client.post("/form", files=files)
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_request"


def test_read_form_duplicate_name_is_422(form_client: TestClient) -> None:
    png = encode(noise((8, 8)), "PNG")
    r = form_client.post("/form", data={"image": "x"}, files={"image": ("i.png", png)})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"


def test_read_form_wrong_content_type_and_broken_bodies(form_client: TestClient) -> None:
    r = form_client.post("/form", json={"prompt": "a cat"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type"
    r = form_client.post("/form", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_request"
    multipart_x = {"Content-Type": "multipart/form-data; boundary=x"}
    for body in (b"junk", b"--x\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--x--\r\n"):  # no part name
        r = form_client.post("/form", content=body, headers=multipart_x)
        assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_request", body
    r = form_client.post("/form", content=b"--x--\r\n", headers={**multipart_x, "Content-Length": "lots"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "Content-Length is not a number"


def test_read_form_upload_of_a_bomb_is_413_in_the_envelope(form_client: TestClient) -> None:
    r = form_client.post("/form", files={"image": ("bomb.png", png_bomb(idat_bytes=20_000), "image/png")})
    assert r.status_code == 413 and r.json()["error"] == {
        "type": "payload_too_large",
        "message": r.json()["error"]["message"],
        "param": "image",
    }
