"""What device and server say to each other: frame kinds, their schemas, and (de)serialisation helpers.

Every frame a server accepts is listed in :data:`REQUEST_SCHEMAS`; a frame carrying any tensor not
listed for its kind is refused. In particular no request kind may carry text or token ids, and the
label-free kinds (used by PAE and Fed MobiLLM) may not carry labels. Nested states (side weights,
optimizer, scheduler) travel as an inner safetensors blob plus a JSON skeleton, never pickled.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from lightning_mobillm.transport import codecs
from lightning_mobillm.transport.frames import Frame, FrameError, FrameSchema, TensorRule, encode_frame

# ---- request kinds -------------------------------------------------------------------------------
HELLO, TRAIN, EVAL, GET_STATE, SET_STATE, BYE = "hello", "train", "eval", "get_state", "set_state", "bye"
#: PAE / Fed: activations + a device-defined target; the schema has no place for labels.
TRAIN_TARGET = "train_target"
#: a training step on samples the server already holds (activation cache): sample keys only.
TRAIN_CACHED = "train_cached"
# ---- reply kinds ---------------------------------------------------------------------------------
OK, ERROR = "ok", "error"

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ACTS = {
    "acts.q": TensorRule(dtypes=(*_FLOATS, torch.int8, torch.uint8), ndim=3),
    "acts.scale": TensorRule(dtypes=(torch.float32,), ndim=2),
    "acts.d": TensorRule(dtypes=(torch.int64,), ndim=1),
    "acts.oidx": TensorRule(dtypes=(torch.int16, torch.int32), ndim=None),
    "acts.oval": TensorRule(dtypes=(torch.float16, torch.float32), ndim=3),
    "lengths": TensorRule(dtypes=(torch.int64,), ndim=1),
}
_SESSION = {"session": str}

REQUEST_SCHEMAS: dict[str, FrameSchema] = {
    HELLO: FrameSchema(
        kind=HELLO,
        tensors={},
        required_header={
            "device_id": str,
            "run_id": str,
            "module": str,
            "hparams": dict,
            "tap_spec": dict,
            "num_outputs": int,
            "total_steps": int,
            "codec": str,
        },
    ),
    TRAIN: FrameSchema(
        kind=TRAIN,
        tensors={**_ACTS, "labels": TensorRule(dtypes=(torch.int64,), ndim=1)},
        required_tensors=("acts.q", "lengths", "labels"),
        required_header={**_SESSION, "step": int, "codec": str},
    ),
    TRAIN_TARGET: FrameSchema(
        kind=TRAIN_TARGET,
        tensors={**_ACTS, "targets": TensorRule(dtypes=(torch.float32,), ndim=2)},
        required_tensors=("acts.q", "lengths", "targets"),
        required_header={**_SESSION, "step": int, "codec": str},
    ),
    TRAIN_CACHED: FrameSchema(
        kind=TRAIN_CACHED,
        tensors={},
        required_header={**_SESSION, "step": int, "keys": list},
    ),
    EVAL: FrameSchema(
        kind=EVAL,
        tensors=dict(_ACTS),
        required_tensors=("acts.q", "lengths"),
        required_header={**_SESSION, "codec": str},
    ),
    GET_STATE: FrameSchema(kind=GET_STATE, tensors={}, required_header=dict(_SESSION)),
    SET_STATE: FrameSchema(
        kind=SET_STATE,
        tensors={"state": TensorRule(dtypes=(torch.uint8,), ndim=1)},
        required_tensors=("state",),
        required_header={**_SESSION, "skeleton": dict},
    ),
    BYE: FrameSchema(kind=BYE, tensors={}, required_header=dict(_SESSION)),
}

REPLY_SCHEMAS: dict[str, FrameSchema] = {
    OK: FrameSchema(
        kind=OK,
        tensors={
            "logits": TensorRule(dtypes=(torch.float32,), ndim=2),
            "state": TensorRule(dtypes=(torch.uint8,), ndim=1),
        },
    ),
    ERROR: FrameSchema(kind=ERROR, tensors={}, required_header={"message": str}),
}


# ---- activations ---------------------------------------------------------------------------------
def pack_acts(
    acts: torch.Tensor, lengths: torch.Tensor, codec: str, outlier_channels: int = 8
) -> dict[str, torch.Tensor]:
    """Quantise packed activations ``[N, L, d]`` with ``codec`` into frame tensors (``acts.*``, ``lengths``).

    ``outlier_channels`` is the number of channels per layer that ``int8o`` / ``int4o`` keep in fp16.
    """
    parts = codecs.encode(acts, codec, outlier_channels=outlier_channels)
    out = {f"acts.{k}": v.contiguous() for k, v in parts.items()}
    out["lengths"] = lengths.to(torch.int64).contiguous()
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


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            name = obj["__tensor__"]
            if name not in tensors:
                raise FrameError(f"state skeleton names a missing tensor {name!r}")
            return tensors[name]
        if "__items__" in obj:
            items = obj["__items__"]
            if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
                raise FrameError("state skeleton has a malformed dict")
            return {k: _unflatten(v, tensors) for k, v in items}
        raise FrameError("state skeleton has an untagged object")
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
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


def say_bye(client: Any, session: str | None) -> None:
    """Best effort: tell the server a session ends (it may already be gone)."""
    if session is None:
        return
    try:
        client.call(encode_frame(Frame(kind=BYE, header={"session": session})))
    except Exception:  # noqa: BLE001 - a closed or unreachable server needs no goodbye
        pass


def error_frame(message: str, **header: Any) -> Frame:
    return Frame(kind=ERROR, header={"message": message, **header})


def json_safe(obj: Any) -> Any:
    """Round-trip through JSON to make sure a header is plain data."""
    return json.loads(json.dumps(obj))
