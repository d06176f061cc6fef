"""Tests of the msgpack tensor wire format (shared/wire.py, documented in docs/wire-format.md).

Hand-built payloads below follow the documented byte layout independently of the codec, so a change to the
layout on either side fails here.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from shared import wire

# ------------------------------------------------------------------------------------------------ helpers
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _payload(dtype: str | bytes, shape: Sequence[int], data: bytes, *, ndim: int | None = None) -> bytes:
    """A tensor ext payload built by hand from the documented layout."""
    name = dtype.encode("ascii") if isinstance(dtype, str) else dtype
    dims = b"".join(struct.pack("<Q", d) for d in shape)
    return bytes([len(name)]) + name + bytes([len(shape) if ndim is None else ndim]) + dims + data


def _ext(payload: bytes, code: int = wire.TENSOR_EXT_TYPE) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))


def _ext8(code: int, data: bytes) -> bytes:
    """An ext8 value written by hand: msgpack.ExtType refuses the negative (reserved) codes."""
    return b"\xc7" + bytes([len(data)]) + struct.pack("b", code) + data


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as same-width integers, so NaN payloads and -0.0 compare exactly."""
    return t.reshape(-1).view(_INT_OF_WIDTH[t.element_size()])


def _assert_same_tensor(got: Any, want: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(_bits(got), _bits(want))


def _assert_same(got: Any, want: Any) -> None:
    """Deep equality where tensors compare bit-for-bit and every other value keeps its exact type."""
    if isinstance(want, torch.Tensor):
        _assert_same_tensor(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict)
        assert list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same(g, w)
    else:
        assert type(got) is type(want)
        assert got == want


def _round_trip(message: Any) -> Any:
    return wire.decode(wire.encode(message))


def _reject(body: bytes, limits: wire.Limits = wire.DEFAULT_LIMITS) -> wire.WireError:
    """decode() must raise WireError (anything else fails the test) with a short message free of internals."""
    with pytest.raises(wire.WireError) as info:
        wire.decode(body, limits)
    text = str(info.value)
    assert text
    assert len(text) < 500, text
    assert "site-packages" not in text and "Traceback" not in text and "frame #" not in text, text
    return info.value


@pytest.fixture
def no_tensor_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every way ext_to_tensor allocates tensor memory fail loudly."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tensor memory was allocated before the header was validated")

    monkeypatch.setattr(torch, "empty", forbidden)
    monkeypatch.setattr(torch, "frombuffer", forbidden)
    monkeypatch.setattr(wire, "bytearray", forbidden, raising=False)


# --------------------------------------------------------------------------------------------- constants
def test_constants() -> None:
    assert wire.CONTENT_TYPE == "application/msgpack"
    assert wire.TENSOR_EXT_TYPE == 1
    assert wire.STRIDED_TENSOR_EXT_TYPE == 2


@pytest.mark.parametrize("name", list(wire.DTYPES))
def test_dtype_table_itemsizes_match_torch(name: str) -> None:
    dtype, itemsize = wire.DTYPES[name]
    assert torch.empty((), dtype=dtype).element_size() == itemsize
    assert str(dtype) == f"torch.{name}"


# ------------------------------------------------------------------------------------------- round trips
# Special values as bit patterns: +0, -0, 1, +inf, -inf, quiet NaN, NaN with payload, negative NaN,
# signalling NaN, smallest subnormal, largest finite, an ordinary negative value.
_FLOAT_BITS: dict[str, tuple[type[np.unsignedinteger[Any]], type[np.signedinteger[Any]], list[int]]] = {
    "float64": (np.uint64, np.int64, [0, 1 << 63, 0x3FF << 52, 0x7FF << 52, 0xFFF << 52, 0x7FF8 << 48,
                                      (0x7FF8 << 48) + 1, 0xFFF8 << 48, (0x7FF << 52) + 1, 1,
                                      0x7FEFFFFFFFFFFFFF, 0xC00921FB54442D18]),
    "float32": (np.uint32, np.int32, [0, 0x80000000, 0x3F800000, 0x7F800000, 0xFF800000, 0x7FC00000,
                                      0x7FC00001, 0xFFC00000, 0x7F800001, 1, 0x7F7FFFFF, 0xC0490FDB]),
    "float16": (np.uint16, np.int16, [0, 0x8000, 0x3C00, 0x7C00, 0xFC00, 0x7E00,
                                      0x7E01, 0xFE00, 0x7C01, 1, 0x7BFF, 0xC248]),
    "bfloat16": (np.uint16, np.int16, [0, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC0,
                                       0x7FC1, 0xFFC0, 0x7F81, 1, 0x7F7F, 0xC049]),
}  # fmt: skip


