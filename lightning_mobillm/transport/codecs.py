"""Codecs that quantize activations for the wire.

An activation tensor ``x`` has any rank >= 1; its last dim is the feature dim ``d``. The integer
codecs use one symmetric absmax scale per vector along the last dim ("per token"):

- ``fp32`` / ``fp16`` / ``bf16``: parts ``{"q"}``, the tensor cast to that dtype.
- ``int8``: parts ``{"q": int8 [..., d], "scale": float32 [...]}``, values in [-127, 127].
- ``int4``: parts ``{"q": uint8 [..., ceil(d / 2)], "scale": float32 [...], "d": int64 [1]}``,
  values in [-7, 7] stored as ``value + 8`` in a nibble, two per byte (low nibble = even index,
  high nibble = odd index); an odd ``d`` is padded with one zero and ``d`` restores the shape.
- ``int8o`` / ``int4o``: outlier-aware int8 / int4. A few channels of LLM hidden states are far
  larger than the rest and would otherwise set every token's absmax scale. ``k = min(outlier_channels,
  d)`` channels per group are sent in 16-bit float and zeroed before the rest is quantised exactly
  like ``int8`` / ``int4``. A group is the second-to-last dim for ``x.ndim >= 3`` (the tapped layer of
  packed acts ``[N, L, d]``), and the whole tensor otherwise. Per group the channels with the largest
  absmax over all leading dims are chosen (per call, i.e. per frame). Parts: those of ``int8`` /
  ``int4`` plus

  - ``"oidx"``: int16 (int32 if ``d > 32767``) channel indices, shape ``[G, k]`` for ``x.ndim >= 3``
    and ``[k]`` otherwise; unique within a group, sorted ascending by ``encode``;
  - ``"oval"``: the values of those channels, shape ``[*x.shape[:-1], k]``, float16 -- or float32
    when any of them lies beyond float16's finite range (+-65504), so they are never clamped.

  ``q`` keeps all ``d`` columns (zeros at the outlier channels, which ``decode`` overwrites with
  ``oval``). Overhead over the base codec: ``2 * k`` bytes per group per token for ``oval`` plus
  ``k * (2 or 4)`` index bytes per group per frame for ``oidx``; with k = 8 and d = 576 that is about
  +2.8% over int8 and +5.6% over int4.

``decode`` runs on the server on untrusted input: it checks every part's presence, dtype and shape
and raises ``ValueError`` instead of crashing or returning garbage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

CODECS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4", "int8o", "int4o")

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_BYTES_PER_VALUE: dict[str, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int8": 1.0,
    "int4": 0.5,
    "int8o": 1.0,
    "int4o": 0.5,
}
_PARTS: dict[str, tuple[str, ...]] = {
    "fp32": ("q",),
    "fp16": ("q",),
    "bf16": ("q",),
    "int8": ("q", "scale"),
    "int4": ("q", "scale", "d"),
    "int8o": ("q", "scale", "oidx", "oval"),
    "int4o": ("q", "scale", "d", "oidx", "oval"),
}
_BASE: dict[str, str] = {"int8o": "int8", "int4o": "int4"}  # outlier-aware codec -> codec of the rest
_FP16_MAX = float(torch.finfo(torch.float16).max)
_INT16_MAX = int(torch.iinfo(torch.int16).max)
_INT8_MAX = 127
_INT4_MAX = 7
_INT4_OFFSET = 8


def _check_codec(codec: str) -> None:
    """Raise ``ValueError`` if ``codec`` is not one of ``CODECS``."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; allowed codecs: {', '.join(CODECS)}")


def tokenwise(codec: str) -> bool:
    """Whether ``codec`` encodes each token on its own, so that a token decodes the same whatever else the
    frame holds: every codec but the outlier-aware ones, which pick their channels over the whole frame."""
    _check_codec(codec)
    return codec not in _BASE


def bytes_per_value(codec: str) -> float:
    """Payload bytes per encoded value (scales and other side parts not included).

    For ``int8o`` / ``int4o`` this is the rate of the quantised bulk ``q`` (1 and 0.5); the outlier
    values come on top, see :func:`payload_nbytes`.
    """
    _check_codec(codec)
    return _BYTES_PER_VALUE[codec]


def part_names(codec: str) -> tuple[str, ...]:
    """Names of the parts that ``encode`` produces for ``codec``."""
    _check_codec(codec)
    return _PARTS[codec]


