"""Reliability of a server shared by mutually untrusted devices: fuzzed frames, unauthorised attempts, faults
and load, each measured against the real server code and written to one JSON file.

    python benchmarks/reliability.py --out benchmarks/results/reliability.json            # everything, full size
    python benchmarks/reliability.py --sections fuzz --fuzz-frames 300 --fuzz-grpc-frames 0 --out /tmp/r.json
    python benchmarks/reliability.py --sections load --load-devices 16 --load-seconds 60 --out /tmp/load.json

Sections (``--sections``, comma separated; each has flags that size it):

* ``fuzz``: structure-aware mutations of valid frames of every request kind (hello, train, train_target,
  train_cached, eval, get_state, set_state, bye) drawn with ``hypothesis``: header keys deleted, added
  (``labels``, ``input_ids``, ``text`` smuggled into label-free sessions' headers), retyped; tensor dtypes,
  shapes, ranks, extra tensors, NaN/inf; lying safetensors offsets and lengths, truncation, bit flips; wrong,
  stale and foreign secrets and identities; out-of-order, replayed and retried steps; oversized counts;
  malformed nested states in ``set_state``; out-of-bounds hellos. Three sessions stay open throughout
  (a labelled one, a label-free PAE one with an activation cache, and a labelled cached one of a second
  identity). Before every mutated frame the world is snapshotted (every session's ``get_state``: model,
  optimizer, scheduler and step, tensor by tensor; in-process also the secret, the restore window, the
  stored retry reply's step, the cache's keys and the open sessions) and compared after it; after every
  frame the mutated session must still train the next valid frame. An independent reference checker
  (:class:`Oracle`: its own frame, safetensors and nested-state parsers, and the contract's rules) says
  whether each mutated frame is valid, so an accepted frame is classified as valid (e.g. a bit flip inside
  int8 activations, a retry), equivalent (an accepted ``set_state`` whose result is what was sent, cast to
  the session's dtypes) or invalid (a finding). Run against an in-process ``SideServer`` and a slice through a
  real ``serve`` process over gRPC with a tokens file. The split role's kinds are not fuzzed here.
  ``tests/test_reliability_fuzz.py`` runs derandomized slices of it in the suite.
* ``auth``: unauthorised attempts over a real ``serve`` process with a tokens file on loopback: no token,
  a wrong token, a revoked token (its line deleted while serving), a stolen session string without its
  secret, a stolen session and secret from another identity, a foreign cache token, replayed hellos (from
  another identity; from the same identity, which is a reconnect and must revoke the old secret), a
  replayed ``set_state`` after training resumed, replayed older training frames; the victim's state is
  compared tensor by tensor after each.
* ``faults``: kills of the server and the device at named points; measured only once the fault hook
  (``lightning_mobillm/faults.py``) exists, otherwise reported as not measured.
* ``load``: a real ``serve`` process with a tokens file; ``--load-devices`` device processes (each its own
  identity and token, sending real-size valid training frames of the quickstart recipe's shape through
  ``ServerClient`` in a loop, with evals and state pulls), while ``--load-slow`` unauthenticated clients hold
  calls open whose request body never finishes (and a few TCP connections that send nothing). The server's
  RSS is sampled with psutil; every legitimate call's latency and failure is counted.

The JSON holds the command, versions, the machine, each section's numbers, ``targets_met`` and ``notes``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


# =========================================================================================== common
def versions() -> dict[str, str]:
    import grpc

    out = {"python": platform.python_version(), "torch": torch.__version__, "grpcio": grpc.__version__}
    for name in ("hypothesis", "safetensors", "lightning", "psutil"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


def machine() -> dict[str, Any]:
    import psutil

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load1_at_start": os.getloadavg()[0]}


def leaves(obj: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a nested state by its path (tensors, numbers, strings, None)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(leaves(value, f"{path}/{key}"))
        return out or {path: {}}
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, value in enumerate(obj):
            out.update(leaves(value, f"{path}[{i}]"))
        return out or {path: []}
    return {path: obj}


def state_diff(a: Any, b: Any, limit: int = 6) -> list[str]:
    """Paths where two states differ (keys, tensor dtype/shape/bits, values): empty when identical."""
    la, lb = leaves(a), leaves(b)
    out = [f"only in one: {p}" for p in sorted(la.keys() ^ lb.keys())][:limit]
    for p, x in la.items():
        if len(out) >= limit:
            break
        if p not in lb:
            continue
        y = lb[p]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y)):
                out.append(p)
        elif type(x) is not type(y) or x != y:
            out.append(p)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ============================================================== the wire, parsed independently (oracle)

class NoChoice(Exception):
    """A mutation drew from an empty set of options (nothing of that kind in this frame)."""

class Invalid(Exception):
    """The reference checker's verdict on a frame that breaks the contract (with the reason)."""


MAGIC, VERSION, PREAMBLE = b"MLLM", 1, struct.Struct(">4sBI")
MAX_HEADER_BYTES = 65536  # decode_frame's header bound (the server uses the default)
NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # activation-cache sample keys (server/cache.py)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "U16": (torch.uint16, 2), "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}


def _no_constant(name: str) -> Any:
    raise Invalid(f"JSON holds the non-standard constant {name}")


