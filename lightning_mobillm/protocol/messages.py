"""What device and server say to each other: frame kinds, their schemas, and (de)serialisation helpers.

This is the contract between the two sides, so it lives outside ``server/``: the device imports it
without loading any server runtime (no session, store, engine or server role).

Every frame a server accepts is listed in :data:`REQUEST_SCHEMAS`; a frame carrying any tensor not
listed for its kind, or any header key its schema does not name, is refused. In particular no request
kind may carry text or token ids, and the label-free kinds (used by PAE and Fed MobiLLM) may not carry
labels, in their tensors or their header. Every frame after a hello presents the session's secret. How activations and nested states
are packed into a frame's tensors is in :mod:`lightning_mobillm.protocol.packing`.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from lightning_mobillm.transport.frames import Frame, FrameError, FrameSchema, TensorRule

__all__ = [
    "BYE", "ERROR", "EVAL", "FED_DOWNLOAD", "FED_HELLO", "FED_REPLY_SCHEMAS", "FED_REQUEST_SCHEMAS", "FED_STATS",
    "FED_UPLOAD", "GET_STATE", "HELLO", "OK", "PROTOCOL_VERSION", "READY_PREFIX", "REPLY_SCHEMAS",
    "REQUEST_SCHEMAS", "SET_STATE", "SPLIT_EVAL", "SPLIT_HELLO", "SPLIT_REPLY_SCHEMAS", "SPLIT_REQUEST_SCHEMAS",
    "SPLIT_TRAIN", "TRAIN", "TRAIN_CACHED", "TRAIN_TARGET", "check_protocol", "error_frame", "json_safe",
]

# ---- request kinds -------------------------------------------------------------------------------
HELLO, TRAIN, EVAL, GET_STATE, SET_STATE, BYE = "hello", "train", "eval", "get_state", "set_state", "bye"
#: PAE / Fed: activations + a device-defined target; the schema has no place for labels.
TRAIN_TARGET = "train_target"
#: a training step on samples the server already holds (activation cache): sample keys only.
TRAIN_CACHED = "train_cached"
#: the split-learning baseline's server role (``serve --role split``)
SPLIT_HELLO, SPLIT_TRAIN, SPLIT_EVAL = "split_hello", "split_train", "split_eval"
#: Fed MobiLLM's shared-model server role (``serve --role fed``): a device uploads its shard once and
#: is answered with acknowledgements only; it downloads its evaluation parts when it wants to evaluate
FED_HELLO, FED_UPLOAD, FED_DOWNLOAD, FED_STATS = "fed_hello", "fed_upload", "fed_download", "fed_stats"
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
#: every frame after a hello names its session and presents the secret the hello's reply gave
_SESSION = {"session": str, "secret": str}
#: a training frame from a device that uses an activation cache names its samples (opaque keyed hashes)
_KEYS = {"keys": list}

#: the version of this contract; a hello from another version is refused with both numbers named
PROTOCOL_VERSION = 3
#: the line a server process prints on stdout once it accepts calls: ``MOBILLM_SERVER_READY port=N pid=N``
READY_PREFIX = "MOBILLM_SERVER_READY"

REQUEST_SCHEMAS: dict[str, FrameSchema] = {
    HELLO: FrameSchema(
        kind=HELLO,
        tensors={},
        required_header={
            "protocol": int,
            "device_id": str,
            "run_id": str,
            "module": str,
            "side": dict,
            "hparams": dict,
            "tap_spec": dict,
            "num_outputs": int,
            "total_steps": int,
            "codec": str,
        },
        optional_header={"num_classes": int, "backbone": dict, "resume": bool, "cache": dict},
    ),
    TRAIN: FrameSchema(
        kind=TRAIN,
        tensors={**_ACTS, "labels": TensorRule(dtypes=(torch.int64,), ndim=1)},
        required_tensors=("acts.q", "lengths", "labels"),
        required_header={**_SESSION, "step": int, "codec": str},
        optional_header=_KEYS,
    ),
    TRAIN_TARGET: FrameSchema(
        kind=TRAIN_TARGET,
        tensors={**_ACTS, "targets": TensorRule(dtypes=(torch.float32,), ndim=2)},
        required_tensors=("acts.q", "lengths", "targets"),
        required_header={**_SESSION, "step": int, "codec": str},
        optional_header=_KEYS,
    ),
    TRAIN_CACHED: FrameSchema(
        kind=TRAIN_CACHED,
        tensors={},
        required_header={**_SESSION, "step": int, **_KEYS},
    ),
    EVAL: FrameSchema(
        kind=EVAL,
        tensors=dict(_ACTS),
        required_tensors=("acts.q", "lengths"),
        required_header={**_SESSION, "codec": str},
    ),
    GET_STATE: FrameSchema(kind=GET_STATE, tensors={}, required_header=dict(_SESSION),
                           optional_header={"model_only": bool}),
    SET_STATE: FrameSchema(
        kind=SET_STATE,
        tensors={"state": TensorRule(dtypes=(torch.uint8,), ndim=1)},
        required_tensors=("state",),
        required_header={**_SESSION, "skeleton": dict},
    ),
    BYE: FrameSchema(kind=BYE, tensors={}, required_header=dict(_SESSION)),
}

#: replies are read by the device from the server it chose: their headers may grow without a new version
REPLY_SCHEMAS: dict[str, FrameSchema] = {
    OK: FrameSchema(
        kind=OK,
        tensors={
            "logits": TensorRule(dtypes=(torch.float32,), ndim=2),
            "state": TensorRule(dtypes=(torch.uint8,), ndim=1),
        },
        allow_header_extra=True,
    ),
    ERROR: FrameSchema(kind=ERROR, tensors={}, required_header={"message": str}, allow_header_extra=True),
}


SPLIT_REQUEST_SCHEMAS: dict[str, FrameSchema] = {
    SPLIT_HELLO: FrameSchema(
        kind=SPLIT_HELLO,
        tensors={},
        required_header={"protocol": int, "device_id": str, "run_id": str, "backbone": dict, "split_layer": int,
                         "num_classes": int, "total_steps": int, "hparams": dict},
        optional_header={"resume": bool},
    ),
    SPLIT_TRAIN: FrameSchema(
        kind=SPLIT_TRAIN,
        tensors={**_ACTS, "labels": TensorRule(dtypes=(torch.int64,), ndim=1)},
        required_tensors=("acts.q", "lengths", "labels"),
        required_header={**_SESSION, "step": int, "codec": str, "codec_down": str},
    ),
    SPLIT_EVAL: FrameSchema(
        kind=SPLIT_EVAL,
        tensors=dict(_ACTS),
        required_tensors=("acts.q", "lengths"),
        required_header={**_SESSION, "codec": str},
    ),
    BYE: REQUEST_SCHEMAS[BYE],
}

SPLIT_REPLY_SCHEMAS: dict[str, FrameSchema] = {
    OK: FrameSchema(kind=OK, tensors={**_ACTS, "logits": TensorRule(dtypes=(torch.float32,), ndim=2)},
                    allow_header_extra=True),
    ERROR: REPLY_SCHEMAS[ERROR],
}


#: an upload's activations: a codec's parts of ``[N, K, d_b]`` (one loss-token vector per aligned layer and
#: sample, so no ``lengths``)
_FED_ACTS = {name: rule for name, rule in _ACTS.items() if name != "lengths"}

#: Fed MobiLLM's requests. No kind has a place for labels, token ids or text: an upload carries the aligned
#: taps, the device-defined targets and opaque sample keys; the header holds only the keys named here.
FED_REQUEST_SCHEMAS: dict[str, FrameSchema] = {
    FED_HELLO: FrameSchema(
        kind=FED_HELLO,
        tensors={},
        required_header={"protocol": int, "device_id": str, "run_id": str, "backbone_type": str, "k": int,
                         "width": int, "out_dim": int, "target_space": str, "codec": str},
        optional_header={"resume": bool},
    ),
    FED_UPLOAD: FrameSchema(
        kind=FED_UPLOAD,
        tensors={**_FED_ACTS, "targets": TensorRule(dtypes=(torch.float32,), ndim=2)},
        required_tensors=("acts.q", "targets"),
        required_header={**_SESSION, "seq": int, "codec": str, **_KEYS},
    ),
    FED_DOWNLOAD: FrameSchema(kind=FED_DOWNLOAD, tensors={}, required_header=dict(_SESSION)),
    FED_STATS: FrameSchema(kind=FED_STATS, tensors={}, required_header=dict(_SESSION)),
    BYE: REQUEST_SCHEMAS[BYE],
}

#: Fed MobiLLM's replies: acknowledgements, statistics, and a download's packed ``state``
FED_REPLY_SCHEMAS: dict[str, FrameSchema] = {
    OK: FrameSchema(kind=OK, tensors={"state": TensorRule(dtypes=(torch.uint8,), ndim=1)}, allow_header_extra=True),
    ERROR: REPLY_SCHEMAS[ERROR],
}


def check_protocol(header: dict[str, Any]) -> None:
    """Refuse a hello spoken in another version of this contract, naming both versions."""
    if header.get("protocol") != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {header.get('protocol')!r} is not this server's {PROTOCOL_VERSION}; "
                         "install the same lightning_mobillm version on the device and the server")


def error_frame(message: str, **header: Any) -> Frame:
    return Frame(kind=ERROR, header={"message": message, **header})


def json_safe(obj: Any) -> Any:
    """Round-trip through JSON to make sure a header is plain data."""
    return json.loads(json.dumps(obj))
