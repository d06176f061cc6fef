"""Untrusted input images for central's img2img / inpaint / outpaint: decode, bound and normalize them.

Everything a client sends passes through here before any pixel is decoded, and every refusal is one of the
envelope errors of :mod:`shared.errors` (never a 500):

* **Transport** (:func:`decode_image`, :func:`decode_mask`): raw bytes (a multipart upload) or a base64
  string (JSON), optionally as a ``data:<type>;base64,`` URL. ASCII whitespace inside base64 is ignored and
  missing ``=`` padding is tolerated; anything else that is not standard base64 → **422** naming the field.
* **Bytes**: more than ``max_bytes`` → **413**. For base64 the decoded length (``len * 3 / 4``) is checked
  before decoding, so an oversized string is never materialized as bytes.
* **Format**: an allowlist, PNG, JPEG (including multi-picture "MPO" JPEGs: the first picture) and WEBP,
  detected from the bytes, never from a file name or declared media type. Pillow is only allowed to try
  these three parsers; anything else (GIF, BMP, TIFF, SVG, PSD, ICO, AVIF, random bytes) → **422** naming
  the allowed formats. Animated PNG/WEBP: the first frame.
* **Pixels**: the width × height declared in the header is checked against ``max_pixels`` *before* Pillow
  allocates or decodes anything → **413**. This runs twice: first on the raw header (our own few-byte parse
  of PNG IHDR / JPEG SOFn / WEBP VP8 ,VP8L,VP8X, so Pillow's parsers are not even run on a bomb, and a
  WEBP decoder, which allocates its canvas when created, is never created), then on Pillow's lazily opened
  ``.size`` before ``.load()``. Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, which
  we leave at its process-wide value) is a third line; if it fires it is also a **413**.
* **Integrity**: the image is fully decoded (``.load()``) inside the guard, with
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` required to be False, so truncated or corrupt data → **422**.

Documented conversions (chosen to match what diffusers does with a PIL input, i.e.
``diffusers.utils.load_image``: ``ImageOps.exif_transpose`` then ``.convert("RGB")``):

* EXIF orientation is applied (``ImageOps.exif_transpose``), so a photo is seen the way viewers show it.
  Unreadable EXIF metadata is ignored rather than refused (the pixels are what matter).
* Alpha is **dropped**, not composited: RGBA → RGB, LA → L → RGB, P/PA with transparency → the palette's
  RGB. Transparent pixels keep whatever colour they store. Clients that want a background should flatten
  before sending.
* CMYK (JPEG) → RGB with Pillow's conversion (no ICC colour management; ICC profiles are ignored throughout).
* Palette (P), 1-bit and grayscale (L) → RGB by replicating/looking up the colour.
* 16-bit grayscale PNG (Pillow modes ``I;16*``, or ``I``) → 8-bit by keeping the high byte (``v >> 8``, the
  same reduction Pillow applies to 16-bit RGB PNGs; ``v * 257`` maps back to ``v`` exactly). Pillow's plain
  ``convert`` would clip instead (every value ≥ 255 becomes white), which is why we do not use it here.
* Masks (:func:`decode_mask`) go through the same steps and end in mode ``"L"`` (white = repaint), with
  Pillow's ITU-R 601-2 luma for colour masks, exactly ``convert("L")`` as diffusers' mask processor does;
  alpha is ignored. Binarization is left to the pipeline, as in diffusers.

Decoding is CPU work: routes should call these functions through ``run_in_threadpool``.
"""

from __future__ import annotations

import binascii
import io
import logging
import re
import struct

import numpy as np
import pybase64
import torch
from PIL import Image, ImageFile, ImageOps
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from shared.errors import InvalidValue, MalformedRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = [
    "ALLOWED_FORMATS",
    "MEDIA_TYPES",
    "check_size_multiple",
    "decode_image",
    "decode_mask",
    "encode_images",
    "read_form",
]

log = logging.getLogger("triptych.images")

#: The formats a client may send, as Pillow names them (the only parsers Pillow is allowed to try).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
#: Pillow reports a multi-picture JPEG (cameras, phones) as "MPO"; it is a JPEG and we read its first picture.
_ACCEPTED_PIL_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
_ALLOWED_TEXT = "PNG, JPEG or WEBP"

_DATA_URL = re.compile(r"^data:[^,]*?,", re.IGNORECASE)
_WHITESPACE = re.compile(r"[ \t\r\n\f\v]+")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Magic numbers of formats we refuse, only to say what was received in the 422 message.
_KNOWN_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"%PDF", "PDF"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"qoif", "QOI"),
)


