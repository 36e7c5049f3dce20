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

import copy
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

__all__ = ["BYTES_PER_PARAMETER", "StepResult", "TrainingEngine", "make_fabric", "save_atomically"]

#: what training one fp32 parameter with AdamW costs an engine: the weight, its gradient, two moments, and the
#: step's undo copy of the weight and both moments (4 bytes each); a server sizes a session's model by it
BYTES_PER_PARAMETER = 28

_STATE_KEYS = {"model", "optimizer", "scheduler", "step"}


def save_atomically(fabric: Fabric, path: str | Path, state: dict[str, Any]) -> None:
    """``fabric.save`` to a temp file beside ``path``, fsync, rename: a process killed while writing leaves
    the previous file intact (every server checkpoint is written this way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fabric.save(tmp, state)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self._undo = _StepUndo()

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

        All or nothing: a non-finite loss or gradient raises :class:`FrameError` before anything changes,
        and an optimizer or scheduler step that raises or leaves a non-finite parameter is undone from a
        copy taken just before it (parameters, optimizer state, learning rates, scheduler), then raises
        FrameError. Parameters, optimizer state, scheduler and step count are then as they were."""
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
            self._undo.capture(self.optimizer, self.scheduler)
            try:
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                if not self._undo.parameters_finite(self.optimizer):
                    raise FrameError("the optimizer step made a parameter non-finite")
            except Exception as err:
                self._undo.restore(self.optimizer, self.scheduler)
                if isinstance(err, FrameError):
                    raise
                raise FrameError(f"the optimizer step failed and was undone ({type(err).__name__}: "
                                 f"{str(err)[:200]})") from None
        finally:
            self.optimizer.zero_grad(set_to_none=True)
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
        state that does not fit raises ValueError and the engine keeps what it had.

        A state may come from a device (``set_state``), so it is checked as untrusted input before any of it
        is applied (:meth:`check_state`): the model's keys and shapes, every number finite and in range, the
        optimizer's structure and hyperparameters, and the scheduler's shape."""
        self.check_state(state)
        before = {"model": {k: v.clone() for k, v in self.module.state_dict().items()},
                  "optimizer": self.optimizer.state_dict(),
                  "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        try:
            self.module.load_state_dict(state["model"], strict=True)
            if state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            self.module.load_state_dict(before["model"])
            self.optimizer.load_state_dict(before["optimizer"])
            if before["scheduler"] is not None:
                self.scheduler.load_state_dict(before["scheduler"])
            raise ValueError(str(err)) from None
        self.step = state["step"]

    #: the largest magnitude a weight or an optimizer moment may have in a loaded state
    MAX_ABS_VALUE = 1e6
    #: ranges of the optimizer's hyperparameters in a loaded state (the hello's ranges for lr and weight decay)
    GROUP_RANGES: dict[str, tuple[float, float, bool]] = {  # (low, high, high included)
        "lr": (0.0, 10.0, True), "initial_lr": (0.0, 10.0, True), "weight_decay": (0.0, 10.0, True),
        "eps": (0.0, 1.0, True), "betas": (0.0, 1.0, False), "momentum": (0.0, 1.0, False),
        "dampening": (0.0, 1.0, True), "alpha": (0.0, 1.0, True)}

    def check_state(self, state: Any) -> None:
        """Raise ValueError unless ``state`` is one this engine could have written: ``model`` with this
        model's keys and shapes, finite, within :attr:`MAX_ABS_VALUE`; ``step`` an int in [0, 2**63); an
        ``optimizer`` (optional) with this optimizer's param groups (same keys and value types, the same
        parameters, hyperparameters in :attr:`GROUP_RANGES`) and per-parameter state only for its own
        parameters, shaped like the state its optimizer class makes (found by stepping a two-element probe),
        finite, and non-negative where the optimizer's own state is (second moments, step counts); a
        ``scheduler`` (optional) of this scheduler's structure, every number finite and >= 0."""
        if not isinstance(state, dict) or not {"model", "step"} <= set(state) or set(state) - _STATE_KEYS:
            raise ValueError("state must hold model and step (optimizer and scheduler are optional), nothing else")
        step = state["step"]
        if type(step) is not int or not 0 <= step < 2**63:
            raise ValueError(f"state step must be an int in [0, 2**63), got {step!r}")
        model, own = state["model"], self.module.state_dict()
        if not isinstance(model, dict) or set(model) != set(own):
            raise ValueError(f"state model must hold exactly the keys {sorted(own)}")
        for key, value in model.items():
            if not isinstance(value, Tensor) or value.shape != own[key].shape:
                raise ValueError(f"state model {key!r} must be a tensor of shape {list(own[key].shape)}")
            _check_finite(value, f"model {key!r}", self.MAX_ABS_VALUE)
        if state.get("optimizer") is not None:
            self._check_optimizer_state(state["optimizer"])
        if state.get("scheduler") is not None:
            if self.scheduler is None:
                raise ValueError("state has a scheduler; this engine has none")
            # a scheduler's load_state_dict takes any dict into its __dict__: check it has the shape of ours
            _check_like(self.scheduler.state_dict(), state["scheduler"], "scheduler", nonnegative=True)
            for key in ("base_lrs", "_last_lr"):
                for lr in state["scheduler"].get(key) or ():
                    if not 0 <= lr <= self.GROUP_RANGES["lr"][1]:
                        raise ValueError(f"scheduler {key} must be in [0, {self.GROUP_RANGES['lr'][1]}]")

    def _check_optimizer_state(self, opt: Any) -> None:
        own = self.optimizer.state_dict()
        if not isinstance(opt, dict) or set(opt) != {"state", "param_groups"}:
            raise ValueError("optimizer state must hold exactly state and param_groups")
        _check_like(own["param_groups"], opt["param_groups"], "optimizer.param_groups", nonnegative=True)
        shapes: dict[int, torch.Size] = {}
        for group, own_group, params in zip(opt["param_groups"], own["param_groups"], self.optimizer.param_groups):
            if list(group["params"]) != list(own_group["params"]):
                raise ValueError("optimizer.param_groups must name this optimizer's parameters")
            shapes.update({i: p.shape for i, p in zip(own_group["params"], params["params"])})
            for key, (low, high, closed) in self.GROUP_RANGES.items():
                for value in _numbers(group.get(key)):
                    if not (low <= value <= high if closed else low <= value < high) or (key == "eps" and value == 0):
                        raise ValueError(f"optimizer.param_groups {key} must be in "
                                         f"{'(' if key == 'eps' else '['}{low}, {high}{']' if closed else ')'}")
        if not isinstance(opt["state"], dict):
            raise ValueError("optimizer.state must be a map of parameter index to its state")
        probe, nonnegative = self._probe_state()
        for index, entry in opt["state"].items():
            if type(index) is not int or index not in shapes:
                raise ValueError(f"optimizer.state has an entry for {index!r}, not one of this optimizer's parameters")
            if not isinstance(entry, dict) or set(entry) != set(probe):
                raise ValueError(f"optimizer.state[{index}] must hold exactly {sorted(probe)}")
            for key, ref in probe.items():
                value, where = entry[key], f"optimizer.state[{index}].{key}"
                if isinstance(ref, Tensor):
                    shape = torch.Size([]) if ref.ndim == 0 else shapes[index]
                    if not isinstance(value, Tensor) or value.shape != shape or not value.is_floating_point():
                        raise ValueError(f"{where} must be a float tensor of shape {list(shape)}")
                    _check_finite(value, where, 2**63 if ref.ndim == 0 else self.MAX_ABS_VALUE**2)
                    if key in nonnegative and bool((value < 0).any()):
                        raise ValueError(f"{where} must be >= 0")
                else:
                    _check_like(ref, value, where, nonnegative=key in nonnegative)

    def _probe_state(self) -> tuple[dict[str, Any], set[str]]:
        """The per-parameter state this optimizer's class makes, and which of its entries stay >= 0: two steps
        of a fresh optimizer of the same class and hyperparameters on a two-element parameter, with gradients
        of both signs (a first moment turns negative, a second moment or a step count does not)."""
        if getattr(self, "_probe", None) is None:
            param = torch.zeros(2, requires_grad=True)
            group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
            probe = type(self.optimizer.optimizer)([{**group, "params": [param]}])
            for _ in range(2):
                param.grad = torch.tensor([1.0, -1.0])
                probe.step()
            entry = probe.state[param]
            nonnegative = {k for k, v in entry.items() if not isinstance(v, bool) and (
                bool((v >= 0).all()) if isinstance(v, Tensor) else isinstance(v, (int, float)) and v >= 0)}
            self._probe = (dict(entry), nonnegative)
        return self._probe

    # ---- checkpoints of the server's own --------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the engine's state (and ``extra``: plain data) to ``path`` atomically (temp file, fsync,
        rename): a server killed while writing leaves the previous checkpoint intact."""
        save_atomically(self.fabric, path, {**self.state_dict(), "extra": extra or {}})

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore from :meth:`save` (loaded with ``weights_only=True``); returns its ``extra``."""
        state = self.fabric.load(Path(path), weights_only=True)
        extra = state.pop("extra", None)
        self.load_state_dict(state)
        return extra or {}