_INT_VALUES: dict[str, list[int]] = {
    "uint8": list(range(256)),
    "int8": [-128, -1, 0, 1, 127],
    "int32": [-(2**31), -1, 0, 1, 2**31 - 1],
    "int64": [-(2**63), -1, 0, 1, 2**53 + 1, 2**63 - 1],
    "bool": [1, 0, 0, 1, 1],
}


def _sample(name: str) -> torch.Tensor:
    dtype = wire.DTYPES[name][0]
    if name in _FLOAT_BITS:
        unsigned, signed, bits = _FLOAT_BITS[name]
        return torch.from_numpy(np.array(bits, dtype=unsigned).view(signed)).view(dtype)
    return torch.tensor(_INT_VALUES[name]).to(dtype)


def test_every_wire_dtype_has_a_round_trip_sample() -> None:
    assert set(_FLOAT_BITS) | set(_INT_VALUES) == set(wire.DTYPES)


@pytest.mark.parametrize("name", list(wire.DTYPES))
def test_round_trip_preserves_dtype_shape_and_bits(name: str) -> None:
    t = _sample(name)
    assert t.dtype == wire.DTYPES[name][0]
    for shaped in (t, t.reshape(-1, 1) if t.numel() % 2 else t.reshape(2, -1)):
        _assert_same_tensor(_round_trip(shaped), shaped)


@pytest.mark.parametrize("name", list(_FLOAT_BITS))
def test_float_specials_survive_exactly(name: str) -> None:
    t = _sample(name)
    out = _round_trip(t)
    assert out.isnan().tolist() == t.isnan().tolist()
    assert out.isinf().tolist() == t.isinf().tolist()
    # The NaN payloads differ from each other and must come back unchanged, sign bit included.
    nan_bits = _bits(t)[t.isnan()].tolist()
    assert len(set(nan_bits)) == len(nan_bits) == 4
    assert _bits(out)[out.isnan()].tolist() == nan_bits
    assert torch.signbit(out[1].float()) and not torch.signbit(out[0].float())  # -0.0 and +0.0


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "uint8", "int64", "bool"])
@pytest.mark.parametrize("shape", [(), (0,), (0, 4), (4, 0), (1,), (3,), (2, 3, 4), (1, 1, 1, 1, 1, 1, 1, 2)], ids=str)
def test_round_trip_shapes(name: str, shape: tuple[int, ...]) -> None:
    dtype = wire.DTYPES[name][0]
    numel = int(np.prod(shape))
    t = (torch.arange(numel, dtype=torch.float64) % 3 * 1.25).to(dtype).reshape(shape)
    out = _round_trip({"t": t})["t"]
    _assert_same_tensor(out, t)
    assert out.dim() == len(shape)


def test_bfloat16_is_not_widened() -> None:
    t = torch.tensor([1.0, 3.140625, -65280.0], dtype=torch.bfloat16)
    body = wire.encode(t)
    assert b"bfloat16" in body
    # 3 values x 2 bytes: the raw tensor bytes are the last 6 bytes of the body.
    assert body[-6:] == bytes.fromhex("803f 4940 7fc7")
    _assert_same_tensor(wire.decode(body), t)


# Views that are not a dense block of memory: sent as the C-order copy (what `tensor.clone()` would give).
_NON_CONTIGUOUS: dict[str, Callable[[], torch.Tensor]] = {
    "step-slice": lambda: torch.arange(40, dtype=torch.int64).reshape(4, 10)[:, ::3],
    "expanded": lambda: torch.tensor([1, 2, 3], dtype=torch.uint8).expand(4, 3),
    "storage-offset": lambda: torch.arange(10, dtype=torch.float16)[3:7],
    "column-bool": lambda: (torch.arange(12).reshape(3, 4) % 3 == 0)[:, 1],
}

