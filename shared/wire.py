"""The msgpack tensor wire format that every stage speaks.

A message is one msgpack value (in practice a map). Tensors inside it are msgpack *ext* values of type
``TENSOR_EXT_TYPE`` (1) whose payload is::

    u8   len(dtype)          dtype name, ASCII, from DTYPES (e.g. "float16")
    ...  dtype
    u8   ndim                0..MAX_NDIM
    ndim x u64 little-endian the shape
    ...  raw bytes           C-order, little-endian, exactly prod(shape) * itemsize bytes

or, for a tensor whose memory layout is not C order (channels-last latents, say), of type
``STRIDED_TENSOR_EXT_TYPE`` (2): the same header, then ``ndim`` u8 giving the dimension order in memory
(outermost first; C order is 0, 1, ..., ndim - 1), then the bytes in that order. The receiver gets a tensor
with the sender's layout: oneDNN picks its convolution kernels by layout, so a tensor that changed layout
in transit would be computed with other kernels than the pipeline uses, and come out 1e-6 off (SPEC §8).

Nothing else is ever executed or unpickled. Decoding is bounded: the body size, every msgpack string /
binary / array / map / ext length, the nesting depth, the number of dimensions and elements, and the byte
count against shape x itemsize are all checked before the tensor's memory is allocated.
``docs/wire-format.md`` is the human-readable version of this module.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

CONTENT_TYPE = "application/msgpack"
TENSOR_EXT_TYPE = 1
STRIDED_TENSOR_EXT_TYPE = 2
FORMAT_VERSION = 2

#: dtype name on the wire -> (torch dtype, itemsize). The only dtypes a peer may send.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "float64": (torch.float64, 8),
    "uint8": (torch.uint8, 1),
    "int8": (torch.int8, 1),
    "int32": (torch.int32, 4),
    "int64": (torch.int64, 8),
    "bool": (torch.bool, 1),
}
_NAME_OF: dict[torch.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items()}
_U64 = struct.Struct("<Q")


class WireError(ValueError):
    """The bytes are not a valid message. ``too_large`` marks bounds violations (HTTP 413)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class Limits:
    """Decoding bounds. The defaults fit SD-sized payloads with a wide margin (a 2048x2048 batch of 8)."""

    max_body_bytes: int = 256 * 1024 * 1024
    max_depth: int = 16
    max_container_len: int = 4096
    max_str_bytes: int = 64 * 1024
    max_ndim: int = 8
    max_elements: int = 128 * 1024 * 1024


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------------------------- encode
def dim_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """The dimensions from outermost to innermost in memory of the layout ``tensor.clone()`` would have:
    ``(0, 1, ..., n-1)`` for C order, ``(0, 2, 3, 1)`` for channels-last. Like torch's ``preserve_format``,
    a dense tensor keeps its own strides and any other (a slice, a broadcast) takes the layout torch suggests
    for it, so a view of channels-last memory travels as channels-last and a broadcast as C order."""
    if tensor.is_contiguous():
        return tuple(range(tensor.dim()))
    strides = torch.empty_like(tensor, device="meta").stride()
    return tuple(sorted(range(tensor.dim()), key=lambda d: -strides[d]))


