"""Server policies: which model a session's frames train, and when steps happen.

The dispatcher (:mod:`lightning_mobillm.server.dispatch`) hands a policy only validated batches; the
policy owns the models and their :class:`~lightning_mobillm.engine.TrainingEngine`. Today's
MobiLLM/PAE behaviour is :class:`PerDevicePolicy`: one model per device session, one optimizer step as
soon as a frame arrives. A policy for one shared model trained from many devices (Fed MobiLLM) goes
beside it and implements the same five methods; the dispatcher does not change.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor

from lightning_mobillm.engine import TrainingEngine
from lightning_mobillm.faults import fault_point
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.frames import FrameError

log = logging.getLogger("lightning_mobillm.server")

__all__ = ["PerDevicePolicy", "ServerPolicy"]


class ServerPolicy(ABC):
    """What a server does with a session's validated frames.

    A session (``lightning_mobillm.server.runtime.SideSession``) carries the module its hello asked for,
    the tap spec, whether it is label-free, and a ``model`` slot the policy fills.
    """

    def __init__(self, config: ServerConfig, fabric: Fabric) -> None:
        self.config = config
        self.fabric = fabric

    @abstractmethod
    def attach(self, session: Any, module: torch.nn.Module, *, resume: bool) -> None:
        """A hello opened ``session`` for ``module``; ``resume`` asks to continue from the server's own
        checkpoint of the same session."""

    @abstractmethod
    def train(self, session: Any, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Train on a validated batch; returns the reply header (``loss``, ``lr``, ...)."""

    @abstractmethod
    def evaluate(self, session: Any, acts: Tensor, lengths: Tensor) -> Tensor:
        """The session's model outputs for a validated batch."""

    @abstractmethod
    def state(self, session: Any) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler", "step"}`` of the session's model."""

    @abstractmethod
    def load_state(self, session: Any, state: dict[str, Any]) -> None:
        """Replace the session's state (all or nothing; ValueError when it does not fit)."""

    def step_end(self, session: Any) -> None:  # noqa: B027 - optional hook
        """A training step and what it stored (activation cache entries) are done (e.g. checkpoint now)."""

    def detach(self, session: Any) -> None:  # noqa: B027 - optional hook
        """The session ends (bye)."""


class PerDevicePolicy(ServerPolicy):
    """One model per device session, stepped on arrival; checkpoints of the server's own in its workdir."""

    def checkpoint_path(self, session: Any) -> Path:
        # the key (owner/run_id) holds device-chosen names: hash it rather than trust it as a file name; the
        # owner is part of it, so no other identity can resume this checkpoint
        name = hashlib.sha256(session.key.encode()).hexdigest()[:32]
        return self.config.root() / "server-checkpoints" / f"session-{name}.ckpt"

    def attach(self, session: Any, module: torch.nn.Module, *, resume: bool) -> None:
        session.model = TrainingEngine.for_module(self.fabric, module, grad_clip=self.config.grad_clip)
        # the loss goes through Fabric's wrapper as forward does (precision, and a distributed strategy's hooks)
        session.model.model.mark_forward_method("compute_loss")
        if resume:
            path = self.checkpoint_path(session)
            if not path.exists():
                raise FrameError(f"no server checkpoint of session {session.key!r} to resume from")
            try:
                session.model.load(path)
            except ValueError as err:
                raise FrameError(f"the server checkpoint of session {session.key!r} does not fit: {err}") from None
            session.checkpoint_step = session.step
            log.info("session %s resumed from the server's checkpoint at step %d", session.key, session.step)

    def train(self, session: Any, batch: dict[str, Tensor]) -> dict[str, Any]:
        engine: TrainingEngine = session.model
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        result = engine.train_step(lambda: engine.model.compute_loss(batch))
        header = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "server_step_s": result.seconds, "server_steps": engine.step}
        if not session.label_free and not getattr(session, "labels_per_token", False):
            header["acc"] = float((result.outputs.argmax(-1) == batch["labels"]).float().mean())
        return header

    def step_end(self, session: Any) -> None:
        """Every ``checkpoint_every_n_steps``: a checkpoint that holds the step's cache entries too."""
        every = self.config.checkpoint_every_n_steps
        if every and session.step % every == 0:
            self.checkpoint(session)

    @torch.no_grad()
    def evaluate(self, session: Any, acts: Tensor, lengths: Tensor) -> Tensor:
        engine: TrainingEngine = session.model
        engine.model.eval()
        return engine.model(acts.to(engine.device), lengths.to(engine.device))

    def state(self, session: Any) -> dict[str, Any]:
        return session.model.state_dict()

    def load_state(self, session: Any, state: dict[str, Any]) -> None:
        session.model.load_state_dict(state)

    def checkpoint(self, session: Any, *, force: bool = False) -> None:
        """Write the session's engine state atomically (and flush its activation cache's index); ``force``
        writes it even when periodic checkpoints are off (a session closed for being idle)."""
        if not (self.config.checkpoint_every_n_steps or force):
            return
        if session.store is not None:
            session.store.flush()
        session.model.save(self.checkpoint_path(session), extra={"session": session.key})
        session.checkpoint_step = session.step  # told to the device in every training reply
        fault_point("server:after_checkpoint", step=session.step, session=session.key)

    def detach(self, session: Any) -> None:
        """A session that said bye ended cleanly: its device holds what it needs, so its server
        checkpoint (which only serves a server restart within a run) is removed."""
        self.checkpoint_path(session).unlink(missing_ok=True)
