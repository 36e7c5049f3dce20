"""The side server (MobiLLM / PAE): the frames of side-network sessions, from hello to bye.

The server never loads a backbone and never sees text; token ids reach it only as the labels of a generative
session (``causal_lm``), whose hello also makes it read that backbone's frozen final norm and LM head from a
checkpoint it allows (checked against the digest the device declares). A hello names a registered module
(never an import path from the network) with its hyperparameters and the backbone's taps; the server
builds it and hands it to its policy (:mod:`lightning_mobillm.server.policies`), which trains it through
a Fabric engine. This module turns frames into validated batches (shapes against the session's taps,
label ranges, finite values, the activation cache) and replies; a frame that fails validation gets an
error reply and leaves every session as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.engine import BYTES_PER_PARAMETER
from lightning_mobillm.faults import fault_point
from lightning_mobillm.server.cache import _KEY_RE, ActivationStore
from lightning_mobillm.server.dispatch import FrameServer, SessionBase
from lightning_mobillm.server.policies import PerDevicePolicy, ServerPolicy
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.side.config import SideConfig
from lightning_mobillm.specs import TapSpec
from lightning_mobillm.transport.frames import Frame, FrameError, encode_frame

log = logging.getLogger("lightning_mobillm.server")

#: Module names a device may ask the server to build (never an arbitrary import path from the network).
MODULE_REGISTRY: dict[str, str] = {
    "side_tuning": "lightning_mobillm.modules.side_tuning:SideTuningModule",
    "additive_adapter": "lightning_mobillm.modules.additive:AdditiveAdapterModule",
    "causal_lm": "lightning_mobillm.modules.causal_lm:CausalLMSideModule",
}


def register_module(name: str, target: str) -> None:
    """Allow devices to request ``target`` (``"package.module:Class"``) under ``name``."""
    MODULE_REGISTRY[name] = target


def _resolve_module_class(name: str) -> type:
    if name not in MODULE_REGISTRY:
        raise FrameError(f"unknown module {name!r}; this server accepts {sorted(MODULE_REGISTRY)}")
    mod, _, cls = MODULE_REGISTRY[name].partition(":")
    return getattr(importlib.import_module(mod), cls)


@dataclass
class SideSession(SessionBase):
    """A side-network session: what its hello declared, its activation cache, and the policy's model."""

    tap_spec: TapSpec
    num_outputs: int
    module_name: str = ""
    label_free: bool = False
    labels_per_token: bool = False  # a generative session: one label (the next token id) per sent position
    label_bound: int = 0  # labels are in [0, label_bound): the class count, or the vocabulary size
    store: ActivationStore | None = None
    cache_folder: Path | None = None
    cache_token: str | None = None  # server-made; only the owner learns it (hello reply) and can reopen with it
    model: Any = None  # set by the policy (a TrainingEngine for the per-device policy)
    checkpoint_step: int = 0  # the step of the session's last checkpoint (what a restarted server resumes)
    backbone: dict = field(default_factory=dict)  # the device's backbone identity (type, name, digest)

    @property
    def step(self) -> int:
        return self.model.step

    @property
    def target_key(self) -> str:
        return "targets" if self.label_free else "labels"

    def same_config(self, module: str, spec: TapSpec, num_outputs: int) -> bool:
        return module == self.module_name and spec == self.tap_spec and num_outputs == self.num_outputs


#: what a hello's backbone identity may hold (it is logged and kept, never used to load anything)
_BACKBONE_KEYS = {"arch": str, "name": str, "hidden_size": int, "num_layers": int, "is_decoder": bool, "digest": str}
#: what a hello's cache request may hold: the token of a cache this identity opened before, and a memory
#: bound below the server's
_CACHE_KEYS = {"token": str, "memory_limit_mb": (int, float)}


#: ranges of the optimiser's hyperparameters a hello may ask for (an lr of 1e308 builds, then never trains)
_HPARAM_RANGES = {"lr": (0.0, 10.0), "weight_decay": (0.0, 10.0), "warmup_ratio": (0.0, 1.0),
                  "min_lr_ratio": (0.0, 1.0), "label_smoothing": (0.0, 0.999)}


