"""Fed MobiLLM's shared-model server (``serve --role fed``; issue 10, ``../shared/METHODS.md`` section 3).

Many devices, one side network. A device says ``fed_hello`` (its backbone type, the federation's K, its
width, the targets' width and space, its codec), uploads its shard once in ``fed_upload`` frames (the K
aligned loss-token taps in a codec's parts, the device-defined targets, opaque sample keys; no labels, token
ids or text: the schemas have no place for them), and is answered with acknowledgements only. When it wants
to evaluate it asks for ``fed_download`` (the trunk, its type's projection and its own head) and evaluates
locally; ``fed_stats`` gives its own statistics and the federation's totals. The frames and replies are in
``docs/protocol.md`` (role ``fed``).

**One federation.** The server holds one :class:`~lightning_mobillm.fed.trainer.FedTrainer` for all sessions,
trained through :class:`~lightning_mobillm.engine.TrainingEngine` on the server's Fabric. Its shape (K, the
targets' width and space, d*) comes from :class:`~lightning_mobillm.server_config.ServerConfig`'s ``fed_*``
settings where set, else from the first hello; a hello that disagrees is refused, naming the federation's
value. The device id the trainer sees is the session's owner (the identity of the tokens file, or
``device:<device_id>`` when the transport names nobody, :meth:`FrameServer.owner_of`): an identity can only
upload as itself, download its own head and read its own statistics.

**Threads.** Frames arrive on the transport's worker threads; training happens in one background thread of
the server. One lock (``_state``, a condition variable) guards the trainer, the queue of arrivals, the ledger
of acknowledged uploads and the counters:

* a ``fed_upload`` is validated and cached (:meth:`FedTrainer.accept`) under the compute gate
  (``max_concurrent_steps``), the session's lock and then the state lock; its samples join the queue of
  arrivals and the training thread is woken. The acknowledgement is sent once the upload is on disk (below);
* the training thread (:meth:`FedServer.step_pending`, one optimizer step at a time) takes the compute gate
  and the state lock for one step and releases both before the next: ``batch_size`` samples of the oldest
  arrival (arrival order), or, when no arrival waits, one replay step of the whole cache
  (:meth:`FedTrainer.replay_step`) while ``fed_replay`` is on, at most ``fed_max_replay_steps`` after the
  last arrival; then it waits on the condition (which releases the lock) until an upload arrives or the
  server closes (:meth:`FedServer.close`);
* disk writes (the upload log, checkpoints) happen outside the state lock, from snapshots taken under it.

Tests run the loop synchronously: ``FedServer(..., background=False)`` and :meth:`FedServer.step_pending` /
:meth:`FedServer.run_pending`.

**Retries.** Uploads carry ``seq`` = the number of uploads the session has had acknowledged. The same frame
again for the last acknowledged ``seq`` (a retry after a lost reply; the secret may differ after a reconnect)
gets the stored acknowledgement and is not cached twice; another frame for that ``seq``, or a ``seq`` out of
order, is refused. A refused upload changes nothing (its ``seq`` stays free).

**Durability.** With ``checkpoint_every_n_steps`` > 0 an upload is written to ``<workdir>/fed/uploads/``
(its codec parts and targets in safetensors, its keys, session, ``seq`` and acknowledgement in the file's
metadata; temp file, fsync, rename) before it is acknowledged, and the trainer's whole state
(:meth:`FedTrainer.state_dict`: model, optimizer, cache, statistics, replay order), the queue of arrivals
not yet trained on and the ledger of sessions are written to ``<workdir>/fed/trainer.ckpt`` every
``checkpoint_every_n_steps`` optimizer steps, when the federation is created, and on :meth:`close`; the
uploads the checkpoint holds are then dropped from the log. A restarted server on the same workdir loads the
checkpoint (``weights_only=True``) and accepts the logged uploads after it again, so it continues with every
acknowledged upload; a device continues its session with a hello that says ``resume: true``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_mobillm import protocol as P
from lightning_mobillm.engine import BYTES_PER_PARAMETER, TrainingEngine, save_atomically
from lightning_mobillm.fed.alignment import AlignmentError, BackboneType, aligned_layers, shared_width
from lightning_mobillm.fed.model import TARGET_SPACES, FedSideModule, check_device_id
from lightning_mobillm.fed.trainer import FedTrainer, UploadRefused
from lightning_mobillm.fed.upload import Upload
from lightning_mobillm.server.dispatch import FrameServer, SessionBase
from lightning_mobillm.server.memory import release_free_memory
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport import codecs
from lightning_mobillm.transport.frames import Frame, FrameError, encode_frame

log = logging.getLogger("lightning_mobillm.server")

__all__ = ["FedServer", "FedSession"]

_CHECKPOINT_FORMAT = 1
_LOG_NAME = re.compile(r"upload-(\d{9})\.safetensors")
#: a ledger entry: the session's next ``seq`` and its last acknowledgement (seq, frame digest, reply bytes)
_Ledger = tuple[int, tuple[int, bytes, bytes] | None]


@dataclass
class FedSession(SessionBase):
    """A device's conversation with the federation: its declared backbone type and codec, and ``seq``, the
    number of its uploads acknowledged (``last_reply`` holds the last acknowledgement, for a retry)."""

    backbone_type: str
    codec: str
    seq: int = 0

    @property
    def step(self) -> int:
        return self.seq


@dataclass
class _Arrival:
    """The samples of an accepted upload that still wait for their arrival steps (in the upload's order)."""

    index: int  # the upload's place in acceptance order (its upload log entry)
    device: str
    backbone_type: str
    keys: list[str]


class FedServer(FrameServer):
    """The Fed MobiLLM server: one shared side network for every device (see the module docstring).

    Args:
        config: the server's settings (``fed_*``, ``allowed_backbones``, ``checkpoint_every_n_steps``, limits).
        fabric: the training engine's Fabric (from ``config`` when None).
        clock: monotonic seconds, for idle expiry.
        background: train in a background thread (the default). ``False`` for tests, which then drive the
            loop with :meth:`step_pending` / :meth:`run_pending`.
    """

    schemas = P.FED_REQUEST_SCHEMAS
    hello_kinds = (P.FED_HELLO,)
    compute_kinds = (P.FED_UPLOAD,)
    sessions: dict[str, FedSession]

    def __init__(self, config: ServerConfig | None = None, fabric: Fabric | None = None,
                 clock: Callable[[], float] = time.monotonic, *, background: bool = True) -> None:
        super().__init__(config, fabric, clock)
        self.trainer: FedTrainer | None = None
        self._state = threading.Condition()  # the one lock of the trainer, the queue, the ledger, the counters
        self._arrivals: deque[_Arrival] = deque()
        self._ledger: dict[str, _Ledger] = {}  # session key -> next seq, last acknowledgement
        self._accepted = 0  # uploads accepted so far: the next upload log index
        self._replay_left = 0
        self._checkpointed_step = 0
        self._serial = 0  # snapshots taken (a later snapshot is never overwritten by an earlier one)
        self._written = -1
        self._write_lock = threading.Lock()
        self.step_failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._restore()
        if background:
            self._thread = threading.Thread(target=self._run, name="mobillm-fed-trainer", daemon=True)
            self._thread.start()

    # ---- paths -------------------------------------------------------------------------------------
    @property
    def persistent(self) -> bool:
        """Whether uploads and checkpoints are written (``checkpoint_every_n_steps`` > 0)."""
        return bool(self.config.checkpoint_every_n_steps)

    @property
    def checkpoint_path(self) -> Path:
        return self.config.root() / "fed" / "trainer.ckpt"

    @property
    def upload_dir(self) -> Path:
        return self.config.root() / "fed" / "uploads"

    # ---- hello -------------------------------------------------------------------------------------
    def _on_fed_hello(self, frame: Frame, identity: str) -> Frame:
        h = frame.header
        owner, key = self.hello_key(frame, identity)
        try:
            check_device_id(owner)
        except ValueError:
            raise FrameError(f"fed_hello: identity {owner!r} cannot name a device in a federation (it must start "
                             "with a letter or a digit)") from None
        backbone = self._check_hello(h)
        live = self._open_or_reuse(key, owner)
        built = False
        with self._state:
            federation = self._federation(h)
            for name, ours in federation.items():
                if h[name] != ours:
                    raise FrameError(f"fed_hello: this federation has {name} = {ours!r}, the hello says "
                                     f"{h[name]!r} (tap the federation's K aligned layers, send its target width "
                                     f"and space)")
            try:
                aligned_layers(backbone.num_layers, federation["k"], name=backbone.key)
            except AlignmentError as err:
                raise FrameError(f"fed_hello: {err}") from None
            if self.trainer is None:
                self._build(federation, backbone)
                built = True
            self._check_joins(owner, backbone)
        if built:
            self.checkpoint()  # the federation's shape is on disk before any upload is logged
        if live is not None:
            if (live.backbone_type, live.codec) != (backbone.key, h["codec"]):
                raise FrameError(f"session {key} is open with backbone type {live.backbone_type!r} and codec "
                                 f"{live.codec!r}; use a new run_id")
            with live.lock:
                secret = self._admit(live, owner, identity)
            log.info("fed session %s reconnected at upload %d (new secret; the old one is revoked)", key, live.seq)
            return self._hello_reply(live, secret)
        session = FedSession(key, backbone_type=backbone.key, codec=h["codec"])
        with self._state:
            if h.get("resume", False):
                if key not in self._ledger:
                    raise FrameError(f"no fed session {key!r} to resume on this server")
                session.seq, session.last_reply = self._ledger[key]
            else:
                self._ledger[key] = (0, None)
        secret = self._admit(session, owner, identity)
        log.info("fed session %s opened: %s, codec %s, at upload %d", key, backbone.key, h["codec"], session.seq)
        return self._hello_reply(session, secret)

    def _check_hello(self, h: dict) -> BackboneType:
        """What a hello may ask for, before anything is built: bounds, codec, target space, a well-formed type
        key of the hello's width, admitted by the allow-list."""
        c = self.config
        for name, bound, setting in (("k", c.max_taps, "max_taps"), ("width", c.max_width, "max_width"),
                                     ("out_dim", c.max_outputs, "max_outputs")):
            if not 1 <= h[name] <= bound:
                raise FrameError(f"fed_hello: {name} must be in [1, {bound}] ({setting}), got {h[name]}")
        if h["target_space"] not in TARGET_SPACES:
            raise FrameError(f"fed_hello: target_space must be one of {list(TARGET_SPACES)}")
        if h["codec"] not in codecs.CODECS:
            raise FrameError(f"fed_hello: codec must be one of {list(codecs.CODECS)}")
        try:
            backbone = BackboneType.from_key(h["backbone_type"])
        except AlignmentError as err:
            raise FrameError(f"fed_hello: {err}") from None
        if backbone.hidden_size != h["width"]:
            raise FrameError(f"fed_hello: width {h['width']} is not the width of backbone type {backbone.key!r}")
        allowed = c.allowed_backbones
        if allowed is not None and backbone.key not in allowed:
            raise FrameError(f"fed_hello: backbone type {backbone.key!r} is not in this server's allow-list "
                             f"{sorted(allowed)[:20]}")
        return backbone

    def _federation(self, h: dict) -> dict[str, Any]:
        """The federation's shape a hello must agree with: the trainer's, else the config's, else the hello's."""
        if self.trainer is not None:
            module = self.trainer.module
            return {"k": module.k, "out_dim": module.out_dim, "target_space": module.target_space}
        c = self.config
        return {"k": c.fed_k or h["k"], "out_dim": c.fed_out_dim or h["out_dim"],
                "target_space": c.fed_target_space or h["target_space"]}

    def _param_budget(self) -> float:
        return self.config.max_session_mb * 2**20 / BYTES_PER_PARAMETER

    def _build(self, federation: dict[str, Any], backbone: BackboneType) -> None:
        """Create the federation's shared model and trainer (under the state lock), sized on the meta device
        against ``max_session_mb`` first."""
        c = self.config
        if c.fed_d_star is not None:
            d_star = c.fed_d_star
        else:
            widths = []
            for key in c.allowed_backbones or ():
                try:
                    widths.append(BackboneType.from_key(key).hidden_size)
                except AlignmentError:
                    pass
            d_star = shared_width(widths or [backbone.hidden_size])
        if d_star > c.max_width:
            raise FrameError(f"the federation's shared width {d_star} exceeds max_width {c.max_width}")
        settings = {"d_star": d_star, "target_space": federation["target_space"], "lr": float(c.fed_lr),
                    "head_rank": c.fed_head_rank, "seed": c.fed_seed}
        with torch.device("meta"):
            sizing = FedSideModule({}, federation["k"], federation["out_dim"], **settings)
        # the trunk, the first type's projection and the first head (the federation's smallest useful model)
        params = (sum(p.numel() for p in sizing.parameters()) + (backbone.hidden_size + 1) * d_star
                  + (d_star + 1) * federation["out_dim"])
        if params > self._param_budget():
            raise FrameError(f"the federation's side network needs {params * BYTES_PER_PARAMETER / 2**20:.0f} MB "
                             f"to train; this server allows {c.max_session_mb:.0f} MB (max_session_mb)")
        self.trainer = self._new_trainer(FedSideModule({}, federation["k"], federation["out_dim"], **settings))
        log.info("federation created: K = %d, out_dim = %d, d* = %d, target space %s", federation["k"],
                 federation["out_dim"], d_star, federation["target_space"])

    def _new_trainer(self, module: FedSideModule) -> FedTrainer:
        c = self.config
        return FedTrainer(module, engine_factory=lambda m: TrainingEngine.for_module(self.fabric, m,
                                                                                     grad_clip=c.grad_clip),
                          batch_size=c.fed_batch_size, allowed_types=c.allowed_backbones,
                          max_samples_per_device=c.fed_max_samples_per_device, seed=c.fed_seed,
                          download_dtype=c.fed_download_dtype)

    def _check_joins(self, owner: str, backbone: BackboneType) -> None:
        """A device keeps its backbone type; a new type's projection and a new head must fit the model's
        memory bound (under the state lock)."""
        trainer = self.trainer
        devices = trainer.statistics()["devices"]
        known = devices.get(owner)
        if known is None:  # a new device: within the federation's cap (devices that uploaded or are connected)
            members = set(devices) | {s.owner for s in list(self.sessions.values())}
            if owner not in members and len(members) >= self.config.fed_max_devices:
                raise FrameError(f"this federation is full ({self.config.fed_max_devices} devices, fed_max_devices)")
        if known is not None and known["backbone_type"] != backbone.key:
            raise FrameError(f"fed_hello: {owner} uploaded with backbone type {known['backbone_type']!r}; a device "
                             f"keeps its type")
        module = trainer.module
        extra = 0
        if backbone.key not in module.types:
            extra += (backbone.hidden_size + 1) * module.shared_width
        if not module.has_head(owner):
            extra += (module.shared_width + 1) * module.out_dim
        if sum(p.numel() for p in module.parameters()) + extra > self._param_budget():
            raise FrameError(f"the federation's side network would outgrow max_session_mb "
                             f"({self.config.max_session_mb:.0f} MB) with this device")

    def _hello_reply(self, session: FedSession, secret: str) -> Frame:
        with self._state:
            module = self.trainer.module
            header = {"session": session.key, "secret": secret, "server_pid": os.getpid(),
                      "server_device": str(self.device), "k": module.k, "d_star": module.shared_width,
                      "out_dim": module.out_dim, "target_space": module.target_space, "seq": session.seq,
                      **self._quota(session.owner)}
        return Frame(kind=P.OK, header=header)

    def _quota(self, owner: str) -> dict[str, int | None]:
        """The device's accepted samples and what is left of its quota (under the state lock)."""
        known = self.trainer.statistics()["devices"].get(owner)
        samples = known["samples"] if known is not None else 0
        quota = self.trainer.max_samples_per_device
        return {"samples": samples, "quota_left": None if quota is None else quota - samples}

    # ---- uploads -----------------------------------------------------------------------------------
    def _on_fed_upload(self, frame: Frame, session: FedSession) -> bytes:
        h = frame.header
        seq, keys = h["seq"], h["keys"]
        digest = _upload_digest(frame)
        with session.lock:
            if (stored := self._retried(session, seq, digest)) is not None:
                return stored
            if h["codec"] != session.codec:
                raise FrameError(f"this session declared codec {session.codec!r}, the upload is in {h['codec']!r}")
            if not 1 <= len(keys) <= self.config.max_tokens_per_frame:
                raise FrameError(f"an upload holds 1 to {self.config.max_tokens_per_frame} samples "
                                 f"(max_tokens_per_frame), got {len(keys)} keys")
            if frame.tensors["acts.q"].shape[0] != len(keys):  # before anything is decoded
                raise FrameError(f"{frame.tensors['acts.q'].shape[0]} samples of activations for {len(keys)} keys")
            acts = {name: t for name, t in frame.tensors.items() if name.startswith("acts.")}
            with self._state:
                upload = Upload(device=session.owner, backbone_type=session.backbone_type, keys=list(keys), acts=acts,
                                codec=h["codec"], targets=frame.tensors["targets"],
                                target_space=self.trainer.module.target_space)  # the hello agreed on it
                try:
                    accepted = self.trainer.accept(upload)
                except UploadRefused as err:
                    raise FrameError(str(err)) from None
                index = self._accepted
                self._accepted += 1
                reply = encode_frame(Frame(kind=P.OK, header={"seq": seq, "accepted": accepted,
                                                              **self._quota(session.owner)}))
                session.seq, session.last_reply = seq + 1, (seq, digest, reply)
                self._ledger[session.key] = (session.seq, session.last_reply)
                self._arrivals.append(_Arrival(index, session.owner, session.backbone_type, list(keys)))
                self._reset_replay()
                self._state.notify_all()
            if self.persistent:  # on disk before it is acknowledged (outside the state lock)
                self._log_upload(index, upload, session.key, seq, digest, reply)
            log.info("fed session %s: upload %d accepted (%d samples)", session.key, seq, accepted)
            return reply

    @staticmethod
    def _retried(session: FedSession, seq: int, digest: bytes) -> bytes | None:
        """The stored acknowledgement of a retried upload; raises for another frame with an acknowledged
        ``seq`` or a ``seq`` out of order (call with the session's lock held)."""
        last = session.last_reply
        if last is not None and last[0] == seq:
            if hmac.compare_digest(last[1], digest):
                return last[2]
            raise FrameError(f"upload {seq} was acknowledged for another frame; stale fed_upload refused")
        if seq != session.seq:
            raise FrameError(f"out-of-order fed_upload: got seq {seq}, expected {session.seq}")
        return None

    def _reset_replay(self) -> None:
        self._replay_left = self.config.fed_max_replay_steps if self.config.fed_replay else 0

    # ---- download and statistics --------------------------------------------------------------------
    def _on_fed_download(self, frame: Frame, session: FedSession) -> Frame:
        with self._state:
            try:
                download = self.trainer.download(session.owner)  # copies: safe to pack outside the lock
            except ValueError as err:
                raise FrameError(f"nothing to download: {err}") from None
            steps = self.trainer.engine.step
        skeleton, blob = P.pack_state(download.state)
        return Frame(kind=P.OK, header={"skeleton": skeleton, "config": download.config, "steps": steps},
                     tensors={"state": blob})

    def _on_fed_stats(self, frame: Frame, session: FedSession) -> Frame:
        with self._state:
            stats = self.trainer.statistics()
            quota = self._quota(session.owner)
            queued = sum(len(a.keys) for a in self._arrivals if a.device == session.owner)
        own = stats["devices"].get(session.owner) or {"backbone_type": session.backbone_type, "uploads": 0,
                                                      "samples": 0, "steps": 0, "sample_steps": 0}
        with self._lock:  # this session's own traffic
            traffic = {"bytes_in": session.bytes_in, "bytes_out": session.bytes_out}
        return Frame(kind=P.OK, header={"device": own, "totals": stats["totals"], "queued_samples": queued,
                                        "seq": session.seq, **quota, **traffic})

    def _on_bye(self, frame: Frame, session: FedSession) -> Frame:
        with session.lock:
            self._pop_session(session)
            with self._state:
                self._ledger.pop(session.key, None)
        log.info("fed session %s closed after %d uploads", session.key, session.seq)
        return Frame(kind=P.OK)

    # ---- training ----------------------------------------------------------------------------------
    def step_pending(self) -> str | None:
        """One step of the training loop: ``"arrival"`` (the next ``batch_size`` samples of the oldest
        arrival), else ``"replay"`` (one replay step, while the replay budget lasts), else None (nothing to
        do). Writes a checkpoint when one is due. The background thread calls it; tests call it directly."""
        snapshot = None
        with torch.inference_mode(False), torch.enable_grad(), self._compute:
            with self._state:
                trainer = self.trainer
                if trainer is None:
                    return None
                if self._arrivals:
                    kind, arrival = "arrival", self._arrivals[0]
                    keys = arrival.keys[:trainer.batch_size]
                    del arrival.keys[:len(keys)]
                    if not arrival.keys:
                        self._arrivals.popleft()
                    self._reset_replay()
                    # train_on finds an accepted upload's samples by device and key: these keys are a part of one
                    part = Upload(arrival.device, arrival.backbone_type, keys, {}, "fp32", torch.empty(0))
                    self._train(lambda: trainer.train_on(part), kind)
                elif self._replay_left > 0:
                    kind = "replay"
                    self._replay_left -= 1
                    self._train(trainer.replay_step, kind)
                else:
                    return None
                every = self.config.checkpoint_every_n_steps
                if every and trainer.engine.step // every > self._checkpointed_step // every:
                    snapshot = self._snapshot()
            if self.config.release_memory:
                release_free_memory()
        if snapshot is not None:
            self._write_checkpoint(*snapshot)
        return kind

    def _train(self, step: Callable[[], Any], kind: str) -> None:
        try:
            step()
        except Exception as err:  # noqa: BLE001 - a bad step (undone by the engine) must not stop training
            self.step_failures += 1
            log.warning("a fed %s step failed and was skipped: %s", kind, err)

    def run_pending(self, max_steps: int | None = None) -> list[str]:
        """:meth:`step_pending` until there is nothing to do (or ``max_steps``); returns the steps' kinds."""
        kinds: list[str] = []
        while max_steps is None or len(kinds) < max_steps:
            kind = self.step_pending()
            if kind is None:
                break
            kinds.append(kind)
        return kinds

    @property
    def queued_samples(self) -> int:
        """Samples of accepted uploads that wait for their arrival steps."""
        with self._state:
            return sum(len(a.keys) for a in self._arrivals)

    def _has_work(self) -> bool:
        return self.trainer is not None and (bool(self._arrivals) or self._replay_left > 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind = self.step_pending()
            except Exception:  # noqa: BLE001 - e.g. a checkpoint that cannot be written: keep serving
                log.exception("the fed training loop failed; trying again")
                self._stop.wait(1.0)
                continue
            if kind is None:
                with self._state:
                    while not self._stop.is_set() and not self._has_work():
                        self._state.wait()

    def close(self) -> None:
        """Stop the training thread (after its current step) and write a last checkpoint. Idempotent."""
        self._stop.set()
        with self._state:
            self._state.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.persistent and self.trainer is not None:
            self.checkpoint()

    # ---- checkpoints of the server's own -------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write the federation's state now (nothing without a federation or with checkpoints disabled)."""
        if not self.persistent:
            return
        with self._state:
            if self.trainer is None:
                return
            snapshot = self._snapshot()
        self._write_checkpoint(*snapshot)

    def _snapshot(self) -> tuple[int, dict[str, Any]]:
        """What a checkpoint holds, taken under the state lock: the engine's tensors are copied (they change
        with the next step); cached uploads never change and are referenced."""
        trainer = self.trainer
        state = trainer.state_dict()
        state["engine"] = _cloned(state["engine"])
        self._checkpointed_step = trainer.engine.step
        self._serial += 1
        ledger = {key: {"seq": seq, "last": None if last is None else
                        {"seq": last[0], "digest": _as_tensor(last[1]), "reply": _as_tensor(last[2])}}
                  for key, (seq, last) in self._ledger.items()}
        arrivals = [{"index": a.index, "device": a.device, "backbone_type": a.backbone_type, "keys": list(a.keys)}
                    for a in self._arrivals]
        return self._serial, {"format": _CHECKPOINT_FORMAT, "trainer": state, "ledger": ledger,
                              "included": self._accepted, "arrivals": arrivals}

    def _write_checkpoint(self, serial: int, state: dict[str, Any]) -> None:
        """Atomically (temp file, fsync, rename), never over a later snapshot; then drop the logged uploads
        the checkpoint holds."""
        with self._write_lock:
            if serial <= self._written:
                return
            save_atomically(self.fabric, self.checkpoint_path, state)
            self._written = serial
            for index, file in self._logged():
                if index < state["included"]:
                    file.unlink(missing_ok=True)
        log.info("fed checkpoint written at step %d (%d uploads)", state["trainer"]["engine"]["step"],
                 state["included"])

    def _log_upload(self, index: int, upload: Upload, session: str, seq: int, digest: bytes, reply: bytes) -> None:
        """One accepted upload, durably: its parts and targets, and in the metadata what restores it."""
        entry = {"index": index, "device": upload.device, "backbone_type": upload.backbone_type,
                 "keys": upload.keys, "codec": upload.codec, "session": session, "seq": seq,
                 "digest": digest.hex(), "reply": base64.b64encode(reply).decode()}
        tensors = {**{name: t.contiguous() for name, t in upload.acts.items()},
                   "targets": upload.targets.contiguous()}
        folder = self.upload_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"upload-{index:09d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"entry": json.dumps(entry)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _logged(self) -> list[tuple[int, Path]]:
        if not self.upload_dir.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.upload_dir.iterdir() if (m := _LOG_NAME.fullmatch(p.name))]
        return sorted(found)

    def _restore(self) -> None:
        """On start: the federation of the last checkpoint, then every upload logged after it."""
        if not self.persistent:
            return
        logged = self._logged()
        if not self.checkpoint_path.exists():
            if logged:
                raise ValueError(f"{len(logged)} logged uploads in {self.upload_dir} but no checkpoint "
                                 f"{self.checkpoint_path}: move the folder away to start a new federation")
            return
        state = self.fabric.load(self.checkpoint_path, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT or set(state) != {
                "format", "trainer", "ledger", "included", "arrivals"}:
            raise ValueError(f"{self.checkpoint_path} is not a fed server checkpoint of format {_CHECKPOINT_FORMAT}")
        saved = state["trainer"]["module"]
        trainer = self._new_trainer(FedSideModule.rebuild(saved["config"], saved["structure"]))
        trainer.load_state_dict(state["trainer"])
        module, c = trainer.module, self.config
        for name, ours, setting in (("K", module.k, c.fed_k), ("out_dim", module.out_dim, c.fed_out_dim),
                                    ("d*", module.shared_width, c.fed_d_star),
                                    ("target space", module.target_space, c.fed_target_space)):
            if setting is not None and setting != ours:
                raise ValueError(f"the federation in {self.checkpoint_path} has {name} = {ours!r}, this server's "
                                 f"config says {setting!r}")
        self.trainer = trainer
        for key, entry in state["ledger"].items():
            last = entry["last"]
            self._ledger[key] = (int(entry["seq"]), None if last is None else (
                int(last["seq"]), last["digest"].numpy().tobytes(), last["reply"].numpy().tobytes()))
        self._arrivals = deque(_Arrival(a["index"], a["device"], a["backbone_type"], list(a["keys"]))
                               for a in state["arrivals"])
        self._accepted = int(state["included"])
        self._checkpointed_step = trainer.engine.step
        replayed = 0
        for index, path in logged:
            if index < self._accepted:  # already in the checkpoint (it was written, the log not yet pruned)
                path.unlink(missing_ok=True)
                continue
            self._reaccept(index, path)
            replayed += 1
        self._reset_replay()
        log.info("federation restored from %s at step %d: %d devices, %d samples, %d logged uploads accepted again",
                 self.checkpoint_path, trainer.engine.step, len(trainer.statistics()["devices"]),
                 trainer.num_samples, replayed)

    def _reaccept(self, index: int, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            entry = json.loads(f.metadata()["entry"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        upload = Upload(device=entry["device"], backbone_type=entry["backbone_type"], keys=list(entry["keys"]),
                        acts={n: t for n, t in tensors.items() if n.startswith("acts.")}, codec=entry["codec"],
                        targets=tensors["targets"], target_space=self.trainer.module.target_space)
        try:
            self.trainer.accept(upload)
        except UploadRefused as err:  # e.g. a quota lowered since: its device was told it was accepted
            log.error("logged upload %d of %s is refused now and dropped: %s", index, entry["device"], err)
            return
        self._accepted = index + 1
        self._arrivals.append(_Arrival(index, entry["device"], entry["backbone_type"], list(entry["keys"])))
        reply = base64.b64decode(entry["reply"])
        self._ledger[entry["session"]] = (entry["seq"] + 1, (entry["seq"], bytes.fromhex(entry["digest"]), reply))


def _upload_digest(frame: Frame) -> bytes:
    """What makes two uploads the same frame: the header without the secret (a reconnect renews it) and every
    tensor's name, dtype, shape and bytes."""
    header = {k: v for k, v in frame.header.items() if k != "secret"}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(frame.tensors):
        t = frame.tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def _cloned(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