def parse_safetensors(body: bytes) -> dict[str, torch.Tensor]:
    """A strict safetensors reader of our own: 8-byte length, JSON table, offsets that tile the data exactly."""
    if len(body) < 8:
        raise Invalid("tensor body shorter than its 8-byte table length")
    (n,) = struct.unpack_from("<Q", body, 0)
    if n > len(body) - 8:
        raise Invalid("safetensors table length runs past the body")
    try:
        table = json.loads(bytes(body[8:8 + n]).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Invalid("safetensors table is not UTF-8 JSON") from None
    if not isinstance(table, dict):
        raise Invalid("safetensors table is not an object")
    data = memoryview(body)[8 + n:]
    spans = []
    for name, entry in table.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise Invalid("safetensors __metadata__ is not a string map")
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise Invalid(f"safetensors entry {name!r} lacks dtype/shape/data_offsets")
        dt, shape, off = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dt not in ST_DTYPES:
            raise Invalid(f"safetensors dtype {dt!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise Invalid("safetensors shape is not a list of non-negative ints")
        if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int and o >= 0 for o in off)):
            raise Invalid("safetensors data_offsets malformed")
        dtype, size = ST_DTYPES[dt]
        if off[1] < off[0] or off[1] - off[0] != math.prod(shape) * size:
            raise Invalid(f"safetensors offsets of {name!r} do not hold its dtype x shape")
        spans.append((off[0], off[1], name, dtype, shape))
    spans.sort(key=lambda s: (s[0], s[1]))
    pos = 0
    for b, e, *_ in spans:
        if b != pos:
            raise Invalid("safetensors offsets overlap or leave a gap")
        pos = e
    if pos != len(data):
        raise Invalid("safetensors data not exactly covered by the offsets")
    out = {}
    for b, e, name, dtype, shape in spans:
        buf = bytearray(data[b:e])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def parse_frame(data: bytes, max_bytes: int) -> tuple[dict, bytes]:
    if len(data) > max_bytes:
        raise Invalid(f"frame of {len(data)} bytes over max_frame_mb")
    if len(data) < PREAMBLE.size:
        raise Invalid("shorter than the preamble")
    magic, version, hl = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        raise Invalid("bad magic or version")
    if hl > MAX_HEADER_BYTES or PREAMBLE.size + hl > len(data):
        raise Invalid("header length lies")
    try:
        header = json.loads(data[PREAMBLE.size:PREAMBLE.size + hl].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Invalid("header is not UTF-8 JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str) or not header["kind"]:
        raise Invalid("header is not an object with a kind")
    return header, data[PREAMBLE.size + hl:]


def json_type_ok(value: Any, allowed: Any) -> bool:
    types = allowed if isinstance(allowed, tuple) else (allowed,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def check_schema(header: dict, tensors: dict[str, torch.Tensor], schemas: dict) -> None:
    schema = schemas.get(header["kind"])
    if schema is None:
        raise Invalid(f"unknown kind {header['kind']!r}")
    named = {**schema.required_header, **schema.optional_header}
    extra = set(header) - set(named) - {"kind"}
    if extra:
        raise Invalid(f"header key(s) not in the schema: {sorted(extra)[:3]}")
    for key, allowed in named.items():
        if key in schema.required_header and key not in header:
            raise Invalid(f"missing header key {key!r}")
        if key in header and not json_type_ok(header[key], allowed):
            raise Invalid(f"header key {key!r} of the wrong type")
    unknown = set(tensors) - set(schema.tensors)
    if unknown:
        raise Invalid(f"tensor(s) not in the schema: {sorted(unknown)[:3]}")
    for name in schema.required_tensors:
        if name not in tensors:
            raise Invalid(f"missing tensor {name!r}")
    for name, t in tensors.items():
        rule = schema.tensors[name]
        if t.dtype not in rule.dtypes or (rule.ndim is not None and t.ndim != rule.ndim):
            raise Invalid(f"tensor {name!r} of the wrong dtype or rank")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.float()).all()):
            raise Invalid(f"tensor {name!r} not finite")


def frame_digest(data: bytes) -> bytes:
    """What makes two training frames the same frame (a retry): the header without the secret, and the body."""
    (hl,) = struct.unpack_from(">I", data, 5)
    header = json.loads(data[PREAMBLE.size:PREAMBLE.size + hl])
    header.pop("secret", None)
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(data[PREAMBLE.size + hl:])
    return h.digest()


def raw_encode(header: dict, tensors: dict[str, torch.Tensor] | None = None, *, body: bytes | None = None,
               indent: int | None = None, sort_keys: bool = False) -> bytes:
    """A frame as bytes, without encode_frame's checks (no kind is added, the header may be anything JSON)."""
    from safetensors.torch import save

    hb = json.dumps(header, separators=None if indent else (",", ":"), indent=indent, sort_keys=sort_keys).encode()
    if body is None:
        body = save({k: v.detach().contiguous() for k, v in (tensors or {}).items()})
    return PREAMBLE.pack(MAGIC, VERSION, len(hb)) + hb + body


def split_frame(data: bytes) -> tuple[int, int, int]:
    """Offsets of a well-formed frame: header start, body start, safetensors data start."""
    (hl,) = struct.unpack_from(">I", data, 5)
    body = PREAMBLE.size + hl
    (n,) = struct.unpack_from("<Q", data, body)
    return PREAMBLE.size, body, body + 8 + n


# ====================================================================================== the world
#: the fuzz server's bounds: small, so that out-of-bounds hellos and frames are cheap to make
FUZZ_SERVER = dict(device="cpu", max_taps=8, max_width=64, max_outputs=32, max_session_mb=0.05,
                   max_tokens_per_frame=256, max_frame_mb=1, cache_memory_mb=1.0, cache_disk_mb=4.0,
                   checkpoint_every_n_steps=0, max_sessions=16, max_sessions_per_identity=4, session_idle_s=1e9,
                   threads=1)
TAPS, WIDTH, CLASSES, PAE_OUTPUTS, BATCH, TOTAL_STEPS = 3, 16, 3, 16, 4, 100_000
IDENTITIES = ("alice", "bob", "mallory")
SMUGGLED = ("labels", "label", "input_ids", "token_ids", "text", "prompt", "attention_mask", "targets", "y")


@dataclass
class SessionSpec:
    name: str
    identity: str
    run_id: str
    module: str  # side_tuning | additive_adapter
    cache: bool
    tokens: int  # tokens per sample

    @property
    def label_free(self) -> bool:
        return self.module == "additive_adapter"

    @property
    def num_outputs(self) -> int:
        return PAE_OUTPUTS if self.label_free else CLASSES

    @property
    def natural(self) -> str:
        return "train_target" if self.label_free else "train"


SPECS = (SessionSpec("lab", "alice", "lab", "side_tuning", False, 3),
         SessionSpec("pae", "alice", "pae", "additive_adapter", True, 1),
         SessionSpec("bobc", "bob", "bobc", "side_tuning", True, 1))


@dataclass
class Sess:
    """What the fuzzer believes about one session (the oracle's model of the server)."""

    spec: SessionSpec
    key: str = ""
    identity: str = ""
    secret: str = ""
    stale: list[str] = field(default_factory=list)
    step: int = 0
    last: tuple[int, bytes, bytes] | None = None  # step, digest, reply bytes
    restorable: bool = True
    cached: set[str] = field(default_factory=set)
    cache_token: str | None = None
    history: list[bytes] = field(default_factory=list)  # accepted training frames (for replays)
    counter: int = 0
    open: bool = False


def module_for(spec: SessionSpec):
    from lightning_mobillm.modules import AdditiveAdapterModule, SideTuningModule
    from lightning_mobillm.specs import BackboneConfig

    bb = BackboneConfig(source="unused")
    if spec.label_free:
        return AdditiveAdapterModule(backbone=bb, num_classes=CLASSES, seed=0)
    return SideTuningModule(backbone=bb, num_classes=CLASSES, lr=1e-2, dropout=0.0, seed=0)


def hello_header(spec: SessionSpec, cache_token: str | None = None) -> dict:
    from lightning_mobillm import protocol as P

    m = module_for(spec)
    h = {"kind": "hello", "protocol": P.PROTOCOL_VERSION, "device_id": "dev", "run_id": spec.run_id,
         "module": spec.module, "side": m.side_config.to_dict(), "hparams": P.json_safe(m.server_hparams()),
         "tap_spec": {"layers": list(range(TAPS)), "hidden_size": WIDTH, "arch": "llama", "is_decoder": True},
         "num_classes": CLASSES, "num_outputs": spec.num_outputs, "total_steps": TOTAL_STEPS, "codec": "int8",
         "backbone": {"arch": "llama", "name": "tiny", "hidden_size": WIDTH, "num_layers": TAPS, "digest": "0" * 64}}
    if spec.cache:
        h["cache"] = {"token": cache_token} if cache_token else {}
    return h


# ---- the contract's rules for a hello's nested objects (types and ranges the docs and modules name)
HPARAM_RULES: dict[str, Any] = {
    "lr": ("num", 0.0, 10.0), "weight_decay": ("num", 0.0, 10.0), "warmup_ratio": ("num", 0.0, 1.0),
    "min_lr_ratio": ("num", 0.0, 1.0), "label_smoothing": ("num", 0.0, 0.999), "betas": ("betas",),
    "loss": ("enum", ("mse", "cosine", "ce")),
}
SIDE_RULES: dict[str, Any] = {
    "trunk": ("enum", ("parallel_adapters",)), "head": ("enum", ("pooled_linear",)), "reduction": ("int", 1, 4096),
    "normalize_taps": ("bool",), "activation": ("enum", ("gelu", "relu", "silu", "tanh")),
    "final_norm": ("enum", ("layernorm", "rmsnorm", "none")), "pool": ("enum", ("last", "mean")),
    "dropout": ("num", 0.0, 0.999),
}
BACKBONE_KEYS = {"arch": str, "name": str, "hidden_size": int, "num_layers": int, "is_decoder": bool, "digest": str}


def _rule_ok(value: Any, rule: tuple) -> bool | None:
    kind = rule[0]
    if kind == "num":
        return json_type_ok(value, float) and math.isfinite(value) and rule[1] <= value <= rule[2]
    if kind == "int":
        return type(value) is int and rule[1] <= value <= rule[2]
    if kind == "bool":
        return type(value) is bool
    if kind == "betas":
        return (isinstance(value, list) and len(value) == 2
                and all(json_type_ok(b, float) and 0 <= b < 1 for b in value))
    if kind == "enum":
        return isinstance(value, str) and (value in rule[1] or None)  # another string: undecided
    return None


def check_nested(what: str, obj: Any, rules: dict[str, Any], base: dict) -> bool | None:
    """True if every key of ``obj`` is known with a value in range, False if one is wrong, None if undecided
    (a key of the original hello deleted, or a string the rules do not list)."""
    if not isinstance(obj, dict):
        raise Invalid(f"hello {what} is not an object")
    verdict: bool | None = True
    for key, value in obj.items():
        if key not in base:
            raise Invalid(f"hello {what} has the unknown key {key!r}")
        rule = rules.get(key)
        if rule is None:
            if type(value) is not type(base[key]):
                raise Invalid(f"hello {what}.{key} of another type")
            continue
        ok = _rule_ok(value, rule)
        if ok is False:
            raise Invalid(f"hello {what}.{key}={str(value)[:40]} out of range or of another type")
        if ok is None:
            verdict = None
    if set(base) - set(obj):
        verdict = None  # a default takes the deleted key's place: undecided
    return verdict


#: what the reference checker calls valid, in short (for readers of the JSON)
ORACLE_RULES = [
    "frame: preamble, UTF-8 JSON header without NaN/Infinity, within max_frame_mb; safetensors whose offsets tile "
    "the data exactly (own parser); header keys exactly those the kind's schema names, with JSON types",
    "tensors: only the schema's names, dtypes and ranks; finite; acts.* exactly the codec's parts, decoding to "
    "finite [N, taps, width]; N <= max_tokens_per_frame; lengths >= 1 summing to N; labels in range; targets "
    "[B, outputs]",
    "session frames: an open session of this transport identity with its current secret; training frames at the "
    "next step, or the very same frame as the last applied step (a retry); keys of [A-Za-z0-9_-]{1,128}, one per "
    "sample, only with a cache; set_state only between a hello and the next step",
    "set_state: the current state's structure, keys, tensor dtypes and shapes, value types; finite, weights within "
    "1e6; step an int in [0, 2**63); optimizer and scheduler may be left out; lr and weight_decay in [0, 10], eps in "
    "(0, 1], betas in [0, 1), Adam's step and exp_avg_sq >= 0, other numbers >= 0",
    "hello: protocol 3; names of [A-Za-z0-9_.@-]{1,64}; tap_spec exactly layers/hidden_size/arch/is_decoder with "
    "their types; within max_taps, max_width, max_outputs, max_session_mb and the session quotas; backbone and "
    "cache objects with known keys and types; hparams/side with the original keys, types and sane ranges (a deleted "
    "key is undecided: a default takes its place); a reconnect keeps module, taps and outputs",
    "a frame the oracle calls valid that the server refuses is reported, not counted as a failure (e.g. targets of "
    "1e38 whose loss overflows); an accepted set_state whose only fault is a dtype (cast on load) or an unused "
    "skeleton key, and whose result is what was sent, counts as 'accepted_equivalent'",
]


@dataclass
class Verdict:
    valid: bool | None  # None: undecided (the contract does not say)
    reason: str = ""
    effect: str = ""  # train | retry | missing | none | eval | set_state | bye | reconnect | new_session
    session: Sess | None = None
    keys: list[str] | None = None
    state: Any = None  # the state a set_state carries


class Oracle:
    """Says whether a frame is valid for the world the fuzzer believes in, without the server's code: its own
    frame, safetensors and state parsers; the schemas of ``protocol`` (data) and the rules of the docs."""

    def __init__(self, fuzzer: Fuzzer) -> None:
        from lightning_mobillm import protocol as P
        from lightning_mobillm.server_config import ServerConfig

        self.fz = fuzzer
        self.cfg = ServerConfig(**FUZZ_SERVER)
        self.schemas = P.REQUEST_SCHEMAS

    def judge(self, data: bytes, identity: str) -> Verdict:
        try:
            if self.fz.transport == "grpc" and identity not in IDENTITIES:
                raise Invalid("no device token")
            header, body = parse_frame(data, self.cfg.max_frame_bytes)
            tensors = parse_safetensors(body)
            check_schema(header, tensors, self.schemas)
            if header["kind"] == "hello":
                return self._hello(header, identity)
            sess = self.fz.by_key.get(header["session"])
            if sess is None or not sess.open or sess.identity != identity or header["secret"] != sess.secret:
                raise Invalid("no such session for this identity and secret")
            return getattr(self, f"_{header['kind']}")(sess, header, tensors, data)
        except Invalid as err:
            return Verdict(False, str(err))

    # ---- kinds -------------------------------------------------------------------------------------
    def _step(self, sess: Sess, header: dict, data: bytes) -> Verdict | None:
        step = header["step"]
        if sess.last is not None and sess.last[0] == step:
            if frame_digest(data) == sess.last[1]:
                return Verdict(True, "a retry of the applied step", "retry", sess)
            raise Invalid("another frame under an applied step")
        if step != sess.step:
            raise Invalid(f"step {step} out of order (expected {sess.step})")
        return None

    def _acts(self, sess: Sess, header: dict, tensors: dict) -> tuple[int, torch.Tensor]:
        from lightning_mobillm.transport import codecs

        q = tensors["acts.q"]
        n, layers, _ = q.shape
        if n > self.cfg.max_tokens_per_frame:
            raise Invalid("more tokens than max_tokens_per_frame")
        if layers != TAPS:
            raise Invalid("acts of another tap count")
        codec = header["codec"]
        if codec not in codecs.CODECS:
            raise Invalid(f"unknown codec {codec[:20]!r}")
        parts = {k.removeprefix("acts."): v for k, v in tensors.items() if k.startswith("acts.")}
        try:
            acts = codecs.decode(parts, codec)  # the codec's documented parts, dtypes, shapes and ranges
        except ValueError as err:
            raise Invalid(f"acts do not decode: {str(err)[:80]}") from None
        if acts.shape[-1] != WIDTH:
            raise Invalid("acts of another width")
        if not bool(torch.isfinite(acts).all()):
            raise Invalid("acts not finite after decoding")
        lengths = tensors["lengths"]
        if lengths.numel() == 0 or bool((lengths < 1).any()) or int(lengths.sum()) != n:
            raise Invalid("lengths do not sum to N")
        return n, lengths

    def _keys(self, sess: Sess, header: dict, batch: int | None) -> list[str] | None:
        if "keys" not in header:
            return None
        keys = header["keys"]
        if not sess.spec.cache:
            raise Invalid("keys in a session without a cache")
        if not all(isinstance(k, str) and KEY_RE.fullmatch(k) for k in keys):
            raise Invalid("a cache key that is not 1-128 chars of [A-Za-z0-9_-]")
        if len(keys) > self.cfg.max_tokens_per_frame:
            raise Invalid("more keys than max_tokens_per_frame")
        if batch is not None and len(keys) != batch:
            raise Invalid("keys do not match the batch")
        return keys

    def _train_like(self, sess: Sess, header: dict, tensors: dict, data: bytes) -> Verdict:
        kind = header["kind"]
        if (kind == "train") == sess.spec.label_free:
            raise Invalid(f"{kind} on a {'label-free' if sess.spec.label_free else 'labelled'} session")
        if (retry := self._step(sess, header, data)) is not None:
            return retry
        n, lengths = self._acts(sess, header, tensors)
        b = int(lengths.numel())
        if kind == "train":
            y = tensors["labels"]
            if y.shape != lengths.shape or bool((y < 0).any()) or bool((y >= sess.spec.num_outputs).any()):
                raise Invalid("labels of another shape or out of range")
        else:
            if tuple(tensors["targets"].shape) != (b, sess.spec.num_outputs):
                raise Invalid("targets of another shape")
        keys = self._keys(sess, header, b)
        if keys is not None and n != b:
            raise Invalid("a cached session needs one token per sample")
        return Verdict(True, "", "train", sess, keys=keys)

    _train = _train_like
    _train_target = _train_like

    def _train_cached(self, sess: Sess, header: dict, tensors: dict, data: bytes) -> Verdict:
        if (retry := self._step(sess, header, data)) is not None:
            return retry
        keys = self._keys(sess, header, None)
        if not keys:
            raise Invalid("train_cached without keys")
        if all(k in sess.cached for k in keys):
            return Verdict(True, "", "train", sess)
        return Verdict(True, "keys not cached: a 'missing' reply", "missing", sess)

    def _eval(self, sess: Sess, header: dict, tensors: dict, data: bytes) -> Verdict:
        self._acts(sess, header, tensors)
        return Verdict(True, "", "eval", sess)

    def _get_state(self, sess: Sess, header: dict, tensors: dict, data: bytes) -> Verdict:
        return Verdict(True, "", "none", sess)

    def _bye(self, sess: Sess, header: dict, tensors: dict, data: bytes) -> Verdict:
        return Verdict(True, "", "bye", sess)

    def _set_state(self, sess: Sess, header: dict, tensors: dict, data: bytes) -> Verdict:
        if not sess.restorable:
            raise Invalid("set_state after training resumed (stale)")
        state = unflatten_state(header["skeleton"], tensors["state"])
        check_state(state, self.fz.reference_state(sess))
        return Verdict(True, "", "set_state", sess, state=state)

    def _hello(self, h: dict, identity: str) -> Verdict:
        from lightning_mobillm import protocol as P
        from lightning_mobillm.server.runtime import MODULE_REGISTRY

        if h["protocol"] != P.PROTOCOL_VERSION:
            raise Invalid("another protocol version")
        if identity == "" and not NAME_RE.fullmatch(h["device_id"]):
            raise Invalid("device_id not a name")
        if not NAME_RE.fullmatch(h["run_id"]):
            raise Invalid("run_id not a name")
        owner = identity or "device:" + h["device_id"]
        key = f"{owner}/{h['run_id']}"
        spec = h["tap_spec"]
        if not isinstance(spec, dict) or set(spec) != {"layers", "hidden_size", "arch", "is_decoder"}:
            raise Invalid("tap_spec keys are not layers/hidden_size/arch/is_decoder")
        layers, width = spec["layers"], spec["hidden_size"]
        if not (isinstance(layers, list) and all(type(i) is int and i >= 0 for i in layers) and type(width) is int
                and isinstance(spec["arch"], str) and type(spec["is_decoder"]) is bool):
            raise Invalid("tap_spec value of another type")
        c = self.cfg
        if not (1 <= len(layers) <= c.max_taps and 1 <= width <= c.max_width and 1 <= h["num_outputs"] <= c.max_outputs
                and 1 <= h["total_steps"] <= 10**9):
            raise Invalid("hello out of bounds (taps, width, outputs or total_steps)")
        if not 2 <= h.get("num_classes", h["num_outputs"]) <= c.max_outputs:
            raise Invalid("num_classes out of range")
        for k, v in h.get("backbone", {}).items():
            if k not in BACKBONE_KEYS or not json_type_ok(v, BACKBONE_KEYS[k]) or isinstance(v, float) \
                    or (isinstance(v, str) and len(v) > 256):
                raise Invalid("backbone identity with an unknown key, another type or a long string")
        if "cache" in h:
            for k, v in h["cache"].items():
                if k == "token" and isinstance(v, str) or k == "memory_limit_mb" and json_type_ok(v, float) and v >= 0:
                    continue
                raise Invalid("cache request with an unknown key, another type or a negative limit")
        if h["module"] not in MODULE_REGISTRY:
            raise Invalid("unregistered module")
        base = hello_header(SPECS[0] if h["module"] == "side_tuning" else SPECS[1])
        verdict = True
        for what, rules in (("hparams", HPARAM_RULES), ("side", SIDE_RULES)):
            ok = check_nested(what, h[what], rules, base[what])
            verdict = None if ok is None else verdict
        live = next((s for s in self.fz.all_sessions() if s.open and s.key == key), None)
        if live is not None:
            if (h["module"], layers, width, spec["arch"], spec["is_decoder"], h["num_outputs"]) != (
                    live.spec.module, list(range(TAPS)), WIDTH, "llama", True, live.spec.num_outputs):
                raise Invalid("a reconnect with another module, taps or outputs")
            return Verdict(verdict, "", "reconnect", live)
        if h.get("resume"):
            raise Invalid("resume without a server checkpoint")
        mine = sum(1 for s in self.fz.all_sessions() if s.open and s.key.startswith(owner + "/"))
        total = sum(1 for s in self.fz.all_sessions() if s.open)
        if mine >= c.max_sessions_per_identity or total >= c.max_sessions:
            raise Invalid("over the session quota")
        if verdict is not False and side_network_mb(h, layers, width) > c.max_session_mb:
            raise Invalid("side network over max_session_mb")
        # a new session of the same owner that names an open cache's token takes that cache over (a resumed run)
        token = h.get("cache", {}).get("token")
        moved = next((s for s in self.fz.all_sessions() if s.open and token and s.cache_token == token
                      and s.key.startswith(owner + "/")), None)
        return Verdict(verdict, "", "new_session", moved)


def side_network_mb(h: dict, layers: list[int], width: int) -> float:
    """The documented budget of a session's model: ``BYTES_PER_PARAMETER`` a parameter (weights, gradients, two
    AdamW moments and the step's undo copy)."""
    from lightning_mobillm.engine import BYTES_PER_PARAMETER
    from lightning_mobillm.server.runtime import _resolve_module_class
    from lightning_mobillm.side.config import SideConfig
    from lightning_mobillm.specs import TapSpec

    try:
        cls = _resolve_module_class(h["module"])
        with torch.device("meta"):
            m = cls.from_hparams_dict({**h["hparams"], **SideConfig.from_dict(h["side"]).module_kwargs()})
            m.build(TapSpec(layers=layers, hidden_size=width), num_classes=h.get("num_classes", h["num_outputs"]),
                    num_outputs=h["num_outputs"])
        return sum(p.numel() for p in m.parameters()) * BYTES_PER_PARAMETER / 2**20
    except Exception:  # noqa: BLE001 - what does not build is judged elsewhere
        return 0.0


def unflatten_state(skeleton: Any, blob: torch.Tensor) -> Any:
    """Our own reader of a set_state's nested state (the packing of protocol/packing.py, strictly)."""
    tensors = parse_safetensors(blob.numpy().tobytes())
    if not isinstance(skeleton, dict) or set(skeleton) != {"root"}:
        raise Invalid("state skeleton is not {'root': ...}")

    def walk(obj: Any, depth: int) -> Any:
        if depth > 64:
            raise Invalid("state skeleton nested too deeply")
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                if obj["__tensor__"] not in tensors:
                    raise Invalid("state skeleton names a missing tensor")
                return tensors[obj["__tensor__"]]
            if set(obj) == {"__items__"} and isinstance(obj["__items__"], list) and all(
                    isinstance(i, list) and len(i) == 2 and isinstance(i[0], (str, int)) and not isinstance(i[0], bool)
                    for i in obj["__items__"]):
                return {k: walk(v, depth + 1) for k, v in obj["__items__"]}
            raise Invalid("state skeleton has a malformed object")
        if isinstance(obj, list):
            return [walk(v, depth + 1) for v in obj]
        return obj

    return walk(skeleton["root"], 0)


def check_state(state: Any, ref: dict) -> None:
    """A state a session may take: the current state's structure, keys, types, shapes and dtypes; finite; in range."""
    if not isinstance(state, dict) or not {"model", "step"} <= set(state) or set(state) - set(ref):
        raise Invalid("state keys are not model, step [, optimizer, scheduler]")
    if type(state["step"]) is not int or not 0 <= state["step"] < 2**63:
        raise Invalid("state step is not an int in [0, 2**63)")
    for part in ("optimizer", "scheduler"):
        if state.get(part) is None and part in state and ref.get(part) is not None:
            raise Invalid(f"state {part} is null")
    model = state["model"]
    if not isinstance(model, dict) or set(model) != set(ref["model"]):
        raise Invalid("state model keys differ")
    for k, t in model.items():
        r = ref["model"][k]
        if not isinstance(t, torch.Tensor) or t.dtype != r.dtype or t.shape != r.shape:
            raise Invalid(f"model tensor {k} of another dtype or shape")
        if t.is_floating_point() and t.numel() and not (bool(torch.isfinite(t).all()) and float(t.abs().max()) <= 1e6):
            raise Invalid(f"model tensor {k} not finite or beyond 1e6")
    if state.get("optimizer") is not None:
        _check_optimizer(state["optimizer"], ref["optimizer"], ref["model"])
    if state.get("scheduler") is not None:
        _check_like(state["scheduler"], ref["scheduler"], "scheduler")


def _check_like(value: Any, ref: Any, path: str) -> None:
    if isinstance(ref, dict):
        if not isinstance(value, dict) or set(value) != set(ref):
            raise Invalid(f"{path} keys differ")
        for k in ref:
            _check_like(value[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, list):
        if not isinstance(value, list) or len(value) != len(ref):
            raise Invalid(f"{path} length differs")
        for i, (v, r) in enumerate(zip(value, ref)):
            _check_like(v, r, f"{path}[{i}]")
    elif isinstance(ref, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.dtype != ref.dtype or value.shape != ref.shape:
            raise Invalid(f"{path} tensor of another dtype or shape")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise Invalid(f"{path} not finite")
    elif type(value) is not type(ref):
        raise Invalid(f"{path} of another type")
    elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
        if not math.isfinite(value) or value < 0:
            raise Invalid(f"{path} negative or not finite")


def _check_optimizer(opt: Any, ref: dict, model: dict) -> None:
    if not isinstance(opt, dict) or set(opt) != {"state", "param_groups"}:
        raise Invalid("optimizer keys are not state, param_groups")
    _check_like(opt["param_groups"], ref["param_groups"], "param_groups")
    for g, r in zip(opt["param_groups"], ref["param_groups"]):
        if g["params"] != r["params"]:
            raise Invalid("param_groups params differ")
        if (any(not 0 <= b < 1 for b in g.get("betas", [])) or not 0 < g.get("eps", 1e-8) <= 1
                or not 0 <= g.get("lr", 0) <= 10 or not 0 <= g.get("weight_decay", 0) <= 10):
            raise Invalid("param_groups lr, weight_decay, betas or eps out of range")
    if not isinstance(opt["state"], dict):
        raise Invalid("optimizer state is not a map")
    for p, s in opt["state"].items():
        if p not in ref["state"]:  # a subset of the session's parameters may carry moments, nothing else
            raise Invalid("optimizer state of an unknown parameter")
        _check_like(s, ref["state"][p], f"optimizer.state.{p}")
        if bool((s["exp_avg_sq"] < 0).any()) or float(s["step"]) < 0:
            raise Invalid("negative exp_avg_sq or step in the optimizer state")


# ============================================================================================ targets
class InProcessTarget:
    """A ``SideServer`` in this process, called through its entry point ``handle(bytes, identity)``."""

    transport = "inprocess"

    def __init__(self, workdir: Path, **overrides: Any) -> None:
        from lightning_mobillm.server.runtime import SideServer
        from lightning_mobillm.server_config import ServerConfig

        self.server = SideServer(ServerConfig(**{**FUZZ_SERVER, **overrides, "workdir": str(workdir)}))

    def call(self, data: bytes, identity: str) -> bytes | str:
        return self.server.handle(data, identity)

    def extras(self, specs: list[Sess]) -> dict:
        out: dict[str, Any] = {"_open": tuple(sorted(self.server.sessions))}
        for s in specs:
            live = self.server.sessions.get(s.key)
            if live is None:
                out[s.spec.name] = None
                continue
            out[s.spec.name] = {
                "secret": live.secret, "restorable": live.restorable,
                "last_step": live.last_reply[0] if live.last_reply else None,
                "cache": tuple(sorted(live.store.keys())) if live.store is not None else None}
        return out

    def internals(self, sess: Sess) -> dict | None:
        live = self.server.sessions.get(sess.key)
        if live is None:
            return None
        return {"secret": live.secret, "step": live.step, "last": live.last_reply, "restorable": live.restorable,
                "cached": set(live.store.keys()) if live.store is not None else set()}

    def close(self) -> dict:
        return {"frames_refused_by_server": self.server.frames_refused}


def write_tokens(path: Path, identities: list[str]) -> dict[str, str]:
    """A tokens file (``<identity> <sha256>`` lines) and the tokens it names."""
    from lightning_mobillm.transport.security import hash_token, new_token

    tokens = {i: new_token() for i in identities}
    path.write_text("".join(f"{i} {hash_token(t)}\n" for i, t in tokens.items()))
    path.chmod(0o600)
    return tokens


class ServeProcess:
    """``python -m lightning_mobillm serve`` with the given ServerConfig fields, until :meth:`stop`."""

    def __init__(self, settings: dict[str, Any], log_path: Path, timeout: float = 120.0,
                 env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "lightning_mobillm", "serve"]
        for key, value in settings.items():
            if value is not None:
                argv += [f"--server.{key}", json.dumps(value) if isinstance(value, (list, bool)) else str(value)]
        env = {**{k: v for k, v in os.environ.items() if k != "MOBILLM_TOKEN"}, **(env or {})}
        self.log_path = log_path
        self._stderr = log_path.open("wb")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, start_new_session=True)
        self.argv = argv
        line: list[str] = []

        def reader() -> None:
            for raw in self.proc.stdout:
                if raw.startswith(b"MOBILLM_SERVER_READY"):
                    line.append(raw.decode())
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if not line:
            self.stop()
            raise RuntimeError(f"serve did not start: {log_path.read_text(errors='replace')[-2000:]}")
        fields = dict(kv.split("=", 1) for kv in line[0].split()[1:])
        self.port, self.pid = int(fields["port"]), int(fields["pid"])
        self.address = f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode

    def log_counts(self) -> dict[str, int]:
        text = self.log_path.read_text(errors="replace")
        return {"tracebacks": text.count("Traceback"), "refused_calls": text.count("refused a call"),
                "refused_frames": text.count("refused a frame"), "log_bytes": len(text)}


class GrpcTarget:
    """A real ``serve`` process with a tokens file on loopback; each identity calls with its own token."""

    transport = "grpc"

    def __init__(self, workdir: Path) -> None:
        from lightning_mobillm.transport.link import GrpcLink

        workdir.mkdir(parents=True, exist_ok=True)
        self.tokens = write_tokens(workdir / "tokens", list(IDENTITIES))
        settings = {**FUZZ_SERVER, "workdir": str(workdir / "server"), "tokens_file": str(workdir / "tokens"),
                    "host": "127.0.0.1", "port": 0}
        self.serve = ServeProcess(settings, workdir / "server.log")
        self.links = {i: GrpcLink(self.serve.address, t, connect_timeout=30, call_timeout=60, retries=0)
                      for i, t in self.tokens.items()}
        self.links[""] = GrpcLink(self.serve.address, None, connect_timeout=30, call_timeout=60, retries=0)

    def call(self, data: bytes, identity: str) -> bytes | str:
        from lightning_mobillm.transport.link import LinkError

        try:
            return self.links[identity].call(data)
        except LinkError as err:
            return f"transport: {err}"

    def extras(self, specs: list[Sess]) -> dict:
        return {}

    def internals(self, sess: Sess) -> dict | None:
        return None

    def close(self) -> dict:
        for link in self.links.values():
            link.close()
        alive = self.serve.alive()
        code = self.serve.stop()
        return {"server_alive_at_end": alive, "server_exit_code": code, **self.serve.log_counts()}


# ============================================================================================ the fuzzer
REQUEST_KINDS = ("hello", "train", "train_target", "train_cached", "eval", "get_state", "set_state", "bye")
TRAIN_KINDS = ("train", "train_target", "train_cached")
OTHER_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**70, -2**70, 0.5, 3.0, 1e308, -1e308,
                                 "", "x", "0" * 32, "a" * 300, [], [1], [["x"]], {}, {"a": 1})
BAD_KEYS = ("a b", "x/y", "../k", "k\n", "é", "", "k" * 129, "k.1", "k:1")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool)


