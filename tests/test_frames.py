"""Tests for the wire format in lightning_mobillm.transport.frames."""

from __future__ import annotations

import json
import random
import struct

import pytest
import safetensors.torch
import torch

from lightning_mobillm.transport.frames import (
    MAGIC,
    VERSION,
    Frame,
    FrameError,
    FrameSchema,
    TensorRule,
    decode_frame,
    encode_frame,
    peek_kind,
    tensor_nbytes,
)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SCHEMAS = {
    "activations": FrameSchema(
        kind="activations",
        tensors={
            "q": TensorRule(FLOATS + (torch.int8, torch.uint8), ndim=3),
            "scale": TensorRule((torch.float32,), ndim=2),
            "d": TensorRule((torch.int64,), ndim=1),
            "labels": TensorRule((torch.int64,), ndim=1),
        },
        required_tensors=("q",),
        required_header={"step": int, "device": str, "lr": float, "train": bool},
        optional_header={"codec": str, "keys": list},
    ),
    "pae_activations": FrameSchema(
        kind="pae_activations",
        tensors={"q": TensorRule(FLOATS, ndim=None)},  # no labels in PAE frames
        required_tensors=("q",),
        required_header={"step": int},
        allow_header_extra=False,
    ),
    "ping": FrameSchema(kind="ping", tensors={}, allow_header_extra=True),
}
HEADER = {"step": 3, "device": "phone-0", "lr": 1e-3, "train": True, "codec": "int8", "keys": ["a", "b"]}


def _activations() -> Frame:
    g = torch.Generator().manual_seed(0)
    return Frame(
        kind="activations",
        header=dict(HEADER),
        tensors={
            "q": torch.randint(-127, 128, (2, 3, 8), generator=g, dtype=torch.int8),
            "scale": torch.rand(2, 3, generator=g),
            "labels": torch.tensor([1, 0]),
        },
    )


def _frame_bytes(
    header: dict, tensors: dict[str, torch.Tensor] | None = None, version: int = VERSION
) -> bytes:
    """Hand-build frame bytes, bypassing encode_frame's own checks."""
    raw = json.dumps(header).encode()
    return (
        MAGIC + bytes([version]) + struct.pack(">I", len(raw)) + raw + safetensors.torch.save(tensors or {})
    )


def _raw_frame(header_raw: bytes, body: bytes = b"") -> bytes:
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(header_raw)) + header_raw + body


def test_round_trip() -> None:
    frame = _activations()
    data = encode_frame(frame)
    assert data[:4] == MAGIC and data[4] == VERSION
    assert peek_kind(data) == "activations"
    out = decode_frame(data, SCHEMAS)
    assert out.kind == "activations"
    assert out.header == {**HEADER, "kind": "activations"}
    assert set(out.tensors) == set(frame.tensors)
    for name, t in frame.tensors.items():
        assert out.tensors[name].dtype == t.dtype
        assert torch.equal(out.tensors[name], t)


def test_round_trip_float_dtypes_and_empty_tensors() -> None:
    q = torch.randn(2, 3, 4).to(torch.bfloat16)
    out = decode_frame(encode_frame(Frame("pae_activations", {"step": 0}, {"q": q})), SCHEMAS)
    assert torch.equal(out.tensors["q"], q) and out.tensors["q"].dtype == torch.bfloat16
    ping = decode_frame(encode_frame(Frame("ping")), SCHEMAS)
    assert ping.kind == "ping" and ping.header == {"kind": "ping"} and ping.tensors == {}


def test_encode_handles_views_and_noncontiguous() -> None:
    base = torch.randn(2, 3, 8)
    frame = Frame("pae_activations", {"step": 1}, {"q": base.transpose(0, 1)})
    out = decode_frame(encode_frame(frame), SCHEMAS)
    assert torch.equal(out.tensors["q"], base.transpose(0, 1))


def test_encode_rejects_bad_frames() -> None:
    with pytest.raises(FrameError, match="disagrees"):
        encode_frame(Frame("ping", {"kind": "other"}))
    with pytest.raises(FrameError, match="JSON"):
        encode_frame(Frame("ping", {"x": object()}))
    with pytest.raises(FrameError, match="JSON"):
        encode_frame(Frame("ping", {"x": float("nan")}))
    with pytest.raises(FrameError, match="non-empty string"):
        encode_frame(Frame(""))


def test_tensor_nbytes_and_overhead() -> None:
    frame = _activations()
    assert tensor_nbytes(frame.tensors) == 2 * 3 * 8 * 1 + 2 * 3 * 4 + 2 * 8
    overhead = len(encode_frame(frame)) - tensor_nbytes(frame.tensors)
    assert 0 < overhead < 600
    assert tensor_nbytes({}) == 0


