"""Tests for the activation codecs in lightning_mobillm.transport.codecs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.transport import codecs
from lightning_mobillm.transport.codecs import (
    CODECS,
    bytes_per_value,
    decode,
    encode,
    part_names,
    payload_nbytes,
)
from lightning_mobillm.transport.frames import Frame, FrameError, decode_frame, encode_frame

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


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "int4"])
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
    assert [bytes_per_value(c) for c in CODECS] == [4, 2, 2, 1, 0.5, 1, 0.5]
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


def test_realistic_batch_round_trips() -> None:
    """A realistic batch (8 x 128 tokens x 30 layers x 576) encodes and decodes (speed: benchmarks/codecs.py)."""
    x = torch.randn(30, 8 * 128, 576)
    for codec in ("int8", "int4", "int8o", "int4o"):
        y = decode(encode(x, codec), codec)
        assert y.shape == x.shape


# ---- outlier-aware codecs int8o / int4o -----------------------------------------------------------
OUTLIER_CODECS = ["int8o", "int4o"]
BASE = {"int8o": "int8", "int4o": "int4"}


def _planted(shape: tuple[int, ...], channels_per_group: list[list[int]], seed: int = 0) -> torch.Tensor:
    """Gaussian ``x`` with a few huge channels in each group (dim -2 for rank 3, one group otherwise)."""
    x = _x(shape, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for group, channels in enumerate(channels_per_group):
        for c in channels:
            vals = (torch.rand(shape[:-1], generator=g) + 1.0) * 300.0 * (-1) ** c
            if len(shape) >= 3:
                x[..., group, c] = vals[..., group]
            else:
                x[..., c] = vals
    return x


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
@pytest.mark.parametrize(
    ("shape", "oidx_shape"),
    [((6, 5, 64), (5, 8)), ((2, 3, 4, 33), (4, 8)), ((9, 64), (8,)), ((4, 33), (8,)), ((33,), (8,)),
     ((3, 5), (5,)), ((2, 3, 1), (3, 1)), ((0, 3, 16), (3, 8)), ((0, 16), (8,))],
)
def test_outlier_round_trip_shapes_and_parts(codec: str, shape: tuple[int, ...], oidx_shape: tuple[int, ...]) -> None:
    x = _x(shape, seed=3)
    parts = encode(x, codec)
    assert tuple(parts) == part_names(codec)
    assert all(p.is_contiguous() for p in parts.values())
    k = oidx_shape[-1]
    assert parts["oidx"].dtype == torch.int16 and tuple(parts["oidx"].shape) == oidx_shape
    assert parts["oval"].dtype == torch.float16 and tuple(parts["oval"].shape) == (*shape[:-1], k)
    assert parts["scale"].shape == shape[:-1]
    assert parts["q"].shape[-1] == (shape[-1] if codec == "int8o" else (shape[-1] + 1) // 2)
    # indices sorted ascending and unique within each group
    idx = parts["oidx"].reshape(-1, k).long()
    assert (idx[:, 1:] > idx[:, :-1]).all()
    y = decode(parts, codec)
    assert y.dtype == torch.float32 and y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
@pytest.mark.parametrize("shape", [(16, 3, 64), (16, 64), (64,), (16, 3, 63)])
def test_outlier_channels_exact_to_fp16_and_rest_within_half_a_step(codec: str, shape: tuple[int, ...]) -> None:
    groups = shape[-2] if len(shape) >= 3 else 1
    chosen = [[(5 + 7 * g) % shape[-1], (11 + 3 * g) % shape[-1], 40 + g] for g in range(groups)]
    x = _planted(shape, chosen, seed=4)
    parts = encode(x, codec, outlier_channels=3)
    oidx = parts["oidx"].reshape(groups, 3).long()
    for g in range(groups):
        assert oidx[g].tolist() == sorted(chosen[g])  # the planted channels are the ones selected
    y = decode(parts, codec)
    xg, yg = x.reshape(-1, groups, shape[-1]), y.reshape(-1, groups, shape[-1])
    rest = xg.clone()
    for g in range(groups):
        sel = oidx[g]
        assert torch.equal(yg[:, g, sel], xg[:, g, sel].half().float())
        rest[:, g, sel] = 0.0
    qmax = QMAX[BASE[codec]]
    torch.testing.assert_close(parts["scale"].reshape(-1, groups), rest.abs().amax(-1) / qmax)
    err = (yg - xg)
    for g in range(groups):
        err[:, g, oidx[g]] = 0.0
    assert (err.abs().amax(-1) <= parts["scale"].reshape(-1, groups) / 2 + 1e-5).all()


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
def test_outlier_codec_error_far_below_plain(codec: str) -> None:
    """Packed acts [N, L, d] with different outlier channels per layer, as in SmolLM2's hidden states."""
    shape = (256, 4, 576)
    x = _planted(shape, [[3, 77], [100, 101, 500], [9], [250, 251, 252, 253]], seed=5)

    def rel(c: str) -> float:
        return float((decode(encode(x, c), c) - x).norm() / x.norm())

    plain, outlier = rel(BASE[codec]), rel(codec)
    # int4's own grid error on the gaussian bulk (~10% of it) bounds what int4o can gain
    assert outlier < plain / {"int8o": 20, "int4o": 5}[codec], (plain, outlier)