@dataclass
class FrameCtx:
    kind: str
    header: dict
    tensors: dict[str, torch.Tensor]
    identity: str
    sess: Sess
    ops: list[str] = field(default_factory=list)
    byte_ops: list[Any] = field(default_factory=list)
    raw: bytes | None = None
    encode_kw: dict = field(default_factory=dict)
    state: Any = None  # set_state: the (unmutated) state packed into the frame
    base_state: Any = None
    drawn: list[str] = field(default_factory=list)  # what hypothesis drew for the mutations

    def encode(self) -> bytes:
        if self.raw is not None:
            data = self.raw
        else:
            data = raw_encode(self.header, self.tensors, **self.encode_kw)
        for op in self.byte_ops:
            try:
                data = op(data)
            except (struct.error, ValueError, KeyError, IndexError, TypeError):
                pass  # an earlier mutation left nothing this one can edit (e.g. a table cut off)
        return data


class Fuzzer:
    """Structure-aware mutations of valid frames against a target, with the world snapshotted around each."""

    def __init__(self, target: Any, *, max_examples_per_reason: int = 3) -> None:
        from lightning_mobillm import protocol as P

        self.P = P
        self.target = target
        self.transport = target.transport
        self.sessions = [Sess(spec) for spec in SPECS]
        self.oracle = Oracle(self)
        self.counts: Counter = Counter()
        self.by_mutation: dict[str, Counter] = defaultdict(Counter)
        self.by_kind: dict[str, Counter] = defaultdict(Counter)
        self.findings: dict[str, list[dict]] = defaultdict(list)
        self.notes: dict[str, list[dict]] = defaultdict(list)  # accepted-valid/undecided and refused-valid examples
        self.max_examples = max_examples_per_reason
        self.harness_errors: list[str] = []
        self._ref: dict[str, Any] = {}
        self._seq = 0
        self.last_ops: list[str] = []
        self.last_drawn: list[str] = []
        self._touched = False  # a session was (re)opened since the last snapshot
        self._ref_before: Any = None
        self.finding_counts: Counter = Counter()
        self.only_kinds: tuple[str, ...] = REQUEST_KINDS
        self.only_ops: tuple[str, ...] | None = None

    # ---- the world -----------------------------------------------------------------------------------
    @property
    def by_key(self) -> dict[str, Sess]:
        return {s.key: s for s in self.sessions if s.open}

    def all_sessions(self) -> list[Sess]:
        return self.sessions

    def reference_state(self, sess: Sess) -> dict:
        return self._ref[sess.spec.name]

    def send(self, data: bytes, identity: str):
        """(kind, header, tensors, raw reply) of a call; kind 'transport' when the link refused it."""
        from lightning_mobillm.transport.frames import decode_frame

        reply = self.target.call(data, identity)
        if isinstance(reply, str):
            return "transport", {"message": reply}, {}, None
        frame = decode_frame(reply, self.P.REPLY_SCHEMAS, require_finite=False)
        return frame.kind, frame.header, frame.tensors, reply

    def setup_call(self, header: dict, tensors: dict | None, identity: str, what: str):
        kind, h, t, raw = self.send(raw_encode(header, tensors or {}), identity)
        if kind != "ok":
            raise RuntimeError(f"setup {what} refused: {h.get('message')}")
        return h, t, raw

    def open(self, sess: Sess) -> None:
        self._touched = True
        h, _, _ = self.setup_call(hello_header(sess.spec), None, sess.spec.identity, "hello")
        if sess.secret:
            sess.stale.append(sess.secret)
        sess.key, sess.secret, sess.identity, sess.open = h["session"], h["secret"], sess.spec.identity, True
        sess.step, sess.last, sess.restorable, sess.cached, sess.history = h["step"], None, True, set(), []
        sess.cache_token = h.get("cache_token")
        for _ in range(2):
            self.train_valid(sess)

    def repair(self, sess: Sess, count: bool = True) -> None:
        """A session that no longer trains (e.g. a state it accepted): close it and open it afresh."""
        self.counts["sessions_reopened"] += count
        self._touched = True
        with contextlib.suppress(Exception):
            self.send(raw_encode({"kind": "bye", "session": sess.key, "secret": sess.secret}), sess.identity)
        sess.open = False
        self.open(sess)

    def reconnect(self, sess: Sess) -> None:
        h, _, _ = self.setup_call(hello_header(sess.spec, sess.cache_token), None, sess.identity, "reconnect")
        sess.stale.append(sess.secret)
        sess.secret, sess.restorable = h["secret"], True

    def get_state(self, sess: Sess) -> dict:
        h, t, _ = self.setup_call({"kind": "get_state", "session": sess.key, "secret": sess.secret}, None,
                                  sess.identity, "get_state")
        return self.P.unpack_state(h["skeleton"], t["state"])

    def snapshot(self) -> dict:
        """Every session's full state as its owner downloads it (None for a session that is not open)."""
        snap: dict[str, Any] = {}
        for s in self.sessions:
            try:
                snap[s.spec.name] = self.get_state(s) if s.open else None
            except RuntimeError:
                snap[s.spec.name] = None
        self._ref = {k: v for k, v in snap.items() if v is not None}
        snap["_extras"] = self.target.extras(self.sessions)
        return snap

    def train_valid(self, sess: Sess, before: dict | None = None) -> bool:
        """The session's next valid training frame; ``before``: the world right before it (if known), to check that
        a refusal changed nothing."""
        ctx = self.build(sess, sess.spec.natural, codec="int8", seed=(10_000 + sess.step) % 2**62)
        data = ctx.encode()
        kind, h, _, raw = self.send(data, sess.identity)
        if kind != "ok" or h.get("step") != sess.step:
            self.counts["next_valid_failed"] += 1
            changed = self.changes(before, self.snapshot(), set()) if before is not None else None
            if changed:
                self.counts["state_changed"] += 1
                self._finding("a refused training frame changed state", {
                    "session": sess.key, "server": str(h.get("message"))[:160], "after": self.last_ops,
                    "after_drawn": self.last_drawn, "changed": changed})
            self._finding("a valid training frame failed after fuzzing",
                          {"session": sess.key, "server": str(h.get("message"))[:160], "after": self.last_ops,
                           "after_drawn": self.last_drawn})
            self.resync(sess)
            self.repair(sess)
            return False
        self.applied(sess, data, raw, h, ctx.header.get("keys"))
        return True

    def applied(self, sess: Sess, data: bytes, raw: bytes, h: dict, keys: list[str] | None) -> None:
        sess.last = (sess.step, frame_digest(data), raw)
        sess.step += 1
        sess.restorable = False
        sess.history = (sess.history + [data])[-8:]
        if keys and h.get("cached"):
            sess.cached |= set(keys)

    def resync(self, sess: Sess) -> None:
        """Believe the server again after something the oracle did not predict."""
        info = self.target.internals(sess)
        if info is not None:
            sess.secret, sess.step, sess.restorable, sess.cached = (info["secret"], info["step"], info["restorable"],
                                                                    info["cached"])
            sess.last = info["last"]
            return
        with contextlib.suppress(Exception):
            sess.step = int(self.get_state(sess)["step"])
            sess.last = None

    # ---- valid frames --------------------------------------------------------------------------------
    def acts(self, sess: Sess, codec: str, seed: int, batch: int = BATCH, tokens: int | None = None):
        g = torch.Generator().manual_seed(seed)
        tokens = tokens or sess.spec.tokens
        labels = torch.randint(0, CLASSES, (batch,), generator=g)
        acts = torch.randn(batch * tokens, TAPS, WIDTH, generator=g)
        acts += 2 * torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(7))[labels].repeat_interleave(
            tokens, 0)[:, None, :]
        return self.P.pack_acts(acts, torch.full((batch,), tokens), codec), labels, g

    def build(self, sess: Sess, kind: str, *, codec: str = "int8", seed: int = 0, draw=None) -> FrameCtx:
        """A valid frame of ``kind`` for ``sess`` as the session stands (invalid by nature only when the kind
        does not fit the session, e.g. labels for a label-free session)."""
        session = {"session": sess.key, "secret": sess.secret}
        if kind == "hello":
            return FrameCtx(kind, hello_header(sess.spec, sess.cache_token), {}, sess.identity, sess)
        if kind in ("get_state", "bye"):
            return FrameCtx(kind, {"kind": kind, **session}, {}, sess.identity, sess)
        if kind == "set_state":
            state = perturbed(self._ref[sess.spec.name], seed)
            skeleton, blob = self.P.pack_state(state)
            return FrameCtx(kind, {"kind": kind, **session, "skeleton": skeleton}, {"state": blob}, sess.identity, sess,
                            state=state, base_state=state)
        if kind == "train_cached":
            cached = sorted(sess.cached)
            if len(cached) >= BATCH:
                rng = random.Random(seed)
                keys = rng.sample(cached, BATCH)
            else:
                keys = [f"{sess.spec.name}-unknown-{seed}-{i}" for i in range(BATCH)]
            return FrameCtx(kind, {"kind": kind, **session, "step": sess.step, "keys": keys}, {}, sess.identity, sess)
        tensors, labels, g = self.acts(sess, codec, seed)
        if kind == "eval":
            return FrameCtx(kind, {"kind": kind, **session, "codec": codec}, tensors, sess.identity, sess)
        header = {"kind": kind, **session, "step": sess.step, "codec": codec}
        if kind == "train":
            tensors["labels"] = labels
        else:
            tensors["targets"] = torch.randn(BATCH, sess.spec.num_outputs, generator=g)
        if sess.spec.cache:
            self._seq += 1
            header["keys"] = [f"{sess.spec.name}-{self._seq}-{i}" for i in range(BATCH)]
        return FrameCtx(kind, header, tensors, sess.identity, sess)

    # ---- one example -----------------------------------------------------------------------------------
    def example(self, data) -> None:
        """One mutated frame, drawn from ``data`` (hypothesis), sent and judged. Which session, kind, codec and
        mutation operators come from a drawn seed (so every operator is drawn about equally often); what each
        operator does is drawn by hypothesis directly."""
        draw = Draws(data)
        # hypothesis repeats seeds often (it varies earlier examples): the example's number keeps choices apart
        self.counts["examples"] += 1
        rng = random.Random(f"{draw.seed}/{self.counts['examples']}")
        sess = rng.choice(self.sessions)
        kind = rng.choice(self.only_kinds)
        codec = rng.choice(("int8", "int8", "fp16", "int4", "int8o", "fp32", "bf16", "int4o"))
        seed = rng.randrange(2**20)
        try:
            if not sess.open:
                self.open(sess)
            before = self.snapshot()  # also the reference state a set_state frame is built from
            if kind == "set_state" and rng.random() < 0.6:
                self.reconnect(sess)  # opens the restore window (and revokes the old secret)
                before = None
            ctx = self.build(sess, kind, codec=codec, seed=seed)
            if kind == "set_state" and not sess.restorable:
                ctx.ops.append("seq.stale_set_state")
            for _ in range(1 + (rng.random() < 0.3)):
                # once a frame's bytes are fixed (a replay), only byte-level and identity mutations apply
                ops = [op for op, ok in OPS.items() if ok(self, ctx)
                       and (self.only_ops is None or op in self.only_ops)
                       and (ctx.raw is None or op.startswith("bytes.") or op == "session.foreign_identity")]
                if not ops:
                    break
                name = rng.choices(ops, weights=[op_weight(op) for op in ops])[0]
                ctx.ops.append(name)
                OP_FUNCS[name](self, ctx, draw)
            ctx.drawn = draw.log
            data_bytes = ctx.encode()
        except (NoChoice, ZeroDivisionError):  # a mutation drew from nothing in this frame: draw the next frame
            return
        except Exception as err:  # noqa: BLE001 - a bug of the harness, not of the server: counted, not fatal
            self.harness_errors.append(f"build: {type(err).__name__}: {err}"[:300])
            return
        self.last_ops, self.last_drawn = [ctx.kind, *ctx.ops], ctx.drawn[:6]
        self.judge_and_send(ctx, data_bytes, before)

    def controls(self) -> dict[str, int]:
        """Unmutated frames of every kind each session takes: all must be judged valid and accepted."""
        out: Counter = Counter()
        for sess in self.sessions:
            for kind in ("hello", sess.spec.natural, "train_cached" if sess.spec.cache else None, "eval", "get_state",
                         "set_state", "bye"):
                if kind is None:
                    continue
                self.snapshot()
                if kind == "set_state":
                    self.reconnect(sess)
                ctx = self.build(sess, kind, seed=1)
                data = ctx.encode()
                verdict = self.oracle.judge(data, ctx.identity)
                k, h, _, raw = self.send(data, ctx.identity)
                out["frames"] += 1
                out["judged_valid"] += verdict.valid is True
                out["accepted"] += k == "ok"
                if k != "ok" or verdict.valid is not True:
                    self.harness_errors.append(f"control {kind} on {sess.key}: {verdict.reason} / {h.get('message')}")
                if k == "ok" and "secret" in h:
                    sess.stale.append(sess.secret)
                    sess.secret, sess.restorable = h["secret"], True
                if k == "ok" and verdict.effect == "train":
                    self.applied(sess, data, raw, h, verdict.keys)
                if k == "ok" and verdict.effect == "set_state":
                    sess.step, sess.last = verdict.state["step"], None
                if k == "ok" and kind == "bye":
                    sess.open = False
                    self.open(sess)
        return dict(out)

    def judge_and_send(self, ctx: FrameCtx, data: bytes, before: dict | None = None) -> None:
        sess = ctx.sess
        try:
            verdict = self.oracle.judge(data, ctx.identity)
            before = before or self.snapshot()
            self._ref_before = before.get(sess.spec.name)
            self._touched = False
            kind, h, t, raw = self.send(data, ctx.identity)
            if kind == "ok" and "secret" in h:  # a hello the server took: it revoked the old secret, whoever judged
                mine = next((s for s in self.sessions if s.open and s.key == h.get("session")), None)
                if mine is not None and h["secret"] != mine.secret:
                    mine.stale.append(mine.secret)
                    mine.secret, mine.restorable = h["secret"], True
            after = self.snapshot()
        except Exception as err:  # noqa: BLE001
            self.harness_errors.append(f"send: {type(err).__name__}: {err}"[:300])
            for s in self.sessions:
                self.resync(s)
            return
        accepted = kind == "ok"
        outcome = self.classify(ctx, verdict, accepted, h, raw, before, after, data)
        self.counts["frames"] += 1
        self.counts[outcome] += 1
        self.counts["refused" if not accepted else "accepted"] += 1
        for op in set(ctx.ops):
            self.by_mutation[op]["frames"] += 1
            self.by_mutation[op]["refused" if not accepted else "accepted"] += 1
            if outcome != "refused_ok":
                self.by_mutation[op][outcome] += 1
        self.by_kind[ctx.kind]["frames"] += 1
        self.by_kind[ctx.kind]["refused" if not accepted else "accepted"] += 1
        # the server still trains the mutated session's next valid frame
        for s in self.sessions:
            if not s.open:
                self.open(s)
        if self.train_valid(sess, before=None if self._touched else after):
            self.counts["next_valid_trained"] += 1

    def classify(self, ctx, verdict: Verdict, accepted: bool, h: dict, raw, before, after, data) -> str:
        sess = ctx.sess
        what = {"ops": ctx.ops, "drawn": ctx.drawn[:6], "kind": ctx.kind, "session": sess.spec.name,
                "identity": ctx.identity,
                "oracle": verdict.reason or ("valid" if verdict.valid else "undecided"),
                "server": (h.get("message") or "ok")[:160]}
        if not accepted:
            changed = self.changes(before, after, set())
            if changed:
                self.counts["state_changed"] += 1
                self._finding("a refused frame changed state", {**what, "changed": changed})
                for s in self.sessions:
                    self.resync(s)
            if verdict.valid is True:
                self._note("refused although the oracle says valid", what)
                return "refused_valid"
            return "refused_ok"
        # accepted
        if verdict.valid is False:
            if self.equivalent(ctx, after):
                self._note("accepted an equivalent frame", what)
                self.after_unpredicted(ctx, h, data)
                return "accepted_equivalent"
            changed = self.changes(before, after, set())
            if changed:
                self.counts["state_changed"] += 1
            self._finding("accepted an invalid frame", {**what, "changed": changed})
            self.after_unpredicted(ctx, h, data)
            return "accepted_invalid"
        if verdict.valid is None:
            self._note("accepted (the contract does not decide)", what)
            self.after_unpredicted(ctx, h, data)
            return "accepted_undecided"
        problem = self.apply_effect(ctx, verdict, h, raw, before, after, data)
        if problem:
            self.counts["state_changed"] += 1
            self._finding("a valid frame had an unexpected effect", {**what, "problem": problem})
            for s in self.sessions:
                self.resync(s)
        else:
            self._note(f"accepted valid ({verdict.effect})", what)
        return "accepted_valid"

    def changes(self, before: dict, after: dict, allowed: set) -> list[str]:
        out = []
        for s in self.sessions:
            name = s.spec.name
            if (name, "state") not in allowed:
                out += [f"{name}{p}" for p in state_diff(before[name], after[name])]
            eb, ea = before["_extras"].get(name), after["_extras"].get(name)
            if eb is not None and ea is not None:
                out += [f"{name}.{k}" for k in eb if (name, k) not in allowed and eb[k] != ea[k]]
            elif eb != ea and (name, "*") not in allowed:
                out.append(f"{name} opened/closed")
        if "_open" in before["_extras"] and ("_open" not in allowed) and before["_extras"]["_open"] != after["_extras"]["_open"]:
            out.append("open sessions")
        return out[:8]

    def equivalent(self, ctx: FrameCtx, after: dict) -> bool:
        """An accepted set_state the oracle refused only for its tensors' dtypes (or its skeleton's form), whose
        result is what was sent, cast to the session's dtypes: a mutation that made an equivalent frame."""
        if ctx.kind != "set_state" or ctx.state is None or after.get(ctx.sess.spec.name) is None:
            return False
        ref = self._ref_before
        sent = cast_like(ctx.state, ref)
        try:
            check_state(sent, ref)
        except Invalid:
            return False
        expect = {**ref, **sent}
        return not state_diff(after[ctx.sess.spec.name], cast_like(expect, after[ctx.sess.spec.name]))

    def apply_effect(self, ctx, v: Verdict, h: dict, raw, before, after, data) -> str | None:
        """Update the world for a valid accepted frame; return what was unexpected, if anything."""
        sess, name = v.session, (v.session.spec.name if v.session else None)
        if v.effect == "train":
            if h.get("step") != sess.step:
                return f"reply step {h.get('step')} != {sess.step}"
            self.applied(sess, data, raw, h, v.keys)
            allowed = {(name, "state"), (name, "last_step"), (name, "restorable"), (name, "cache")}
            if after[name]["step"] != before[name]["step"] + 1:
                return "the step did not advance by one"
        elif v.effect == "retry":
            if raw != sess.last[2]:
                return "a retry got another reply than the stored one"
            allowed = set()
        elif v.effect == "missing":
            if not h.get("missing"):
                return "no missing keys in the reply"
            allowed = set()
        elif v.effect == "set_state":
            sess.step, sess.last = v.state["step"], None
            allowed = {(name, "state"), (name, "last_step")}
            expect = {**before[name], **{k: v.state[k] for k in v.state}}
            diff = state_diff(after[name], cast_like(expect, after[name]))
            if diff:
                return f"set_state not applied as sent: {diff[:3]}"
        elif v.effect == "reconnect":
            allowed = {(name, "secret"), (name, "restorable")}
        elif v.effect == "bye":
            sess.open = False
            allowed = {(name, "*"), (name, "state"), "_open"}
            after = {**after, name: before[name]}
        elif v.effect == "new_session":
            allowed = {"_open"} | ({(name, "cache")} if sess is not None else set())
            self.close_foreign(h, ctx.identity)
            if sess is not None:  # its cache moved to the new session: give it a cache of its own again
                changed = self.changes(before, after, allowed)
                self.repair(sess, count=False)
                return f"changed {changed}" if changed else None
        else:  # eval, none
            allowed = set()
        changed = self.changes(before, after, allowed)
        return f"changed {changed}" if changed else None

    def after_unpredicted(self, ctx: FrameCtx, h: dict, data: bytes) -> None:
        """After an accepted frame the oracle did not call valid: close what it opened, believe the server."""
        if "secret" in h and not any(s.open and s.key == h.get("session") for s in self.sessions):
            self.close_foreign(h, ctx.identity)
            token = ctx.header.get("cache", {}).get("token") if isinstance(ctx.header.get("cache"), dict) else None
            for s in self.sessions:  # a new session of the same owner took that session's cache over
                if s.open and token and s.cache_token == token:
                    self.repair(s, count=False)
        for s in self.sessions:
            if s.open and self.target.internals(s) is None and self.transport == "inprocess":
                s.open = False
            self.resync(s)
        if ctx.kind in ("set_state", *TRAIN_KINDS, "replay", "retry") and ctx.sess.open:
            self.repair(ctx.sess, count=False)  # start again from a state the oracle understands

    def close_foreign(self, h: dict, identity: str) -> None:
        self._touched = True
        kind, rh, _, _ = self.send(raw_encode({"kind": "bye", "session": h["session"], "secret": h["secret"]}), identity)
        if kind != "ok":
            self.harness_errors.append(f"could not close {h['session']}: {rh.get('message')}")

    def _finding(self, reason: str, what: dict) -> None:
        self.counts[f"finding: {reason}"] += 1
        key = reason + " | " + str(what.get("oracle", ""))[:100]
        self.finding_counts[key] += 1
        if len(self.findings[key]) < self.max_examples:
            self.findings[key].append(what)

    def _note(self, reason: str, what: dict) -> None:
        key = reason + " | " + str(what.get("oracle", ""))[:60]
        if len(self.notes[key]) < self.max_examples:
            self.notes[key].append({k: what[k] for k in ("ops", "drawn", "kind", "session", "server")})

    def result(self) -> dict:
        c = self.counts
        return {
            "frames": c["frames"], "refused": c["refused"], "accepted": c["accepted"],
            "state_changed": c["state_changed"],
            "accepted_valid": c["accepted_valid"], "accepted_equivalent": c["accepted_equivalent"],
            "accepted_undecided": c["accepted_undecided"], "accepted_invalid": c["accepted_invalid"],
            "refused_valid": c["refused_valid"],
            "next_valid_trained": c["next_valid_trained"], "next_valid_failed": c["next_valid_failed"],
            "sessions_reopened": c["sessions_reopened"],
            "harness_errors": len(self.harness_errors), "harness_error_examples": self.harness_errors[:5],
            "by_mutation": {k: dict(v) for k, v in sorted(self.by_mutation.items())},
            "by_frame_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
            "findings_count": dict(sorted(self.finding_counts.items())),
            "findings": {k: v for k, v in sorted(self.findings.items())},
            "accepted_or_refused_valid_examples": {k: v for k, v in sorted(self.notes.items())},
        }


