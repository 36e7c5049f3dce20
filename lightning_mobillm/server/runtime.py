"""The server process: validates frames, keeps one training session per device, steps the side module.

The server never loads a backbone and never sees text or token ids. Each session holds a
LightningModule built from the hyperparameters in the device's hello (only registered module names are
accepted), its optimizer and scheduler, and the number of training steps it has applied. A frame that
fails validation gets an error reply and leaves every session as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.assets import cache_dir
from lightning_mobillm.server.cache import ActivationStore
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import TapSpec
from lightning_mobillm.transport.frames import Frame, FrameError, decode_frame, encode_frame

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
class Session:
    key: str
    module: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tap_spec: TapSpec
    num_outputs: int
    label_free: bool = False
    store: ActivationStore | None = None
    step: int = 0
    last_reply: tuple[int, bytes] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def target_key(self) -> str:
        return "targets" if self.label_free else "labels"


class FrameServer:
    """Turns request bytes into reply bytes: validates a frame against :attr:`schemas`, dispatches it to
    ``_on_<kind>``, and answers any refusal or bug with an error frame (the server keeps running and
    the refused frame changes nothing). Thread-safe; subclasses lock their own state.
    """

    #: the request kinds this server accepts and what each may carry
    schemas: dict = P.REQUEST_SCHEMAS

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.device = self.config.torch_device()
        self.sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.frames_refused = 0
        self.bytes_in = 0  # counted where frames are read and written, to cross-check the device's count
        self.bytes_out = 0

    # ---- entry point ---------------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes:
        with self._lock:
            self.bytes_in += len(data)
        reply = self._handle(data)
        with self._lock:
            self.bytes_out += len(reply)
        return reply

    def _handle(self, data: bytes) -> bytes:
        try:
            frame = decode_frame(data, self.schemas, max_bytes=self.config.max_frame_mb * 2**20)
            reply = getattr(self, f"_on_{frame.kind}")(frame)
            if isinstance(reply, bytes):
                return reply
        except FrameError as err:
            with self._lock:
                self.frames_refused += 1
            log.warning("refused a frame: %s", err)
            reply = P.error_frame(str(err))
        except Exception as err:  # noqa: BLE001 - a bug must not take the server down
            with self._lock:
                self.frames_refused += 1
            log.exception("failed to handle a frame")
            reply = P.error_frame(f"server error: {type(err).__name__}: {err}")
        return encode_frame(reply)

    def _check_capacity(self, key: str) -> None:
        with self._lock:
            if key not in self.sessions and len(self.sessions) >= self.config.max_sessions:
                raise FrameError(f"too many open sessions ({self.config.max_sessions})")

    @staticmethod
    def _replayed(session: Any, step: int, kind: str) -> bytes | None:
        """The stored reply when ``step`` was already applied (a retried frame is never applied twice);
        raises on a step out of order. Call with the session's lock held."""
        if session.last_reply is not None and session.last_reply[0] == step:
            return session.last_reply[1]
        if step != session.step:
            raise FrameError(f"out-of-order {kind} frame: got step {step}, expected {session.step}")
        return None

    def _autocast(self):
        if self.config.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class SideServer(FrameServer):
    """The MobiLLM / PAE server: one side-network training session per device run."""

    sessions: dict[str, Session]

    def _session(self, frame: Frame) -> Session:
        key = frame.header["session"]
        session = self.sessions.get(key)
        if session is None:
            raise FrameError(f"unknown session {key!r}; send a hello first")
        return session

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
            module = cls.from_hparams_dict(h["hparams"])
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
        module.to(self.device)
        optimizer, scheduler = _optimizers(module.configure_optimizers())
        store = self._open_store(h.get("cache"))
        session = Session(key, module, optimizer, scheduler, spec, h["num_outputs"],
                          label_free=bool(getattr(cls, "label_free", False)), store=store)
        with self._lock:
            replaced = key in self.sessions
            self.sessions[key] = session
        log.info(
            "session %s %s: %s, %d taps x %d, %d outputs, %d params, %d steps planned, on %s",
            key,
            "restarted" if replaced else "opened",
            h["module"],
            spec.num_taps,
            spec.hidden_size,
            h["num_outputs"],
            sum(p.numel() for p in module.parameters()),
            h["total_steps"],
            self.device,
        )
        header = {"session": key, "server_pid": os.getpid(), "server_device": str(self.device)}
        if store is not None:
            header["cached_keys"] = len(store)
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
        root = Path(self.config.workdir) if self.config.workdir else cache_dir() / "server"
        folder = root / f"activation-cache-{cache_id}"
        store = ActivationStore(folder, memory_limit_mb=float(limit)) if not folder.exists() else None
        if store is None:
            store = ActivationStore.open(folder, memory_limit_mb=float(limit))
            log.info("reopened activation cache %s with %d samples", folder, len(store))
        return store

    def _batch(self, session: Session, frame: Frame, *, with_target: bool) -> dict[str, torch.Tensor]:
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
    def _target(session: Session, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if session.label_free:
            if y.shape != (lengths.numel(), session.num_outputs):
                raise FrameError(f"targets shape {list(y.shape)} != [{lengths.numel()}, {session.num_outputs}]")
        else:
            if y.shape != lengths.shape:
                raise FrameError(f"labels shape {list(y.shape)} != lengths shape {list(lengths.shape)}")
            if bool((y < 0).any()) or bool((y >= session.num_outputs).any()):
                raise FrameError(f"labels must be in [0, {session.num_outputs})")
        return y

    def _keys(self, session: Session, frame: Frame, batch_size: int | None) -> list[str] | None:
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

    def _train(self, session: Session, frame: Frame) -> bytes:
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
            header = self._step(session, batch)
            header["step"] = step
            if keys is not None and not cached:
                store_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(frame.header["codec"], torch.float16)
                session.store.put_many(keys, {"acts": batch["acts"].to(store_dtype), "y": batch[session.target_key]})
                header["cached"] = True
            if session.store is not None:
                header.update(self._cache_stats(session))
            reply = encode_frame(Frame(kind=P.OK, header=header))
            session.last_reply = (step, reply)
            return reply

    @staticmethod
    def _cache_stats(session: Session) -> dict[str, int]:
        store = session.store
        return {"cache_hits": store.hits, "cache_misses": store.misses,
                "cache_bytes": store.bytes_in_memory + store.bytes_on_disk, "cache_size": len(store)}

    def _step(self, session: Session, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on a validated batch; parameters change only if everything is finite."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        t0 = time.perf_counter()
        module, optimizer = session.module, session.optimizer
        module.train()
        optimizer.zero_grad(set_to_none=True)
        try:
            with self._autocast():
                loss, outputs = module.compute_loss(batch)
            if not torch.isfinite(loss):
                raise FrameError(f"non-finite loss {loss.item()}; step skipped")
            loss.backward()
            params = [p for p in module.parameters() if p.grad is not None]
            if self.config.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            if not torch.isfinite(norm):
                raise FrameError("non-finite gradient; step skipped")
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
        if session.scheduler is not None:
            session.scheduler.step()
        session.step += 1
        header = {
            "loss": float(loss.item()),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "grad_norm": float(norm),
            "server_step_s": time.perf_counter() - t0,
            "server_steps": session.step,
        }
        if not session.label_free:
            header["acc"] = (outputs.argmax(-1) == batch["labels"]).float().mean().item()
        return header

    @torch.no_grad()
    def _on_eval(self, frame: Frame) -> Frame:
        session = self._session(frame)
        with session.lock:
            batch = {k: v.to(self.device) for k, v in self._batch(session, frame, with_target=False).items()}
            t0 = time.perf_counter()
            session.module.eval()
            with self._autocast():
                logits = session.module(batch["acts"], batch["lengths"])
            return Frame(
                kind=P.OK,
                header={"server_step_s": time.perf_counter() - t0},
                tensors={"logits": logits.float().cpu().contiguous()},
            )

    def _on_get_state(self, frame: Frame) -> Frame:
        session = self._session(frame)
        with session.lock:
            state = {
                "model": session.module.state_dict(),
                "optimizer": session.optimizer.state_dict(),
                "scheduler": session.scheduler.state_dict() if session.scheduler is not None else None,
                "step": session.step,
            }
            skeleton, blob = P.pack_state(state)
            if session.store is not None:
                session.store.flush()  # the cache's index and files are on disk with every checkpoint
        with self._lock:
            counts = {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
        return Frame(kind=P.OK, header={"skeleton": skeleton, "step": session.step, **counts}, tensors={"state": blob})

    def _on_set_state(self, frame: Frame) -> Frame:
        session = self._session(frame)
        state = P.unpack_state(frame.header["skeleton"], frame.tensors["state"])
        if not isinstance(state, dict) or not {"model", "step"} <= set(state):
            raise FrameError("state must hold model and step (optimizer and scheduler are optional)")
        with session.lock:
            # Load into copies first so a state that does not fit leaves the session as it was.
            module_state = {k: v.clone() for k, v in session.module.state_dict().items()}
            opt_state = session.optimizer.state_dict()
            sched_state = session.scheduler.state_dict() if session.scheduler is not None else None
            try:
                session.module.load_state_dict(state["model"], strict=True)
                if state.get("optimizer") is not None:
                    session.optimizer.load_state_dict(state["optimizer"])
                if session.scheduler is not None and state.get("scheduler") is not None:
                    session.scheduler.load_state_dict(state["scheduler"])
                _check_optimizer_shapes(session.optimizer)
                session.step = int(state["step"])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                session.module.load_state_dict(module_state)
                session.optimizer.load_state_dict(opt_state)
                if sched_state is not None:
                    session.scheduler.load_state_dict(sched_state)
                raise FrameError(f"state does not fit this session: {err}") from None
            session.last_reply = None
        log.info("session %s restored at step %d", session.key, session.step)
        return Frame(kind=P.OK, header={"step": session.step})

    def _on_bye(self, frame: Frame) -> Frame:
        with self._lock:
            session = self.sessions.pop(frame.header["session"], None)
        if session is not None:
            if session.store is not None:
                session.store.flush()
                session.store.close()
            log.info("session %s closed after %d steps", session.key, session.step)
        return Frame(kind=P.OK)


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != p.shape:
                    raise ValueError(f"optimizer state {name!r} has shape {list(value.shape)}, "
                                     f"its parameter {list(p.shape)}")


def _optimizers(conf: Any) -> tuple[torch.optim.Optimizer, Any]:
    """Normalise what ``configure_optimizers`` returned to one optimizer and an optional scheduler."""
    if isinstance(conf, torch.optim.Optimizer):
        return conf, None
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        if isinstance(sched, dict):
            sched = sched.get("scheduler")
        return conf["optimizer"], sched
    if isinstance(conf, (list, tuple)) and len(conf) == 2:
        opts, scheds = conf
        sched = scheds[0] if scheds else None
        return opts[0], sched.get("scheduler") if isinstance(sched, dict) else sched
    raise TypeError(f"the server supports one optimizer with an optional scheduler, got {type(conf).__name__}")