def _absmax_scale(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token scale ``absmax / qmax`` (float32, shape ``x.shape[:-1]``) and a divisor safe for zeros."""
    scale = x.abs().amax(dim=-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, safe


def _quantize(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization of float32 ``x`` to integers in [-qmax, qmax] (still float)."""
    scale, safe = _absmax_scale(x, qmax)
    q = torch.div(x, safe.unsqueeze(-1)).round_().clamp_(-qmax, qmax)
    return q, scale


def _encode_int4(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize to int4 and pack two nibbles per byte along the last dim."""
    d = x.shape[-1]
    q, scale = _quantize(x, _INT4_MAX)
    u = q.add_(_INT4_OFFSET).to(torch.uint8)
    if d % 2:
        pad = torch.full((*u.shape[:-1], 1), _INT4_OFFSET, dtype=torch.uint8)
        u = torch.cat([u, pad], dim=-1)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    return {
        "q": packed.contiguous(),
        "scale": scale.contiguous(),
        "d": torch.tensor([d], dtype=torch.int64),
    }


def _encode_base(x: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """Encode float32 ``x`` with the plain integer codec ``int8`` or ``int4``."""
    if codec == "int8":
        q, scale = _quantize(x, _INT8_MAX)
        return {"q": q.to(torch.int8).contiguous(), "scale": scale.contiguous()}
    return _encode_int4(x)


def _as_groups(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as ``[P, G, d]``: groups along dim -2 for rank >= 3, else one group."""
    if x.ndim >= 3:
        return x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])
    return x.reshape(math.prod(x.shape[:-1]), 1, x.shape[-1])


def _encode_outlier(x: torch.Tensor, codec: str, outlier_channels: int) -> dict[str, torch.Tensor]:
    """Keep the ``k`` largest-absmax channels per group in 16-bit float, quantise the rest with the base codec."""
    if isinstance(outlier_channels, bool) or not isinstance(outlier_channels, int) or outlier_channels < 0:
        raise ValueError(f"outlier_channels must be an int >= 0, got {outlier_channels!r}")
    d = x.shape[-1]
    k = min(outlier_channels, d)
    xg = _as_groups(x)  # [P, G, d]
    groups = xg.shape[1]
    if xg.shape[0]:
        absmax = xg.abs().amax(dim=0)  # [G, d]
    else:
        absmax = torch.zeros(groups, d)
    idx = absmax.topk(k, dim=-1).indices.sort(dim=-1).values  # [G, k], unique per group
    gather_idx = idx.unsqueeze(0).expand(xg.shape[0], groups, k)
    oval = xg.gather(-1, gather_idx)  # [P, G, k]
    rest = xg.clone().scatter_(-1, gather_idx, 0.0).reshape(x.shape)
    if oval.numel() and bool(oval.abs().amax() > _FP16_MAX):
        oval = oval.to(torch.float32)  # beyond fp16's range: send exactly rather than clamp
    else:
        oval = oval.to(torch.float16)
    parts = _encode_base(rest, _BASE[codec])
    parts["oidx"] = (idx if x.ndim >= 3 else idx[0]).to(torch.int16 if d <= _INT16_MAX else torch.int32)
    parts["oval"] = oval.reshape(*x.shape[:-1], k)
    return {name: parts[name].contiguous() for name in _PARTS[codec]}


def encode(x: torch.Tensor, codec: str, outlier_channels: int = 8) -> dict[str, torch.Tensor]:
    """Encode float tensor ``x`` (rank >= 1, last dim = features) with ``codec`` into named parts.

    Integer codecs compute in float32 with one absmax scale per vector along the last dim; an all-zero
    vector gets scale 0 and decodes to zeros. ``outlier_channels`` is the number ``k`` of channels per
    group that ``int8o`` / ``int4o`` keep in 16-bit float (capped at ``d``; 0 gives plain int8 / int4
    plus empty outlier parts); the other codecs ignore it.
    """
    _check_codec(codec)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"encode expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"encode expects a floating point tensor, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("encode expects a tensor of rank >= 1 (last dim = features), got a scalar")
    x = x.detach()
    if codec in _FLOAT_DTYPES:
        return {"q": x.to(_FLOAT_DTYPES[codec]).contiguous()}
    if x.shape[-1] == 0:
        raise ValueError(f"codec {codec!r} needs a feature dim >= 1, got shape {tuple(x.shape)}")
    if codec in _BASE:
        return _encode_outlier(x.to(torch.float32), codec, outlier_channels)
    return _encode_rows(x, codec)