def perturbed(state: dict, seed: int) -> dict:
    """A valid state unlike the current one: weights moved, Adam moments scaled (so a partial load shows)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(state)
    out["model"] = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
                    for k, v in out["model"].items()}
    if out.get("optimizer"):
        for p in out["optimizer"]["state"].values():
            p["exp_avg"] = p["exp_avg"] * 1.5
    return out


def cast_like(state: Any, ref: Any) -> Any:
    """``state`` with every tensor cast to the dtype of the tensor at the same place in ``ref``."""
    if isinstance(state, dict) and isinstance(ref, dict):
        return {k: cast_like(v, ref.get(k)) for k, v in state.items()}
    if isinstance(state, list) and isinstance(ref, list) and len(state) == len(ref):
        return [cast_like(a, b) for a, b in zip(state, ref)]
    if isinstance(state, torch.Tensor) and isinstance(ref, torch.Tensor) and state.shape == ref.shape:
        return state.to(ref.dtype)
    return state


# ============================================================================================ mutations
def _st():
    from hypothesis import strategies as st

    return st


def json_values():
    st = _st()
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=5)


class Draws:
    """What the mutation operators of one example may use, drawn by hypothesis up front in a fixed structure
    (a seed, 32 integers, two JSON values, bytes and a text) so that generation never depends on the server's
    state; the operators consume these values in order and log what they took."""

    def __init__(self, data) -> None:
        st = _st()
        self.seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
        self._ints = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=32, max_size=32), label="ints")
        self._json = [data.draw(json_values(), label="json") for _ in range(2)]
        self._bytes = data.draw(st.binary(max_size=2048), label="bytes")
        self._text = data.draw(st.text(min_size=1, max_size=10), label="text")
        self._i = 0
        self.log: list[str] = []

    def _next(self) -> int:
        value = self._ints[self._i % len(self._ints)] ^ (self._i // len(self._ints)) * 0x9E3779B1
        self._i += 1
        return value

    def _logged(self, label: str, value: Any) -> Any:
        if label:
            shown = value.key if isinstance(value, Sess) else f"{len(value)} bytes" if isinstance(value, bytes) else value
            self.log.append(f"{label}={shown!r}"[:80])
        return value

    def pick(self, options, label: str = "") -> Any:
        options = list(options)
        if not options:
            raise NoChoice(label)
        return self._logged(label, options[self._next() % len(options)])

    def int(self, bounds: tuple[int, int], label: str = "") -> int:
        lo, hi = bounds
        return self._logged(label, lo + ((self._next() << 32) | self._next()) % (hi - lo + 1))

    def bool(self, label: str = "") -> bool:
        return self._logged(label, bool(self._next() & 1))

    def ints(self, min_n: int, max_n: int, label: str = "") -> list[int]:
        n = min_n + self._next() % (max_n - min_n + 1)
        return self._logged(label, [self._next() for _ in range(n)])

    def json(self, label: str = "") -> Any:
        return self._logged(label, self._json[self._next() % 2])

    def text(self, label: str = "") -> str:
        return self._logged(label, self._text)

    def bytes(self, min_n: int, max_n: int, label: str = "") -> bytes:
        blob = self._bytes[:max_n]
        return self._logged(label, blob if len(blob) >= min_n else blob + b"\0" * (min_n - len(blob)))


def _session_frame(fz, ctx) -> bool:
    return ctx.kind != "hello"


def _has(*names):
    return lambda fz, ctx: any(n in ctx.tensors for n in names)


def _kinds(*kinds):
    return lambda fz, ctx: ctx.kind in kinds


# ---- header ----------------------------------------------------------------------------------------
def op_header_delete_key(fz, ctx, draw):
    key = draw.pick((sorted(ctx.header)), label="deleted key")
    del ctx.header[key]


def op_header_add_key(fz, ctx, draw):
    others = ("step", "keys", "skeleton", "codec", "codec_down", "resume", "cache", "protocol", "device_id", "session",
              "secret", "_digest", "__proto__", "Kind")
    name = draw.pick(others, "added key") if draw.bool() else draw.text("added key")
    if name in ctx.header:
        name += "_"
    ctx.header[name] = draw.json("added value")


def op_header_smuggle(fz, ctx, draw):
    """labels, token ids or text in the JSON header (the label-free session's frames above all)."""
    name = draw.pick((SMUGGLED), label="smuggled key")
    values = {"labels": [0, 1, 2, 1], "label": 2, "input_ids": [[1, 2, 3], [4, 5, 6]], "token_ids": [17, 42],
              "text": "a private sentence about the user", "prompt": "Article: secret\nTopic:",
              "attention_mask": [[1, 1, 0]], "targets": [[0.0] * 16], "y": [1, 0]}
    ctx.header[name] = values[name]


def op_header_type_change(fz, ctx, draw):
    key = draw.pick((sorted(ctx.header)), label="retyped key")
    ctx.header[key] = draw.pick((OTHER_VALUES), label="new value")


def op_header_kind_change(fz, ctx, draw):
    kinds = (*REQUEST_KINDS, "ok", "error", "split_train", "split_hello", "exec", "", "HELLO", "train ")
    ctx.header["kind"] = draw.pick(([k for k in kinds if k != ctx.kind]), label="new kind")


def op_header_reformat(fz, ctx, draw):
    """A valid control: the same header with other whitespace and key order."""
    ctx.encode_kw = {"indent": 2, "sort_keys": True}


# ---- session, identity, secrets -----------------------------------------------------------------------
def op_session_wrong_secret(fz, ctx, draw):
    secret = ctx.header.get("secret") if isinstance(ctx.header.get("secret"), str) else "0" * 32
    ctx.header["secret"] = draw.pick((
        ["0" * 32, "", secret[:-1], secret.upper(), secret + "0", secret[::-1], secret + "\0"]), label="wrong secret")


def op_session_stale_secret(fz, ctx, draw):
    ctx.header["secret"] = draw.pick((ctx.sess.stale), label="stale secret")


def op_session_foreign_identity(fz, ctx, draw):
    others = [i for i in (*IDENTITIES, "") if i != ctx.identity]
    ctx.identity = draw.pick((others), label="identity")


def op_session_other_session(fz, ctx, draw):
    """Another session's key with this session's secret, or an unknown or path-like key."""
    keys = [s.key for s in fz.sessions if s is not ctx.sess] + ["device:dev/lab", "alice/none", "../alice/lab", "",
                                                                ctx.sess.key + "/", ctx.sess.key.upper()]
    ctx.header["session"] = draw.pick((keys), label="session key")


def op_session_stolen_pair(fz, ctx, draw):
    """Another session's key and its right secret, presented by this frame's identity."""
    victim = draw.pick(([s for s in fz.sessions if s is not ctx.sess and s.open]), label="victim")
    ctx.header.update(session=victim.key, secret=victim.secret)


def _has_stale(fz, ctx):
    return ctx.kind != "hello" and bool(ctx.sess.stale)


# ---- steps and replays ----------------------------------------------------------------------------------
def op_step_shift(fz, ctx, draw):
    step = ctx.header.get("step", 0) if type(ctx.header.get("step")) is int else 0
    ctx.header["step"] = step + draw.pick(([1, 2, 5, -1, -2, -step - 1, 2**31, 2**63, -2**63]),
                                     label="step shift")


def op_seq_replay_older(fz, ctx, draw):
    """The exact bytes of an earlier accepted training frame of this session (maybe re-signed)."""
    old = draw.pick((ctx.sess.history), label="replayed frame")
    if draw.bool("re-signed"):
        hl = struct.unpack_from(">I", old, 5)[0]
        header = json.loads(old[PREAMBLE.size:PREAMBLE.size + hl])
        header["secret"] = ctx.sess.secret
        ctx.raw = raw_encode(header, body=old[PREAMBLE.size + hl:])
    else:
        ctx.raw = old
    ctx.kind = "replay"


def op_seq_retry_last(fz, ctx, draw):
    """A valid control: the last applied frame again, with the current secret (a retry)."""
    old = ctx.sess.history[-1]
    hl = struct.unpack_from(">I", old, 5)[0]
    header = json.loads(old[PREAMBLE.size:PREAMBLE.size + hl])
    header["secret"] = ctx.sess.secret
    ctx.raw = raw_encode(header, body=old[PREAMBLE.size + hl:])
    ctx.kind = "retry"


def _has_history(fz, ctx):
    return ctx.kind in TRAIN_KINDS and bool(ctx.sess.history)


def _can_retry(fz, ctx):
    return _has_history(fz, ctx) and ctx.sess.last is not None


# ---- codec and keys ---------------------------------------------------------------------------------------
def op_codec_change(fz, ctx, draw):
    ctx.header["codec"] = draw.pick((
        ["int8", "int4", "fp16", "fp32", "bf16", "int8o", "int4o", "INT8", "int8 ", "", "pickle", "x" * 300]),
        label="codec")


def op_keys_mutate(fz, ctx, draw):
    keys = list(ctx.header.get("keys") or [f"k{i}" for i in range(BATCH)])
    how = draw.pick((["bad_char", "non_string", "empty_list", "duplicate", "drop_one", "add_one", "too_many",
                                "foreign", "not_a_list"]), label="keys mutation")
    if how == "bad_char":
        keys[draw.int((0, len(keys) - 1))] = draw.pick(BAD_KEYS)
    elif how == "non_string":
        keys[0] = draw.pick([1, None, True, ["k"], {"k": 1}])
    elif how == "empty_list":
        keys = []
    elif how == "duplicate":
        keys = [keys[0]] * len(keys)
    elif how == "drop_one":
        keys = keys[:-1]
    elif how == "add_one":
        keys = keys + ["extra-key"]
    elif how == "too_many":
        keys = [f"k{i}" for i in range(FUZZ_SERVER["max_tokens_per_frame"] + 1)]
    elif how == "foreign":  # keys the other cached session holds
        other = next((s for s in fz.sessions if s.spec.cache and s is not ctx.sess and s.cached), None)
        keys = sorted(other.cached)[:len(keys)] if other else ["nobody-1"] * len(keys)
    else:
        keys = draw.pick(["k1", {"k": 1}, 5])
    ctx.header["keys"] = keys


# ---- tensors ------------------------------------------------------------------------------------------------
def _pick_tensor(ctx, draw, floats_only: bool = False) -> str:
    names = sorted(n for n, t in ctx.tensors.items() if not floats_only or t.is_floating_point())
    return draw.pick((names), label="tensor")


def op_tensor_dtype(fz, ctx, draw):
    name = _pick_tensor(ctx, draw)
    dtype = draw.pick(([d for d in DTYPES if d != ctx.tensors[name].dtype]), label="dtype")
    ctx.tensors[name] = ctx.tensors[name].to(dtype)


def op_tensor_shape(fz, ctx, draw):
    name = _pick_tensor(ctx, draw)
    t = ctx.tensors[name]
    if t.ndim == 0:
        ctx.tensors[name] = t.reshape(1).repeat(2)
        return
    dim = draw.int((0, t.ndim - 1), label="dim")
    how = draw.pick((["+1", "-1", "0", "x2"]), label="resize")
    n = t.shape[dim]
    if how == "+1" and n:
        ctx.tensors[name] = torch.cat([t, t.narrow(dim, n - 1, 1)], dim)
    elif how == "-1" and n:
        ctx.tensors[name] = t.narrow(dim, 0, n - 1).contiguous()
    elif how == "0":
        ctx.tensors[name] = t.narrow(dim, 0, 0).contiguous()
    else:
        ctx.tensors[name] = torch.cat([t, t], dim)


def op_tensor_rank(fz, ctx, draw):
    name = _pick_tensor(ctx, draw)
    t = ctx.tensors[name]
    how = draw.pick((["unsqueeze0", "unsqueeze-1", "flatten", "first", "scalar"]), label="rank")
    if how == "unsqueeze0":
        t = t.unsqueeze(0)
    elif how == "unsqueeze-1":
        t = t.unsqueeze(-1)
    elif how == "flatten":
        t = t.flatten()
    elif how == "first" and t.ndim and t.shape[0]:
        t = t[0]
    else:
        t = t.reshape(-1)[:1].reshape(()) if t.numel() else torch.zeros((), dtype=t.dtype)
    ctx.tensors[name] = t.contiguous()


def op_tensor_extra(fz, ctx, draw):
    name = draw.pick(((*SMUGGLED, "acts.oidx", "acts.oval", "acts.d", "acts.scale", "acts.extra", "state",
                                 "logits", "lengths", "labels", "__metadata", "acts.q.1")), label="extra tensor")
    values = {"text": torch.frombuffer(bytearray(b"a private sentence"), dtype=torch.uint8),
              "input_ids": torch.randint(0, 50_000, (BATCH, 8)), "token_ids": torch.randint(0, 50_000, (8,)),
              "labels": torch.randint(0, CLASSES, (BATCH,)), "label": torch.tensor([1]),
              "attention_mask": torch.ones(BATCH, 8, dtype=torch.int64)}
    ctx.tensors[name] = values.get(name, torch.randn(BATCH, draw.int((1, 4), label="width")))


def op_tensor_drop(fz, ctx, draw):
    del ctx.tensors[_pick_tensor(ctx, draw)]


def op_tensor_nonfinite(fz, ctx, draw):
    name = _pick_tensor(ctx, draw, floats_only=True)
    t = ctx.tensors[name].clone()
    value = draw.pick(([float("nan"), float("inf"), -float("inf")]), label="non-finite")
    if t.numel():
        t.view(-1)[draw.int((0, t.numel() - 1), label="index")] = value
    ctx.tensors[name] = t


def op_tensor_values(fz, ctx, draw):
    """Values the schema's dtypes allow but the session does not: labels out of range, lengths that do not sum,
    a negative or overflowing scale, int4's d, outlier indices, extreme finite targets."""
    name = _pick_tensor(ctx, draw)
    t = ctx.tensors[name].clone()
    if name == "labels":
        t[0] = draw.pick(([CLASSES, -1, 2**40, PAE_OUTPUTS]), label="label")
    elif name == "lengths" and t.numel():
        flat = t.view(-1)
        i = draw.int((0, t.numel() - 1))
        flat[i] = flat[i] + draw.pick([1, -1, -flat[i].item(), -flat[i].item() - 1, 2**40], label="length delta")
    elif name == "acts.scale":
        t.view(-1)[0] = draw.pick(([-1.0, 3e38, 1e-45]), label="scale")
    elif name == "acts.d":
        t[0] = draw.pick(([0, 15, 17, 33, -1, 2**40]), label="d")
    elif name == "acts.oidx":
        t.view(-1)[0] = draw.pick(([-1, WIDTH, 32767, int(t.view(-1)[-1])]), label="oidx")
    elif name == "acts.q" and t.dtype == torch.int8:
        t.view(-1)[0] = -128
    elif name == "acts.q" and t.dtype == torch.uint8:
        t.view(-1)[0] = 0  # two nibbles of value -8
    elif t.is_floating_point() and t.numel():
        t.view(-1)[0] = draw.pick(([1e38, -1e38, 6e4, 1e-40]), label="extreme value")
    elif t.numel():
        t.view(-1)[0] = 1 if t.dtype == torch.bool else 100
    ctx.tensors[name] = t


def op_count_oversized(fz, ctx, draw):
    how = draw.pick((["tokens", "samples", "frame_bytes"]), label="oversized")
    codec = ctx.header.get("codec") if ctx.header.get("codec") in ("int8", "fp32") else "int8"
    limit = FUZZ_SERVER["max_tokens_per_frame"]
    if how == "tokens":
        batch, tokens = 1, limit + draw.int((1, 64))
    elif how == "samples":
        batch, tokens = limit + draw.int((1, 64)), 1
    else:
        batch, tokens, codec = 1, 6000, "fp32"  # 6000 x 3 x 16 x 4 bytes > max_frame_mb = 1
    acts = torch.randn(batch * tokens, TAPS, WIDTH)
    ctx.header["codec"] = codec
    ctx.tensors.update(fz.P.pack_acts(acts, torch.full((batch,), tokens), codec))
    for k in [k for k in ctx.tensors if k.startswith("acts.") and k[5:] not in ("q", "scale")]:
        del ctx.tensors[k]
    if "labels" in ctx.tensors:
        ctx.tensors["labels"] = torch.zeros(batch, dtype=torch.int64)
    if "targets" in ctx.tensors:
        ctx.tensors["targets"] = torch.zeros(batch, ctx.sess.spec.num_outputs)
    if "keys" in ctx.header:
        ctx.header["keys"] = [f"big-{i}" for i in range(batch)]


# ---- bytes -----------------------------------------------------------------------------------------------
def op_bytes_truncate(fz, ctx, draw):
    cut = draw.int((0, 10**9), label="cut")
    ctx.byte_ops.append(lambda d: d[:cut % max(1, len(d))])


def op_bytes_bit_flip(fz, ctx, draw):
    region = draw.pick((["preamble", "header", "table", "data", "anywhere"]), label="region")
    flips = draw.ints(1, 8, "bits")

    def flip(d: bytes) -> bytes:
        try:
            h0, body, data0 = split_frame(d)
        except struct.error:
            h0, body, data0 = 9, len(d), len(d)
        lo, hi = {"preamble": (0, 9), "header": (h0, body), "table": (body, data0), "data": (data0, len(d)),
                  "anywhere": (0, len(d))}[region]
        if hi <= lo:
            lo, hi = 0, len(d)
        b = bytearray(d)
        for f in flips:
            pos = lo + (f // 8) % (hi - lo)
            b[pos] ^= 1 << (f % 8)
        return bytes(b)

    ctx.byte_ops.append(flip)


def _edit_table(d: bytes, edit) -> bytes:
    h0, body, data0 = split_frame(d)
    table = json.loads(d[body + 8:data0])
    edit(table)
    tb = json.dumps(table).encode()
    return d[:body] + struct.pack("<Q", len(tb)) + tb + d[data0:]


def op_bytes_st_offsets(fz, ctx, draw):
    """Lying safetensors offsets, shapes or dtypes in the tensor table (the table re-serialised)."""
    how = draw.pick((["shift_begin", "shift_end", "past_end", "reversed", "overlap", "huge", "shape",
                                "dtype", "negative", "float"]), label="lie")
    k = draw.int((1, 64), label="by")
    pick = draw.int((0, 1000), label="which")

    def edit(table: dict) -> None:
        names = sorted(n for n in table if n != "__metadata__")
        if not names:
            table["ghost"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
            return
        e = table[names[pick % len(names)]]
        b, end = e["data_offsets"]
        if how == "shift_begin":
            e["data_offsets"] = [max(0, b - k), end]
        elif how == "shift_end":
            e["data_offsets"] = [b, end + k]
        elif how == "past_end":
            e["data_offsets"] = [b, end + 10**6]
        elif how == "reversed":
            e["data_offsets"] = [end, b]
        elif how == "overlap":
            other = table[names[(pick + 1) % len(names)]]
            e["data_offsets"] = list(other["data_offsets"])
        elif how == "huge":
            e["data_offsets"] = [b, 2**63]
        elif how == "shape":
            e["shape"] = [*e["shape"][:-1], (e["shape"][-1] if e["shape"] else 1) + k] if e["shape"] else [k]
        elif how == "dtype":
            e["dtype"] = {"I8": "U8", "U8": "I8", "F32": "I32", "I32": "F32", "F16": "BF16", "BF16": "F16",
                          "I64": "F64", "F64": "I64", "I16": "F16"}.get(e["dtype"], "F32")
        elif how == "negative":
            e["data_offsets"] = [-1, end]
        else:
            e["data_offsets"] = [float(b), float(end)]

    ctx.byte_ops.append(lambda d: _edit_table(d, edit))


def op_bytes_st_length(fz, ctx, draw):
    delta = draw.pick(([1, -1, 8, -8, 10**6, 2**63, -(2**20)]), label="table length delta")

    def lie(d: bytes) -> bytes:
        h0, body, data0 = split_frame(d)
        n = (data0 - body - 8 + delta) % 2**64
        return d[:body] + struct.pack("<Q", n) + d[body + 8:]

    ctx.byte_ops.append(lie)


def op_bytes_header_length(fz, ctx, draw):
    delta = draw.pick(([1, -1, 5, -5, 2**20, 2**32 - 1]), label="header length delta")

    def lie(d: bytes) -> bytes:
        (hl,) = struct.unpack_from(">I", d, 5)
        return d[:5] + struct.pack(">I", (hl + delta) % 2**32) + d[9:]

    ctx.byte_ops.append(lie)


def op_bytes_magic(fz, ctx, draw):
    which = draw.pick([b"MLLN", b"mllm", b"\0\0\0\0", b"PK\x03\x04", *range(256)],
                 label="magic or version")
    if isinstance(which, bytes):
        ctx.byte_ops.append(lambda d: which + d[4:])
    else:
        ctx.byte_ops.append(lambda d: d[:4] + bytes([which if which != VERSION else 2]) + d[5:])


def op_bytes_trailing(fz, ctx, draw):
    tail = draw.bytes(1, 64, "trailing bytes")
    ctx.byte_ops.append(lambda d: d + tail)


def op_bytes_random(fz, ctx, draw):
    blob = draw.bytes(0, 2048, "random bytes")
    keep = draw.pick(([0, 9, "header"]), label="kept prefix")

    def rnd(d: bytes) -> bytes:
        if keep == "header":
            return d[:split_frame(d)[1]] + blob
        return d[:keep] + blob

    ctx.byte_ops.append(rnd)


# ---- set_state: the nested state -------------------------------------------------------------------------
def _repack(fz, ctx) -> None:
    skeleton, blob = fz.P.pack_state(ctx.state)
    ctx.header["skeleton"], ctx.tensors["state"] = skeleton, blob


def op_state_model(fz, ctx, draw):
    state = ctx.state = copy.deepcopy(ctx.state)
    names = sorted(state["model"])
    key = draw.pick((names), label="weight")
    how = draw.pick((["drop", "extra", "shape", "dtype", "nan", "inf", "huge", "not_a_tensor"]),
               label="weight mutation")
    t = state["model"][key]
    if how == "drop":
        del state["model"][key]
    elif how == "extra":
        state["model"]["side.extra"] = torch.zeros(2)
    elif how == "shape":
        state["model"][key] = torch.zeros(*(s + 1 for s in t.shape)) if t.ndim else torch.zeros(2)
    elif how == "dtype":
        state["model"][key] = t.to(draw.pick([torch.float64, torch.float16, torch.int64, torch.bfloat16]))
    elif how in ("nan", "inf") and t.numel():
        t = t.clone()
        t.view(-1)[0] = float(how)
        state["model"][key] = t
    elif how == "huge" and t.numel():
        state["model"][key] = torch.full_like(t, 1e30)
    else:
        state["model"][key] = draw.pick([1, "w", None, [1.0]])
    _repack(fz, ctx)


def op_state_optimizer(fz, ctx, draw):
    state = ctx.state = copy.deepcopy(ctx.state)
    opt = state["optimizer"]
    how = draw.pick((["moment_shape", "negative_sq", "nan_moment", "adam_step", "lr", "betas", "eps",
                                "params", "extra_group", "extra_key", "drop_state", "drop_optimizer",
                                "unknown_param", "maximize"]), label="optimizer mutation")
    moments = list(opt["state"].values())
    group = opt["param_groups"][0]
    if how == "moment_shape" and moments:
        moments[0]["exp_avg"] = torch.zeros(3)
    elif how == "negative_sq" and moments:
        moments[0]["exp_avg_sq"] = -moments[0]["exp_avg_sq"] - 1
    elif how == "nan_moment" and moments:
        moments[0]["exp_avg"] = torch.full_like(moments[0]["exp_avg"], float("nan"))
    elif how == "adam_step" and moments:
        moments[0]["step"] = torch.tensor(draw.pick([-5.0, float("nan"), 1e30]))
    elif how == "lr":
        group["lr"] = draw.pick((["x", -1.0, 1e308, True, None, [0.1]]), label="lr")
    elif how == "betas":
        group["betas"] = draw.pick(([[2.0, 0.9], [0.9], "x", [0.9, -0.5]]), label="betas")
    elif how == "eps":
        group["eps"] = draw.pick(([0.0, -1.0, "x"]), label="eps")
    elif how == "params":
        group["params"] = draw.pick([[], group["params"][:-1], group["params"] + [999], [0] * 3])
    elif how == "extra_group":
        opt["param_groups"].append(copy.deepcopy(group))
    elif how == "extra_key":
        opt["foreign"] = 5
    elif how == "drop_state":
        del opt["state"]
    elif how == "drop_optimizer":
        del state["optimizer"]  # valid: the optimizer is optional
    elif how == "unknown_param":
        opt["state"][999] = copy.deepcopy(moments[0]) if moments else {}
    else:
        group["maximize"] = "yes"
    _repack(fz, ctx)


def op_state_scheduler(fz, ctx, draw):
    state = ctx.state = copy.deepcopy(ctx.state)
    how = draw.pick((["last_epoch", "foreign_key", "drop_key", "lambda", "drop_scheduler", "not_a_dict"]),
               label="scheduler mutation")
    sched = state["scheduler"]
    if how == "last_epoch":
        sched["last_epoch"] = draw.pick((["three", -5, 2.5, None, 2**70]), label="last_epoch")
    elif how == "foreign_key":
        sched["optimizer"] = 5
    elif how == "drop_key":
        sched.pop("_step_count", None) if "_step_count" in sched else sched.pop("last_epoch")
    elif how == "lambda" and sched.get("lr_lambdas"):
        sched["lr_lambdas"] = [{"total_steps": "x"}] if sched["lr_lambdas"][0] else [{"f": 1}]
    elif how == "drop_scheduler":
        del state["scheduler"]  # valid: the scheduler is optional
    else:
        state["scheduler"] = [1, 2]
    _repack(fz, ctx)


def op_state_step(fz, ctx, draw):
    ctx.state = {**ctx.state, "step": draw.pick(([-1, "3", 1.5, True, None, 2**62, 2**70, 0]),
                                           label="state step")}
    _repack(fz, ctx)


def op_state_skeleton(fz, ctx, draw):
    how = draw.pick((["untagged", "missing_tensor", "malformed_items", "no_root", "not_a_dict", "deep",
                                "extra_root_key", "tensor_ref_type"]), label="skeleton mutation")
    sk = ctx.header["skeleton"]
    if how == "untagged":
        sk["root"] = {"model": {}, "step": 0}
    elif how == "missing_tensor":
        sk["root"] = {"__items__": [["model", {"__items__": [["w", {"__tensor__": "t9999"}]]}], ["step", 0]]}
    elif how == "malformed_items":
        sk["root"] = {"__items__": [["model"], "x"]}
    elif how == "no_root":
        ctx.header["skeleton"] = {"roots": sk.get("root")}
    elif how == "not_a_dict":
        ctx.header["skeleton"] = []
    elif how == "deep":  # nested lists past the JSON encoder's recursion limit: written into the bytes directly
        depth = draw.pick([100, 900, 5000], label="depth")
        sk["root"] = "__DEEP__"
        nested = b"[" * depth + b"0" + b"]" * depth

        def deepen(d: bytes) -> bytes:
            (hl,) = struct.unpack_from(">I", d, 5)
            header = d[PREAMBLE.size:PREAMBLE.size + hl].replace(b'"__DEEP__"', nested)
            return PREAMBLE.pack(MAGIC, VERSION, len(header)) + header + d[PREAMBLE.size + hl:]

        ctx.byte_ops.insert(0, deepen)
    elif how == "extra_root_key":
        sk["extra"] = {"__tensor__": "t0"}
    else:
        sk["root"] = {"__tensor__": 5}


# ---- hello ---------------------------------------------------------------------------------------------------
def op_hello_protocol(fz, ctx, draw):
    ctx.header["protocol"] = draw.pick(([2, 4, 0, -1, "3", 3.0, 2**70]), label="protocol")


def op_hello_names(fz, ctx, draw):
    key = draw.pick((["device_id", "run_id"]), label="name")
    ctx.header[key] = draw.pick((["", "a" * 65, "../x", "a b", "é", "run/1", "x\0", "r-" + str(fz._seq)]),
                           label="value")


def op_hello_module(fz, ctx, draw):
    ctx.header["module"] = draw.pick((
        ["os:system", "lightning_mobillm.modules.side_tuning:SideTuningModule", "additive_adapter", "side_tuning",
         "", "side_tuning ", "__import__"]), label="module")


def op_hello_tap_spec(fz, ctx, draw):
    spec = dict(ctx.header["tap_spec"])
    how = draw.pick((["layers", "hidden_size", "arch", "is_decoder", "extra", "missing", "not_a_dict"]),
               label="tap_spec mutation")
    if how == "layers":
        spec["layers"] = draw.pick(([[], list(range(9)), [-1, 0, 1], ["0", "1", "2"], [0.5, 1, 2],
                                               [True, 1, 2], "all", [0, 1, 2, 3]]), label="layers")
    elif how == "hidden_size":
        spec["hidden_size"] = draw.pick(([0, -1, 65, 2**40, "16", 16.0, 16.5, None]), label="hidden_size")
    elif how == "arch":
        spec["arch"] = draw.pick(([5, None, ["llama"], {"x": 1}]), label="arch")
    elif how == "is_decoder":
        spec["is_decoder"] = draw.pick((["no", 0, None, [True]]), label="is_decoder")
    elif how == "extra":
        spec[draw.pick((["labels", "text", "input_ids", "x"]), label="extra key")] = \
            draw.pick(([[0, 1, 2], "a private sentence", [[1, 2, 3]]]), label="extra value")
    elif how == "missing":
        del spec[draw.pick((sorted(spec)), label="missing key")]
    else:
        spec = draw.pick([[], "spec", None])
    ctx.header["tap_spec"] = spec


def op_hello_counts(fz, ctx, draw):
    key = draw.pick((["num_outputs", "num_classes", "total_steps"]), label="count")
    ctx.header[key] = draw.pick(([0, 1, 2, -1, 33, 2**40, 10**9 + 1, 5]), label="count value")


def op_hello_cache(fz, ctx, draw):
    cache = dict(ctx.header.get("cache") or {})
    how = draw.pick((["memory", "token", "extra", "not_a_dict", "foreign_token"]), label="cache mutation")
    if how == "memory":
        cache["memory_limit_mb"] = draw.pick(([-1, 1e308, "x", True, 0]), label="memory")
    elif how == "token":
        cache["token"] = draw.pick(([5, "", "0" * 32, "../../etc", None]), label="token")
    elif how == "extra":
        cache[draw.pick(["path", "folder", "cache_id", "labels"])] = "/tmp/x"
    elif how == "foreign_token":
        other = next((s.cache_token for s in fz.sessions if s.cache_token and s is not ctx.sess), None)
        cache["token"] = other or "f" * 32
    else:
        cache = draw.pick([[], "cache", 1])
    ctx.header["cache"] = cache


def op_hello_backbone(fz, ctx, draw):
    bb = dict(ctx.header.get("backbone") or {})
    how = draw.pick((["extra", "long", "type"]), label="backbone mutation")
    if how == "extra":
        bb[draw.pick(["path", "source", "trust_remote_code", "text"])] = "/home/user/model"
    elif how == "long":
        bb["name"] = "n" * 300
    else:
        bb[draw.pick(sorted(BACKBONE_KEYS))] = draw.pick([5, "x", None, 1.5, True])
    ctx.header["backbone"] = bb


def op_hello_nested(fz, ctx, draw):
    """hparams and side: a key deleted, an unknown key, a retyped value, a value out of range."""
    what = draw.pick((["hparams", "side"]), label="object")
    obj = dict(ctx.header[what])
    how = draw.pick((["delete", "unknown", "retype", "range"]), label="nested mutation")
    key = draw.pick((sorted(obj)), label="nested key")
    if how == "delete":
        del obj[key]
    elif how == "unknown":
        obj[draw.pick(["lr_scheduler", "__class__", "target", "class_path", "labels"])] = "x"
    elif how == "retype":
        obj[key] = draw.pick((OTHER_VALUES), label="nested value")
    else:
        obj[key] = draw.pick(([-1, 1e308, 2.0, 0, 1.5, "max", 100000]), label="nested range value")
    ctx.header[what] = obj


def op_hello_resume(fz, ctx, draw):
    ctx.header["resume"] = draw.pick(([True, "yes", 1]), label="resume")


def op_hello_new_run(fz, ctx, draw):
    """A valid control: a new run of this identity (a new session, closed again at once)."""
    fz._seq += 1
    ctx.header["run_id"] = f"fz{fz._seq}"


def op_hello_memory(fz, ctx, draw):
    """Within max_taps and max_width but over max_session_mb once built."""
    ctx.header["tap_spec"] = {"layers": list(range(8)), "hidden_size": 64, "arch": "llama", "is_decoder": True}
    ctx.header["run_id"] = "big"


def op_hello_reconfigure(fz, ctx, draw):
    """The live run's name with another configuration."""
    ctx.header.update(draw.pick([{"num_outputs": 5}, {"module": "additive_adapter", "num_outputs": 16},
                                                {"module": "side_tuning", "num_outputs": 3},
                                                {"tap_spec": {**ctx.header["tap_spec"], "layers": [0, 1]}}]))


def op_weight(op: str) -> int:
    """How often an operator is drawn: byte-level 1, generic header/session/tensor 2, those that only one kind
    of frame takes (hello, set_state, training keys and steps) 4, so that each kind's own rules get tried."""
    family = op.split(".")[0]
    return {"bytes": 1, "header": 2, "session": 2, "tensor": 2}.get(family, 4)


def _hello(fz, ctx):
    return ctx.kind == "hello"


def _always(fz, ctx):
    return True


OPS: dict[str, Any] = {
    "header.delete_key": _always, "header.add_key": _always, "header.smuggle": _always,
    "header.type_change": _always, "header.kind_change": _always, "header.reformat": _always,
    "session.wrong_secret": _session_frame, "session.stale_secret": _has_stale,
    "session.foreign_identity": _always, "session.other_session": _session_frame,
    "session.stolen_pair": _session_frame,
    "step.shift": _kinds(*TRAIN_KINDS), "seq.replay_older": _has_history, "seq.retry_last": _can_retry,
    "codec.change": _kinds("train", "train_target", "eval"),
    "keys.mutate": lambda fz, ctx: ctx.kind in TRAIN_KINDS or ("keys" in ctx.header),
    "tensor.dtype": lambda fz, ctx: bool(ctx.tensors), "tensor.shape": lambda fz, ctx: bool(ctx.tensors),
    "tensor.rank": lambda fz, ctx: bool(ctx.tensors), "tensor.extra": _always,
    "tensor.drop": lambda fz, ctx: bool(ctx.tensors),
    "tensor.nonfinite": lambda fz, ctx: any(t.is_floating_point() for t in ctx.tensors.values()),
    "tensor.values": lambda fz, ctx: bool(ctx.tensors),
    "count.oversized": _kinds("train", "train_target", "eval"),
    "bytes.truncate": _always, "bytes.bit_flip": _always, "bytes.st_offsets": _always,
    "bytes.st_length": _always, "bytes.header_length": _always, "bytes.magic": _always,
    "bytes.trailing": _always, "bytes.random": _always,
    "state.model": _kinds("set_state"), "state.optimizer": _kinds("set_state"), "state.scheduler": _kinds("set_state"),
    "state.step": _kinds("set_state"), "state.skeleton": _kinds("set_state"),
    "hello.protocol": _hello, "hello.names": _hello, "hello.module": _hello, "hello.tap_spec": _hello,
    "hello.counts": _hello, "hello.cache": _hello, "hello.backbone": _hello, "hello.nested": _hello,
    "hello.resume": _hello, "hello.new_run": _hello, "hello.memory": _hello, "hello.reconfigure": _hello,
}
OP_FUNCS: dict[str, Any] = {name: globals()["op_" + name.replace(".", "_")] for name in OPS}


def run_fuzz(target: Any, frames: int, *, seed: int | None = None, derandomize: bool = False,
             kinds: tuple[str, ...] | None = None, ops: tuple[str, ...] | None = None) -> dict:
    """``frames`` mutated frames against ``target`` (hypothesis draws the mutations; ``derandomize`` for tests);
    ``kinds`` and ``ops`` narrow the frame kinds and mutation operators drawn from."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    fz = Fuzzer(target)
    fz.only_kinds = kinds or REQUEST_KINDS
    fz.only_ops = ops
    for s in fz.sessions:
        fz.open(s)
    t0 = time.perf_counter()
    controls = fz.controls()

    @settings(max_examples=frames, derandomize=derandomize, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.data())
    def one(data):
        fz.example(data)

    if seed is not None and not derandomize:
        one = hseed(seed)(one)
    one()
    out = fz.result()
    out["controls"] = controls
    out["sessions"] = [f"{sp.identity}/{sp.run_id}: {sp.module}, {TAPS} taps x {WIDTH}, "
                       f"{'cache, ' if sp.cache else ''}{sp.tokens} token(s) per sample" for sp in SPECS]
    out["server_bounds"] = {k: v for k, v in FUZZ_SERVER.items() if k not in ("device", "threads")}
    out["oracle"] = ORACLE_RULES
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["server"] = target.close()
    return out


# ============================================================================================ auth
class Caller:
    """One identity's gRPC link to a serve process (token None: no token)."""

    def __init__(self, address: str, token: str | None) -> None:
        from lightning_mobillm.transport.link import GrpcLink

        self.link = GrpcLink(address, token, connect_timeout=30, call_timeout=60, retries=0)

    def raw(self, data: bytes) -> tuple[str, dict, dict, bytes | None]:
        from lightning_mobillm import protocol as P
        from lightning_mobillm.transport.frames import decode_frame
        from lightning_mobillm.transport.link import LinkError

        try:
            reply = self.link.call(data)
        except LinkError as err:
            return "transport", {"message": str(err)}, {}, None
        frame = decode_frame(reply, P.REPLY_SCHEMAS, require_finite=False)
        return frame.kind, frame.header, frame.tensors, reply

    def call(self, header: dict, tensors: dict | None = None):
        return self.raw(raw_encode(header, tensors or {}))

    def close(self) -> None:
        self.link.close()


def _train_header(spec: SessionSpec, session: dict, step: int, seed: int, keys: list[str] | None = None):
    from lightning_mobillm import protocol as P

    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(BATCH * spec.tokens, TAPS, WIDTH, generator=g)
    tensors = P.pack_acts(acts, torch.full((BATCH,), spec.tokens), "int8")
    if spec.label_free:
        tensors["targets"] = torch.randn(BATCH, spec.num_outputs, generator=g)
    else:
        tensors["labels"] = torch.randint(0, CLASSES, (BATCH,), generator=g)
    header = {"kind": spec.natural, **session, "step": step, "codec": "int8"}
    if keys is not None:
        header["keys"] = keys
    return header, tensors


def run_auth(workdir: Path) -> dict:
    """Unauthorised attempts against alice's sessions over a real serve process with a tokens file."""
    from lightning_mobillm import protocol as P

    workdir.mkdir(parents=True, exist_ok=True)
    tokens_path = workdir / "tokens"
    tokens = write_tokens(tokens_path, ["alice", "bob", "carol", "mallory"])
    serve = ServeProcess({"device": "cpu", "threads": 1, "workdir": str(workdir / "server"),
                          "tokens_file": str(tokens_path), "host": "127.0.0.1", "port": 0}, workdir / "server.log")
    callers = {i: Caller(serve.address, t) for i, t in tokens.items()}
    anon = Caller(serve.address, None)
    stranger = Caller(serve.address, "not-a-token-" + "x" * 20)
    alice, bob = callers["alice"], callers["bob"]
    rows: list[dict] = []
    allowed: list[dict] = []
    lab, pae = SPECS[0], SPECS[1]
    t0 = time.perf_counter()

    def hello(caller: Caller, spec: SessionSpec, **extra) -> dict:
        kind, h, _, _ = caller.call({**hello_header(spec), **extra})
        assert kind == "ok", h
        return h

    # alice's two sessions, trained a little (the PAE one with an activation cache)
    h = hello(alice, lab)
    s_lab = {"session": h["session"], "secret": h["secret"]}
    hello_bytes = raw_encode(hello_header(lab))
    h = hello(alice, pae)
    s_pae = {"session": h["session"], "secret": h["secret"]}
    cache_token = h["cache_token"]
    alice_keys = [f"alice-{i}" for i in range(BATCH)]
    lab_frames = []
    for step in range(3):
        data = raw_encode(*_train_header(lab, s_lab, step, step))
        lab_frames.append(data)
        assert alice.raw(data)[0] == "ok"
        assert alice.call(*_train_header(pae, s_pae, step, 100 + step, alice_keys if step == 0 else
                                         [f"alice-{step}-{i}" for i in range(BATCH)]))[0] == "ok"

    mine = {"lab": s_lab, "pae": s_pae}  # alice's current session headers (a reconnect renews a secret)
    replies: dict[str, bytes | None] = {}

    def victim_state() -> dict:
        out = {}
        for name, s in mine.items():
            kind, h, t, _ = alice.call({"kind": "get_state", **s})
            assert kind == "ok", h
            out[name] = P.unpack_state(h["skeleton"], t["state"])
        return out

    def attempt(kind: str, what: str, caller: Caller, data: bytes, expect_refused: bool = True) -> dict:
        before = victim_state()
        k, h, _, raw = caller.raw(data)
        renewed = None
        for s in mine.values():
            if k == "ok" and h.get("session") == s["session"] and caller is alice:
                renewed = dict(s)
                s["secret"] = h["secret"]
        after = victim_state()
        changed = [f"{n}{p}" for n in before for p in state_diff(before[n], after[n])]
        row = {"kind": kind, "what": what, "refused": k != "ok", "how": (h.get("message") or "ok")[:120],
               "state_unchanged": not changed, **({"changed": changed[:4]} if changed else {})}
        replies[what] = raw
        if renewed is not None:
            k2, _, _, _ = alice.call({"kind": "get_state", **renewed})
            row["old_secret_revoked"] = k2 != "ok"
        (rows if expect_refused else allowed).append(row)
        return row

    def frames_for(session: dict) -> dict[str, bytes]:
        state = victim_state()["lab"]
        skeleton, blob = P.pack_state({"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
                                       "step": 0})
        acts = P.pack_acts(torch.randn(BATCH * 3, TAPS, WIDTH), torch.full((BATCH,), 3), "int8")
        return {
            "get_state": raw_encode({"kind": "get_state", **session}),
            "train": raw_encode(*_train_header(lab, session, 3, 999)),
            "eval": raw_encode({"kind": "eval", **session, "codec": "int8"}, acts),
            "set_state": raw_encode({"kind": "set_state", **session, "skeleton": skeleton}, {"state": blob}),
            "bye": raw_encode({"kind": "bye", **session}),
        }

    # -- no token, a wrong token ----------------------------------------------------------------------------
    for what, caller in (("no token", anon), ("wrong token", stranger)):
        attempt(what, "hello", caller, hello_bytes)
        for name, data in frames_for(s_lab).items():
            attempt(what, name, caller, data)
    # -- a revoked token: carol works, her line is deleted while the server runs, then nothing of hers works --
    carol = callers["carol"]
    h = hello(carol, lab)
    s_carol = {"session": h["session"], "secret": h["secret"]}
    assert carol.call(*_train_header(lab, s_carol, 0, 5))[0] == "ok"
    text = "".join(ln + "\n" for ln in tokens_path.read_text().splitlines() if not ln.startswith("carol "))
    tmp = tokens_path.with_name("tokens.tmp")
    tmp.write_text(text)
    os.replace(tmp, tokens_path)
    attempt("revoked token", "get_state of its own session", carol, raw_encode({"kind": "get_state", **s_carol}))
    attempt("revoked token", "train its own session", carol, raw_encode(*_train_header(lab, s_carol, 1, 6)))
    attempt("revoked token", "hello", carol, hello_bytes)
    attempt("revoked token", "its session and secret from bob", bob, raw_encode({"kind": "get_state", **s_carol}))
    # -- a stolen session string without its secret (bob holds a valid token of his own) ----------------------
    stale = dict(s_lab)
    h = alice.raw(hello_bytes)[1]  # alice reconnects: her previous secret is now stale
    s_lab["secret"] = h["secret"]
    for label, session in (("no secret", {"session": s_lab["session"]}), ("empty secret", {**s_lab, "secret": ""}),
                           ("guessed secret", {**s_lab, "secret": "0" * 32}), ("alice's revoked secret", stale)):
        for name, data in frames_for(session).items():
            attempt("stolen session string without its secret", f"{name} ({label})", bob, data)
    # -- the session and its current secret, from another identity ----------------------------------------------
    for thief in ("bob", "mallory"):
        for name, data in frames_for(s_lab).items():
            attempt("stolen session and secret from another identity", f"{name} by {thief}", callers[thief], data)
    # -- a foreign cache token ---------------------------------------------------------------------------------
    kind, h, _, _ = bob.call({**hello_header(pae), "run_id": "steal", "cache": {"token": cache_token}})
    s_bob = {"session": h.get("session"), "secret": h.get("secret")}
    opened_alices = kind == "ok" and (h.get("cache_token") == cache_token or h.get("cached_keys", 0) > 0)
    rows.append({"kind": "foreign cache token", "what": "hello naming alice's cache token",
                 "refused": not opened_alices, "how": f"bob got cache_token {'=' if opened_alices else '!='} alice's, "
                 f"cached_keys={h.get('cached_keys')}", "state_unchanged": True})
    before = victim_state()
    k, h2, _, _ = bob.call({"kind": "train_cached", **s_bob, "step": 0, "keys": alice_keys})
    read = k == "ok" and not h2.get("missing")
    rows.append({"kind": "foreign cache token", "what": "train_cached on alice's keys", "refused": not read,
                 "how": f"missing={len(h2.get('missing') or [])}/{len(alice_keys)}",
                 "state_unchanged": not any(state_diff(before[n], victim_state()[n]) for n in before)})
    k, h3, _, _ = bob.call(*_train_header(pae, s_bob, 0, 77, alice_keys))  # writes under alice's keys: bob's cache
    kind, ha, _, _ = alice.call({**hello_header(pae, cache_token)})  # alice reconnects: her cache as it was?
    s_pae["secret"] = ha["secret"]
    k4, h4, _, _ = alice.call({"kind": "train_cached", **s_pae, "step": 3, "keys": alice_keys})
    rows.append({"kind": "foreign cache token", "what": "overwrite alice's entries (train_target under her keys)",
                 "refused": ha.get("cached_keys") == 3 * BATCH and k4 == "ok" and not h4.get("missing")
                 and ha.get("cache_token") == cache_token,
                 "how": f"bob's write {k}; alice still holds {ha.get('cached_keys')} entries and trains on them "
                 f"({k4}, missing={len(h4.get('missing') or [])})", "state_unchanged": True})
    bob.call({"kind": "bye", **s_bob})
    # -- replayed hellos ------------------------------------------------------------------------------------------
    row = attempt("replayed hello from another identity", "bob replays alice's hello bytes", bob, hello_bytes)
    k, h, _, _ = alice.call({"kind": "get_state", **s_lab})
    row["refused"] = row["how"] == "ok" and k == "ok"  # it opened bob's own session; alice's secret still works
    row["how"] = "opened the replayer's own session (bob/lab); alice's session and secret untouched" if row["refused"] \
        else row["how"]
    bob.call({"kind": "bye", "session": "bob/lab", "secret": "?"})
    row = attempt("replayed hello from the same identity", "alice replays her own hello", alice, hello_bytes, False)
    row["allowed_as_reconnect"] = row["how"] == "ok"
    row["note"] = "allowed: a reconnect of the same identity keeps the state and revokes the old secret"
    # -- a replayed set_state after training resumed ------------------------------------------------------------
    state = victim_state()["lab"]
    skeleton, blob = P.pack_state(state)
    set_bytes = raw_encode({"kind": "set_state", **s_lab, "skeleton": skeleton}, {"state": blob})
    assert alice.raw(set_bytes)[0] == "ok"  # right after a hello: the resume of her own checkpoint
    step = int(state["step"])
    for i in range(2):
        data = raw_encode(*_train_header(lab, s_lab, step + i, 500 + i))
        lab_frames.append(data)
        k, _, _, last_reply = alice.raw(data)
        assert k == "ok"
    attempt("replayed set_state after training resumed", "alice's own set_state bytes again", alice, set_bytes)
    attempt("replayed set_state after training resumed", "by bob", bob, set_bytes)
    # -- replayed older training frames ----------------------------------------------------------------------------
    attempt("replayed older train frame", "alice's step-0 frame (old secret)", alice, lab_frames[0])
    resigned = []
    for data in lab_frames[:-1]:
        hl = struct.unpack_from(">I", data, 5)[0]
        header = {**json.loads(data[9:9 + hl]), "secret": s_lab["secret"]}
        resigned.append(raw_encode(header, body=data[9 + hl:]))
    for i, data in enumerate(resigned):
        attempt("replayed older train frame", f"frame {i} re-sent with the current secret", alice, data)
    attempt("replayed older train frame", "the last frame by bob", bob, lab_frames[-1])
    row = attempt("replayed older train frame", "the last applied frame again (a retry)", alice, lab_frames[-1], False)
    row["note"] = "a retry: the stored reply is returned and nothing is applied twice"
    row["same_reply_bytes_as_the_first_time"] = replies[row["what"]] == last_reply
    # -- sums ------------------------------------------------------------------------------------------------------
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_kind[r["kind"]]["attempts"] += 1
        by_kind[r["kind"]]["refused"] += r["refused"]
        by_kind[r["kind"]]["state_unchanged"] += r["state_unchanged"]
    for c in (*callers.values(), anon, stranger):
        c.close()
    alive = serve.alive()
    serve.stop()
    return {"attempts": len(rows), "refused": sum(r["refused"] for r in rows),
            "state_unchanged": sum(r["state_unchanged"] for r in rows),
            "by_kind": {k: dict(v) for k, v in by_kind.items()}, "rows": rows, "allowed_legitimate": allowed,
            "server_alive_at_end": alive, "server_log": serve.log_counts(),
            "seconds": round(time.perf_counter() - t0, 1)}


# ============================================================================================ load
#: the quickstart recipe's shape (SmolLM2-135M: 30 taps x 576, 5 classes, batch 8 x 128 tokens, select all, int8)
LOAD_TAPS, LOAD_WIDTH, LOAD_CLASSES, LOAD_BATCH, LOAD_TOKENS = 30, 576, 5, 8, 128


def load_hello() -> dict:
    from lightning_mobillm import protocol as P
    from lightning_mobillm.modules import SideTuningModule
    from lightning_mobillm.specs import BackboneConfig

    m = SideTuningModule(backbone=BackboneConfig(source="smollm2-135m"), num_classes=LOAD_CLASSES, reduction=8,
                         dropout=0.1, lr=1e-3)
    return {"device_id": "dev", "run_id": "load", "module": "side_tuning", "side": m.side_config.to_dict(),
            "hparams": P.json_safe(m.server_hparams()),
            "tap_spec": {"layers": list(range(LOAD_TAPS)), "hidden_size": LOAD_WIDTH, "arch": "llama",
                         "is_decoder": True},
            "num_classes": LOAD_CLASSES, "num_outputs": LOAD_CLASSES, "total_steps": 100_000, "codec": "int8",
            "backbone": {"arch": "llama", "name": "smollm2-135m", "hidden_size": LOAD_WIDTH,
                         "num_layers": LOAD_TAPS, "is_decoder": True, "digest": "0" * 64}}


def child_device(cfg: dict) -> dict:
    """A device process: its own identity and token; real-size valid frames through ServerClient in a loop."""
    from safetensors.torch import save

    from lightning_mobillm import protocol as P
    from lightning_mobillm.client import ServerClient
    from lightning_mobillm.transport.frames import Frame, encode_frame

    torch.set_num_threads(1)
    token = Path(cfg["token_file"]).read_text().strip()
    g = torch.Generator().manual_seed(cfg["seed"])
    n = LOAD_BATCH * LOAD_TOKENS
    # one real-size frame body, built once: the header (step, secret) changes per call, the tensors need not
    body = save({"acts.q": torch.randint(-127, 128, (n, LOAD_TAPS, LOAD_WIDTH), dtype=torch.int8, generator=g),
                 "acts.scale": torch.rand(n, LOAD_TAPS, generator=g) * 0.05 + 0.01,
                 "lengths": torch.full((LOAD_BATCH,), LOAD_TOKENS, dtype=torch.int64),
                 "labels": torch.randint(0, LOAD_CLASSES, (LOAD_BATCH,), generator=g)})
    eval_tensors = P.pack_acts(torch.randn(2 * LOAD_TOKENS, LOAD_TAPS, LOAD_WIDTH, generator=g),
                               torch.full((2,), LOAD_TOKENS), "int8")
    lat: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    calls = Counter()
    client = ServerClient(cfg["address"], token, call_timeout=cfg["call_timeout"], retries=0)
    deadline = time.monotonic() + cfg["seconds"]

    def timed(kind: str, fn):
        calls[kind] += 1
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 - every failed legitimate call is counted
            calls[kind + "_failed"] += 1
            failures.append(f"{kind}: {type(err).__name__}: {err}"[:200])
            return None
        lat[kind].append(time.perf_counter() - t)
        return out

    client.open()
    reply = timed("hello", lambda: client.hello(P.HELLO, {**cfg["hello"], "device_id": cfg["identity"]}))
    step = reply.header["step"] if reply is not None else 0
    i = 0
    while time.monotonic() < deadline and reply is not None:
        i += 1
        if i % cfg["state_every"] == 0:
            timed("get_state", client.pull_state)
        elif i % cfg["eval_every"] == 0:
            timed("eval", lambda: client.request(Frame(kind=P.EVAL, header={"codec": "int8"}, tensors=eval_tensors)))
        else:
            data = raw_encode({"kind": P.TRAIN, **client.session_header(step=step, codec="int8")}, body=body)
            out = timed("train", lambda data=data: client.decode_reply(client.call(data)))
            if out is not None:
                step += 1
            else:  # learn where the server is (a failed call may or may not have been applied)
                again = timed("hello", lambda: client.hello(P.HELLO, {**cfg["hello"], "device_id": cfg["identity"]}))
                step = again.header["step"] if again is not None else step
    timed("bye", lambda: client.call(encode_frame(Frame(kind=P.BYE, header=client.session_header()))))
    client.session = None
    client.close()
    return {"identity": cfg["identity"], "calls": dict(calls), "failures": failures[:10], "steps": step,
            "latencies": {k: [round(x, 4) for x in v] for k, v in lat.items()}, "frame_bytes": len(body)}


def child_step(cfg: dict) -> dict:
    """One session of the load's shape on an in-process SideServer: RSS before and the peak over three real-size
    training steps (what one step in flight costs the server beyond its session's budget)."""
    import resource

    import psutil
    from safetensors.torch import save

    from lightning_mobillm import protocol as P
    from lightning_mobillm.server.runtime import SideServer
    from lightning_mobillm.server_config import ServerConfig
    from lightning_mobillm.transport.frames import decode_frame

    torch.set_num_threads(cfg["threads"])
    server = SideServer(ServerConfig(device="cpu", workdir=cfg["workdir"]))
    reply = decode_frame(server.handle(raw_encode({"kind": "hello", "protocol": P.PROTOCOL_VERSION, **load_hello()}),
                                       "probe"), P.REPLY_SCHEMAS)
    session = {"session": reply.header["session"], "secret": reply.header["secret"]}
    g = torch.Generator().manual_seed(0)
    n = LOAD_BATCH * LOAD_TOKENS
    body = save({"acts.q": torch.randint(-127, 128, (n, LOAD_TAPS, LOAD_WIDTH), dtype=torch.int8, generator=g),
                 "acts.scale": torch.rand(n, LOAD_TAPS, generator=g) * 0.05 + 0.01,
                 "lengths": torch.full((LOAD_BATCH,), LOAD_TOKENS, dtype=torch.int64),
                 "labels": torch.randint(0, LOAD_CLASSES, (LOAD_BATCH,), generator=g)})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss0 = psutil.Process().memory_info().rss / 2**20
    seconds = []
    for step in range(3):
        t = time.perf_counter()
        data = raw_encode({"kind": "train", **session, "step": step, "codec": "int8"}, body=body)
        out = decode_frame(server.handle(data, "probe"), P.REPLY_SCHEMAS, require_finite=False)
        assert out.kind == "ok", out.header
        seconds.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_mb_with_session": rss0, "peak_rss_mb_over_steps": peak, "maxrss_mb_before_steps": before,
            "step_transient_mb": peak - max(before, rss0), "step_s": seconds, "frame_bytes": len(body),
            "threads": cfg["threads"]}


def child_slow(cfg: dict) -> dict:
    """Unauthenticated clients: connections whose calls send metadata (no token, or a wrong one) and then never
    finish the request body, each re-issued after it is refused; TCP connections that send nothing; and
    connections that send only the HTTP/2 preface."""
    import grpc

    from lightning_mobillm.transport.link import METHOD, TOKEN_KEY

    stop = threading.Event()
    stats: Counter = Counter()
    refusal_s: list[float] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        channel = grpc.insecure_channel(cfg["address"], options=[("grpc.use_local_subchannel_pool", 1)])
        metadata = () if i % 2 == 0 else ((TOKEN_KEY, "wrong-token-" + str(i)),)
        while not stop.is_set():
            released = threading.Event()

            def body(released=released):
                released.wait(120)  # the body never comes while the call is open
                return
                yield b""

            t = time.perf_counter()
            fut = channel.stream_unary(METHOD).future(body(), metadata=metadata, timeout=cfg["call_timeout"])
            try:
                fut.result(timeout=cfg["call_timeout"] + 5)
                code = "answered"
            except grpc.RpcError as err:
                code = err.code().name
            except Exception as err:  # noqa: BLE001
                code = type(err).__name__
            released.set()
            with lock:
                stats[code] += 1
                refusal_s.append(time.perf_counter() - t)
            stop.wait(cfg["interval"])
        channel.close()

    host, port = cfg["address"].rsplit(":", 1)
    idle, preface = [], []
    for _ in range(cfg["idle_tcp"]):
        idle.append(socket.create_connection((host, int(port)), timeout=10))
    for _ in range(cfg["preface_tcp"]):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        preface.append(s)
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(cfg["stalled"])]
    for t in threads:
        t.start()
    time.sleep(cfg["seconds"])
    stop.set()
    for t in threads:
        t.join(timeout=cfg["call_timeout"] + 10)

    def still_open(s: socket.socket) -> bool:
        s.setblocking(False)
        try:
            return s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    out = {"stalled_connections": cfg["stalled"], "calls": sum(stats.values()), "codes": dict(stats),
           "refusal_s_p50": percentile(refusal_s, 50), "refusal_s_p95": percentile(refusal_s, 95),
           "refusal_s_max": max(refusal_s) if refusal_s else None,
           "idle_tcp": cfg["idle_tcp"], "idle_tcp_still_open_at_end": sum(still_open(s) for s in idle),
           "preface_tcp": cfg["preface_tcp"], "preface_tcp_still_open_at_end": sum(still_open(s) for s in preface)}
    for s in idle + preface:
        s.close()
    return out


def spawn_child(name: str, cfg: dict, workdir: Path) -> subprocess.Popen:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(cfg))
    log = (workdir / f"{name}.log").open("wb")
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", name.split("-")[0],
                             "--child-config", str(path)], stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                            start_new_session=True)