def tensor_to_ext(tensor: torch.Tensor) -> msgpack.ExtType:
    """One tensor as a wire ext value, keeping its memory layout: C-order tensors as type 1, any other
    layout as type 2 with its dimension order. Copies to CPU (and into that order) when needed; never
    pickles."""
    name = _NAME_OF.get(tensor.dtype)
    if name is None:
        raise TypeError(f"dtype {tensor.dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
    if tensor.dim() > 255:
        raise TypeError("a tensor on the wire has at most 255 dimensions")
    t = tensor.detach().to("cpu")
    order = dim_order(t)
    strided = order != tuple(range(t.dim()))
    # In memory order, then dense: the bytes of a channels-last tensor are its NHWC bytes.
    t = t.permute(order).contiguous() if strided else t.contiguous()
    # A uint8 view of the flat tensor gives the raw bytes for every dtype, bfloat16 included.
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    dtype = name.encode("ascii")
    shape = tensor.shape
    header = bytes([len(dtype)]) + dtype + bytes([len(shape)]) + b"".join(_U64.pack(d) for d in shape)
    if strided:
        return msgpack.ExtType(STRIDED_TENSOR_EXT_TYPE, header + bytes(order) + raw)
    return msgpack.ExtType(TENSOR_EXT_TYPE, header + raw)


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tensor_to_ext(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def encode(message: Any) -> bytes:
    """Serialise a message (dicts, lists, str, int, float, bool, None, bytes, tensors) to msgpack bytes."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


# --------------------------------------------------------------------------------------------- decode
def ext_to_tensor(data: bytes, limits: Limits = DEFAULT_LIMITS, *, strided: bool = False) -> torch.Tensor:
    """Parse one tensor ext payload (type 2 when ``strided``), validating the header before allocating."""
    view = memoryview(data)
    if len(view) < 2:
        raise WireError("tensor header is truncated")
    name_len = view[0]
    if len(view) < 1 + name_len + 1:
        raise WireError("tensor header is truncated")
    name = bytes(view[1 : 1 + name_len]).decode("ascii", errors="replace")
    if name not in DTYPES:
        raise WireError(f"unknown tensor dtype {name!r}; allowed: {', '.join(DTYPES)}")
    dtype, itemsize = DTYPES[name]
    pos = 1 + name_len
    ndim = view[pos]
    pos += 1
    if ndim > limits.max_ndim:
        raise WireError(f"tensor has {ndim} dimensions; at most {limits.max_ndim} are allowed")
    if len(view) < pos + 8 * ndim:
        raise WireError("tensor shape is truncated")
    shape = [_U64.unpack_from(view, pos + 8 * i)[0] for i in range(ndim)]
    pos += 8 * ndim
    order = list(range(ndim))
    if strided:
        if len(view) < pos + ndim:
            raise WireError("tensor dimension order is truncated")
        order = list(view[pos : pos + ndim])
        pos += ndim
        if sorted(order) != list(range(ndim)):
            raise WireError(f"tensor dimension order {order} is not a permutation of 0..{ndim - 1}")
    # Each dimension is bounded too: a zero-element shape such as (0, 2**64 - 1) must not reach torch.
    if any(d > limits.max_elements for d in shape):
        raise WireError(f"tensor of shape {shape} has a dimension above {limits.max_elements}", too_large=True)
    # Python ints do not overflow, so a lying shape cannot wrap around the element bound.
    numel = math.prod(shape)
    if numel > limits.max_elements:
        raise WireError(
            f"tensor of shape {shape} has {numel} elements; at most {limits.max_elements} are allowed",
            too_large=True,
        )
    expected = numel * itemsize
    if len(view) - pos != expected:
        raise WireError(
            f"tensor of dtype {name} and shape {shape} needs {expected} bytes but {len(view) - pos} were sent"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray gives torch a writable buffer of its own; the message bytes are not kept alive.
    flat = torch.frombuffer(bytearray(view[pos:]), dtype=torch.uint8).view(dtype)
    if not strided:
        return flat.reshape(shape)
    # The bytes hold the dimensions in `order`; permuting back gives the logical shape with the sender's strides.
    inverse = sorted(range(ndim), key=order.__getitem__)
    return flat.reshape([shape[d] for d in order]).permute(inverse)


def _check_depth(obj: Any, max_depth: int, depth: int = 0) -> None:
    if depth > max_depth:
        raise WireError(f"message nesting exceeds {max_depth} levels")
    if isinstance(obj, dict):
        for key, value in obj.items():
            # strict_map_key still lets bin keys through; the format only has str keys.
            if not isinstance(key, str):
                raise WireError(f"map keys must be strings, not {type(key).__name__}")
            _check_depth(value, max_depth, depth + 1)
    elif isinstance(obj, list):
        for value in obj:
            _check_depth(value, max_depth, depth + 1)
    elif isinstance(obj, msgpack.Timestamp):
        # msgpack decodes ext type -1 itself, without calling ext_hook.
        raise WireError("unknown msgpack ext type -1")


def decode(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse msgpack bytes into Python values with tensors restored; raises WireError on anything else."""
    if len(body) > limits.max_body_bytes:
        raise WireError(f"body is {len(body)} bytes; at most {limits.max_body_bytes} are allowed", too_large=True)
    if not body:
        raise WireError("body is empty")

    def ext_hook(code: int, data: bytes) -> Any:
        if code not in (TENSOR_EXT_TYPE, STRIDED_TENSOR_EXT_TYPE):
            raise WireError(f"unknown msgpack ext type {code}")
        return ext_to_tensor(data, limits, strided=code == STRIDED_TENSOR_EXT_TYPE)

    try:
        # msgpack checks these lengths while parsing, before it allocates a container or string.
        message = msgpack.unpackb(
            body,
            ext_hook=ext_hook,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_body_bytes,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=limits.max_body_bytes,
        )
    except WireError:
        raise
    except msgpack.StackError as exc:
        raise WireError(f"message nesting exceeds {limits.max_depth} levels") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ExtraData, OutOfData, FormatError, UnicodeDecodeError and the length bounds all land here.
        text = str(exc)
        if "exceeds max_" in text:
            raise WireError(f"message exceeds a decoding bound: {text}", too_large=True) from exc
        raise WireError(f"body is not valid msgpack ({exc.__class__.__name__}: {text or 'malformed'})") from exc
    _check_depth(message, limits.max_depth)
    return message


# ----------------------------------------------------------------------------------------------- streams
#: A stage's streamed answer (the UNet's progress): a sequence of frames, each a 4-byte little-endian length
#: and one msgpack message. A client asks for it with ``Accept: STREAM_CONTENT_TYPE``.
STREAM_CONTENT_TYPE = "application/vnd.triptych.stream+msgpack"
_FRAME_LEN = struct.Struct("<I")


def encode_frame(message: Any) -> bytes:
    """One frame of a stream: length, then ``encode(message)``."""
    body = encode(message)
    return _FRAME_LEN.pack(len(body)) + body


class FrameReader:
    """Splits the chunks of a stream into decoded messages; each frame is bounded like a whole body, and its
    length is checked before its bytes are buffered."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Any]:
        self._buffer += chunk
        messages = []
        while len(self._buffer) >= _FRAME_LEN.size:
            (size,) = _FRAME_LEN.unpack_from(self._buffer)
            if size > self.limits.max_body_bytes:
                raise WireError(f"a frame of {size} bytes; at most {self.limits.max_body_bytes}", too_large=True)
            end = _FRAME_LEN.size + size
            if len(self._buffer) < end:
                break
            messages.append(decode(bytes(self._buffer[_FRAME_LEN.size : end]), self.limits))
            del self._buffer[:end]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (non-zero when a stream ends: it was cut)."""
        return len(self._buffer)