# ----------------------------------------------------------------------------------------------- decoding


def decode_image(
    data: bytes | bytearray | memoryview | str, *, param: str, max_bytes: int, max_pixels: int
) -> Image.Image:
    """Decode one untrusted input image into a fully loaded RGB ``PIL.Image.Image``.

    ``data`` is the raw file (bytes) or its base64 text (str, optionally a ``data:`` URL). ``param`` is the
    request field the image came from; every error names it. Raises ``PayloadTooLarge`` (413) above
    ``max_bytes`` bytes or ``max_pixels`` pixels and ``InvalidValue`` (422) for anything that is not a
    complete PNG, JPEG or WEBP image. See the module docstring for the conversions applied.
    """
    im = _decode(data, param=param, max_bytes=max_bytes, max_pixels=max_pixels)
    return _to_rgb(im)


def decode_mask(
    data: bytes | bytearray | memoryview | str,
    *,
    param: str,
    max_bytes: int,
    max_pixels: int,
    size: tuple[int, int],
) -> Image.Image:
    """Decode an inpainting mask into mode ``"L"`` (white = repaint, black = keep).

    Same transport, limits and format rules as :func:`decode_image`; colour and alpha masks are converted
    with ``convert("L")`` (alpha ignored). ``size`` is the ``(width, height)`` of the image the mask belongs
    to (after its EXIF orientation); a mask of any other size → 422 naming ``param`` and both sizes.
    """
    im = _to_l(_decode(data, param=param, max_bytes=max_bytes, max_pixels=max_pixels))
    if im.size != tuple(size):
        raise InvalidValue(
            f"`{param}` is {_wxh(im.size)} but the image is {_wxh(size)}; the mask must be the same size as the image.",
            param=param,
        )
    return im


def _decode(data: bytes | bytearray | memoryview | str, *, param: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes/base64 → a fully loaded, EXIF-oriented image in whatever mode the file has."""
    raw = _to_bytes(data, param=param, max_bytes=max_bytes)
    if not raw:
        raise InvalidValue(f"`{param}` is empty; send a {_ALLOWED_TEXT} image.", param=param)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"`{param}` is {len(raw)} bytes; at most {max_bytes} are allowed.", param=param)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process turned Pillow's truncation check off; we would accept half-decoded images.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must be False for central.images to be safe")

    # Gate 1: the header's own dimensions, before any Pillow parser (or WEBP decoder) runs on the data.
    declared = _declared_size(raw)
    if declared is not None:
        _check_pixels(declared, param=param, max_pixels=max_pixels)

    try:
        im = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, in case it is stricter than ours
        raise PayloadTooLarge(f"`{param}` has too many pixels: {exc}", param=param) from None
    except Image.UnidentifiedImageError:
        raise InvalidValue(f"`{param}` must be a {_ALLOWED_TEXT} image; got {_describe(raw)}.", param=param) from None
    except Exception as exc:  # a parser that recognized the format but choked on the header
        raise InvalidValue(f"`{param}` could not be read as an image: {_reason(exc)}.", param=param) from None

    with im:
        if im.format not in _ACCEPTED_PIL_FORMATS:  # defensive: `formats=` already restricts the parsers
            raise InvalidValue(f"`{param}` must be a {_ALLOWED_TEXT} image; got {im.format}.", param=param)
        # Gate 2: Pillow's lazily parsed size, still before a single pixel is decoded.
        _check_pixels(im.size, param=param, max_pixels=max_pixels)
        try:
            im.load()  # full decode; truncated or corrupt data raises here
            oriented = _exif_transpose(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PayloadTooLarge(f"`{param}` has too many pixels: {exc}", param=param) from None
        except MemoryError:
            raise PayloadTooLarge(f"`{param}` is too large to decode.", param=param) from None
        except Exception as exc:
            raise InvalidValue(
                f"`{param}` is truncated or corrupt ({im.format}): {_reason(exc)}.", param=param
            ) from None
    return oriented


def _to_bytes(data: bytes | bytearray | memoryview | str, *, param: str, max_bytes: int) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if not isinstance(data, str):
        raise InvalidValue(f"`{param}` must be a base64 string or a file upload.", param=param)
    text = data.strip()
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None or not match.group(0).lower().endswith(";base64,"):
            raise InvalidValue(
                f"`{param}` is a data URL but not a base64 one; use `data:image/png;base64,...`.", param=param
            )
        text = text[match.end() :]
    text = _WHITESPACE.sub("", text)
    # Decoded size, checked before decoding: 4 base64 characters carry 3 bytes.
    estimated = len(text) * 3 // 4 - min(2, len(text) - len(text.rstrip("=")))
    if estimated > max_bytes:
        raise PayloadTooLarge(
            f"`{param}` decodes to about {estimated} bytes; at most {max_bytes} are allowed.", param=param
        )
    if len(text) % 4 == 1:
        raise InvalidValue(f"`{param}` is not valid base64 (its length is impossible).", param=param)
    text += "=" * (-len(text) % 4)
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidValue(f"`{param}` is not valid base64.", param=param) from None


def _check_pixels(size: tuple[int, int], *, param: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidValue(f"`{param}` declares an empty size ({_wxh(size)}).", param=param)
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"`{param}` is {_wxh(size)} = {width * height} pixels; at most {max_pixels} are allowed.", param=param
        )


def _exif_transpose(im: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose`` (always a new image); metadata it cannot parse is ignored, not refused."""
    try:
        return ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, MemoryError):
        raise
    except Exception as exc:
        log.debug("ignoring unreadable EXIF orientation: %s", _reason(exc))
        return im.copy()


