"""The wire format: a small JSON header plus named tensors as safetensors bytes.

Layout of a frame::

    b"MLLM"            4 bytes magic
    version            1 byte (= 1)
    H                  4 bytes big-endian length of the header
    header             H bytes UTF-8 JSON object, always holding "kind"
    body               the rest: ``safetensors.torch.save(tensors)`` (possibly of an empty dict)

``decode_frame`` runs on untrusted bytes. It never unpickles or calls ``torch.load``; every
rejection raises ``FrameError`` saying what was wrong, and a frame is only returned once its header
and tensors match the schema registered for its kind.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

MAGIC = b"MLLM"
VERSION = 1
_PREAMBLE = struct.Struct(">4sBI")  # magic, version, header length
PREAMBLE_BYTES = _PREAMBLE.size


class FrameError(ValueError):
    """A frame was malformed, oversized or did not match its schema."""


@dataclass
class Frame:
    """One message on the link: a kind, a JSON-able header and named tensors."""

    kind: str
    header: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorRule:
    """What one named tensor may look like: allowed dtypes and, optionally, its rank."""

    dtypes: tuple[torch.dtype, ...]
    ndim: int | None = None


@dataclass(frozen=True)
class FrameSchema:
    """What a frame of one kind may carry.

    ``tensors`` lists the only tensor names allowed; ``required_header`` maps header keys to the
    allowed python type(s) of their values, ``optional_header`` likewise for keys that may be absent.
    A header may hold nothing but ``kind`` and those keys, unless ``allow_header_extra`` (replies only:
    a device reads a server's replies, a server never accepts unknown keys).
    """

    kind: str
    tensors: dict[str, TensorRule]
    required_tensors: tuple[str, ...] = ()
    required_header: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    optional_header: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    allow_header_extra: bool = False


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Sum of the element bytes of ``tensors`` (framing overhead = frame length - this)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _reject_constant(name: str) -> Any:
    """``json`` hook: refuse the non-standard constants NaN, Infinity and -Infinity."""
    raise FrameError(f"header JSON holds the non-standard constant {name}")


def encode_frame(frame: Frame) -> bytes:
    """Serialize ``frame`` to bytes; ``frame.kind`` is written into the JSON header as ``kind``."""
    if not isinstance(frame.kind, str) or not frame.kind:
        raise FrameError(f"frame kind must be a non-empty string, got {frame.kind!r}")
    if frame.header.get("kind", frame.kind) != frame.kind:
        raise FrameError(f"header kind {frame.header['kind']!r} disagrees with frame kind {frame.kind!r}")
    header = {**frame.header, "kind": frame.kind}
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise FrameError(f"frame header is not JSON-serializable: {e}") from e
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in frame.tensors.items()}
    body = safetensors_save(tensors)
    return _PREAMBLE.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes + body


def _parse_header(data: bytes, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    """Check magic, version and header length; return the JSON header and the body offset."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    if len(data) < PREAMBLE_BYTES:
        raise FrameError(f"frame too short: {len(data)} bytes, need at least {PREAMBLE_BYTES}")
    magic, version, header_len = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}, this side speaks version {VERSION}")
    if header_len > max_header_bytes:
        raise FrameError(f"header of {header_len} bytes exceeds the limit of {max_header_bytes} bytes")
    end = PREAMBLE_BYTES + header_len
    if end > len(data):
        raise FrameError(f"header length {header_len} runs past the end of the {len(data)}-byte frame")
    try:
        text = bytes(data[PREAMBLE_BYTES:end]).decode("utf-8")
        header = json.loads(text, parse_constant=_reject_constant)
    except FrameError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FrameError(f"header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise FrameError(f"header must be a JSON object, got {type(header).__name__}")
    kind = header.get("kind")
    if not isinstance(kind, str) or not kind:
        raise FrameError(f"header lacks a string 'kind' (got {kind!r})")
    return header, end


def peek_kind(data: bytes, *, max_header_bytes: int = 65536) -> str:
    """Return a frame's ``kind`` after checking only its magic, version and JSON header."""
    header, _ = _parse_header(data, max_header_bytes)
    return header["kind"]


def _type_ok(value: Any, allowed: type | tuple[type, ...]) -> bool:
    """``isinstance`` with JSON semantics: ``bool`` is not an ``int``, an ``int`` is a ``float``."""
    types = allowed if isinstance(allowed, tuple) else (allowed,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _type_names(allowed: type | tuple[type, ...]) -> str:
    """Readable names of the allowed type(s)."""
    types = allowed if isinstance(allowed, tuple) else (allowed,)
    return " | ".join(t.__name__ for t in types)


def _check_header(header: dict[str, Any], schema: FrameSchema) -> None:
    """Check the required and optional header keys and their types, and refuse keys the schema does not name."""
    for key in schema.required_header:
        if key not in header:
            raise FrameError(f"{schema.kind!r} frame: header lacks required key {key!r}")
    for key, allowed in (*schema.required_header.items(), *schema.optional_header.items()):
        if key in header and not _type_ok(header[key], allowed):
            raise FrameError(
                f"{schema.kind!r} frame: header key {key!r} must be {_type_names(allowed)}, "
                f"got {type(header[key]).__name__}"
            )
    if not schema.allow_header_extra:
        extra = sorted(set(header) - set(schema.required_header) - set(schema.optional_header) - {"kind"})
        if extra:
            raise FrameError(f"{schema.kind!r} frame: header keys {extra[:8]} are not in the schema")


def _load_tensors(body: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes, turning any failure (including a Rust panic) into ``FrameError``."""
    try:
        return safetensors_load(body)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # pyo3 panics derive from BaseException
        raise FrameError(f"tensor payload is not valid safetensors: {type(e).__name__}: {e}") from e


def _check_tensors(tensors: dict[str, torch.Tensor], schema: FrameSchema, require_finite: bool) -> None:
    """Check tensor names, presence, dtypes, ranks and (optionally) finiteness against ``schema``."""
    unknown = sorted(set(tensors) - set(schema.tensors))
    if unknown:
        raise FrameError(
            f"{schema.kind!r} frame: tensors {unknown} are not allowed; allowed: {sorted(schema.tensors)}"
        )
    missing = [name for name in schema.required_tensors if name not in tensors]
    if missing:
        raise FrameError(f"{schema.kind!r} frame: required tensors missing: {missing}")
    for name, t in tensors.items():
        rule = schema.tensors[name]
        if t.dtype not in rule.dtypes:
            raise FrameError(
                f"{schema.kind!r} frame: tensor {name!r} has dtype {t.dtype}, allowed: {list(rule.dtypes)}"
            )
        if rule.ndim is not None and t.ndim != rule.ndim:
            raise FrameError(
                f"{schema.kind!r} frame: tensor {name!r} has rank {t.ndim} (shape {list(t.shape)}), "
                f"expected rank {rule.ndim}"
            )
        if require_finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise FrameError(f"{schema.kind!r} frame: tensor {name!r} holds NaN or infinite values")


def decode_frame(
    data: bytes,
    schemas: Mapping[str, FrameSchema],
    *,
    max_bytes: int = 256 * 2**20,
    max_header_bytes: int = 65536,
    require_finite: bool = True,
) -> Frame:
    """Parse and validate untrusted frame bytes against the schema registered for their kind.

    Raises ``FrameError`` (and nothing else) on any malformed, oversized or non-conforming frame.
    """
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    header, body_offset = _parse_header(data, max_header_bytes)
    kind = header["kind"]
    schema = schemas.get(kind)
    if schema is None:
        raise FrameError(f"unknown frame kind {kind!r}; expected one of {sorted(schemas)}")
    _check_header(header, schema)
    tensors = _load_tensors(bytes(data[body_offset:]))
    _check_tensors(tensors, schema, require_finite)
    return Frame(kind=kind, header=header, tensors=tensors)
