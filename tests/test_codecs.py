"""Tests for the activation codecs in lightning_mobillm.transport.codecs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mobillm.transport.codecs import (
    CODECS,
    bytes_per_value,
    decode,
    encode,
    part_names,
    payload_nbytes,
)

SHAPES = [(3, 4, 576), (5, 7), (2, 9), (7,), (1, 1), (0, 8)]
QMAX = {"int8": 127, "int4": 7}


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3.0


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_shape_and_dtype(codec: str, shape: tuple[int, ...]) -> None:
    x = _x(shape)
    parts = encode(x, codec)
    assert tuple(parts) == part_names(codec)
    assert all(p.is_contiguous() for p in parts.values())
    y = decode(parts, codec)
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_fp32_is_exact() -> None:
    x = _x((3, 4, 576))
    assert torch.equal(decode(encode(x, "fp32"), "fp32"), x)


@pytest.mark.parametrize(("codec", "tol"), [("fp16", 1e-3), ("bf16", 1e-2)])
def test_half_precision_relative_error(codec: str, tol: float) -> None:
    x = _x((3, 4, 576))
    y = decode(encode(x, codec), codec)
    rel = ((y - x).abs() / x.abs().clamp_min(1e-6)).max()
    assert rel <= tol


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(3, 4, 576), (5, 7), (2, 9), (4, 1)])
def test_integer_codecs_error_within_half_a_step(codec: str, shape: tuple[int, ...]) -> None:
    x = _x(shape, seed=1)
    parts = encode(x, codec)
    scale = parts["scale"]
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    torch.testing.assert_close(scale, x.abs().amax(-1) / QMAX[codec])
    err = (decode(parts, codec) - x).abs().amax(-1)
    assert (err <= scale / 2 + 1e-6).all()


def test_int8_values_and_dtype() -> None:
    parts = encode(_x((5, 7)), "int8")
    assert parts["q"].dtype == torch.int8
    assert parts["q"].abs().max() == 127  # the absmax element maps to the end of the range
    assert parts["q"].min() >= -127


def test_int4_packing_layout() -> None:
    x = torch.tensor([[7.0, -7.0, 1.0, 0.0, -3.0]])  # scale = 1, odd d
    parts = encode(x, "int4")
    assert parts["q"].dtype == torch.uint8
    assert parts["q"].shape == (1, 3)
    assert parts["d"].tolist() == [5]
    # low nibble = even index, high nibble = odd index, each holding value + 8; padding stores 0 + 8
    expected = [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | ((0 + 8) << 4), (-3 + 8) | ((0 + 8) << 4)]
    assert parts["q"][0].tolist() == expected
    assert torch.equal(decode(parts, "int4"), x)


@pytest.mark.parametrize("codec", CODECS)
def test_zero_vectors_round_trip_to_zero(codec: str) -> None:
    x = _x((4, 6))
    x[1] = 0.0
    x[3] = 0.0
    parts = encode(x, codec)
    y = decode(parts, codec)
    assert not torch.isnan(y).any()
    assert torch.equal(y[1], torch.zeros(6)) and torch.equal(y[3], torch.zeros(6))
    if "scale" in parts:
        assert parts["scale"][1] == 0 and torch.isfinite(parts["scale"]).all()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", [(3, 4, 576), (5, 7), (2, 9)])
def test_payload_bytes_match_bytes_per_value(codec: str, shape: tuple[int, ...]) -> None:
    q = encode(_x(shape), codec)["q"]
    nbytes = q.numel() * q.element_size()
    assert nbytes == payload_nbytes(shape, codec)
    if codec == "int4":
        assert nbytes == math.prod(shape[:-1]) * math.ceil(shape[-1] / 2)
        if shape[-1] % 2 == 0:
            assert nbytes == bytes_per_value(codec) * math.prod(shape)
    else:
        assert nbytes == bytes_per_value(codec) * math.prod(shape)


def test_bytes_per_value_table() -> None:
    assert [bytes_per_value(c) for c in CODECS] == [4, 2, 2, 1, 0.5]
    with pytest.raises(ValueError, match="int2"):
        bytes_per_value("int2")


def test_outlier_channel_inflates_int8_error() -> None:
    """Per-token absmax scales: one large outlier channel coarsens the grid for all other channels."""
    x = _x((64, 576), seed=2)
    with_outlier = x.clone()
    with_outlier[:, 17] = 200.0  # LLM activations have such channels
    normal = torch.ones(576, dtype=torch.bool)
    normal[17] = False

    def rel_err(t: torch.Tensor) -> float:
        y = decode(encode(t, "int8"), "int8")
        return ((y - t)[:, normal].norm() / t[:, normal].norm()).item()

    assert rel_err(with_outlier) > 5 * rel_err(x)


def test_encode_rejects_unknown_codec_and_bad_input() -> None:
    with pytest.raises(ValueError, match=r"int2.*fp32, fp16, bf16, int8, int4"):
        encode(_x((2, 3)), "int2")
    with pytest.raises(ValueError, match="floating point"):
        encode(torch.ones(2, 3, dtype=torch.int64), "int8")
    with pytest.raises(ValueError, match="rank"):
        encode(torch.tensor(1.0), "fp16")
    with pytest.raises(ValueError, match="feature dim"):
        encode(torch.ones(2, 0), "int4")


def test_decode_rejects_unknown_codec() -> None:
    with pytest.raises(ValueError, match=r"'int3'.*allowed codecs: fp32, fp16, bf16, int8, int4"):
        decode(encode(_x((2, 3)), "int8"), "int3")


@pytest.mark.parametrize(
    ("codec", "bad_q"),
    [
        ("int8", torch.zeros(2, 3, dtype=torch.uint8)),
        ("int8", torch.zeros(2, 3, dtype=torch.float32)),
        ("int4", torch.zeros(2, 2, dtype=torch.int8)),
        ("fp16", torch.zeros(2, 3, dtype=torch.float32)),
        ("bf16", torch.zeros(2, 3, dtype=torch.float16)),
        ("fp32", torch.zeros(2, 3, dtype=torch.float64)),
    ],
)
def test_decode_rejects_wrong_q_dtype(codec: str, bad_q: torch.Tensor) -> None:
    parts = encode(_x((2, 3)), codec)
    parts["q"] = bad_q
    with pytest.raises(ValueError, match="part 'q' must have dtype"):
        decode(parts, codec)


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("bad_shape", [(3,), (2, 1), (), (1,)])
def test_decode_rejects_mismatched_scale_shape(codec: str, bad_shape: tuple[int, ...]) -> None:
    parts = encode(_x((2, 4)), codec)
    parts["scale"] = torch.ones(bad_shape)
    with pytest.raises(ValueError, match="part 'scale' has shape"):
        decode(parts, codec)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_decode_rejects_bad_scale_dtype_and_values(codec: str) -> None:
    parts = encode(_x((2, 4)), codec)
    with pytest.raises(ValueError, match="part 'scale' must have dtype"):
        decode({**parts, "scale": parts["scale"].double()}, codec)
    for bad in (float("nan"), float("inf"), -1.0):
        scale = parts["scale"].clone()
        scale[0] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            decode({**parts, "scale": scale}, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_decode_rejects_missing_and_unexpected_parts(codec: str) -> None:
    parts = encode(_x((2, 4)), codec)
    for name in parts:
        with pytest.raises(ValueError, match=f"missing part '{name}'"):
            decode({k: v for k, v in parts.items() if k != name}, codec)
    with pytest.raises(ValueError, match="unexpected parts"):
        decode({**parts, "labels": torch.zeros(2)}, codec)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        decode({**parts, "q": [1, 2, 3]}, codec)


def test_decode_rejects_scalar_q() -> None:
    with pytest.raises(ValueError, match="rank >= 1"):
        decode({"q": torch.tensor(1.0)}, "fp32")
    with pytest.raises(ValueError, match="rank >= 1"):
        decode({"q": torch.tensor(1, dtype=torch.int8), "scale": torch.tensor(1.0)}, "int8")


def test_decode_int4_checks_d() -> None:
    parts = encode(_x((2, 9)), "int4")  # q has 5 bytes per token
    for bad_d in (8, 11, 0, -1):
        with pytest.raises(ValueError, match="does not fit"):
            decode({**parts, "d": torch.tensor([bad_d])}, "int4")
    assert decode({**parts, "d": torch.tensor([10])}, "int4").shape == (2, 10)
    with pytest.raises(ValueError, match="shape \\[1\\]"):
        decode({**parts, "d": torch.tensor([9, 9])}, "int4")
    with pytest.raises(ValueError, match="must have dtype"):
        decode({**parts, "d": torch.tensor([9], dtype=torch.int32)}, "int4")


def test_decode_rejects_out_of_range_codes() -> None:
    parts = encode(_x((2, 4)), "int8")
    q = parts["q"].clone()
    q[0, 0] = -128
    with pytest.raises(ValueError, match="-128"):
        decode({**parts, "q": q}, "int8")
    parts = encode(_x((2, 4)), "int4")
    q = parts["q"].clone()
    q[1, 1] = 0x80  # low nibble 0 encodes -8
    with pytest.raises(ValueError, match="nibble 0"):
        decode({**parts, "q": q}, "int4")


def test_input_dtypes_and_no_mutation() -> None:
    x = _x((3, 10)).to(torch.bfloat16)
    before = x.clone()
    for codec in CODECS:
        y = decode(encode(x, codec), codec)
        assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(x, before)


def test_large_batch_is_fast_enough() -> None:
    """A realistic batch (8 x 128 tokens x 30 layers x 576) encodes and decodes without loops."""
    x = torch.randn(30, 8 * 128, 576)
    for codec in ("int8", "int4"):
        y = decode(encode(x, codec), codec)
        assert y.shape == x.shape