def _check_like(reference: Any, value: Any, path: str, *, nonnegative: bool = False) -> None:
    """``value`` has the structure and value types of ``reference`` (same keys, lengths and kinds of
    number; finite numbers, and ``nonnegative`` ones when asked), as a state of the same object would."""
    if isinstance(reference, dict):
        if not isinstance(value, dict) or set(value) != set(reference):
            raise ValueError(f"{path} must hold the keys {sorted(reference, key=str)}")
        for key in reference:
            _check_like(reference[key], value[key], f"{path}.{key}", nonnegative=nonnegative)
    elif isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            raise ValueError(f"{path} must be a list of {len(reference)}")
        for i, (r, v) in enumerate(zip(reference, value)):
            _check_like(r, v, f"{path}[{i}]", nonnegative=nonnegative)
    elif isinstance(reference, bool) or reference is None or isinstance(reference, str):
        if type(value) is not type(reference):
            raise ValueError(f"{path} must be {type(reference).__name__}, got {type(value).__name__}")
    elif isinstance(reference, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path} must be a finite number, got {value!r}")
        if isinstance(reference, int) and not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        if nonnegative and not 0 <= value < 2**63:
            raise ValueError(f"{path} must be in [0, 2**63), got {value!r}")
    elif isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape:
            raise ValueError(f"{path} must be a tensor of shape {list(reference.shape)}")
        _check_finite(value, path, math.inf)
    else:
        raise ValueError(f"{path}: a {type(reference).__name__} cannot be loaded from a device")


