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

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors and models (see conftest)

QMAX = {"int8": 127, "int4": 7, "int8o": 127, "int4o": 7}
#: every codec on every one of these: ranks 1-4, odd widths, d = 1, no tokens at all
SHAPES = [(3, 4, 576), (2, 3, 4, 33), (4, 33), (5, 7), (2, 9), (7,), (1, 1), (2, 3, 1), (0, 8), (0, 3, 16)]


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3.0


def _llm_acts(n: int = 256, layers: int = 4, d: int = 576, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed hidden states ``[N, L, d]`` shaped like a small decoder LLM's, and the mask of their outlier channels.

    A heavy-tailed bulk (Student-t with 4 degrees of freedom) whose scale varies per token and grows with
    depth; in every layer three outlier channels (different ones per layer) at 60-100x the bulk's mean
    magnitude with a fixed sign; in the deeper half a "massive activation" of 1000x on one channel of every
    32nd token (attention-sink tokens). The codec errors on these match SmolLM2-135M's own hidden states
    (layers 3/10/20/29 of three sentences: int8 5.1% overall / 31% on the non-outlier channels, int4 17% /
    84%, int8o 0.22% / 1.3%, int4o 4.0% / 24%).
    """
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(4, n, layers, d, generator=g).pow(2).mean(0)
    x = torch.randn(n, layers, d, generator=g) / chi2.sqrt()
    x *= torch.exp(0.3 * torch.randn(n, 1, 1, generator=g)) * torch.logspace(0, 1, layers).view(1, layers, 1)
    outlier = torch.zeros(layers, d, dtype=torch.bool)
    for layer in range(layers):
        chans = torch.randperm(d, generator=g)[:3]
        outlier[layer, chans] = True
        bulk = x[:, layer].abs().mean()
        mag = (60 + 40 * torch.rand(3, generator=g)) * torch.tensor([1.0, -1.0, 1.0]) * bulk
        x[:, layer, chans] = mag * (1 + 0.2 * torch.randn(n, 3, generator=g))
        if layer >= layers // 2:
            x[::32, layer, chans[0]] = 1000 * bulk
    return x, outlier.expand(n, layers, d)


def _groups(t: torch.Tensor) -> torch.Tensor:
    """``[P, G, d]``: the outlier codecs' groups (dim -2 for rank >= 3, the whole tensor otherwise)."""
    return t.reshape(-1, t.shape[-2], t.shape[-1]) if t.ndim >= 3 else t.reshape(-1, 1, t.shape[-1])


def _assert_within_codec_bound(x: torch.Tensor, y: torch.Tensor, codec: str, k: int = 8) -> None:
    """The elementwise error bound each codec guarantees on any input, computed from ``x`` alone.

    fp32 is exact; fp16 and bf16 round to nearest (relative error 2^-11 and 2^-8; fp16 has subnormal steps of
    2^-24 below 6e-5); the integer codecs err by at most half a step of the token's own grid, absmax / (2 qmax);
    the outlier codecs send the k channels of largest absmax per group in fp16 and the rest like int8 / int4
    with a grid set by the rest alone.
    """
    assert y.dtype == torch.float32 and y.shape == x.shape
    err = (y - x).abs()
    if codec == "fp32":
        assert torch.equal(y, x)
    elif codec == "fp16":
        assert bool((err <= 2**-11 * x.abs() + 2**-25).all()), err.max()
    elif codec == "bf16":
        assert bool((err <= 2**-8 * x.abs()).all()), err.max()
    elif codec in ("int8", "int4"):
        step = x.abs().amax(-1, keepdim=True) / QMAX[codec] if x.numel() else x
        assert bool((err <= step / 2 * (1 + 1e-6)).all()), (err - step / 2).max()
    else:
        xg, yg = _groups(x), _groups(y)
        kk = min(k, x.shape[-1])
        top = xg.abs().amax(0).topk(kk, dim=-1).indices if xg.shape[0] else torch.zeros(xg.shape[1], 0, dtype=torch.long)
        chosen = torch.zeros(xg.shape[1:], dtype=torch.bool).scatter_(-1, top, True).expand_as(xg)
        assert torch.equal(yg[chosen], xg[chosen].half().float())  # fp16-exact
        rest = xg.masked_fill(chosen, 0.0)
        step = rest.abs().amax(-1, keepdim=True) / QMAX[codec]
        assert bool(((yg - rest).abs().masked_fill(chosen, 0.0) <= step / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("codec", CODECS)
def test_round_trips_stay_within_the_codec_error_bound(codec: str) -> None:
    for i, shape in enumerate(SHAPES):
        x = _x(shape, seed=i)
        parts = encode(x, codec)
        assert tuple(parts) == part_names(codec)
        _assert_within_codec_bound(x, decode(parts, codec), codec)
        if codec in ("int8", "int4"):  # the scale on the wire is that grid's step
            torch.testing.assert_close(parts["scale"], x.abs().amax(-1) / QMAX[codec] if x.numel() else parts["scale"])


#: bounds on the relative error ||decode(encode(x)) - x|| / ||x|| on ``_llm_acts``, overall and on the
#: non-outlier channels ("bulk"); None: no bound (the plain integer codecs lose the bulk to the outliers)
LLM_BOUNDS = {
    "fp32": (0.0, 0.0),
    "fp16": (5e-4, 5e-4),
    "bf16": (4e-3, 4e-3),
    "int8": (0.05, None),
    "int4": (0.25, None),
    "int8o": (0.005, 0.025),
    "int4o": (0.06, 0.35),
}


def _rel(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y - x).norm() / x.norm())


@pytest.mark.parametrize("codec", CODECS)
def test_error_on_llm_like_activations(codec: str) -> None:
    x, outlier = _llm_acts()
    y = decode(encode(x, codec), codec)
    _assert_within_codec_bound(x, y, codec)
    overall, bulk = LLM_BOUNDS[codec]
    assert _rel(y, x) <= overall, _rel(y, x)
    if bulk is not None:
        assert _rel(y[~outlier], x[~outlier]) <= bulk, _rel(y[~outlier], x[~outlier])


def test_outliers_coarsen_the_plain_grid_and_the_outlier_codecs_recover_it() -> None:
    """Per-token absmax scales: a few huge channels set every token's step, so plain int8/int4 lose the other
    channels (the bulk); int8o/int4o send those channels apart and keep the bulk's own grid."""
    x, outlier = _llm_acts(seed=1)
    rel = {c: _rel(decode(encode(x, c), c), x) for c in ("int8", "int4", "int8o", "int4o")}
    bulk = {c: _rel(decode(encode(x, c), c)[~outlier], x[~outlier]) for c in rel}
    assert bulk["int8"] > 0.1 and bulk["int4"] > 0.5, bulk  # 20% and 94%: the damage the outlier codecs undo
    assert rel["int8o"] < rel["int8"] / 8 and bulk["int8o"] < bulk["int8"] / 8, (rel, bulk)
    # int4's own grid error on the heavy-tailed bulk bounds what int4o can gain
    assert rel["int4o"] < rel["int4"] / 3 and bulk["int4o"] < bulk["int4"] / 3, (rel, bulk)
    # without the outliers the plain codecs are as good as the outlier ones
    clean = x.masked_fill(outlier, 0.0)
    for c in ("int8", "int4"):
        plain, aware = _rel(decode(encode(clean, c), c), clean), _rel(decode(encode(clean, c + "o"), c + "o"), clean)
        assert aware <= plain * 1.05, (c, plain, aware)


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


def test_unknown_codec_and_bad_input_are_refused() -> None:
    with pytest.raises(ValueError, match=r"int2.*fp32, fp16, bf16, int8, int4"):
        encode(_x((2, 3)), "int2")
    with pytest.raises(ValueError, match="int2"):
        bytes_per_value("int2")
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes_encode_like_their_float32_values_and_are_not_mutated(dtype: torch.dtype) -> None:
    x = _llm_acts(n=16, layers=2, d=40)[0].to(dtype)
    before = x.clone()
    for codec in CODECS:
        parts = encode(x, codec)
        ref = encode(x.float(), codec)  # the codecs compute in float32
        assert parts.keys() == ref.keys()
        for name in parts:
            assert torch.equal(parts[name], ref[name]), (codec, name)
    assert torch.equal(x, before)


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
    data = encode_frame(Frame(kind=P.TRAIN, header={"session": "s", "secret": "s", "step": 0, "codec": codec}, tensors=tensors))
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


# ---- LayerEncoder: encoding inside the taps, one layer at a time --------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_by_layer_encoding_equals_encoding_the_stack(codec: str, dtype: torch.dtype) -> None:
    acts, _ = _llm_acts(n=40, layers=5, d=33, seed=3)
    acts = acts.to(dtype)
    enc = codecs.LayerEncoder(40, 5, 33, codec, outlier_channels=4, measure=True)
    for j in (3, 0, 4, 1, 2):  # any order: each layer has its own slot
        enc.write(j, acts[:, j])
    whole = codecs.encode(acts, codec, outlier_channels=4)
    got = enc.parts()
    assert got.keys() == whole.keys()
    for name in whole:
        assert got[name].dtype == whole[name].dtype and torch.equal(got[name], whole[name]), name
    x = acts.float()
    expected = float((codecs.decode(whole, codec) - x).norm() / x.norm())
    assert enc.rel_error == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_layer_encoder_refuses_a_wrong_layer_and_an_unwritten_frame() -> None:
    enc = codecs.LayerEncoder(4, 2, 8, "int8")
    with pytest.raises(ValueError, match=r"expected activations \[4, 8\]"):
        enc.write(0, torch.zeros(4, 9))
    enc.write(0, torch.ones(4, 8))
    with pytest.raises(RuntimeError, match=r"layers \[1\] were never written"):
        enc.parts()
    assert enc.rel_error is None  # not asked to measure
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.LayerEncoder(4, 2, 8, "int3")


def test_layer_encoder_turns_the_frame_float32_when_a_later_layer_has_outliers_beyond_fp16() -> None:
    acts = torch.randn(6, 2, 16)
    acts[:, 1, 5] = 1e6  # beyond float16: this layer's outlier values must stay float32
    enc = codecs.LayerEncoder(6, 2, 16, "int8o", outlier_channels=2)
    enc.write(0, acts[:, 0])
    enc.write(1, acts[:, 1])
    parts = enc.parts()
    assert parts["oval"].dtype == torch.float32
    got, whole = codecs.decode(parts, "int8o"), codecs.decode(codecs.encode(acts, "int8o", 2), "int8o")
    assert torch.equal(got[:, 1], whole[:, 1])  # the layer beyond float16: exact
    torch.testing.assert_close(got[:, 0], whole[:, 0], rtol=2**-10, atol=1e-6)  # written before: float16 rounding


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_a_tokenwise_codec_decodes_a_token_the_same_alone_or_in_a_frame(codec):
    acts, _ = _llm_acts(n=64, layers=2, d=64)
    together = decode(encode(acts, codec), codec)[-1:]
    alone = decode(encode(acts[-1:], codec), codec)
    # the strategy evaluates select: all on the loss token alone only for codecs where this holds
    assert torch.equal(together, alone) == codecs.tokenwise(codec), codec
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.tokenwise("int3")
