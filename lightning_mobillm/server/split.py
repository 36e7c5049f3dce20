"""The server half of the split-learning baseline (``python -m lightning_mobillm serve --role split``).

Unlike the MobiLLM side server it loads a backbone: blocks ``k..L-1``, the final norm, LoRA adapters and
a classification head, for each device session. It only loads backbones its config allows
(``ServerConfig.allowed_backbones``; by default the packaged offline models), never remote code. Frames
are validated like every other frame of the framework; a refused frame changes nothing.

Like the side server, it checkpoints each session in its workdir every ``checkpoint_every_n_steps`` (only
what trains: the LoRA adapters and the head, their optimizer and schedule, the step, and the stored reply of
the last step, so that a device's retry of that step after a restart gets the same gradient back), and a
hello with ``resume: true`` continues a session from it on a restarted server.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mobillm import protocol as P
from lightning_mobillm.assets import PACKAGED_MODELS
from lightning_mobillm.backbone import add_lora, load_split_part
from lightning_mobillm.engine import TrainingEngine, save_atomically
from lightning_mobillm.faults import fault_point
from lightning_mobillm.optim import adamw_warmup_cosine
from lightning_mobillm.server.dispatch import FrameServer, SessionBase
from lightning_mobillm.side.heads import LastTokenHead
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.transport import codecs
from lightning_mobillm.transport.frames import Frame, FrameError

log = logging.getLogger("lightning_mobillm.server")

__all__ = ["SplitServer"]


class SplitHalf(nn.Module):
    """The server's half: blocks ``k..L-1`` with LoRA, the final norm, and the classification head."""

    def __init__(self, upper: nn.Module, head: LastTokenHead) -> None:
        super().__init__()
        self.upper = upper
        self.head = head

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-pad the packed states, run the upper blocks with positions ``0..n-1``, classify the last token."""
        device = states.device
        batch, seqlen = int(lengths.numel()), int(lengths.max())
        mask = torch.arange(seqlen, device=device)[None, :] < lengths[:, None]
        dtype = next(self.upper.parameters()).dtype
        padded = states.new_zeros(batch, seqlen, states.shape[-1]).to(dtype)
        padded = padded.masked_scatter(mask[..., None], states.to(dtype))
        positions = torch.arange(seqlen, device=device).expand(batch, seqlen)
        out = self.upper(inputs_embeds=padded, attention_mask=mask.long(), position_ids=positions,
                         use_cache=False).last_hidden_state
        return self.head(out[torch.arange(batch, device=device), lengths - 1])


@dataclass
class SplitSession(SessionBase):
    engine: TrainingEngine
    num_classes: int
    hidden_size: int
    label_smoothing: float
    checkpoint_step: int = 0

    @property
    def step(self) -> int:
        return self.engine.step

    @property
    def half(self) -> SplitHalf:
        return self.engine.module


class SplitServer(FrameServer):
    """Per device session: the upper blocks with LoRA + head, their AdamW and schedule."""

    schemas = P.SPLIT_REQUEST_SCHEMAS
    hello_kinds = (P.SPLIT_HELLO,)
    compute_kinds = (P.SPLIT_TRAIN, P.SPLIT_EVAL)
    sessions: dict[str, SplitSession]

    def _allowed(self, source: str) -> bool:
        allowed = self.config.allowed_backbones
        return source in (allowed if allowed is not None else PACKAGED_MODELS)

    def _on_split_hello(self, frame: Frame, identity: str) -> Frame:
        h = frame.header
        owner, key = self.hello_key(frame, identity)
        try:
            backbone = BackboneConfig(**h["backbone"])
        except (TypeError, ValueError) as err:
            raise FrameError(f"bad backbone in hello: {err}") from None
        if not self._allowed(backbone.source) or backbone.trust_remote_code:
            raise FrameError(f"this server does not load backbone {backbone.source!r} "
                             f"(allowed: {self.config.allowed_backbones or sorted(PACKAGED_MODELS)}; no remote code)")
        hp = h["hparams"]
        if not 2 <= h["num_classes"] <= self.config.max_outputs or not 1 <= h["total_steps"] <= 10**9:
            raise FrameError(f"hello needs num_classes in [2, {self.config.max_outputs}] and total_steps >= 1")
        live = self._open_or_reuse(key, owner)
        if live is not None:
            with live.lock:
                secret = self._admit(live, owner, identity)
            log.info("split session %s reconnected at step %d", key, live.step)
            return self._hello_reply(live, secret)
        path = self.checkpoint_path(key)
        if h.get("resume", False) and not path.exists():
            raise FrameError(f"no server checkpoint of split session {key!r} to resume from")
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(hp.get("seed", 0)))
                upper = load_split_part(backbone, h["split_layer"], "upper")
                upper = add_lora(upper, int(hp["r"]), int(hp["alpha"]), float(hp["lora_dropout"]),
                                 list(hp["target_modules"]))
                hidden = int(upper.config.hidden_size)
                head = LastTokenHead(hidden, h["num_classes"], float(hp.get("dropout", 0.1)))
            half = SplitHalf(upper, head)
            optimizer, scheduler = adamw_warmup_cosine(
                half.parameters(), lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.0),
                betas=hp.get("betas", (0.9, 0.999)), total_steps=int(h["total_steps"]),
                warmup_ratio=hp.get("warmup_ratio", 0.0), min_lr_ratio=hp.get("min_lr_ratio", 0.0),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise FrameError(f"cannot build the split server's half: {err}") from None
        engine = TrainingEngine(self.fabric, half, optimizer, scheduler, grad_clip=self.config.grad_clip)
        session = SplitSession(key, engine, h["num_classes"], hidden, float(hp.get("label_smoothing", 0.0)))
        if h.get("resume", False):
            self._load(session, path)
            log.info("split session %s resumed from the server's checkpoint at step %d", key, session.step)
        secret = self._admit(session, owner, identity)
        log.info("split session %s: %s from block %d, %d trainable parameters on %s", key, backbone.source,
                 h["split_layer"], sum(p.numel() for g in optimizer.param_groups for p in g["params"]), self.device)
        return self._hello_reply(session, secret)

    def _hello_reply(self, session: SplitSession, secret: str) -> Frame:
        return Frame(kind=P.OK, header={"session": session.key, "secret": secret, "server_pid": os.getpid(),
                                        "server_device": str(self.device), "step": session.step,
                                        "checkpoint_step": session.checkpoint_step})

    # ---- checkpoints of the server's own ----------------------------------------------------------
    def checkpoint_path(self, key: str) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]  # the key holds device-chosen names
        return self.config.root() / "server-checkpoints" / f"split-{name}.ckpt"

    def checkpoint(self, session: SplitSession, *, force: bool = False) -> None:
        """Write what trains (adapters, head, optimizer, schedule, step) and the last step's stored reply,
        atomically (temp file, fsync, rename)."""
        if not (self.config.checkpoint_every_n_steps or force):
            return
        engine = session.engine
        state: dict[str, Any] = {**engine.state_dict(), "model": _trainable(session.half)}
        if session.last_reply is not None:
            step, digest, reply = session.last_reply
            state["last_reply"] = {"step": step, "digest": _as_tensor(digest), "reply": _as_tensor(reply)}
        save_atomically(engine.fabric, self.checkpoint_path(session.key), state)
        session.checkpoint_step = session.step
        fault_point("server:after_checkpoint", step=session.step, session=session.key)

    def _load(self, session: SplitSession, path: Path) -> None:
        """Restore a checkpoint of :meth:`checkpoint` (``weights_only``); all or nothing."""
        try:
            state = session.engine.fabric.load(path, weights_only=True)
            trainable = _trainable(session.half)
            if not isinstance(state, dict) or set(state.get("model", {})) != set(trainable):
                raise ValueError("it does not hold this session's adapters and head")
            full = {**session.half.state_dict(), **state["model"]}
            session.engine.load_state_dict({**{k: state[k] for k in ("optimizer", "scheduler", "step") if k in state},
                                            "model": full})
            last = state.get("last_reply")
            if last is not None:
                session.last_reply = (int(last["step"]), last["digest"].numpy().tobytes(),
                                      last["reply"].numpy().tobytes())
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
            raise FrameError(f"the server checkpoint of split session {session.key!r} does not fit: {err}") from None
        session.checkpoint_step = session.step

    def _on_expire(self, session: SplitSession) -> None:
        self.checkpoint(session, force=True)

    def _inputs(self, session: SplitSession, frame: Frame) -> tuple[torch.Tensor, torch.Tensor]:
        n, layers, packed = frame.tensors["acts.q"].shape  # bounded before anything is dequantised
        if n > self.config.max_tokens_per_frame:
            raise FrameError(f"{n} tokens in one frame; this server allows {self.config.max_tokens_per_frame}")
        if layers != 1 or packed > session.hidden_size:
            raise FrameError(f"states shape [{n}, {layers}, {packed}] != [N, 1, {session.hidden_size}]")
        acts, lengths = P.unpack_acts(frame.tensors, frame.header["codec"])
        n, layers, width = acts.shape
        if width != session.hidden_size:
            raise FrameError(f"states shape [{n}, {layers}, {width}] != [N, 1, {session.hidden_size}]")
        if lengths.numel() == 0 or bool((lengths < 1).any()) or int(lengths.sum()) != n:
            raise FrameError(f"lengths must be >= 1 and sum to N={n}")
        if not torch.isfinite(acts).all():
            raise FrameError("states are not finite after decoding")
        return acts[:, 0].to(self.device), lengths.to(self.device)

    def _on_split_train(self, frame: Frame, session: SplitSession) -> bytes:
        step = frame.header["step"]
        codec = frame.header["codec_down"]
        if codec not in codecs.CODECS:
            raise FrameError(f"codec_down {codec!r} is not one of {list(codecs.CODECS)}")
        with session.lock:
            if (replayed := self._replayed(session, frame)) is not None:
                return replayed
            states, lengths = self._inputs(session, frame)
            labels = frame.tensors["labels"].to(self.device)
            if labels.shape != lengths.shape or bool((labels < 0).any() | (labels >= session.num_classes).any()):
                raise FrameError(f"labels must be [B] in [0, {session.num_classes})")
            states.requires_grad_(True)

            def compute_loss() -> tuple[torch.Tensor, torch.Tensor]:
                logits = session.engine.model(states, lengths)
                return F.cross_entropy(logits.float(), labels, label_smoothing=session.label_smoothing), logits

            result = session.engine.train_step(compute_loss)
            tensors = P.pack_acts(states.grad.float()[:, None, :].cpu(), lengths.cpu(), codec)
            header = {"step": step, "codec": codec, "loss": result.loss, "server_step_s": result.seconds,
                      "lr": result.lr, "acc": float((result.outputs.argmax(-1) == labels).float().mean())}
            reply = self._remember(session, frame, Frame(kind=P.OK, header=header, tensors=tensors))
            every = self.config.checkpoint_every_n_steps
            if every and session.step % every == 0:
                self.checkpoint(session)  # with the stored reply: a retry after a restart gets it back
            fault_point("server:after_train_step", step=session.step, session=session.key)
            return reply

    @torch.no_grad()
    def _on_split_eval(self, frame: Frame, session: SplitSession) -> Frame:
        with session.lock:
            states, lengths = self._inputs(session, frame)
            session.engine.model.eval()
            logits = session.engine.model(states, lengths)
        return Frame(kind=P.OK, tensors={"logits": logits.float().cpu().contiguous()})

    def _on_bye(self, frame: Frame, session: SplitSession) -> Frame:
        self._pop_session(session)
        self.checkpoint_path(session.key).unlink(missing_ok=True)  # it ended cleanly
        log.info("split session %s closed after %d steps", session.key, session.step)
        return Frame(kind=P.OK)


def _trainable(half: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA adapters and the head): what a split checkpoint holds."""
    return {name: p.detach() for name, p in half.named_parameters() if p.requires_grad}


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