def child_result(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return {"error": "timed out"}
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {"error": f"exit {proc.returncode}, no result"}


def run_load(args: argparse.Namespace, workdir: Path) -> dict:
    """``args.load_devices`` device processes against one serve process while slow unauthenticated clients
    are connected; the server's RSS sampled throughout."""
    import psutil

    from lightning_mobillm.server_config import ServerConfig

    workdir.mkdir(parents=True, exist_ok=True)
    identities = [f"device-{i:02d}" for i in range(args.load_devices)]
    tokens = write_tokens(workdir / "tokens", identities)
    for ident, tok in tokens.items():  # each device reads its own token from a file (never argv)
        (workdir / f"{ident}.token").write_text(tok)
        (workdir / f"{ident}.token").chmod(0o600)
    config = ServerConfig(device="cpu", threads=args.load_server_threads, workdir=str(workdir / "server"),
                          tokens_file=str(workdir / "tokens"))
    settings = {k: getattr(config, k) for k in ("device", "threads", "workdir", "tokens_file")}
    settings.update(host="127.0.0.1", port=0)
    serve = ServeProcess(settings, workdir / "server.log", env=dict(kv.split("=", 1) for kv in args.load_server_env))
    proc = psutil.Process(serve.pid)
    samples: list[tuple[float, float]] = []
    loads: list[float] = []
    stop = threading.Event()

    devices: list[subprocess.Popen] = []
    aborted: list[str] = []
    available: list[float] = []

    def sampler() -> None:
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                samples.append((time.monotonic(), proc.memory_info().rss / 2**20))
            loads.append(os.getloadavg()[0])
            available.append(psutil.virtual_memory().available / 2**20)
            if available[-1] < args.load_min_available_mb and not aborted:  # guard the shared machine
                aborted.append(f"the machine had {available[-1]:.0f} MB available (< {args.load_min_available_mb:.0f}); "
                               "device processes stopped")
                for d in devices:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(d.pid, 15)
            stop.wait(args.load_sample_s)

    t_start = time.monotonic()
    threading.Thread(target=sampler, daemon=True).start()
    time.sleep(args.load_idle_s)
    idle = [r for _, r in samples]
    idle_mb = percentile(idle, 50)
    hello = load_hello()
    budget_model = side_network_mb({**hello, "kind": "hello"}, hello["tap_spec"]["layers"], LOAD_WIDTH)
    step_probe = child_result(spawn_child("step", {"threads": args.load_server_threads,
                                                    "workdir": str(workdir / "probe")}, workdir), 600)
    slow = spawn_child("slow", {"address": serve.address, "stalled": args.load_slow, "idle_tcp": args.load_idle_tcp,
                                "preface_tcp": args.load_idle_tcp, "seconds": args.load_seconds + 20,
                                "interval": args.load_slow_interval, "call_timeout": 30.0}, workdir)
    time.sleep(5)  # the slow clients are connected before the first device calls
    t_devices = time.monotonic()
    devices += [spawn_child(f"device-{i}", {"address": serve.address, "identity": ident, "seed": i,
                                            "token_file": str(workdir / f"{ident}.token"), "hello": hello,
                                            "seconds": args.load_seconds, "call_timeout": args.load_call_timeout,
                                            "eval_every": 10, "state_every": 25}, workdir)
                for i, ident in enumerate(identities)]
    results = [child_result(p, args.load_seconds + args.load_call_timeout + 300) for p in devices]
    t_end = time.monotonic()
    slow_result = child_result(slow, 120)
    time.sleep(3)
    stop.set()
    alive = serve.alive()
    serve.stop()
    during = [r for t, r in samples if t_devices <= t <= t_end]
    lat_all: list[float] = []
    lat_by: dict[str, list[float]] = defaultdict(list)
    calls, failures, failure_examples, steps, frame_bytes = 0, 0, [], 0, 0
    for r in results:
        if "error" in r:
            failures += 1
            failure_examples.append(r["error"])
            continue
        calls += sum(v for k, v in r["calls"].items() if not k.endswith("_failed"))
        failures += sum(v for k, v in r["calls"].items() if k.endswith("_failed"))
        failure_examples += r["failures"][:2]
        steps += r["steps"]
        frame_bytes = r["frame_bytes"]
        for k, v in r["latencies"].items():
            lat_by[k] += v
            lat_all += v
    sessions = len(identities)
    budget = budget_model + 0.0  # no session asks for an activation cache
    rss_max = max(during) if during else None
    return {
        "devices": sessions, "device_processes": len(devices), "seconds": args.load_seconds,
        "wall_s": round(t_end - t_devices, 1),
        "frame": {"kind": "train", "codec": "int8", "tokens": LOAD_BATCH * LOAD_TOKENS, "taps": LOAD_TAPS,
                  "width": LOAD_WIDTH, "bytes": frame_bytes},
        "legit_calls": calls, "legit_failures": failures, "legit_failure_examples": failure_examples[:10],
        "train_steps": steps, "train_steps_per_s": round(steps / max(1e-9, t_end - t_devices), 2),
        "latency_s": {"p50": percentile(lat_all, 50), "p95": percentile(lat_all, 95), "max": max(lat_all, default=None),
                      **{k: {"p50": percentile(v, 50), "p95": percentile(v, 95), "n": len(v)}
                         for k, v in sorted(lat_by.items())}},
        "server_rss_mb_idle": idle_mb, "server_rss_mb_max": rss_max,
        "server_rss_mb_mean": sum(during) / len(during) if during else None, "rss_samples": len(samples),
        "per_session_budget_mb": budget,
        "per_session_budget_parts": {"side_network_training_mb (weights, grads, 2 AdamW moments, undo copy; as the server "
                                     "sizes it)": budget_model, "activation_cache_mb": 0.0},
        "config_max_per_session_mb": config.max_session_mb + config.cache_memory_mb,
        # the budgets the server is configured with: one per session (its side network's training memory) and
        # one per compute place (max_concurrent_steps: the steps that may be in flight at once, each costing what
        # one real-size step costs beyond its session, measured by the probe in this run)
        "max_concurrent_steps": config.max_concurrent_steps,
        "target_rss_mb": (idle_mb + sessions * budget + config.max_concurrent_steps
                          * step_probe.get("step_transient_mb", float("nan"))) if idle_mb is not None else None,
        "one_step_probe": step_probe,
        "aborted": aborted, "min_available_mb": min(available, default=None),
        "server": {"threads": args.load_server_threads, "max_workers": config.max_workers,
                   "env": args.load_server_env,
                   "max_concurrent_rpcs": config.max_concurrent_rpcs,
                   "max_calls_per_identity": config.max_calls_per_identity,
                   "release_memory": config.release_memory, "alive_at_end": alive, **serve.log_counts()},
        "slow_clients": slow_result, "load1_max": max(loads, default=None),
        "load1_mean": sum(loads) / len(loads) if loads else None,
        "device_errors": [r["error"] for r in results if "error" in r],
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }


# ============================================================================================ faults
#: a tiny run's data: three topics learnable from their words (as tests/conftest.py's tiny data set)
TINY_TOPICS = {
    "sport": "match goal team coach player league score win season cup",
    "tech": "software chip phone network data computer internet code robot cloud",
    "money": "bank market price shares profit economy trade tax growth stocks",
}
TINY_FILLER = "the a of and to in on with for said today new year people".split()


def write_tiny_run_assets(folder: Path, n: int = 180) -> tuple[Path, Path]:
    """A tiny random Llama with a word-level tokenizer over the topic words, and a JSON-lines data set."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    model_dir, data = folder / "tiny-llama", folder / "tiny.jsonl"
    words = sorted({w for ws in TINY_TOPICS.values() for w in ws.split()} | set(TINY_FILLER) | {"Article", "Topic", ":"})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", *words, *TINY_TOPICS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                 intermediate_size=64, num_key_value_heads=2, pad_token_id=0)
                                     ).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(model_dir)
    rng = random.Random(0)
    names = sorted(TINY_TOPICS)
    with data.open("w") as f:
        for i in range(n):
            label = names[i % len(names)]
            ws = [rng.choice(TINY_TOPICS[label].split()) for _ in range(rng.randint(3, 8))]
            ws += [rng.choice(TINY_FILLER) for _ in range(rng.randint(2, 10))]
            rng.shuffle(ws)
            f.write(json.dumps({"text": " ".join(ws), "label": label}) + "\n")
    return model_dir, data


def child_fit(cfg: dict) -> dict:
    """One MobiLLM fit of the tiny model (faults placed by the caller through MOBILLM_FAULTS); every trained batch's
    sample indices appended to ``batches.jsonl`` as it ends (a killed run leaves what it trained), then the trained
    side network's validation accuracy, computed on the device the same way for every run."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_mobillm.callbacks import QuantizedTransfer
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.modules import SideTuningModule
    from lightning_mobillm.server_config import ServerConfig
    from lightning_mobillm.specs import BackboneConfig
    from lightning_mobillm.strategies import ServerAssistedStrategy

    torch.set_num_threads(1)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    data = TextClassificationDataModule(dataset="json", data_files=cfg["data"], prompt="Article : {text} Topic :",
                                        max_length=20, batch_size=8, tokenizer=cfg["model"])
    model = SideTuningModule(backbone=BackboneConfig(source=cfg["model"]), num_classes=3, lr=1e-2, dropout=0.0,
                             pool="mean")
    embedded = ServerConfig(device="cpu", threads=1, checkpoint_every_n_steps=cfg["server_every"],
                            workdir=cfg["workdir"])
    strategy = ServerAssistedStrategy(server=cfg.get("server"), token_file=cfg.get("token_file"), pipeline_depth=1,
                                      retries=1, connect_timeout=60, reconnect_timeout=120, embedded=embedded)
    log = (out / "batches.jsonl").open("a")

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            log.write(json.dumps({"step": trainer.global_step - 1, "indices": batch["index"].tolist()}) + "\n")
            log.flush()
            os.fsync(log.fileno())

    callbacks: list = [QuantizedTransfer("int8"), Record()]
    if cfg.get("device_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=cfg["device_every"], save_top_k=-1,
                                         save_last=True))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=cfg["steps"], callbacks=callbacks, logger=False,
                        enable_checkpointing=bool(cfg.get("device_every")), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
    trainer.fit(model, data, ckpt_path=cfg.get("ckpt_path"))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "weights.pt")
    result = {"steps": trainer.global_step, "server_steps": strategy.device_stats.last_train_reply.get("server_steps"),
              "recoveries": strategy.recoveries, "replayed_steps": strategy.replayed_steps}
    val = L.Trainer(strategy=ServerAssistedStrategy(server="inprocess", inference="local",
                                                    embedded=ServerConfig(device="cpu", workdir=str(out / "val"))),
                    accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
                    ).validate(model, data, verbose=False)
    result["val_acc"] = float(val[0]["val/acc"])
    return result