def _check_hparams(hparams: dict) -> None:
    for key, (low, high) in _HPARAM_RANGES.items():
        value = hparams.get(key, low)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise FrameError(f"hello: hparams.{key} must be a number in [{low}, {high}]")
    betas = hparams.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise FrameError("hello: hparams.betas must be two numbers in [0, 1)")


def _check_object(what: str, obj: dict, allowed: dict[str, Any]) -> dict:
    for key, value in obj.items():
        if key not in allowed:
            raise FrameError(f"hello: {what} has key {key!r}; allowed: {sorted(allowed)}")
        types = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise FrameError(f"hello: {what}.{key} must be {' | '.join(t.__name__ for t in types)}")
        if isinstance(value, str) and len(value) > 256:
            raise FrameError(f"hello: {what}.{key} is longer than 256 characters")
    return obj


class SideServer(FrameServer):
    """The MobiLLM / PAE server. ``policy`` decides which model a frame trains and when (default: one
    model per device session, stepped on arrival)."""

    sessions: dict[str, SideSession]
    compute_kinds = (P.TRAIN, P.TRAIN_TARGET, P.TRAIN_CACHED, P.EVAL)

    def __init__(self, config: ServerConfig | None = None, policy: ServerPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.policy = policy or PerDevicePolicy(self.config, self.fabric)
        self._caches: dict[Path, str] = {}  # open activation-cache folders -> the session key holding each
        self._output_layers: dict[tuple, Any] = {}  # (source, dtype) -> a backbone's frozen output layer, as read
        self._output_casts: dict[tuple, Any] = {}  # (source, dtype, compute dtype, device) -> its shared copy
        self._output_lock = threading.Lock()

    # ---- hello ----------------------------------------------------------------------------------
    def _check_bounds(self, spec: TapSpec, h: dict) -> None:
        c = self.config
        if spec.num_taps < 1 or spec.hidden_size < 1 or h["num_outputs"] < 1 or h["total_steps"] < 1:
            raise FrameError("hello needs at least one tap, a positive width, outputs and total_steps")
        for what, value, bound, key in ((" taps", spec.num_taps, c.max_taps, "max_taps"),
                                        ("-wide taps", spec.hidden_size, c.max_width, "max_width"),
                                        (" outputs", h["num_outputs"], c.max_outputs, "max_outputs")):
            if value > bound:
                raise FrameError(f"hello asks for {value}{what}; this server allows at most {bound} ({key})")
        if h["total_steps"] > 10**9:
            raise FrameError("hello: total_steps is beyond any real run")

    def _output_layer(self, backbone: dict, dtype: Any, compute_dtype: torch.dtype) -> Any:
        """The final norm and LM head of the backbone a generative hello names, in ``compute_dtype`` on the
        server's device: read by the server itself from a checkpoint it allows (``allowed_backbones``, else the
        packaged models: an alias, or an allowed local folder of that name; each candidate is tried until one
        matches) and checked against the digest the device declared. Each checkpoint is read once per dtype and
        each cast copy made once: every session of that backbone shares them (frozen, never trained), so a
        head costs the server its ``V x d`` once, and a hello with a wrong digest costs no second read."""
        from lightning_mobillm.assets import PACKAGED_MODELS, resolve_source
        from lightning_mobillm.side.causal_lm import OutputLayer

        name, digest = backbone.get("name"), backbone.get("digest")
        if not name or not digest:
            raise FrameError("a generative hello declares its backbone's name and output-layer digest")
        if not isinstance(dtype, str) or dtype not in ("float32", "bfloat16", "float16"):
            raise FrameError("hello: hparams.output_dtype must be float32, bfloat16 or float16")
        allowed = self.config.allowed_backbones
        allowed = list(allowed if allowed is not None else PACKAGED_MODELS)
        sources = [a for a in allowed if a == name or (a not in PACKAGED_MODELS and Path(a).name == name)]
        if not sources:
            raise FrameError(f"this server does not load the output layer of backbone {name!r} (allowed: {allowed})")
        for source in sources:
            with self._output_lock:  # one read per (checkpoint, dtype), however many hellos wait for it
                read = self._output_layers.get((source, dtype))
                if read is None:
                    try:
                        folder = Path(resolve_source(source, dtype=dtype))
                        if not folder.is_dir():
                            raise ValueError("not a local checkpoint folder (the server reads no hub id)")
                        read = OutputLayer.from_pretrained(folder, getattr(torch, dtype))
                    except Exception as err:  # noqa: BLE001 - any failure to read is the hello's refusal
                        raise FrameError(f"backbone {name!r}: its output layer could not be read from {source!r}: "
                                         f"{type(err).__name__}: {str(err)[:300]}") from None
                    self._output_layers[(source, dtype)] = read
                if read.digest_value != digest:
                    continue
                key = (source, dtype, str(compute_dtype), str(self.device))
                if key not in self._output_casts:
                    self._output_casts[key] = read.copy_to(dtype=compute_dtype, device=self.device)
                return self._output_casts[key]
        raise FrameError(f"backbone {name!r}: the output layer of {sources} in {dtype} does not match the digest the "
                         "device declared (a different checkpoint or dtype)")

    def _build_module(self, h: dict, spec: TapSpec, num_classes: int, *, sizing_only: bool = False) -> Any:
        """Build the module a hello asks for, after sizing it on the meta device (nothing allocated) against
        ``max_session_mb`` at :data:`~lightning_mobillm.engine.BYTES_PER_PARAMETER` bytes per
        parameter. ``sizing_only`` stops after the checks."""
        cls = _resolve_module_class(h["module"])
        _check_hparams(h["hparams"])
        try:
            side = SideConfig.from_dict(h["side"])
            kwargs = {**h["hparams"], **side.module_kwargs()}
            with torch.device("meta"):
                sizing = cls.from_hparams_dict(kwargs)
                sizing.build(spec, num_classes=num_classes, num_outputs=h["num_outputs"])
            mb = sum(p.numel() for p in sizing.parameters()) * BYTES_PER_PARAMETER / 2**20
            if mb > self.config.max_session_mb:
                raise FrameError(f"the side network asked for needs {mb:.0f} MB to train; this server allows "
                                 f"{self.config.max_session_mb:.0f} MB per session (max_session_mb)")
            if sizing_only:
                return None
            module = cls.from_hparams_dict(kwargs)
            module.build(spec, num_classes=num_classes, num_outputs=h["num_outputs"])
        except (TypeError, ValueError, KeyError) as err:
            raise FrameError(f"hparams do not build {h['module']}: {err}") from None
        if hasattr(module, "attach_output_layer"):
            module.attach_output_layer(self._output_layer(h.get("backbone", {}), h["hparams"].get("output_dtype"),
                                                          module.side_dtype))
        module.total_steps = h["total_steps"]
        return module

    def _on_hello(self, frame: Frame, identity: str) -> Frame:
        h = frame.header
        owner, key = self.hello_key(frame, identity)
        try:
            spec = TapSpec.from_dict(h["tap_spec"])
        except (KeyError, TypeError, ValueError) as err:
            raise FrameError(f"bad tap_spec in hello: {err}") from None
        self._check_bounds(spec, h)
        num_classes = h.get("num_classes", h["num_outputs"])
        if num_classes < 2 or num_classes > self.config.max_outputs:
            raise FrameError(f"hello: num_classes must be in [2, {self.config.max_outputs}], got {num_classes}")
        backbone = _check_object("backbone", h.get("backbone", {}), _BACKBONE_KEYS)
        cache = _check_object("cache", h["cache"], _CACHE_KEYS) if "cache" in h else None
        if cache is not None and cache.get("memory_limit_mb", 0) < 0:
            raise FrameError("hello: cache.memory_limit_mb must be >= 0")
        live = self._open_or_reuse(key, owner)
        if live is not None:
            self._build_module(h, spec, num_classes, sizing_only=True)  # a reconnect is checked like a new hello
            if not live.same_config(h["module"], spec, h["num_outputs"]):
                raise FrameError(f"session {key} is open with another module or taps; use a new run_id")
            with live.lock:
                secret = self._admit(live, owner, identity)
            log.info("session %s reconnected at step %d (new secret; the old one is revoked)", key, live.step)
            return self._hello_reply(live, secret)
        module = self._build_module(h, spec, num_classes)
        per_token = bool(getattr(type(module), "labels_per_token", False))
        session = SideSession(key, spec, h["num_outputs"], module_name=h["module"], backbone=backbone,
                              label_free=bool(getattr(type(module), "label_free", False)),
                              labels_per_token=per_token,
                              label_bound=int(module.label_bound) if per_token else h["num_outputs"])
        self.policy.attach(session, module, resume=h.get("resume", False))
        if cache is not None:
            self._open_store(session, owner, cache)
        secret = self._admit(session, owner, identity)
        log.info("session %s opened: %s on %s, %d taps x %d, %d outputs, %d params, %d steps planned, on %s",
                 key, h["module"], backbone.get("name", "?"), spec.num_taps, spec.hidden_size, h["num_outputs"],
                 sum(p.numel() for p in module.parameters()), h["total_steps"], self.device)
        return self._hello_reply(session, secret)

    def _hello_reply(self, session: SideSession, secret: str) -> Frame:
        header = {"session": session.key, "secret": secret, "server_pid": os.getpid(),
                  "server_device": str(self.device), "step": session.step,
                  "checkpoint_step": session.checkpoint_step}
        if session.store is not None:
            header["cached_keys"] = len(session.store)
            header["cache_token"] = session.cache_token
        return Frame(kind=P.OK, header=header)

    def _open_store(self, session: SideSession, owner: str, cache: dict) -> None:
        """Open the activation cache a hello asks for: a new one, or (with ``token``) one this identity opened
        before. The folder is named by a hash of the owner and a server-made token, so no other identity can
        name it; a cache is open in one session at a time (a new session of its owner takes it over, e.g.
        a resumed run); its memory and disk bounds are the server's."""
        limit = min(float(cache.get("memory_limit_mb", self.config.cache_memory_mb)), self.config.cache_memory_mb)
        token = cache.get("token") or secrets.token_hex(16)
        folder = self._cache_folder(owner, token)
        if not folder.exists():  # new, or not this identity's: a fresh cache (the reply's token says which)
            token = secrets.token_hex(16)
            folder = self._cache_folder(owner, token)
        with self._lock:
            holder = self.sessions.get(self._caches.get(folder, ""))
        if holder is not None:
            with holder.lock:
                self._close_store(holder)
            log.info("activation cache moved from session %s to %s", holder.key, session.key)
        store = ActivationStore.open(folder, memory_limit_mb=limit)
        store.quota_bytes = int((limit + self.config.cache_disk_mb) * 2**20)
        session.store, session.cache_folder, session.cache_token = store, folder, token
        with self._lock:
            self._caches[folder] = session.key

    def _cache_folder(self, owner: str, token: str) -> Path:
        name = hashlib.sha256(f"{owner}\0{token}".encode()).hexdigest()[:32]
        return self.config.root() / f"activation-cache-{name}"

    def _close_store(self, session: SideSession) -> None:
        """Flush and close a session's cache (its files stay, for its owner to reopen)."""
        if session.store is None:
            return
        session.store.flush()
        session.store.close()
        with self._lock:
            if self._caches.get(session.cache_folder) == session.key:
                del self._caches[session.cache_folder]
        session.store = None

    def _on_expire(self, session: SideSession) -> None:
        self.policy.checkpoint(session, force=True)
        self._close_store(session)

    def _batch(self, session: SideSession, frame: Frame, *, with_target: bool) -> dict[str, torch.Tensor]:
        spec = session.tap_spec
        # bounded before anything is dequantised (a packed codec's q is narrower than the taps, never wider)
        n, layers, packed = frame.tensors["acts.q"].shape
        if n > self.config.max_tokens_per_frame:
            raise FrameError(f"{n} tokens in one frame; this server allows {self.config.max_tokens_per_frame} "
                             "(max_tokens_per_frame)")
        if layers != spec.num_taps or packed > spec.hidden_size:
            raise FrameError(f"acts shape [{n}, {layers}, {packed}] does not match the session's taps "
                             f"[N, {spec.num_taps}, {spec.hidden_size}]")
        acts, lengths = P.unpack_acts(frame.tensors, frame.header["codec"])
        n, layers, width = acts.shape
        if width != spec.hidden_size:
            raise FrameError(f"acts shape [{n}, {layers}, {width}] does not match the session's taps "
                             f"[N, {spec.num_taps}, {spec.hidden_size}]")
        if lengths.numel() == 0 or bool((lengths < 1).any()) or int(lengths.sum()) != n:
            raise FrameError(f"lengths must be >= 1 and sum to N={n}")
        if not torch.isfinite(acts).all():
            raise FrameError("activations are not finite after decoding")
        batch = {"acts": acts, "lengths": lengths}
        if with_target:
            batch[session.target_key] = self._target(session, frame.tensors[session.target_key], lengths)
        return batch

    @staticmethod
    def _target(session: SideSession, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if session.label_free:
            if y.shape != (lengths.numel(), session.num_outputs):
                raise FrameError(f"targets shape {list(y.shape)} != [{lengths.numel()}, {session.num_outputs}]")
        else:
            n = int(lengths.sum()) if session.labels_per_token else lengths.numel()
            if y.shape != (n,):
                raise FrameError(f"labels shape {list(y.shape)} != [{n}] (one per "
                                 f"{'sent token' if session.labels_per_token else 'sample'})")
            if bool((y < 0).any()) or bool((y >= session.label_bound).any()):
                raise FrameError(f"labels must be in [0, {session.label_bound})")
        return y

    def _keys(self, session: SideSession, frame: Frame, batch_size: int | None) -> list[str] | None:
        keys = frame.header.get("keys")
        if keys is None:
            return None
        if session.store is None:
            raise FrameError("this session has no activation cache; open it with a cache in the hello")
        if not isinstance(keys, list) or not all(isinstance(k, str) and _KEY_RE.fullmatch(k) for k in keys):
            raise FrameError("keys must be a list of strings of 1-128 characters of [A-Za-z0-9_-]")
        if len(keys) > self.config.max_tokens_per_frame:
            raise FrameError(f"{len(keys)} keys in one frame; at most max_tokens_per_frame")
        if batch_size is not None and len(keys) != batch_size:
            raise FrameError(f"{len(keys)} keys for a batch of {batch_size}")
        return keys

    def _on_train(self, frame: Frame, session: SideSession) -> bytes:
        if session.label_free:
            raise FrameError("this session is label-free (PAE/Fed): send train_target frames, never labels")
        return self._train(session, frame)

    def _on_train_target(self, frame: Frame, session: SideSession) -> bytes:
        if not session.label_free:
            raise FrameError("this session trains on labels: send train frames")
        return self._train(session, frame)

    def _on_train_cached(self, frame: Frame, session: SideSession) -> bytes:
        return self._train(session, frame)

    def _train(self, session: SideSession, frame: Frame) -> bytes:
        step = frame.header["step"]
        with session.lock:
            if (replayed := self._replayed(session, frame)) is not None:
                return replayed
            cached = frame.kind == P.TRAIN_CACHED
            if cached:
                keys = self._keys(session, frame, None)
                if not keys:
                    raise FrameError("train_cached needs a non-empty list of keys")
                per_token = session.labels_per_token
                found, missing = session.store.get_many(keys, join="cat" if per_token else "stack")
                if missing:
                    # nothing trained: the device forwards these samples again and resends the step
                    return encode_frame(Frame(kind=P.OK, header={"step": step, "missing": missing,
                                                                  **self._cache_stats(session)}))
                lengths = found["rows"] if per_token else torch.ones(len(keys), dtype=torch.int64)
                batch = {"acts": found["acts"].float(), "lengths": lengths, session.target_key: found["y"]}
            else:
                batch = self._batch(session, frame, with_target=True)
                keys = self._keys(session, frame, int(batch["lengths"].numel()))
                if keys is not None and not session.labels_per_token and int(batch["acts"].shape[0]) != len(keys):
                    raise FrameError("the activation cache needs one token per sample (strategy select: loss)")
            header = self.policy.train(session, batch)
            header["step"] = step
            if keys is not None and not cached:
                store_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(frame.header["codec"], torch.float16)
                rows = batch["lengths"].tolist() if session.labels_per_token else None  # a sample's answer tokens
                header["cached"] = session.store.put_many(
                    keys, {"acts": batch["acts"].to(store_dtype), "y": batch[session.target_key]}, rows)
            self.policy.step_end(session)  # after the cache entries: a checkpoint holds them too
            header["checkpoint_step"] = session.checkpoint_step
            if session.store is not None:
                header.update(self._cache_stats(session))
            fault_point("server:after_train_step", step=session.step, session=session.key)
            return self._remember(session, frame, Frame(kind=P.OK, header=header))

    @staticmethod
    def _cache_stats(session: SideSession) -> dict[str, int]:
        store = session.store
        return {"cache_hits": store.hits, "cache_misses": store.misses,
                "cache_bytes": store.bytes_in_memory + store.bytes_on_disk, "cache_size": len(store)}

    def _on_eval(self, frame: Frame, session: SideSession) -> Frame:
        with session.lock:
            batch = self._batch(session, frame, with_target=False)
            t0 = time.perf_counter()
            outputs = self.policy.evaluate(session, batch["acts"], batch["lengths"])
            return Frame(kind=P.OK, header={"server_step_s": time.perf_counter() - t0},
                         tensors={"logits": outputs.float().cpu().contiguous()})

    def _on_get_state(self, frame: Frame, session: SideSession) -> Frame:
        with session.lock:
            state = self.policy.state(session)
            if frame.header.get("model_only"):  # the weights alone: no optimizer moments to send and hold
                state = {"model": state["model"], "step": state["step"]}
            skeleton, blob = P.pack_state(state)
            if session.store is not None:
                session.store.flush()  # the cache's index and files are on disk with every checkpoint
        with self._lock:  # this session's own traffic only: another device's is none of its business
            counts = {"bytes_in": session.bytes_in, "bytes_out": session.bytes_out}
        return Frame(kind=P.OK, header={"skeleton": skeleton, "step": session.step, **counts}, tensors={"state": blob})

    def _on_set_state(self, frame: Frame, session: SideSession) -> Frame:
        state = P.unpack_state(frame.header["skeleton"], frame.tensors["state"])
        with session.lock:
            if not session.restorable:
                raise FrameError("set_state is accepted only between a hello and the next training step; "
                                 "this one is stale (say hello again to restore a checkpoint)")
            try:
                self.policy.load_state(session, state)
            except ValueError as err:
                raise FrameError(f"state does not fit this session: {err}") from None
            session.last_reply = None
            self.policy.checkpoint(session)  # what a restarted server resumes is the restored state
        log.info("session %s restored at step %d", session.key, session.step)
        return Frame(kind=P.OK, header={"step": session.step})

    def _on_bye(self, frame: Frame, session: SideSession) -> Frame:
        with session.lock:
            self._pop_session(session)
            self.policy.detach(session)
            self._close_store(session)
        log.info("session %s closed after %d steps", session.key, session.step)
        return Frame(kind=P.OK)