# Dense tensors whose memory order is not C order: sent in their own order, received with the same strides.
_PERMUTED: dict[str, Callable[[], torch.Tensor]] = {
    "transposed": lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    "permuted-bf16": lambda: (
        torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).permute(2, 0, 1)
    ),
    "channels-last": lambda: torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last),
    "channels-last-3d": lambda: torch.randn(1, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d),
}


@pytest.mark.parametrize("make", list(_NON_CONTIGUOUS.values()), ids=list(_NON_CONTIGUOUS))
def test_non_dense_views_are_sent_in_c_order(make: Callable[[], torch.Tensor]) -> None:
    t = make()
    assert not t.is_contiguous() or t.storage_offset() > 0
    # On the wire it is exactly the C-order copy; decoded it equals the logical tensor.
    assert wire.encode(t) == wire.encode(t.contiguous())
    out = _round_trip(t)
    _assert_same_tensor(out, t.contiguous())
    assert out.is_contiguous()
    assert torch.equal(out, t)


@pytest.mark.parametrize("make", list(_PERMUTED.values()), ids=list(_PERMUTED))
def test_memory_layout_survives_the_trip(make: Callable[[], torch.Tensor]) -> None:
    t = make()
    assert not t.is_contiguous()
    body = wire.encode(t)
    assert msgpack.unpackb(body).code == wire.STRIDED_TENSOR_EXT_TYPE
    out = wire.decode(body)
    _assert_same_tensor(out.contiguous(), t.contiguous())
    assert out.stride() == t.stride()


def test_a_view_of_channels_last_memory_arrives_channels_last() -> None:
    """The VAE posterior's mean is a channel slice of channels-last moments on some CPUs: not dense, but laid
    out channels-last. The UNet must receive it channels-last, as the pipeline's own tensor is (issue: a
    contiguous copy made oneDNN pick other convolution kernels, 1/255 off diffusers)."""
    moments = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    mean = moments.chunk(2, dim=1)[0]
    assert mean.stride() == (512, 1, 64, 8)
    out = _round_trip(mean)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, mean)
    assert wire.dim_order(mean) == (0, 2, 3, 1)


def test_strided_bytes_follow_the_documented_layout() -> None:
    t = torch.arange(6, dtype=torch.int64).reshape(2, 3).t()  # (3, 2), column-major: dimension order (1, 0)
    raw = np.arange(6, dtype="<i8").tobytes()  # the memory, outermost dimension (the original rows) first
    payload = _payload("int64", [3, 2], bytes([1, 0]) + raw)
    assert wire.encode(t) == _ext(payload, wire.STRIDED_TENSOR_EXT_TYPE)
    out = wire.decode(_ext(payload, wire.STRIDED_TENSOR_EXT_TYPE))
    assert out.tolist() == [[0, 3], [1, 4], [2, 5]] and out.stride() == (1, 3)


@pytest.mark.parametrize(
    ("order", "match"),
    [(b"\x00\x00", "not a permutation"), (b"\x00\x02", "not a permutation"), (b"\x01", "truncated")],
)
def test_bad_dimension_orders_are_refused(order: bytes, match: str) -> None:
    raw = b"\x00" * 8 * 6 if len(order) == 2 else b""
    body = _ext(_payload("int64", [3, 2], order + raw), wire.STRIDED_TENSOR_EXT_TYPE)
    with pytest.raises(wire.WireError, match=match):
        wire.decode(body)


def test_encoded_bytes_follow_the_documented_layout() -> None:
    t = torch.arange(12, dtype=torch.int64).reshape(3, 4)[:, 1:3]  # a non-dense (3, 2) view: C order
    raw = np.ascontiguousarray(t.numpy()).astype("<i8").tobytes(order="C")
    assert wire.encode(t) == _ext(_payload("int64", [3, 2], raw))

    f = torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.float32)
    raw = np.array([[1.5, -2.0, 0.25]], "<f4").tobytes()
    assert wire.encode({"f": f}) == msgpack.packb({"f": msgpack.ExtType(1, _payload("float32", [1, 3], raw))})