def _fit(name: str, cfg: dict, work: Path, fault: str | None, timeout: float = 900) -> tuple[int, dict, str]:
    from lightning_mobillm import faults

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", faults.ENV_DIR: str(work / "fired")}
    env.pop(faults.ENV, None)
    env.pop("MOBILLM_TOKEN", None)
    if fault:
        env[faults.ENV] = fault
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "fit", "--child-config", str(path)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)
    (work / f"{name}.log").write_text(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    reached = [ln for ln in proc.stdout.splitlines() if ln.startswith(faults.MARKER)]
    return proc.returncode, (json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {}), "\n".join(reached)


def _batches(out: Path) -> list[list[int]]:
    rows = [json.loads(ln) for ln in (out / "batches.jsonl").read_text().splitlines() if ln.strip()]
    return [r["indices"] for r in rows]


def _accounting(history: list[list[int]], reference: list[list[int]]) -> dict[str, int]:
    got, want = Counter(i for b in history for i in b), Counter(i for b in reference for i in b)
    return {"samples_lost": sum((want - got).values()), "samples_twice": sum((got - want).values()),
            "same_batches_in_the_same_order": history == reference}


def _weights_equal(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run_faults(args: argparse.Namespace, work: Path) -> dict:
    """Kills at random (seeded) steps of a tiny real run: the embedded server SIGKILLed twice mid-fit (restarted by
    the device, the lost steps replayed), and the device SIGKILLed once against a standalone serve (resumed from its
    last checkpoint on the session the server kept); each compared with an uninterrupted run of the same seed."""
    hook = "lightning_mobillm/faults.py"
    if not (REPO / hook).exists():
        return {"status": "not measured", "why": f"the fault hook {hook} (named kill points) is not in this code"}
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data = write_tiny_run_assets(work)
    steps, every = args.faults_steps, args.faults_checkpoint_every
    rng = random.Random(args.seed)
    server_kill_steps = sorted(rng.sample(range(2, steps - 1), 2))
    device_kill_step = rng.randrange(every + 1, steps - 1)
    base = {"model": str(model_dir), "data": str(data), "steps": steps, "server_every": every}
    t0 = time.perf_counter()
    # the uninterrupted reference: the same run, over the in-process link
    code, ref, _ = _fit("reference", {**base, "out": str(work / "reference"), "server": "inprocess",
                                      "workdir": str(work / "reference" / "server")}, work, None)
    if code != 0:
        return {"status": "failed", "why": f"the reference run failed: {(work / 'reference.log').read_text()[-1500:]}"}
    reference = _batches(work / "reference")
    rows = {}
    # 1. the embedded server killed after applying steps a and b (before replying)
    fault = ",".join(f"server:after_train_step@{k}=kill" for k in server_kill_steps)
    code, res, _ = _fit("server-kills", {**base, "out": str(work / "server-kills"),
                                         "workdir": str(work / "server-kills" / "server")}, work, fault)
    fired = work / "fired"  # MOBILLM_FAULTS_DIR: one file per fault that fired (in whichever process)
    rows["server_kills"] = {"fault": fault, "exit_code": code, "kills_fired": len(list(fired.glob("server-*.fired"))),
                            **res,
                            **_accounting(_batches(work / "server-kills"), reference),
                            "weights_equal_to_reference": code == 0 and _weights_equal(
                                work / "server-kills" / "weights.pt", work / "reference" / "weights.pt")}
    # 2. the device killed after step c against a standalone serve; resumed from its last checkpoint
    tokens = write_tokens(work / "tokens", ["phone"])
    (work / "phone.token").write_text(tokens["phone"])
    serve = ServeProcess({"device": "cpu", "threads": 1, "workdir": str(work / "standalone"), "host": "127.0.0.1",
                          "port": 0, "tokens_file": str(work / "tokens"), "checkpoint_every_n_steps": every},
                         work / "standalone.log")
    try:
        remote = {**base, "server": serve.address, "token_file": str(work / "phone.token"), "device_every": every}
        fault = f"device:after_train_step@{device_kill_step}=kill"
        code1, _, _ = _fit("device-kill-1", {**remote, "out": str(work / "device-kill-1"),
                                                   "workdir": str(work / "unused")}, work, fault)
        ckpt = work / "device-kill-1" / "ckpt" / "last.ckpt"
        resumed_at = int(torch.load(ckpt, weights_only=True)["global_step"]) if ckpt.exists() else None
        code2, res, _ = _fit("device-kill-2", {**remote, "out": str(work / "device-kill-2"), "ckpt_path": str(ckpt),
                                               "workdir": str(work / "unused")}, work, None)
    finally:
        serve.stop()
    first = _batches(work / "device-kill-1")
    history = first[:resumed_at or 0] + (_batches(work / "device-kill-2") if code2 == 0 else [])
    rows["device_kill"] = {"fault": fault, "first_exit_code": code1, "kills_fired": len(list(fired.glob("device-*.fired"))),
                           "resumed_from_step": resumed_at, "steps_trained_before_the_kill": len(first),
                           "second_exit_code": code2, **res, **_accounting(history, reference),
                           "weights_equal_to_reference": code2 == 0 and _weights_equal(
                               work / "device-kill-2" / "weights.pt", work / "reference" / "weights.pt"),
                           "note": "the server's history after the resume: the first run's steps before its "
                                   "checkpoint, then the second run's (the steps after the checkpoint are rolled back "
                                   "by the resume's set_state)"}
    kill_rows = list(rows.values())
    return {
        "status": "measured", "run": f"tiny random Llama (4 x 32), 180 texts of 3 topics, batch 8, {steps} steps, "
                                      f"server checkpoint every {every} steps, one torch thread, seed 0",
        "server_kills": rows["server_kills"]["kills_fired"], "device_kills": rows["device_kill"]["kills_fired"],
        "samples_lost": sum(r["samples_lost"] for r in kill_rows),
        "samples_twice": sum(r["samples_twice"] for r in kill_rows),
        "final_val_acc": {"after_server_kills": rows["server_kills"].get("val_acc"),
                          "after_device_kill": rows["device_kill"].get("val_acc")},
        "reference_val_acc": ref.get("val_acc"), "reference_steps": ref.get("steps"), "runs": rows,
        "seconds": round(time.perf_counter() - t0, 1)}


# ============================================================================================ main
SECTIONS = ("fuzz", "auth", "faults", "load")


def code_info() -> dict:
    """Which code ran: the commit, and whether it ran from a clean export of it (``BENCH_GIT_COMMIT``, set by whoever
    exported it) or from a working tree (with the library files that differed from the commit)."""
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--", "lightning_mobillm"], cwd=REPO, capture_output=True,
                               text=True).stdout.split("\n")
        return {"git_commit": head, "ran_from": str(REPO), "library_files_differing_from_commit":
                [ln.strip() for ln in dirty if ln.strip()]}
    return {"git_commit": os.environ.get("BENCH_GIT_COMMIT", "unknown"), "ran_from": f"a clean export ({REPO})",
            "library_files_differing_from_commit": []}


def pytest_processes() -> int:
    import psutil

    n = 0
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any("pytest" in part for part in (p.info["cmdline"] or [])):
                n += 1
    return n


def wait_for_quiet_machine(max_wait_s: float) -> dict:
    """Before the load measurement: wait (at most ``max_wait_s``) until no pytest process runs."""
    t0 = time.monotonic()
    seen = pytest_processes()
    while seen and time.monotonic() - t0 < max_wait_s:
        time.sleep(15)
        seen = pytest_processes()
    return {"waited_s": round(time.monotonic() - t0), "pytest_processes_at_start": seen,
            "load1_at_start": os.getloadavg()[0]}


def targets(out: dict) -> tuple[dict, list[str]]:
    met: dict[str, bool] = {}
    notes: list[str] = []
    for name in ("fuzz", "fuzz_grpc"):
        f = out.get(name)
        if not f:
            continue
        met[f"{name}: every invalid frame refused"] = f["accepted_invalid"] == 0
        met[f"{name}: no state changed by a refused or invalid frame"] = f["state_changed"] == 0
        met[f"{name}: the next valid frame trains"] = f["next_valid_failed"] == 0
        if f["accepted_invalid"]:
            notes.append(f"{name}: {f['accepted_invalid']} invalid frame(s) accepted; see {name}.findings (the "
                         "frame's mutations, what hypothesis drew, the oracle's reason and what changed)")
        if f["state_changed"]:
            notes.append(f"{name}: {f['state_changed']} frame(s) changed a session's state although refused or "
                         f"invalid; see {name}.findings")
        if f["refused_valid"]:
            notes.append(f"{name}: {f['refused_valid']} frame(s) the oracle judged valid were refused (not a "
                         "security problem; listed in accepted_or_refused_valid_examples)")
    if out.get("auth"):
        a = out["auth"]
        met["auth: every unauthorised attempt refused"] = a["refused"] == a["attempts"]
        met["auth: victim state unchanged after every attempt"] = a["state_unchanged"] == a["attempts"]
        met["auth: a replayed same-identity hello revokes the old secret"] = all(
            r.get("old_secret_revoked", True) for r in a["allowed_legitimate"])
    faults = out.get("faults", {})
    if faults.get("status") == "measured":
        runs = faults["runs"].values()
        met["faults: zero samples lost or trained twice"] = faults["samples_lost"] == faults["samples_twice"] == 0
        met["faults: final accuracy within 1 point of the uninterrupted run"] = all(
            r.get("val_acc") is not None and abs(r["val_acc"] - faults["reference_val_acc"]) <= 0.01 for r in runs)
        met["faults (informational): final side network bit-identical to the uninterrupted run's"] = all(
            r["weights_equal_to_reference"] for r in runs)
        for name, r in faults["runs"].items():
            if r.get("val_acc") is None or r["samples_lost"] or r["samples_twice"]:
                notes.append(f"faults: {name} ({r['fault']}): exit {r.get('exit_code', r.get('second_exit_code'))}, "
                             f"{r['samples_lost']} samples lost, {r['samples_twice']} trained twice")
    elif faults:
        notes.append(f"faults: {faults['status']}: " + faults["why"])
    if out.get("load"):
        ld = out["load"]
        met["load: >= 16 device processes"] = ld["device_processes"] >= 16
        met["load: >= 600 s"] = ld["seconds"] >= 600
        met["load: no legitimate call failed with slow unauthenticated clients connected"] = ld["legit_failures"] == 0
        met["load: >= 64 slow unauthenticated clients"] = ld["slow_clients"].get("stalled_connections", 0) >= 64
        met["load: server RSS <= idle + sessions x per-session budget + max_concurrent_steps x one step"] = (
            ld["server_rss_mb_max"] is not None and ld["server_rss_mb_max"] <= ld["target_rss_mb"])
        if ld["seconds"] < 600 or ld["device_processes"] < 16:
            notes.append(f"load: a reduced run ({ld['device_processes']} devices, {ld['seconds']} s)")
        transient = ld["one_step_probe"].get("step_transient_mb")
        if not met["load: server RSS <= idle + sessions x per-session budget + max_concurrent_steps x one step"]:
            notes.append(f"load: server RSS peaked at {ld['server_rss_mb_max']:.0f} MB against the target "
                         f"{ld['target_rss_mb']:.0f} MB (idle {ld['server_rss_mb_idle']:.0f} + {ld['devices']} x "
                         f"{ld['per_session_budget_mb']:.1f} MB + {ld['max_concurrent_steps']} x "
                         f"{transient or float('nan'):.0f} MB, one real-size step's transient measured in a fresh "
                         "process)")
        if ld["legit_failures"]:
            notes.append(f"load: {ld['legit_failures']} of {ld['legit_calls']} legitimate calls failed: "
                         f"{sorted(set(ld['legit_failure_examples']))[:3]}")
        cpus = out.get("machine", {}).get("cpus") or 1
        if (ld.get("load1_mean") or 0) > 2 * cpus:
            notes.append(f"load: the machine was busy (1-minute load {ld['load1_mean']:.1f} mean, {ld['load1_max']:.1f} "
                         f"max on {cpus} cpus): the devices, the server and the slow clients share the cores, and "
                         "any other job on the machine adds to it; latencies and refusal times are inflated")
    return met, notes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where to write the JSON")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated subset of {SECTIONS}")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed of the fuzzer")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--fuzz-frames", type=int, default=3000, help="mutated frames against the in-process server")
    p.add_argument("--fuzz-grpc-frames", type=int, default=500,
                   help="mutated frames through a real serve process over gRPC (0: skip)")
    p.add_argument("--faults-steps", type=int, default=16, help="training steps of the tiny faulted runs")
    p.add_argument("--faults-checkpoint-every", type=int, default=4,
                   help="the server's (and the device's) checkpoint interval in the faulted runs")
    p.add_argument("--update", action="store_true",
                   help="keep the other sections of an existing --out file; replace only the sections run now")
    p.add_argument("--load-devices", type=int, default=16, help="device processes (>= 16 for the target)")
    p.add_argument("--load-seconds", type=float, default=600.0, help="how long every device sends (>= 600)")
    p.add_argument("--load-slow", type=int, default=64, help="stalled unauthenticated connections")
    p.add_argument("--load-idle-tcp", type=int, default=4,
                   help="TCP connections that send nothing (and as many that send only the HTTP/2 preface)")
    p.add_argument("--load-slow-interval", type=float, default=1.0,
                   help="seconds before a refused stalled connection opens its next stalled call")
    p.add_argument("--load-call-timeout", type=float, default=300.0, help="deadline of a device's call")
    p.add_argument("--load-server-threads", type=int, default=os.cpu_count() or 1, help="serve --server.threads")
    p.add_argument("--load-idle-s", type=float, default=10.0, help="seconds of idle RSS samples before the load")
    p.add_argument("--load-sample-s", type=float, default=0.5, help="RSS sampling interval")
    p.add_argument("--load-server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the serve process (e.g. MALLOC_ARENA_MAX=2); repeatable")
    p.add_argument("--load-min-available-mb", type=float, default=1536.0,
                   help="stop the device processes if the machine's available memory falls below this")
    p.add_argument("--load-wait-for-tests-s", type=float, default=900.0,
                   help="wait at most this long for running pytest processes to finish before the load")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        cfg = json.loads(Path(args.child_config).read_text())
        result = {"device": child_device, "slow": child_slow, "step": child_step, "fit": child_fit}[args.child](cfg)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    if args.out is None:
        p.error("--out is required")
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    import logging

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("lightning_mobillm").setLevel(logging.CRITICAL)  # refused frames are the point here
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="reliability-"))
    out: dict[str, Any] = {
        "command": "python benchmarks/reliability.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "versions": versions(), "machine": machine(), "code": code_info()}
    t0 = time.perf_counter()
    if "fuzz" in sections:
        print(f"fuzz: {args.fuzz_frames} frames in-process", flush=True)
        out["fuzz"] = run_fuzz(InProcessTarget(work / "fuzz"), args.fuzz_frames, seed=args.seed)
        if args.fuzz_grpc_frames:
            print(f"fuzz: {args.fuzz_grpc_frames} frames over gRPC", flush=True)
            out["fuzz_grpc"] = run_fuzz(GrpcTarget(work / "fuzz-grpc"), args.fuzz_grpc_frames, seed=args.seed + 1)
    if "auth" in sections:
        print("auth", flush=True)
        out["auth"] = run_auth(work / "auth")
    if "faults" in sections:
        print(f"faults: a tiny run of {args.faults_steps} steps, killed at random steps", flush=True)
        out["faults"] = run_faults(args, work / "faults")
    if "load" in sections:
        quiet = wait_for_quiet_machine(args.load_wait_for_tests_s)
        print(f"load: {args.load_devices} devices for {args.load_seconds:.0f} s ({quiet})", flush=True)
        out["load"] = run_load(args, work / "load")
        out["load"]["machine_before"] = quiet
    command = out["command"]
    out["section_commands"] = {s: command for s in sections}
    if args.update and args.out.exists():  # keep the sections not run now (and the command that made them)
        old = json.loads(args.out.read_text())
        kept = {k: v for k, v in old.items() if k in ("fuzz", "fuzz_grpc", "auth", "faults", "load")
                and k not in out and not (k == "fuzz_grpc" and "fuzz" in sections)}
        out = {**old, **kept, **{k: v for k, v in out.items() if k in (*SECTIONS, "fuzz_grpc")},
               "section_commands": {**old.get("section_commands", {s: old["command"] for s in SECTIONS
                                                                   if s in old}), **out["section_commands"]},
               "updated_by": old.get("updated_by", []) + [{"command": command, "sections": sections,
                                                           "code": out["code"], "machine": out["machine"],
                                                           "seconds": round(time.perf_counter() - t0, 1)}]}
    out["targets_met"], out["notes"] = targets(out)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps({"targets_met": out["targets_met"], "notes": out["notes"]}, indent=1))


if __name__ == "__main__":
    main()
