"""The side server (MobiLLM / PAE): the frames of side-network sessions, from hello to bye.

The server never loads a backbone and never sees text or token ids. A hello names a registered module
(never an import path from the network) with its hyperparameters and the backbone's taps; the server
builds it and hands it to its policy (:mod:`lightning_mobillm.server.policies`), which trains it through
a Fabric engine. This module turns frames into validated batches (shapes against the session's taps,
label ranges, finite values, the activation cache) and replies; a frame that fails validation gets an
error reply and leaves every session as it was.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.server.cache import ActivationStore
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
    label_free: bool = False
    store: ActivationStore | None = None
    model: Any = None  # set by the policy (a TrainingEngine for the per-device policy)
    backbone: dict = field(default_factory=dict)  # the device's backbone identity (type, name, digest)

    @property
    def step(self) -> int:
        return self.model.step

    @property
    def target_key(self) -> str:
        return "targets" if self.label_free else "labels"


class SideServer(FrameServer):
    """The MobiLLM / PAE server. ``policy`` decides which model a frame trains and when (default: one
    model per device session, stepped on arrival)."""

    sessions: dict[str, SideSession]

    def __init__(self, config: ServerConfig | None = None, policy: ServerPolicy | None = None) -> None:
        super().__init__(config)
        self.policy = policy or PerDevicePolicy(self.config, self.fabric)

    # ---- handlers -------------------------------------------------------------------------------
    def _on_hello(self, frame: Frame) -> Frame:
        h = frame.header
        P.check_protocol(h)
        key = f"{h['device_id']}/{h['run_id']}"
        try:
            spec = TapSpec.from_dict(h["tap_spec"])
        except (KeyError, TypeError, ValueError) as err:
            raise FrameError(f"bad tap_spec in hello: {err}") from None
        if spec.num_taps < 1 or spec.hidden_size < 1 or h["num_outputs"] < 1 or h["total_steps"] < 1:
            raise FrameError("hello needs at least one tap, a positive width, outputs and total_steps")
        cls = _resolve_module_class(h["module"])
        self._check_capacity(key)
        try:
            side = SideConfig.from_dict(h.get("side", {}))
            module = cls.from_hparams_dict({**h["hparams"], **side.module_kwargs()})
        except (TypeError, ValueError, KeyError) as err:
            raise FrameError(f"hparams do not build {h['module']}: {err}") from None
        num_classes = h.get("num_classes", h["num_outputs"])
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise FrameError(f"hello: num_classes must be an int >= 2, got {num_classes!r}")
        try:
            module.build(spec, num_classes=num_classes, num_outputs=h["num_outputs"])
        except ValueError as err:
            raise FrameError(f"cannot build {h['module']}: {err}") from None
        module.total_steps = h["total_steps"]
        resume = h.get("resume", False)
        if not isinstance(resume, bool):
            raise FrameError("hello: resume must be true or false")
        backbone = h.get("backbone", {})
        if not isinstance(backbone, dict):
            raise FrameError("hello: backbone must be an object (arch, name, hidden_size, num_layers, digest)")
        session = SideSession(key, spec, h["num_outputs"], label_free=bool(getattr(cls, "label_free", False)),
                              backbone=backbone)
        self.policy.attach(session, module, resume=resume)
        session.store = self._open_store(h.get("cache"))
        replaced = self._add_session(session)
        log.info(
            "session %s %s: %s on %s, %d taps x %d, %d outputs, %d params, %d steps planned, on %s",
            key,
            "restarted" if replaced else "opened",
            h["module"],
            backbone.get("name", "?"),
            spec.num_taps,
            spec.hidden_size,
            h["num_outputs"],
            sum(p.numel() for p in module.parameters()),
            h["total_steps"],
            self.device,
        )
        header = {"session": key, "server_pid": os.getpid(), "server_device": str(self.device),
                  "step": session.step}
        if session.store is not None:
            header["cached_keys"] = len(session.store)
        return Frame(kind=P.OK, header=header)

    def _open_store(self, cache: Any) -> ActivationStore | None:
        """The activation cache a hello asks for: ``{"cache_id": str, "memory_limit_mb": float}``."""
        if cache is None:
            return None
        if not isinstance(cache, dict) or not isinstance(cache.get("cache_id"), str):
            raise FrameError("hello: cache must be an object with a string cache_id")
        cache_id = cache["cache_id"]
        if not cache_id or len(cache_id) > 64 or not all(c.isalnum() or c in "-_" for c in cache_id):
            raise FrameError("hello: cache_id must be 1-64 characters of [A-Za-z0-9_-]")
        limit = cache.get("memory_limit_mb", 512)
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit < 0:
            raise FrameError("hello: cache.memory_limit_mb must be a number >= 0")
        folder = self.config.root() / f"activation-cache-{cache_id}"
        store = ActivationStore(folder, memory_limit_mb=float(limit)) if not folder.exists() else None
        if store is None:
            store = ActivationStore.open(folder, memory_limit_mb=float(limit))
            log.info("reopened activation cache %s with %d samples", folder, len(store))
        return store

    def _batch(self, session: SideSession, frame: Frame, *, with_target: bool) -> dict[str, torch.Tensor]:
        acts, lengths = P.unpack_acts(frame.tensors, frame.header["codec"])
        n, layers, width = acts.shape
        spec = session.tap_spec
        if layers != spec.num_taps or width != spec.hidden_size:
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
            if y.shape != lengths.shape:
                raise FrameError(f"labels shape {list(y.shape)} != lengths shape {list(lengths.shape)}")
            if bool((y < 0).any()) or bool((y >= session.num_outputs).any()):
                raise FrameError(f"labels must be in [0, {session.num_outputs})")
        return y

    def _keys(self, session: SideSession, frame: Frame, batch_size: int | None) -> list[str] | None:
        keys = frame.header.get("keys")
        if keys is None:
            return None
        if session.store is None:
            raise FrameError("this session has no activation cache; open it with a cache in the hello")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise FrameError("keys must be a list of strings")
        if batch_size is not None and len(keys) != batch_size:
            raise FrameError(f"{len(keys)} keys for a batch of {batch_size}")
        return keys

    def _on_train(self, frame: Frame) -> bytes:
        session = self._session(frame)
        if session.label_free:
            raise FrameError("this session is label-free (PAE/Fed): send train_target frames, never labels")
        return self._train(session, frame)

    def _on_train_target(self, frame: Frame) -> bytes:
        session = self._session(frame)
        if not session.label_free:
            raise FrameError("this session trains on labels: send train frames")
        return self._train(session, frame)

    def _on_train_cached(self, frame: Frame) -> bytes:
        return self._train(self._session(frame), frame)

    def _train(self, session: SideSession, frame: Frame) -> bytes:
        step = frame.header["step"]
        with session.lock:
            if (replayed := self._replayed(session, step, frame.kind)) is not None:
                return replayed
            cached = frame.kind == P.TRAIN_CACHED
            if cached:
                keys = self._keys(session, frame, None)
                if not keys:
                    raise FrameError("train_cached needs a non-empty list of keys")
                found, missing = session.store.get_many(keys)
                if missing:
                    # nothing trained: the device forwards these samples again and resends the step
                    return encode_frame(Frame(kind=P.OK, header={"step": step, "missing": missing,
                                                                  **self._cache_stats(session)}))
                batch = {"acts": found["acts"].float(), "lengths": torch.ones(len(keys), dtype=torch.int64),
                         session.target_key: found["y"]}
            else:
                batch = self._batch(session, frame, with_target=True)
                keys = self._keys(session, frame, int(batch["lengths"].numel()))
                if keys is not None and int(batch["acts"].shape[0]) != len(keys):
                    raise FrameError("the activation cache needs one token per sample (strategy select: loss)")
            header = self.policy.train(session, batch)
            header["step"] = step
            if keys is not None and not cached:
                store_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(frame.header["codec"], torch.float16)
                session.store.put_many(keys, {"acts": batch["acts"].to(store_dtype), "y": batch[session.target_key]})
                header["cached"] = True
            if session.store is not None:
                header.update(self._cache_stats(session))
            return self._remember(session, step, Frame(kind=P.OK, header=header))

    @staticmethod
    def _cache_stats(session: SideSession) -> dict[str, int]:
        store = session.store
        return {"cache_hits": store.hits, "cache_misses": store.misses,
                "cache_bytes": store.bytes_in_memory + store.bytes_on_disk, "cache_size": len(store)}

    def _on_eval(self, frame: Frame) -> Frame:
        session = self._session(frame)
        with session.lock:
            batch = self._batch(session, frame, with_target=False)
            t0 = time.perf_counter()
            outputs = self.policy.evaluate(session, batch["acts"], batch["lengths"])
            return Frame(kind=P.OK, header={"server_step_s": time.perf_counter() - t0},
                         tensors={"logits": outputs.float().cpu().contiguous()})

    def _on_get_state(self, frame: Frame) -> Frame:
        session = self._session(frame)
        with session.lock:
            skeleton, blob = P.pack_state(self.policy.state(session))
            if session.store is not None:
                session.store.flush()  # the cache's index and files are on disk with every checkpoint
        with self._lock:
            counts = {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
        return Frame(kind=P.OK, header={"skeleton": skeleton, "step": session.step, **counts}, tensors={"state": blob})

    def _on_set_state(self, frame: Frame) -> Frame:
        session = self._session(frame)
        state = P.unpack_state(frame.header["skeleton"], frame.tensors["state"])
        with session.lock:
            try:
                self.policy.load_state(session, state)
            except ValueError as err:
                raise FrameError(f"state does not fit this session: {err}") from None
            session.last_reply = None
        log.info("session %s restored at step %d", session.key, session.step)
        return Frame(kind=P.OK, header={"step": session.step})

    def _on_bye(self, frame: Frame) -> Frame:
        session = self._pop_session(frame)
        if session is not None:
            with session.lock:
                self.policy.detach(session)
                if session.store is not None:
                    session.store.flush()
                    session.store.close()
            log.info("session %s closed after %d steps", session.key, session.step)
        return Frame(kind=P.OK)