def test_worked_example_in_docs() -> None:
    # The hex dump shown in docs/wire-format.md.
    message = {"x": torch.tensor([[1.0, -2.0], [0.5, float("inf")]], dtype=torch.bfloat16)}
    expected = bytes.fromhex(
        "81 a1 78 c7 22 01 08 62 66 6c 6f 61 74 31 36 02"
        " 02 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00"
        " 80 3f 00 c0 00 3f 80 7f"
    )
    assert wire.encode(message) == expected
    _assert_same(wire.decode(expected), message)


def test_hand_built_payloads_decode() -> None:
    assert wire.decode(_ext(_payload("float32", [], struct.pack("<f", 2.5)))).item() == 2.5
    scalar = wire.decode(_ext(_payload("int64", [], struct.pack("<q", -7))))
    assert scalar.shape == () and scalar.dtype == torch.int64 and scalar.item() == -7
    grid = wire.decode(_ext(_payload("uint8", [2, 3], bytes([1, 2, 3, 4, 5, 6]))))
    assert grid.tolist() == [[1, 2, 3], [4, 5, 6]]  # C order: the last index varies fastest
    empty = wire.decode(_ext(_payload("float16", [0, 4], b"")))
    assert empty.shape == (0, 4) and empty.dtype == torch.float16


def test_nested_message_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    message = {
        "prompt": "a cat, ünïcødé ✓",
        "steps": 50,
        "big": 2**64 - 1,
        "small": -(2**63),
        "guidance": 7.5,
        "seed": None,
        "flag": True,
        "off": False,
        "raw": b"\x00\xff\x80",
        "empty_list": [],
        "empty_map": {},
        "tensors": [
            torch.randn(2, 4, generator=gen).to(torch.float16),
            {"inner": torch.zeros(0, 4), "label": "zeros", "scale": 0.18215},
            [torch.tensor(3, dtype=torch.int64), None, b"", "", 0.0],
        ],
        "nested": {"a": {"b": {"c": [1, "two", 3.0, None, torch.ones(1, dtype=torch.bool)]}}},
    }
    _assert_same(_round_trip(message), message)


def test_tensors_that_need_grad_are_detached() -> None:
    t = torch.ones(3, requires_grad=True) * 2
    out = _round_trip(t)
    assert not out.requires_grad
    _assert_same_tensor(out, t.detach())


# ------------------------------------------------------------------------------------- encode refusals
_BAD_DTYPES = [torch.complex64, torch.complex128, torch.int16, torch.uint16, torch.uint32]
_BAD_DTYPES += [dt for dt in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if dt]


@pytest.mark.parametrize("dtype", _BAD_DTYPES, ids=str)
def test_encoding_an_unsupported_dtype_raises_type_error(dtype: torch.dtype) -> None:
    t = torch.zeros(2, dtype=dtype)
    with pytest.raises(TypeError, match="cannot be sent"):
        wire.encode(t)
    with pytest.raises(TypeError):
        wire.encode({"nested": [t]})


class _Custom:
    pass


@pytest.mark.parametrize(
    "value",
    [object(), _Custom(), {1, 2}, frozenset(), 1j, np.zeros(3, dtype=np.float32), np.float32(1.0), range(3)],
    ids=lambda v: type(v).__name__,
)
def test_encoding_an_unsupported_object_raises_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        wire.encode(value)
    with pytest.raises(TypeError):
        wire.encode({"a": [1, {"b": value}]})


# ------------------------------------------------------------------------------------ ownership of memory
def test_decoded_tensor_is_writable_and_does_not_alias_the_body() -> None:
    t = torch.arange(8, dtype=torch.float32)
    body = wire.encode({"t": t})
    out = wire.decode(body)["t"]
    out.add_(100)
    out[0] = -1
    assert out[:2].tolist() == [-1.0, 101.0]
    _assert_same_tensor(wire.decode(body)["t"], t)
    assert body == wire.encode({"t": t})