def test_outlier_channels_option() -> None:
    x = _x((5, 3, 16), seed=6)
    # k = 0: plain int8 values plus empty outlier parts
    p0 = encode(x, "int8o", outlier_channels=0)
    assert p0["oidx"].shape == (3, 0) and p0["oval"].shape == (5, 3, 0)
    assert torch.equal(decode(p0, "int8o"), decode(encode(x, "int8"), "int8"))
    # k >= d: every channel is an outlier, so the result is x at fp16 precision
    pall = encode(x, "int4o", outlier_channels=100)
    assert pall["oidx"].shape == (3, 16)
    assert torch.equal(decode(pall, "int4o"), x.half().float())
    assert (pall["scale"] == 0).all()
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="outlier_channels"):
            encode(x, "int8o", outlier_channels=bad)
    # the other codecs ignore the keyword
    assert torch.equal(encode(x, "int8", outlier_channels=3)["q"], encode(x, "int8")["q"])


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
def test_outlier_zero_tensor(codec: str) -> None:
    for shape in [(4, 3, 10), (4, 10), (10,)]:
        parts = encode(torch.zeros(shape), codec)
        y = decode(parts, codec)
        assert torch.equal(y, torch.zeros(shape))
        assert (parts["scale"] == 0).all() and torch.isfinite(parts["scale"]).all()


def test_outlier_values_beyond_fp16_stay_float32() -> None:
    x = _x((4, 2, 12), seed=7)
    x[:, 1, 3] = 1e6  # beyond fp16's max of 65504
    parts = encode(x, "int8o", outlier_channels=2)
    assert parts["oval"].dtype == torch.float32
    y = decode(parts, "int8o")
    assert torch.equal(y[:, 1, 3], x[:, 1, 3])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
@pytest.mark.parametrize("shape", [(3, 4, 576), (5, 7), (2, 9)])
def test_outlier_payload_bytes(codec: str, shape: tuple[int, ...]) -> None:
    parts = encode(_x(shape), codec)
    nbytes = sum(parts[n].numel() * parts[n].element_size() for n in ("q", "oval"))
    assert nbytes == payload_nbytes(shape, codec)
    k = min(8, shape[-1])
    base = payload_nbytes(shape, BASE[codec])
    assert payload_nbytes(shape, codec) == base + 2 * k * math.prod(shape[:-1])
    assert payload_nbytes(shape, codec, outlier_channels=0) == base
    assert bytes_per_value(codec) == bytes_per_value(BASE[codec])


