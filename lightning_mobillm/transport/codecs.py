"""Codecs that quantize activations for the wire.

An activation tensor ``x`` has any rank >= 1; its last dim is the feature dim ``d``. The integer
codecs use one symmetric absmax scale per vector along the last dim ("per token"):

- ``fp32`` / ``fp16`` / ``bf16``: parts ``{"q"}``, the tensor cast to that dtype.
- ``int8``: parts ``{"q": int8 [..., d], "scale": float32 [...]}``, values in [-127, 127].
- ``int4``: parts ``{"q": uint8 [..., ceil(d / 2)], "scale": float32 [...], "d": int64 [1]}``,
  values in [-7, 7] stored as ``value + 8`` in a nibble, two per byte (low nibble = even index,
  high nibble = odd index); an odd ``d`` is padded with one zero and ``d`` restores the shape.

``decode`` runs on the server on untrusted input: it checks every part's presence, dtype and shape
and raises ``ValueError`` instead of crashing or returning garbage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

CODECS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_BYTES_PER_VALUE: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
_PARTS: dict[str, tuple[str, ...]] = {
    "fp32": ("q",),
    "fp16": ("q",),
    "bf16": ("q",),
    "int8": ("q", "scale"),
    "int4": ("q", "scale", "d"),
}
_INT8_MAX = 127
_INT4_MAX = 7
_INT4_OFFSET = 8


def _check_codec(codec: str) -> None:
    """Raise ``ValueError`` if ``codec`` is not one of ``CODECS``."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; allowed codecs: {', '.join(CODECS)}")


def bytes_per_value(codec: str) -> float:
    """Payload bytes per encoded value (scales and other side parts not included)."""
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


def encode(x: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """Encode float tensor ``x`` (rank >= 1, last dim = features) with ``codec`` into named parts.

    Integer codecs compute in float32 with one absmax scale per vector along the last dim; an all-zero
    vector gets scale 0 and decodes to zeros.
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
    x = x.to(torch.float32)
    if codec == "int8":
        q, scale = _quantize(x, _INT8_MAX)
        return {"q": q.to(torch.int8).contiguous(), "scale": scale.contiguous()}
    return _encode_int4(x)


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


def _decode_int8(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Dequantize int8 parts."""
    q = _get_q(parts, torch.int8, "int8")
    scale = _get_scale(parts, q, "int8")
    if q.numel() and bool((q < -_INT8_MAX).any()):
        raise ValueError("codec 'int8': part 'q' holds -128, outside the symmetric range [-127, 127]")
    return q.to(torch.float32).mul_(scale.unsqueeze(-1))


def _decode_int4(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unpack nibbles and dequantize int4 parts."""
    q = _get_q(parts, torch.uint8, "int4")
    scale = _get_scale(parts, q, "int4")
    d_part = _get_part(parts, "d", torch.int64, "int4")
    if d_part.shape != (1,):
        raise ValueError(f"codec 'int4': part 'd' must have shape [1], got {list(d_part.shape)}")
    d = int(d_part.item())
    nbytes = q.shape[-1]
    if d < 1 or (d + 1) // 2 != nbytes:
        raise ValueError(
            f"codec 'int4': feature dim d={d} does not fit q's last dim {nbytes} (need ceil(d/2))"
        )
    low = q & 0x0F
    high = q >> 4
    if q.numel() and bool((low == 0).any() or (high == 0).any()):
        raise ValueError(
            "codec 'int4': part 'q' holds nibble 0 (value -8), outside the symmetric range [-7, 7]"
        )
    u = torch.empty((*q.shape[:-1], 2 * nbytes), dtype=torch.uint8)
    u[..., 0::2] = low
    u[..., 1::2] = high
    return u[..., :d].to(torch.float32).sub_(_INT4_OFFSET).mul_(scale.unsqueeze(-1))


def decode(parts: dict[str, torch.Tensor], codec: str) -> torch.Tensor:
    """Decode parts produced by ``encode(x, codec)`` back to a float32 tensor shaped like ``x``.

    Raises ``ValueError`` on an unknown codec, a missing or unexpected part, a wrong dtype or a shape
    that does not match.
    """
    _check_codec(codec)
    _check_parts(parts, codec)
    if codec in _FLOAT_DTYPES:
        return _get_q(parts, _FLOAT_DTYPES[codec], codec).to(torch.float32)
    if codec == "int8":
        return _decode_int8(parts)
    return _decode_int4(parts)


def payload_nbytes(shape: tuple[int, ...] | torch.Size, codec: str) -> int:
    """Bytes of the ``q`` payload that ``encode`` produces for a tensor of ``shape`` (no scales)."""
    _check_codec(codec)
    if codec == "int4":
        return math.prod(shape[:-1]) * ((shape[-1] + 1) // 2)
    return int(math.prod(shape) * _BYTES_PER_VALUE[codec])