def test_decoded_tensor_does_not_alias_a_mutable_body() -> None:
    t = torch.arange(16, dtype=torch.uint8).reshape(4, 4)
    body = bytearray(wire.encode(t))
    out = wire.decode(body)  # type: ignore[arg-type]  # e.g. a request body read into a bytearray
    body[-16:] = bytes(16)
    _assert_same_tensor(out, t)
    assert wire.decode(bytes(body)).sum().item() == 0


def test_writing_to_a_decoded_tensor_never_touches_the_payload() -> None:
    payload = _payload("float32", [2, 2], np.arange(4, dtype="<f4").tobytes())  # bytes, as msgpack hands over
    snapshot = bytes(bytearray(payload))  # a separate object (bytes(payload) would be payload itself)
    wire.ext_to_tensor(payload).fill_(9)
    assert payload == snapshot


def test_a_mutable_payload_is_copied() -> None:
    payload = bytearray(_payload("float32", [2, 2], np.arange(4, dtype="<f4").tobytes()))
    out = wire.ext_to_tensor(payload)  # type: ignore[arg-type]
    payload[-8:] = bytes(8)
    assert out.tolist() == [[0.0, 1.0], [2.0, 3.0]]


def test_two_decodes_do_not_share_memory() -> None:
    body = wire.encode([torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)])
    a, b = wire.decode(body), wire.decode(body)
    for x, y in zip(a, b, strict=True):
        x.fill_(1)
        assert y.sum().item() == 0