#: vectors quantised at a time by the plain integer codecs: their float32 temporaries stay a few MB
#: instead of several copies of the whole tensor (the device's peak memory is what MobiLLM saves)
CHUNK_ROWS = 4096


def _encode_rows(x: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """``int8``/``int4`` of ``x`` in chunks of :data:`CHUNK_ROWS` vectors (each vector has its own scale,
    so the result equals encoding the whole tensor at once)."""
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    pieces = [_encode_base(rows[i : i + CHUNK_ROWS].to(torch.float32), codec)
              for i in range(0, max(1, rows.shape[0]), CHUNK_ROWS)]
    q = torch.cat([p["q"] for p in pieces])
    parts = {
        "q": q.reshape(*lead, q.shape[-1]),
        "scale": torch.cat([p["scale"] for p in pieces]).reshape(lead),
    }
    if "d" in pieces[0]:
        parts["d"] = pieces[0]["d"]
    return parts


def _get_part(parts: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, codec: str) -> torch.Tensor:
    """Fetch part ``name`` and check that it is a tensor of ``dtype``."""
    if name not in parts:
        raise ValueError(f"codec {codec!r}: missing part {name!r} (got parts {sorted(parts)})")
    t = parts[name]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"codec {codec!r}: part {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"codec {codec!r}: part {name!r} must have dtype {dtype}, got {t.dtype}")
    return t


def _check_parts(parts: Mapping[str, torch.Tensor], codec: str) -> None:
    """Reject a non-mapping ``parts`` or any part name the codec does not produce."""
    if not isinstance(parts, Mapping):
        raise ValueError(
            f"codec {codec!r}: parts must be a mapping of name -> tensor, got {type(parts).__name__}"
        )
    extra = sorted(set(parts) - set(_PARTS[codec]))
    if extra:
        raise ValueError(f"codec {codec!r}: unexpected parts {extra}; expected {list(_PARTS[codec])}")


def _get_q(parts: Mapping[str, torch.Tensor], dtype: torch.dtype, codec: str) -> torch.Tensor:
    """Fetch the payload ``q`` and check its dtype and rank."""
    q = _get_part(parts, "q", dtype, codec)
    if q.ndim < 1:
        raise ValueError(f"codec {codec!r}: part 'q' must have rank >= 1, got a scalar")
    return q


def _get_scale(parts: Mapping[str, torch.Tensor], q: torch.Tensor, codec: str) -> torch.Tensor:
    """Fetch ``scale`` and check it is float32, shaped ``q.shape[:-1]``, finite and non-negative."""
    scale = _get_part(parts, "scale", torch.float32, codec)
    if scale.shape != q.shape[:-1]:
        raise ValueError(
            f"codec {codec!r}: part 'scale' has shape {tuple(scale.shape)}, "
            f"expected {tuple(q.shape[:-1])} (q shape {tuple(q.shape)} without its last dim)"
        )
    if scale.numel() and not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError(f"codec {codec!r}: part 'scale' must be finite and non-negative")
    return scale


def _decode_int8(parts: Mapping[str, torch.Tensor], codec: str = "int8") -> torch.Tensor:
    """Dequantize int8 parts."""
    q = _get_q(parts, torch.int8, codec)
    scale = _get_scale(parts, q, codec)
    if q.numel() and bool((q < -_INT8_MAX).any()):
        raise ValueError(f"codec {codec!r}: part 'q' holds -128, outside the symmetric range [-127, 127]")
    return q.to(torch.float32).mul_(scale.unsqueeze(-1))


def _decode_int4(parts: Mapping[str, torch.Tensor], codec: str = "int4") -> torch.Tensor:
    """Unpack nibbles and dequantize int4 parts."""
    q = _get_q(parts, torch.uint8, codec)
    scale = _get_scale(parts, q, codec)
    d_part = _get_part(parts, "d", torch.int64, codec)
    if d_part.shape != (1,):
        raise ValueError(f"codec {codec!r}: part 'd' must have shape [1], got {list(d_part.shape)}")
    d = int(d_part.item())
    nbytes = q.shape[-1]
    if d < 1 or (d + 1) // 2 != nbytes:
        raise ValueError(
            f"codec {codec!r}: feature dim d={d} does not fit q's last dim {nbytes} (need ceil(d/2))"
        )
    low = q & 0x0F
    high = q >> 4
    if q.numel() and bool((low == 0).any() or (high == 0).any()):
        raise ValueError(
            f"codec {codec!r}: part 'q' holds nibble 0 (value -8), outside the symmetric range [-7, 7]"
        )
    u = torch.empty((*q.shape[:-1], 2 * nbytes), dtype=torch.uint8)
    u[..., 0::2] = low
    u[..., 1::2] = high
    return u[..., :d].to(torch.float32).sub_(_INT4_OFFSET).mul_(scale.unsqueeze(-1))


def _fetch(parts: Mapping[str, torch.Tensor], name: str, dtypes: tuple[torch.dtype, ...], codec: str) -> torch.Tensor:
    """Fetch part ``name`` and check that it is a tensor of one of ``dtypes``."""
    if name not in parts:
        raise ValueError(f"codec {codec!r}: missing part {name!r} (got parts {sorted(parts)})")
    t = parts[name]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"codec {codec!r}: part {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"codec {codec!r}: part {name!r} must have dtype in {list(dtypes)}, got {t.dtype}")
    return t


def _decode_outlier(parts: Mapping[str, torch.Tensor], codec: str) -> torch.Tensor:
    """Decode the quantised bulk with the base codec, then write the outlier channels back from ``oval``."""
    # fetch and type-check the outlier parts before the (costlier) bulk decode
    oidx = _fetch(parts, "oidx", (torch.int16, torch.int32), codec)
    oval = _fetch(parts, "oval", (torch.float16, torch.float32), codec)
    y = _decode_int8(parts, codec) if _BASE[codec] == "int8" else _decode_int4(parts, codec)
    d = y.shape[-1]
    if y.ndim >= 3:
        groups = y.shape[-2]
        if oidx.ndim != 2 or oidx.shape[0] != groups:
            raise ValueError(
                f"codec {codec!r}: part 'oidx' must have shape [G={groups}, k] for a rank-{y.ndim} tensor, "
                f"got {list(oidx.shape)}"
            )
    elif oidx.ndim != 1:
        raise ValueError(
            f"codec {codec!r}: part 'oidx' must have shape [k] for a rank-{y.ndim} tensor, got {list(oidx.shape)}"
        )
    k = oidx.shape[-1]
    if k > d:
        raise ValueError(f"codec {codec!r}: part 'oidx' names k={k} channels per group, more than d={d}")
    expected = (*y.shape[:-1], k)
    if tuple(oval.shape) != expected:
        raise ValueError(
            f"codec {codec!r}: part 'oval' has shape {list(oval.shape)}, expected {list(expected)} "
            f"(decoded shape {list(y.shape)} with k={k} outlier channels)"
        )
    if k == 0:
        return y
    idx = oidx.to(torch.int64).reshape(-1, k)  # [G, k]
    if bool((idx < 0).any() or (idx >= d).any()):
        raise ValueError(f"codec {codec!r}: part 'oidx' holds channel indices outside [0, {d})")
    srt = idx.sort(dim=-1).values
    if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError(f"codec {codec!r}: part 'oidx' repeats a channel index within a group")
    if oval.numel() and not bool(torch.isfinite(oval).all()):
        raise ValueError(f"codec {codec!r}: part 'oval' must be finite")
    y = y.contiguous()  # so that the grouped view below writes into y
    yg = _as_groups(y)  # [P, G, d]; overwrite (not add to) whatever q held at the outlier channels
    yg.scatter_(-1, idx.unsqueeze(0).expand(yg.shape[0], -1, -1), _as_groups(oval).to(torch.float32))
    return y


def decode(parts: dict[str, torch.Tensor], codec: str) -> torch.Tensor:
    """Decode parts produced by ``encode(x, codec)`` back to a float32 tensor shaped like ``x``.

    Raises ``ValueError`` on an unknown codec, a missing or unexpected part, a wrong dtype or a shape
    that does not match, and for ``int8o`` / ``int4o`` on outlier indices that are out of range or
    repeated within a group, or non-finite outlier values.
    """
    _check_codec(codec)
    _check_parts(parts, codec)
    if codec in _FLOAT_DTYPES:
        return _get_q(parts, _FLOAT_DTYPES[codec], codec).to(torch.float32)
    if codec in _BASE:
        return _decode_outlier(parts, codec)
    if codec == "int8":
        return _decode_int8(parts)
    return _decode_int4(parts)


def payload_nbytes(shape: tuple[int, ...] | torch.Size, codec: str, outlier_channels: int = 8) -> int:
    """Bytes of the payload that ``encode`` produces for a tensor of ``shape`` (no scales, no indices).

    The payload is ``q``; for ``int8o`` / ``int4o`` it also counts the outlier values ``oval`` at 2 bytes
    each (``min(outlier_channels, d)`` per group per token; 4 bytes each if they had to stay float32).
    """
    _check_codec(codec)
    if codec in ("int4", "int4o"):
        nbytes = math.prod(shape[:-1]) * ((shape[-1] + 1) // 2)
    else:
        nbytes = int(math.prod(shape) * _BYTES_PER_VALUE[codec])
    if codec in _BASE:
        nbytes += math.prod(shape[:-1]) * min(outlier_channels, shape[-1]) * 2
    return nbytes


class LayerEncoder:
    """``encode`` of packed activations ``[N, L, d]`` written one tapped layer at a time, as the forward runs.

    The backbone's hook for layer ``j`` hands its ``[N, d]`` selected tokens to :meth:`write`, which encodes
    them and copies the result into parts allocated once for the whole frame, so the float ``[N, L, d]`` stack
    never exists: the extra memory over inference is the frame itself and one layer's temporaries. Every codec
    works per token and per layer (the outlier codecs choose their channels per layer), so :meth:`parts`
    equals ``encode(acts, codec, outlier_channels)`` bit for bit once every layer has been written. (One
    exception: when a later layer's outlier values exceed float16, the frame's ``oval`` turns float32 as
    ``encode``'s does, but the layers written before keep their float16 rounding.)

    With ``measure`` the relative error ``||decode(encode(x)) - x|| / ||x||`` of the whole frame is summed
    layer by layer (:attr:`rel_error`), again without the stack.
    """

    def __init__(self, n_tokens: int, n_layers: int, d: int, codec: str, outlier_channels: int = 8,
                 measure: bool = False) -> None:
        _check_codec(codec)
        if n_tokens < 0 or n_layers < 1 or d < 1:
            raise ValueError(f"LayerEncoder needs N >= 0, L >= 1 and d >= 1, got {n_tokens}, {n_layers}, {d}")
        self.codec, self.outlier_channels = codec, outlier_channels
        self.shape = (n_tokens, n_layers, d)
        self._parts: dict[str, torch.Tensor] = {}  # allocated from the first layer written (its dtypes, shapes)
        self._written = [False] * n_layers
        self.measure = measure
        self._err_sq = 0.0
        self._ref_sq = 0.0

    def write(self, j: int, x: torch.Tensor) -> None:
        """Encode layer ``j``'s ``[N, d]`` activations into the frame's parts."""
        n, _, d = self.shape
        if tuple(x.shape) != (n, d):
            raise ValueError(f"layer {j}: expected activations [{n}, {d}], got {list(x.shape)}")
        parts = encode(x.detach().cpu().unsqueeze(1), self.codec, self.outlier_channels)
        if not self._parts:
            self._allocate(parts)
        for name, part in parts.items():
            if name == "d":
                continue
            buf = self._parts[name]
            if part.dtype != buf.dtype:  # outlier values beyond float16 in this layer: the frame sends float32
                buf = self._parts[name] = buf.to(part.dtype)
            if name == "oidx":
                buf[j] = part[0]
            else:
                buf[:, j] = part[:, 0]
        self._written[j] = True
        if self.measure:
            xf = x.detach().cpu().float()
            self._err_sq += float((decode(parts, self.codec)[:, 0] - xf).square().sum())
            self._ref_sq += float(xf.square().sum())

    def _allocate(self, layer_parts: dict[str, torch.Tensor]) -> None:
        """The whole frame's parts, shaped from one layer's (``[N, 1, ...]``, and ``oidx`` ``[1, k]``)."""
        n, layers, _ = self.shape
        for name, part in layer_parts.items():
            if name == "d":
                self._parts[name] = part
            elif name == "oidx":
                self._parts[name] = torch.empty(layers, *part.shape[1:], dtype=part.dtype)
            else:
                self._parts[name] = torch.empty(n, layers, *part.shape[2:], dtype=part.dtype)

    def parts(self) -> dict[str, torch.Tensor]:
        """The frame's parts, as ``encode`` gives them; every layer must have been written."""
        if missing := [j for j, done in enumerate(self._written) if not done]:
            raise RuntimeError(f"layers {missing} were never written")
        return dict(self._parts)

    @property
    def rel_error(self) -> float | None:
        """``||decode(parts) - acts|| / ||acts||`` over the layers written (``measure`` only)."""
        if not self.measure:
            return None
        return math.sqrt(self._err_sq) / max(math.sqrt(self._ref_sq), 1e-12)