def _check_finite(value: Tensor, path: str, bound: float) -> None:
    if value.is_floating_point() and value.numel():
        if not bool(torch.isfinite(value).all()) or float(value.abs().max()) > bound:
            raise ValueError(f"{path} must be finite and within {bound:g}")


def _numbers(value: Any) -> list[float]:
    return [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


class _StepUndo:
    """A copy of everything ``optimizer.step()`` and ``scheduler.step()`` change, kept in buffers allocated
    once (re-allocated only when the optimizer's tensors change shape), so that a step that fails half-way
    (torch's single-tensor AdamW updates parameter after parameter) can be undone: tensors are copied back
    in place, and each parameter's state map is put back as it was (entries a step replaced or created are
    dropped). Its cost is one copy of the parameters and the optimizer state per step, and that much memory
    (counted in a session's size at hello)."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._tensors: list[Tensor] = []
        self._states: list[tuple[Tensor, dict[str, Any] | None]] = []
        self._groups: list[dict[str, Any]] = []
        self._scheduler: dict[str, Any] | None = None

    def capture(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self._states, self._tensors = [], []
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = dict(optimizer.state[p]) if p in optimizer.state else None
                self._states.append((p, state))
                self._tensors += [p.data, *(v for v in (state or {}).values() if isinstance(v, Tensor))]
        if len(self._buffers) != len(self._tensors) or any(
                b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                for b, t in zip(self._buffers, self._tensors)):
            self._buffers = [torch.empty_like(t) for t in self._tensors]
        if self._tensors:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._tensors)
        self._groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
        self._scheduler = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None

    def restore(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        if self._tensors:
            with torch.no_grad():
                torch._foreach_copy_(self._tensors, self._buffers)
        for p, state in self._states:
            if state is None:
                optimizer.state.pop(p, None)
            else:
                optimizer.state[p] = state
        for group, saved in zip(optimizer.param_groups, self._groups):
            group.update(saved)
        if scheduler is not None and self._scheduler is not None:
            scheduler.load_state_dict(self._scheduler)

    @staticmethod
    def parameters_finite(optimizer: torch.optim.Optimizer) -> bool:
        params = [p.detach() for g in optimizer.param_groups for p in g["params"] if p.is_floating_point()]
        return not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