# ------------------------------------------------------------------------------------------ hostile bytes
_VALID_BODY = wire.encode(
    {"prompt": "x", "t": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": [1, 2.5, None, b"z"]}
)


def test_random_garbage_never_raises_anything_but_wire_error() -> None:
    rng = random.Random(1234)
    rejected = 0
    for _ in range(3000):
        body = rng.randbytes(rng.randint(1, 96))
        try:
            wire.decode(body)
        except wire.WireError:
            rejected += 1
    assert rejected > 2500  # almost all of it is refused; the rest happened to be a valid scalar message


@pytest.mark.parametrize("seed", range(4))
def test_mutated_messages_never_raise_anything_but_wire_error(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        body = bytearray(_VALID_BODY)
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        with contextlib.suppress(wire.WireError):
            wire.decode(bytes(body))


@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\xc1\x00\x00", b"\xff\xfe\xfd", b"\x00\x01", b"GET / HTTP/1.1\r\n\r\n", b'{"prompt": "json"}'],
    ids=["reserved-byte", "reserved-then-data", "fixints-then-extra", "two-values", "http", "json"],
)
def test_garbage_is_rejected(body: bytes) -> None:
    assert not _reject(body).too_large


def test_every_truncation_of_a_message_is_rejected() -> None:
    for cut in range(len(_VALID_BODY)):
        assert not _reject(_VALID_BODY[:cut]).too_large


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", b"\x81\xa1a\x01", _VALID_BODY])
def test_trailing_data_is_rejected(extra: bytes) -> None:
    assert not _reject(_VALID_BODY + extra).too_large


def test_empty_body_is_rejected() -> None:
    err = _reject(b"")
    assert not err.too_large
    assert "empty" in str(err)


_F32x16 = bytes(64)  # the 64 bytes a float32 (4, 4) tensor needs


@pytest.mark.parametrize(
    "payload",
    [
        _payload("float32", [4, 4], _F32x16[:-4]),  # header claims more bytes than were sent
        _payload("float32", [4, 4], _F32x16 + bytes(4)),  # ... and fewer
        _payload("float32", [4, 4], b""),
        _payload("float32", [], b""),
        _payload("float32", [0, 4], b"\x00"),
        _payload("bfloat16", [3], bytes(5)),
        _payload("float32", [4, 4], b"", ndim=2)[:-8],  # shape cut short
        _payload("float32", [4, 4], b"", ndim=2)[:-16],
        _payload("float32", [4], b"", ndim=3) + bytes(12),  # ndim larger than the dims sent
        b"",  # no header at all
        b"\x07",
        b"\x07float",  # dtype name cut short
        b"\x07float32",  # ndim byte missing
        b"\xfffloat32\x00",  # name length points past the end
    ],
    ids=lambda p: p.hex()[:40] or "empty",
)
def test_lying_or_truncated_tensor_headers_are_rejected(payload: bytes, no_tensor_allocation: None) -> None:
    err = _reject(_ext(payload))
    assert not err.too_large


@pytest.mark.parametrize(
    "shape",
    [
        [2**40, 2**40],
        [2**64 - 1, 2**64 - 1],
        [2**20, 2**20],  # every dimension is modest, the product is not
        [2**14] * 8,
        [0, 2**64 - 1],  # zero elements, but a dimension no tensor library can hold
        [0, 2**62],
        [2**27 + 1],  # one past the default element bound
    ],
    ids=str,
)
def test_astronomical_shapes_are_too_large_and_allocate_nothing(shape: list[int], no_tensor_allocation: None) -> None:
    # A few bytes declare the shape; refusing it needs no allocation by construction (checked by the fixture).
    err = _reject(_ext(_payload("float32", shape, b"\x00" * 16)))
    assert err.too_large


def test_element_bound_is_inclusive() -> None:
    limits = wire.Limits(max_elements=4)
    full = wire.decode(_ext(_payload("uint8", [2, 2], bytes(4))), limits)
    _assert_same_tensor(full, torch.zeros(2, 2, dtype=torch.uint8))
    empty = wire.decode(_ext(_payload("uint8", [0, 4], b"")), limits)
    _assert_same_tensor(empty, torch.zeros(0, 4, dtype=torch.uint8))
    assert _reject(_ext(_payload("uint8", [5], bytes(5))), limits).too_large
    assert _reject(_ext(_payload("uint8", [0, 5], b"")), limits).too_large


@pytest.mark.parametrize("ndim", [9, 16, 64, 255])
def test_ndim_above_the_limit_is_rejected(ndim: int, no_tensor_allocation: None) -> None:
    err = _reject(_ext(_payload("uint8", [1] * ndim, b"\x00")))
    assert not err.too_large
    assert "dimensions" in str(err)
    _reject(_ext(_payload("uint8", [], b"", ndim=ndim)))  # the same with the shape missing


def test_ndim_at_the_limit_is_accepted() -> None:
    assert wire.DEFAULT_LIMITS.max_ndim == 8
    out = wire.decode(_ext(_payload("uint8", [1] * 8, b"\x07")))
    assert out.shape == (1,) * 8 and out.item() == 7


@pytest.mark.parametrize(
    "name",
    [b"", b"complex64", b"float", b"Float32", b"float32 ", b"<f4", b"torch.float32", b"object", b"\xff\xfe"],
    ids=lambda n: repr(n),
)
def test_unknown_dtype_names_are_rejected(name: bytes, no_tensor_allocation: None) -> None:
    err = _reject(_ext(_payload(name, [1], bytes(8))))
    assert not err.too_large
    assert "dtype" in str(err)


@pytest.mark.parametrize("code", [0, 3, 5, 42, 127, -2, -128])
def test_unknown_ext_type_codes_are_rejected(code: int) -> None:
    payload = _payload("uint8", [1], b"\x01")  # a valid tensor payload under the wrong code
    err = _reject(b"\x81\xa1t" + _ext8(code, payload))
    assert not err.too_large
    assert str(code) in str(err)


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x01", bytes(8), bytes(12)], ids=["ts32", "ts64", "ts96"])
def test_msgpack_timestamp_ext_is_rejected(data: bytes) -> None:
    # Ext type -1 is msgpack's timestamp, which msgpack decodes itself without consulting ext_hook.
    assert isinstance(msgpack.unpackb(_ext8(-1, data)), msgpack.Timestamp)
    err = _reject(b"\x81\xa4when" + _ext8(-1, data))
    assert not err.too_large
    assert "-1" in str(err)


@pytest.mark.parametrize(
    ("body", "too_large"),
    [
        (b"\xc6\xff\xff\xff\xff" + b"abc", None),  # bin32 of 4 GiB, 3 bytes sent (truncated or too large)
        (b"\xdb\xff\xff\xff\xff" + b"abc", None),  # str32 of 4 GiB
        (b"\xdd\xff\xff\xff\xff" + b"\xc0", True),  # array32 of 4 G items
        (b"\xdf\xff\xff\xff\xff" + b"\xa1a\xc0", True),  # map32 of 4 G pairs
        (b"\xc9\xff\xff\xff\xff\x01" + b"abc", True),  # ext32 of 4 GiB
        (b"\xc6\x00\x00\x03\xe8" + b"abc", False),  # bin32 of 1000 bytes, 3 sent
        (b"\xd9\xc8" + b"abc", False),  # str8 of 200 bytes, 3 sent
        (b"\xdc\x00\x64" + b"\x01", False),  # array16 of 100 items, 1 sent
        (b"\xde\x00\x0a" + b"\xa1a\x01", False),  # map16 of 10 pairs, 1 sent
        (b"\xc7\x64\x01" + b"\x07float32", False),  # ext8 of 100 bytes, 8 sent
        (b"\x81\xa1t\xdd\xff\xff\xff\xff", True),  # inside a map, with nothing after the header
    ],
    ids=lambda v: v.hex()[:24] if isinstance(v, bytes) else str(v),
)
def test_lying_msgpack_lengths_are_rejected(body: bytes, too_large: bool | None) -> None:
    err = _reject(body)
    if too_large is not None:
        assert err.too_large is too_large


def _nested_lists(levels: int) -> bytes:
    return b"\x91" * levels + b"\xc0"  # [[[...[None]...]]]


def _nested_maps(levels: int) -> bytes:
    return b"\x81\xa1k" * levels + b"\xc0"  # {"k": {"k": ... None}}


@pytest.mark.parametrize("nest", [_nested_lists, _nested_maps])
@pytest.mark.parametrize("levels", [17, 100, 1000, 1025, 5000, 100_000])
def test_deep_nesting_is_rejected(nest: Callable[[int], bytes], levels: int) -> None:
    err = _reject(nest(levels))
    assert not err.too_large
    assert "nesting" in str(err)


@pytest.mark.parametrize("nest", [_nested_lists, _nested_maps])
def test_nesting_up_to_max_depth_is_accepted(nest: Callable[[int], bytes]) -> None:
    assert wire.DEFAULT_LIMITS.max_depth == 16
    value = wire.decode(nest(16))
    for _ in range(16):
        value = value[0] if isinstance(value, list) else value["k"]
    assert value is None


def test_nesting_built_by_the_encoder_is_rejected_too() -> None:
    deep: Any = torch.zeros(1)
    for _ in range(100):
        deep = {"x": [deep]}
    _reject(wire.encode(deep))


@pytest.mark.parametrize("kind", ["array", "map"])
def test_containers_longer_than_max_container_len_are_too_large(kind: str) -> None:
    n = wire.DEFAULT_LIMITS.max_container_len
    make = (lambda k: list(range(k))) if kind == "array" else (lambda k: {str(i): i for i in range(k)})
    assert len(wire.decode(wire.encode(make(n)))) == n
    assert _reject(wire.encode(make(n + 1))).too_large


def test_body_over_max_body_bytes_is_too_large() -> None:
    body = wire.encode({"blob": b"\x00" * 200})
    assert wire.decode(body, wire.Limits(max_body_bytes=len(body)))["blob"] == b"\x00" * 200
    err = _reject(body, wire.Limits(max_body_bytes=len(body) - 1))
    assert err.too_large
    assert _reject(b"\xc0" * 65, wire.Limits(max_body_bytes=64)).too_large  # checked before parsing


def test_strings_longer_than_max_str_bytes_are_too_large() -> None:
    n = wire.DEFAULT_LIMITS.max_str_bytes
    assert len(wire.decode(wire.encode("a" * n))) == n
    assert _reject(wire.encode("a" * (n + 1))).too_large


class _Pickled:
    def __init__(self) -> None:
        self.value = [1, 2, 3]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize(
    "obj", [{"prompt": "x"}, [1, 2], _Pickled(), torch.zeros(3)], ids=["dict", "list", "object", "tensor"]
)
def test_pickle_payloads_are_rejected(obj: Any, protocol: int) -> None:
    _reject(pickle.dumps(obj, protocol=protocol))


def test_torch_save_payload_is_rejected() -> None:
    buf = io.BytesIO()
    torch.save({"t": torch.zeros(3)}, buf)
    _reject(buf.getvalue())


def test_pickle_inside_a_bin_field_stays_bytes() -> None:
    blob = pickle.dumps(_Pickled())
    assert wire.decode(wire.encode({"b": blob})) == {"b": blob}


def test_msgpack_numpy_style_arrays_are_not_tensors() -> None:
    # msgpack-numpy encodes an array as a map with bytes keys; it is neither decoded nor accepted.
    arr = np.arange(4, dtype="<f4")
    legacy = {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [4], b"data": arr.tobytes()}
    _reject(msgpack.packb(legacy, use_bin_type=True))


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb({1: "a"}),
        msgpack.packb({-1: "a"}),
        msgpack.packb({1.5: "a"}),
        msgpack.packb({None: "a"}),
        msgpack.packb({True: "a"}),
        msgpack.packb({b"key": "a"}, use_bin_type=True),
        msgpack.packb({"ok": {b"inner": 1}}, use_bin_type=True),
        msgpack.packb({"ok": [{2: 1}]}),
        b"\x81\x91\x01\x02",  # [1]: 2
        b"\x81\x81\xa1a\x01\x02",  # {"a": 1}: 2
        b"\x81" + _ext(_payload("uint8", [1], b"\x01")) + b"\x02",  # tensor: 2
    ],
    ids=["int", "negative-int", "float", "nil", "bool", "bin", "nested-bin", "in-list", "array", "map", "tensor"],
)
def test_non_str_map_keys_are_rejected(body: bytes) -> None:
    assert not _reject(body).too_large


