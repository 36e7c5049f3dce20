"""How activations and nested states become a frame's tensors, and back.

Activations are quantised by a codec (:mod:`lightning_mobillm.transport.codecs`) into ``acts.*`` tensors
plus ``lengths``. Nested states (side weights, optimizer, scheduler) travel as one inner safetensors blob
plus a JSON skeleton: nothing is pickled, and unpacking parses only safetensors and JSON.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from lightning_mobillm.transport import codecs
from lightning_mobillm.transport.frames import FrameError


# ---- activations ---------------------------------------------------------------------------------
def pack_acts(
    acts: torch.Tensor, lengths: torch.Tensor, codec: str, outlier_channels: int = 8
) -> dict[str, torch.Tensor]:
    """Quantise packed activations ``[N, L, d]`` with ``codec`` into frame tensors (``acts.*``, ``lengths``).

    ``outlier_channels`` is the number of channels per layer that ``int8o`` / ``int4o`` keep in fp16.
    """
    return acts_tensors(codecs.encode(acts, codec, outlier_channels=outlier_channels), lengths)


def acts_tensors(parts: dict[str, torch.Tensor], lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """A frame's activation tensors from a codec's parts (``encode``'s, or a ``LayerEncoder``'s)."""
    out = {f"acts.{k}": v.contiguous() for k, v in parts.items()}
    out["lengths"] = lengths.to(torch.int64).cpu().contiguous()
    return out


def unpack_acts(tensors: dict[str, torch.Tensor], codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_acts`: float32 activations ``[N, L, d]`` and lengths ``[B]``."""
    parts = {k.removeprefix("acts."): v for k, v in tensors.items() if k.startswith("acts.")}
    try:
        acts = codecs.decode(parts, codec)
    except ValueError as err:
        raise FrameError(f"activations do not decode with codec {codec!r}: {err}") from None
    return acts, tensors["lengths"]


# ---- nested states (weights, optimizer, scheduler) -----------------------------------------------
def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__items__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialise a {type(obj).__name__} in a state (only tensors, numbers, strings, lists, dicts)")


#: how deep a state's skeleton may nest (a real optimizer state is 5 deep); deeper is refused, not recursed into
MAX_STATE_DEPTH = 32


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > MAX_STATE_DEPTH:
        raise FrameError(f"state skeleton nests deeper than {MAX_STATE_DEPTH}")
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            name = obj["__tensor__"]
            if not isinstance(name, str) or name not in tensors:
                raise FrameError(f"state skeleton names a missing tensor {str(name)[:64]!r}")
            return tensors[name]
        if "__items__" in obj:
            items = obj["__items__"]
            if not isinstance(items, list) or not all(
                    isinstance(i, list) and len(i) == 2 and isinstance(i[0], (str, int)) for i in items):
                raise FrameError("state skeleton has a malformed dict (items of [str or int key, value])")
            return {k: _unflatten(v, tensors, depth + 1) for k, v in items}
        raise FrameError("state skeleton has an untagged object")
    if isinstance(obj, list):
        return [_unflatten(v, tensors, depth + 1) for v in obj]
    return obj


def pack_state(state: Any) -> tuple[dict, torch.Tensor]:
    """Serialise a nested state into a JSON skeleton and one uint8 tensor (safetensors bytes)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {"root": _flatten(state, tensors)}
    blob = safetensors_save(tensors)
    return skeleton, torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def unpack_state(skeleton: dict, blob: torch.Tensor) -> Any:
    """Inverse of :func:`pack_state`; parses only safetensors and JSON (nothing is executed)."""
    try:
        tensors = safetensors_load(blob.numpy().tobytes())
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad frame
        raise FrameError(f"state blob is not valid safetensors: {err}") from None
    if "root" not in skeleton:
        raise FrameError("state skeleton has no root")
    return _unflatten(skeleton["root"], tensors)
