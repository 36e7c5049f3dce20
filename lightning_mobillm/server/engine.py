"""One training engine for every server role, on Lightning Fabric.

A :class:`TrainingEngine` owns one model, its optimizer, its scheduler and its step count. Fabric sets
the model and optimizer up (device, precision, strategy), runs the backward pass and clips gradients; the
engine adds what a server that steps on untrusted frames needs: parameters change only when the loss and
the gradient are finite, a state that does not fit leaves the engine as it was, and checkpoints of its
own are written atomically so that a server can restart without any device's checkpoint.

What ``configure_optimizers`` returned is normalised by Lightning's own functions (the same ones the
Trainer uses), not by a copy of them. The side server and the split-learning server both train through
this class; a GPU or multi-GPU server gets a Fabric accelerator and strategy from its
:class:`~lightning_mobillm.server_config.ServerConfig` (tested here on CPU only).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from torch import Tensor, nn

from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.frames import FrameError

__all__ = ["StepResult", "TrainingEngine", "make_fabric"]


def make_fabric(config: ServerConfig) -> Fabric:
    """The Fabric of a server process, from its config (``device``, ``precision``, ``fabric_strategy``)."""
    device = config.device
    if device == "auto":
        accelerator, devices = ("cuda", 1) if torch.cuda.is_available() else ("cpu", 1)
    elif device.startswith("cuda:"):
        accelerator, devices = "cuda", [int(device.split(":", 1)[1])]
    else:
        accelerator, devices = device, config.devices
    return Fabric(accelerator=accelerator, devices=devices, strategy=config.fabric_strategy,
                  precision=config.precision)


@dataclass
class StepResult:
    loss: float
    outputs: Tensor
    grad_norm: float
    lr: float
    seconds: float


class TrainingEngine:
    """A model, its optimizer and scheduler, trained through ``fabric``.

    Args:
        fabric: the server's Fabric.
        model: what trains (a LightningModule, or any ``nn.Module``).
        optimizer, scheduler: its optimizer and an optional per-step scheduler; see :meth:`for_module` to
            take them from ``model.configure_optimizers()``.
        grad_clip: max global gradient norm (None: no clipping; the norm is still checked to be finite).
    """

    def __init__(self, fabric: Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 *, grad_clip: float | None = 1.0) -> None:
        self.fabric = fabric
        self.model, self.optimizer = fabric.setup(model, optimizer)
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.step = 0

    @classmethod
    def for_module(cls, fabric: Fabric, module: nn.Module, *, grad_clip: float | None = 1.0) -> TrainingEngine:
        """An engine with the optimizer and scheduler ``module.configure_optimizers()`` declares (one
        optimizer with at most one step-interval scheduler: what a server can step per frame)."""
        optimizers, schedulers, monitor = _configure_optimizers(module.configure_optimizers())
        if len(optimizers) != 1:
            raise ValueError(f"a server trains one optimizer per model, {type(module).__name__} returned "
                             f"{len(optimizers)}")
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
        if len(configs) > 1 or any(c.interval != "step" or c.frequency != 1 or c.monitor for c in configs):
            raise ValueError("a server steps at most one scheduler, every step (interval 'step', frequency 1)")
        return cls(fabric, module, optimizers[0], configs[0].scheduler if configs else None, grad_clip=grad_clip)

    @property
    def module(self) -> nn.Module:
        """The model without Fabric's wrapper."""
        return self.model.module

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---- one step -------------------------------------------------------------------------------------
    def train_step(self, compute_loss: Callable[[], tuple[Tensor, Tensor]]) -> StepResult:
        """``compute_loss()`` -> (loss, outputs) under Fabric's precision; backward, clip, step, schedule.
        A non-finite loss or gradient raises :class:`FrameError` and leaves parameters, optimizer state,
        scheduler and step count untouched."""
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with self.fabric.autocast():
                loss, outputs = compute_loss()
            if not torch.isfinite(loss):
                raise FrameError(f"non-finite loss {loss.item()}; step skipped")
            self.fabric.backward(loss)
            if self.grad_clip is not None:
                norm = self.fabric.clip_gradients(self.model, self.optimizer, max_norm=self.grad_clip,
                                                  error_if_nonfinite=False)
            else:
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None])
            if norm is None or not torch.isfinite(norm):
                raise FrameError("non-finite gradient; step skipped")
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        return StepResult(float(loss.detach()), outputs.detach(), float(norm), self.lr, time.perf_counter() - t0)

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``model`` and ``step`` (``optimizer`` and ``scheduler`` when present). All or nothing: a
        state that does not fit raises ValueError and the engine keeps what it had."""
        if not isinstance(state, dict) or not {"model", "step"} <= set(state):
            raise ValueError("state must hold model and step (optimizer and scheduler are optional)")
        before = {"model": {k: v.clone() for k, v in self.module.state_dict().items()},
                  "optimizer": self.optimizer.state_dict(),
                  "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        try:
            self.module.load_state_dict(state["model"], strict=True)
            if state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                # a scheduler's load_state_dict takes any dict into its __dict__: check it has the shape of ours
                _check_like(before["scheduler"], state["scheduler"], "scheduler")
                self.scheduler.load_state_dict(state["scheduler"])
            _check_optimizer_shapes(self.optimizer)
            step = int(state["step"])
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            self.module.load_state_dict(before["model"])
            self.optimizer.load_state_dict(before["optimizer"])
            if before["scheduler"] is not None:
                self.scheduler.load_state_dict(before["scheduler"])
            raise ValueError(str(err)) from None
        self.step = step

    # ---- checkpoints of the server's own --------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the engine's state (and ``extra``: plain data) to ``path`` atomically (temp file, fsync,
        rename): a server killed while writing leaves the previous checkpoint intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.fabric.save(tmp, {**self.state_dict(), "extra": extra or {}})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore from :meth:`save` (loaded with ``weights_only=True``); returns its ``extra``."""
        state = self.fabric.load(Path(path), weights_only=True)
        self.load_state_dict(state)
        return state.get("extra") or {}


def _check_like(reference: Any, value: Any, path: str) -> None:
    """``value`` has the structure and value types of ``reference`` (same keys, lengths and kinds of
    number; finite numbers), as a state of the same scheduler would."""
    if isinstance(reference, dict):
        if not isinstance(value, dict) or set(value) != set(reference):
            raise ValueError(f"{path} must hold the keys {sorted(reference)}")
        for key in reference:
            _check_like(reference[key], value[key], f"{path}.{key}")
    elif isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            raise ValueError(f"{path} must be a list of {len(reference)}")
        for i, (r, v) in enumerate(zip(reference, value)):
            _check_like(r, v, f"{path}[{i}]")
    elif isinstance(reference, bool) or reference is None or isinstance(reference, str):
        if type(value) is not type(reference):
            raise ValueError(f"{path} must be {type(reference).__name__}, got {type(value).__name__}")
    elif isinstance(reference, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path} must be a finite number, got {value!r}")
        if isinstance(reference, int) and not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
    elif isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape:
            raise ValueError(f"{path} must be a tensor of shape {list(reference.shape)}")


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != p.shape:
                    raise ValueError(f"optimizer state {name!r} has shape {list(value.shape)}, "
                                     f"its parameter {list(p.shape)}")