# --------------------------------------------------------------------------------------------- conversions


def _to_8bit(im: Image.Image) -> Image.Image:
    """Reduce 16/32-bit integer grayscale to ``L`` by keeping the high byte of the 16-bit value."""
    if im.mode not in _SIXTEEN_BIT_MODES:
        return im
    values = np.asarray(im).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    im = _to_8bit(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")  # same colours as P → RGB, without Pillow's transparency warning
    return im.convert("RGB")


def _to_l(im: Image.Image) -> Image.Image:
    im = _to_8bit(im)
    if im.mode == "L":
        return im
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode == "CMYK":
        im = im.convert("RGB")
    return im.convert("L")


# --------------------------------------------------------------------------------------- header sniffing

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field


def _declared_size(raw: bytes) -> tuple[int, int] | None:
    """The (width, height) a PNG, JPEG or WEBP header declares, read without decoding; None if not found.

    Only a pre-check: Pillow's parsed ``.size`` is checked again afterwards, so a header this misses is
    still bounded. For JPEG the largest frame declared before the first scan is returned.
    """
    try:
        if raw.startswith(_PNG_SIGNATURE) and raw[12:16] == b"IHDR":
            return struct.unpack(">II", raw[16:24])
        if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
            return _webp_size(raw)
        if raw.startswith(b"\xff\xd8"):
            return _jpeg_size(raw)
    except struct.error:
        return None
    return None


def _webp_size(raw: bytes) -> tuple[int, int] | None:
    chunk = raw[12:16]
    if chunk == b"VP8X" and len(raw) >= 30:  # extended: 24-bit canvas width-1, height-1
        return int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1
    if chunk == b"VP8L" and len(raw) >= 25 and raw[20] == 0x2F:  # lossless: 14-bit width-1, height-1
        bits = int.from_bytes(raw[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(raw) >= 30 and raw[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", raw[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    i, n = 2, len(raw)
    while i + 4 <= n:
        if raw[i] != 0xFF:
            break  # not at a marker: leave the rest to Pillow
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: the header is over
            break
        (length,) = struct.unpack(">H", raw[i + 2 : i + 4])
        if marker in _JPEG_SOF and i + 9 <= n:
            height, width = struct.unpack(">HH", raw[i + 5 : i + 9])
            if best is None or width * height > best[0] * best[1]:
                best = (width, height)
        if length < 2:
            break
        i += 2 + length
    return best


def _describe(raw: bytes) -> str:
    """A short name for what a refused file looks like (for the error message only)."""
    for magic, name in _KNOWN_OTHER_FORMATS:
        if raw.startswith(magic):
            return name
    if raw[4:8] == b"ftyp":
        brand = raw[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand[:3] == b"hei" or brand in (b"mif1", b"msf1"):
            return "HEIF/HEIC"
    head = raw[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype svg")) or b"<svg" in head:
        return "SVG/XML text"
    if raw.startswith(_PNG_SIGNATURE):
        return "a malformed PNG"
    if raw.startswith(b"\xff\xd8"):
        return "a malformed JPEG"
    if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
        return "a malformed or unsupported WEBP"
    return "data in an unrecognized format"


def _reason(exc: BaseException) -> str:
    """Pillow's explanation, short and single-line (Pillow works on an in-memory buffer: no paths leak)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------------------------------- size checks


def check_size_multiple(
    width: int, height: int, multiple: int, param_w: str = "width", param_h: str = "height"
) -> None:
    """422 unless ``width`` and ``height`` are positive multiples of ``multiple`` (the VAE scale factor).

    The message is diffusers' own (``StableDiffusionPipeline.check_inputs``) and ``param`` names the first
    offending field, height first as in that message.
    """
    if width <= 0 or height <= 0:
        param = param_h if height <= 0 else param_w
        raise InvalidValue(f"`{param_h}` and `{param_w}` must be positive but are {height} and {width}.", param=param)
    if height % multiple or width % multiple:
        param = param_h if height % multiple else param_w
        raise InvalidValue(
            f"`{param_h}` and `{param_w}` have to be divisible by {multiple} but are {height} and {width}.",
            param=param,
        )


# ----------------------------------------------------------------------------------------------- multipart


def bounded(request: Request, max_bytes: int) -> Request:
    """``request`` with its body bounded: a ``Content-Length`` over ``max_bytes`` is refused at once, and a body
    without one is counted as it streams and cut off at the limit (413 either way)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise MalformedRequest("Content-Length is not a number") from None
        if declared_bytes > max_bytes:
            raise PayloadTooLarge(f"body is {declared_bytes} bytes; at most {max_bytes} are allowed")
    received = 0
    upstream = request.receive

    async def counting_receive() -> Message:
        nonlocal received
        message = await upstream()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise PayloadTooLarge(f"body exceeds {max_bytes} bytes")
        return message

    return Request(request.scope, counting_receive)


async def read_form(
    request: Request,
    *,
    max_bytes: int,
    max_files: int = 4,
    max_fields: int = 64,
    max_field_bytes: int | None = None,
) -> tuple[dict[str, str], dict[str, bytes]]:
    """Parse a ``multipart/form-data`` body into ``(text fields, file bytes)``, within limits.

    ``application/x-www-form-urlencoded`` (an HTML form without files) is accepted too and has no files.

    * ``max_bytes`` bounds the whole body, multipart framing included: a larger ``Content-Length`` is refused
      before reading, and a body without one (chunked) is counted as it streams and cut off at the limit
      → 413. (Starlette's ``max_part_size`` only bounds *text* parts; file parts are spooled unbounded, which
      is why the body is counted here.)
    * ``max_field_bytes`` bounds each text field (default: ``max_bytes``) → 413. For a urlencoded body
      Starlette counts the encoded name and value together.
    * more than ``max_files`` file parts or ``max_fields`` text fields, a missing boundary or broken framing
      → 400; a body that is not ``multipart/form-data`` → 415; a name given twice → 422 naming it.

    Must be called before anything else reads the body. File parts come back as bytes (their own size is
    then checked by :func:`decode_image`); a part counts as a file when it has a ``filename``.
    """
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UnsupportedMediaType(f"expected multipart/form-data, got {media_type or 'no content type'!r}")
    limited = bounded(request, max_bytes)
    part_limit = max_bytes if max_field_bytes is None else max_field_bytes
    try:
        form = await limited.form(max_files=max_files, max_fields=max_fields, max_part_size=part_limit)
    except (HTTPException, MultiPartException) as exc:
        # Starlette turns its parser errors into HTTPException(400) when running inside an app.
        detail = str(exc.detail if isinstance(exc, HTTPException) else exc.message)
        if "exceeded maximum size" in detail:
            raise PayloadTooLarge(f"a form field exceeds {part_limit} bytes", param=None) from None
        raise MalformedRequest(f"malformed multipart body: {detail}") from None

    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        for name, value in form.multi_items():
            if name in fields or name in files:
                raise InvalidValue(f"`{name}` was given more than once.", param=name)
            if isinstance(value, UploadFile):
                files[name] = await value.read()
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files


MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_images(images: torch.Tensor, fmt: str) -> list[bytes]:
    """uint8 (B, H, W, 3) -> one file per image. PNG is lossless: its pixels are exactly the tensor's."""
    out = []
    array = images.numpy()
    for i in range(array.shape[0]):
        buf = io.BytesIO()
        image = Image.fromarray(np.ascontiguousarray(array[i]))
        if fmt == "png":
            image.save(buf, format="PNG", compress_level=1)
        elif fmt == "jpeg":
            image.save(buf, format="JPEG", quality=95)
        else:
            image.save(buf, format="WEBP", quality=95)
        out.append(buf.getvalue())
    return out