def _tamper(codec: str, shape: tuple[int, ...] = (4, 3, 10), **override: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = encode(_x(shape, seed=8), codec, outlier_channels=2)
    return {**parts, **override}


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
def test_outlier_decode_rejects_bad_indices(codec: str) -> None:
    for bad in ([[0, 10], [1, 2], [3, 4]], [[-1, 2], [1, 2], [3, 4]], [[0, 1], [1, 32767], [3, 4]]):
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            decode(_tamper(codec, oidx=torch.tensor(bad, dtype=torch.int16)), codec)
    with pytest.raises(ValueError, match="repeats a channel index"):
        decode(_tamper(codec, oidx=torch.tensor([[0, 1], [5, 5], [3, 4]], dtype=torch.int16)), codec)
    with pytest.raises(ValueError, match="repeats a channel index"):
        decode(_tamper(codec, (4, 10), oidx=torch.tensor([7, 7], dtype=torch.int16)), codec)
    # the same index in different groups is fine, and int32 indices are accepted
    ok = decode(_tamper(codec, oidx=torch.tensor([[5, 6], [5, 6], [6, 5]], dtype=torch.int32)), codec)
    assert ok.shape == (4, 3, 10)
    for dtype in (torch.int64, torch.uint8, torch.float32):
        with pytest.raises(ValueError, match="part 'oidx' must have dtype"):
            decode(_tamper(codec, oidx=torch.tensor([[0, 1], [1, 2], [3, 4]]).to(dtype)), codec)


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
def test_outlier_decode_rejects_mismatched_shapes(codec: str) -> None:
    i16 = torch.int16
    cases = [
        (r"oidx' must have shape \[G=3, k\]", {"oidx": torch.tensor([0, 1], dtype=i16)}),
        (r"oidx' must have shape \[G=3, k\]", {"oidx": torch.tensor([[0, 1], [1, 2]], dtype=i16)}),
        (r"oidx' must have shape \[G=3, k\]", {"oidx": torch.zeros(1, 3, 2, dtype=i16)}),
        (r"part 'oval' has shape", {"oval": torch.zeros(4, 3, 3, dtype=torch.float16)}),
        (r"part 'oval' has shape", {"oval": torch.zeros(4, 2, dtype=torch.float16)}),
        (r"part 'oval' has shape", {"oval": torch.zeros(5, 3, 2, dtype=torch.float16)}),
        (r"more than d=10", {"oidx": torch.arange(11, dtype=i16).repeat(3, 1),
                             "oval": torch.zeros(4, 3, 11, dtype=torch.float16)}),
    ]
    for match, override in cases:
        with pytest.raises(ValueError, match=match):
            decode(_tamper(codec, **override), codec)
    with pytest.raises(ValueError, match=r"oidx' must have shape \[k\]"):
        decode(_tamper(codec, (4, 10), oidx=torch.tensor([[0, 1]], dtype=i16)), codec)
    with pytest.raises(ValueError, match="part 'oval' must have dtype"):
        parts = _tamper(codec)
        decode({**parts, "oval": parts["oval"].to(torch.bfloat16)}, codec)
    bad = _tamper(codec)["oval"].clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'oval' must be finite"):
        decode(_tamper(codec, oval=bad), codec)
    # base-codec checks still apply, with the outlier codec's name in the message
    with pytest.raises(ValueError, match=rf"codec '{codec}': part 'scale' has shape"):
        decode(_tamper(codec, scale=torch.ones(4)), codec)


@pytest.mark.parametrize("codec", OUTLIER_CODECS)
def test_outlier_codecs_through_a_train_frame(codec: str) -> None:
    acts = _planted((20, 3, 32), [[1, 2], [3], [30, 31]], seed=9)
    lengths = torch.tensor([12, 8])
    tensors = P.pack_acts(acts, lengths, codec, outlier_channels=4)
    assert tensors["acts.oidx"].shape == (3, 4) and tensors["acts.oval"].shape == (20, 3, 4)
    tensors["labels"] = torch.tensor([0, 1])
    data = encode_frame(Frame(kind=P.TRAIN, header={"session": "s", "step": 0, "codec": codec}, tensors=tensors))
    frame = decode_frame(data, P.REQUEST_SCHEMAS)
    got, got_lengths = P.unpack_acts(frame.tensors, codec)
    assert torch.equal(got, decode(encode(acts, codec, outlier_channels=4), codec))
    assert torch.equal(got_lengths, lengths)
    frame.tensors["acts.oidx"] = torch.tensor([[0, 0, 1, 2]] * 3, dtype=torch.int16)
    with pytest.raises(FrameError, match="repeats a channel index"):
        P.unpack_acts(frame.tensors, codec)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_chunked_encoding_equals_encoding_at_once(codec, monkeypatch):
    x = torch.randn(5, 7, 33) * torch.logspace(-2, 3, 33)
    whole = codecs.encode(x, codec)
    monkeypatch.setattr(codecs, "CHUNK_ROWS", 4)  # 35 vectors in 9 chunks, the last one partial
    chunked = codecs.encode(x, codec)
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name
    empty = codecs.encode(torch.zeros(0, 3, 8), codec)
    assert codecs.decode(empty, codec).shape == (0, 3, 8)