def test_too_short() -> None:
    for data in (b"", b"MLLM", MAGIC + bytes([VERSION]) + b"\x00\x00"):
        with pytest.raises(FrameError, match="too short"):
            decode_frame(data, SCHEMAS)
    with pytest.raises(FrameError, match="too short"):
        peek_kind(b"ML")


def test_not_bytes() -> None:
    with pytest.raises(FrameError, match="must be bytes"):
        decode_frame("MLLM...", SCHEMAS)  # type: ignore[arg-type]


def test_oversize_total() -> None:
    data = encode_frame(_activations())
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(data, SCHEMAS, max_bytes=len(data) - 1)
    assert decode_frame(data, SCHEMAS, max_bytes=len(data)).kind == "activations"


def test_wrong_magic() -> None:
    data = encode_frame(_activations())
    with pytest.raises(FrameError, match="bad magic"):
        decode_frame(b"XLLM" + data[4:], SCHEMAS)
    with pytest.raises(FrameError, match="bad magic"):
        peek_kind(b"PK\x03\x04" + data[4:])  # e.g. a zip / torch.save archive


def test_unsupported_version() -> None:
    data = encode_frame(_activations())
    for version in (0, 2, 255):
        with pytest.raises(FrameError, match=f"unsupported frame version {version}"):
            decode_frame(data[:4] + bytes([version]) + data[5:], SCHEMAS)


def test_header_length_beyond_data() -> None:
    data = _raw_frame(b'{"kind":"ping"}')
    bad = data[:5] + struct.pack(">I", 1000) + data[9:]
    with pytest.raises(FrameError, match="runs past the end"):
        decode_frame(bad, SCHEMAS)


def test_header_too_large() -> None:
    big = {"kind": "ping", "pad": "x" * 100_000}
    data = _frame_bytes(big)
    with pytest.raises(FrameError, match="exceeds the limit of 65536"):
        decode_frame(data, SCHEMAS)
    with pytest.raises(FrameError, match="exceeds the limit"):
        peek_kind(data)
    assert decode_frame(data, SCHEMAS, max_header_bytes=200_000).header["pad"] == big["pad"]
    # a huge declared length is refused before anything is read
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(MAGIC + bytes([VERSION]) + b"\xff\xff\xff\xff", SCHEMAS)


@pytest.mark.parametrize(
    "header_raw",
    [
        b"\xff\xfe{}",  # not UTF-8
        b'{"kind": "ping"',  # truncated JSON
        b"kind=ping",  # not JSON
        b'["kind", "ping"]',  # JSON but not an object
        b'"ping"',
        b"null",
        b'{"kind": "ping", "x": NaN}',  # non-standard constant
        b"[" * 50_000 + b"]" * 50_000,  # deep nesting must not escape as RecursionError
    ],
)
def test_header_not_json_object(header_raw: bytes) -> None:
    data = _raw_frame(header_raw, safetensors.torch.save({}))
    with pytest.raises(FrameError):
        decode_frame(data, SCHEMAS, max_header_bytes=200_000)


@pytest.mark.parametrize("header", [{}, {"kind": 3}, {"kind": ""}, {"kind": None}, {"step": 1}])
def test_missing_kind(header: dict) -> None:
    data = _frame_bytes(header)
    with pytest.raises(FrameError, match="lacks a string 'kind'"):
        decode_frame(data, SCHEMAS)
    with pytest.raises(FrameError, match="lacks a string 'kind'"):
        peek_kind(data)


def test_unknown_kind() -> None:
    data = encode_frame(Frame("shutdown"))
    assert peek_kind(data) == "shutdown"
    with pytest.raises(FrameError, match="unknown frame kind 'shutdown'"):
        decode_frame(data, SCHEMAS)


def test_required_header_key_missing() -> None:
    frame = _activations()
    del frame.header["device"]
    with pytest.raises(FrameError, match="lacks required key 'device'"):
        decode_frame(encode_frame(frame), SCHEMAS)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("step", True),  # bool is an int subclass but not an int here
        ("step", 1.5),
        ("step", "3"),
        ("step", None),
        ("device", 7),
        ("lr", "0.1"),
        ("lr", False),
        ("train", 1),
        ("train", "true"),
    ],
)
def test_required_header_wrong_type(key: str, value: object) -> None:
    frame = _activations()
    frame.header[key] = value
    with pytest.raises(FrameError, match=f"header key '{key}' must be"):
        decode_frame(encode_frame(frame), SCHEMAS)


def test_float_rule_accepts_int() -> None:
    frame = _activations()
    frame.header["lr"] = 1
    assert decode_frame(encode_frame(frame), SCHEMAS).header["lr"] == 1


def test_header_extra_keys_when_forbidden() -> None:
    frame = Frame("pae_activations", {"step": 1, "label": 3}, {"q": torch.zeros(1, 2)})
    with pytest.raises(FrameError, match=r"keys \['label'\] are not in the schema"):
        decode_frame(encode_frame(frame), SCHEMAS)