@pytest.mark.parametrize("body", [b"\xa2\xff\xfe", b"\xa3\xed\xa0\x80", b"\x81\xa2\xc3\x28\x01"])
def test_invalid_utf8_strings_are_rejected(body: bytes) -> None:
    assert not _reject(body).too_large


# ------------------------------------------------------------------------------------------ custom limits
_SMALL = wire.Limits(max_body_bytes=256, max_depth=2, max_container_len=3, max_str_bytes=4, max_ndim=2, max_elements=6)


@pytest.mark.parametrize(
    ("ok", "bad", "too_large"),
    [
        ({"s": "abcd"}, {"s": "abcde"}, True),
        ({"k": [1, 2, 3]}, {"k": [1, 2, 3, 4]}, True),
        ({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}, True),
        ({"a": [1]}, {"a": [[1]]}, False),
        ({"t": torch.zeros(2, 3)}, {"t": torch.zeros(1, 2, 3)}, False),
        ({"t": torch.zeros(6, dtype=torch.uint8)}, {"t": torch.zeros(7, dtype=torch.uint8)}, True),
        ({"b": b"x" * 200}, {"b": b"x" * 300}, True),
    ],
    ids=["str", "array", "map", "depth", "ndim", "elements", "body"],
)
def test_custom_limits_are_honoured(ok: Any, bad: Any, too_large: bool) -> None:
    _assert_same(wire.decode(wire.encode(ok), _SMALL), ok)
    assert _reject(wire.encode(bad), _SMALL).too_large is too_large
    # The same "bad" message is fine under the defaults, so it is the custom limit that tripped.
    _assert_same(wire.decode(wire.encode(bad)), bad)


def test_ext_to_tensor_honours_limits_directly() -> None:
    payload = _payload("int32", [2, 2], bytes(16))
    assert wire.ext_to_tensor(payload).shape == (2, 2)
    with pytest.raises(wire.WireError) as info:
        wire.ext_to_tensor(payload, wire.Limits(max_elements=3))
    assert info.value.too_large
    with pytest.raises(wire.WireError):
        wire.ext_to_tensor(payload, wire.Limits(max_ndim=1))