def test_optional_header_keys_are_typed_and_extras_refused_by_default() -> None:
    frame = Frame("activations", {**HEADER, "codec": 8}, {"q": torch.zeros(1, 2, 3)})
    with pytest.raises(FrameError, match="header key 'codec' must be str"):
        decode_frame(encode_frame(frame), SCHEMAS)
    frame = Frame("activations", {**HEADER, "text": "private"}, {"q": torch.zeros(1, 2, 3)})
    with pytest.raises(FrameError, match=r"\['text'\] are not in the schema"):
        decode_frame(encode_frame(frame), SCHEMAS)
    assert "codec" not in decode_frame(encode_frame(Frame("activations", {k: v for k, v in HEADER.items() if k != "codec"},
                                                           {"q": torch.zeros(1, 2, 3)})), SCHEMAS).header


def test_safetensors_part_unparseable() -> None:
    header = b'{"kind":"ping"}'
    body = safetensors.torch.save({"q": torch.zeros(4)})
    bodies = [
        b"",
        b"garbage",
        b"\x00" * 8,
        struct.pack("<Q", 2**60) + b"{}",  # absurd safetensors header length
        struct.pack("<Q", 10) + b"not json!!",
        body[:-1],
        body + b"\x00",
        body[:8] + body[8:].replace(b"F32", b"XYZ"),  # unknown dtype
    ]
    for b in bodies:
        with pytest.raises(FrameError, match="not valid safetensors"):
            decode_frame(_raw_frame(header, b), SCHEMAS)


def test_pickle_payload_is_not_executed(tmp_path) -> None:
    import io
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    payload = pickle.dumps({"q": Boom()})
    buf = io.BytesIO()
    torch.save({"q": torch.zeros(2)}, buf)
    for body in (payload, buf.getvalue()):
        with pytest.raises(FrameError):
            decode_frame(_raw_frame(b'{"kind":"ping"}', body), SCHEMAS)
    assert not (tmp_path / "pwned").exists()


def test_disallowed_tensor_name() -> None:
    frame = Frame("pae_activations", {"step": 1}, {"q": torch.zeros(2, 4), "labels": torch.tensor([1, 0])})
    with pytest.raises(FrameError, match=r"tensors \['labels'\] are not allowed"):
        decode_frame(encode_frame(frame), SCHEMAS)


def test_required_tensor_missing() -> None:
    frame = _activations()
    del frame.tensors["q"]
    with pytest.raises(FrameError, match=r"required tensors missing: \['q'\]"):
        decode_frame(encode_frame(frame), SCHEMAS)


def test_dtype_not_allowed() -> None:
    frame = _activations()
    frame.tensors["scale"] = frame.tensors["scale"].double()
    with pytest.raises(FrameError, match="tensor 'scale' has dtype torch.float64"):
        decode_frame(encode_frame(frame), SCHEMAS)


def test_wrong_ndim() -> None:
    frame = _activations()
    frame.tensors["q"] = frame.tensors["q"].reshape(6, 8)
    with pytest.raises(FrameError, match="tensor 'q' has rank 2"):
        decode_frame(encode_frame(frame), SCHEMAS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", FLOATS)
def test_non_finite_values(bad: float, dtype: torch.dtype) -> None:
    q = torch.randn(2, 3, 4).to(dtype)
    q[1, 2, 3] = bad
    data = encode_frame(Frame("pae_activations", {"step": 1}, {"q": q}))
    with pytest.raises(FrameError, match="NaN or infinite"):
        decode_frame(data, SCHEMAS)
    out = decode_frame(data, SCHEMAS, require_finite=False)
    assert not torch.isfinite(out.tensors["q"]).all()


def test_every_truncation_is_rejected() -> None:
    data = encode_frame(_activations())
    for n in range(len(data)):
        with pytest.raises(FrameError):
            decode_frame(data[:n], SCHEMAS)


def test_random_bytes_raise_only_frame_error() -> None:
    rng = random.Random(1234)
    valid = encode_frame(_activations())
    for i in range(2000):
        n = rng.randrange(0, 300)
        buf = rng.randbytes(n)
        if i % 2:  # half of them get a valid preamble so the fuzzing reaches the header and body
            buf = MAGIC + bytes([VERSION]) + struct.pack(">I", rng.randrange(0, n + 1)) + buf
        with pytest.raises(FrameError):
            decode_frame(buf, SCHEMAS)
    # random corruptions of a valid frame either decode to a schema-conforming frame or raise FrameError
    for _ in range(2000):
        buf = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            frame = decode_frame(bytes(buf), SCHEMAS)
        except FrameError:
            continue
        assert frame.kind in SCHEMAS
        assert set(frame.tensors) <= set(SCHEMAS[frame.kind].tensors)


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode_frame(_activations())
    for buf in (bytearray(data), memoryview(data)):
        assert decode_frame(buf, SCHEMAS).kind == "activations"
        assert peek_kind(buf) == "activations"
