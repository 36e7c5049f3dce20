"""Fed MobiLLM's shared side network: one model that devices with different backbones and keys train together.

``../shared/METHODS.md`` section 3 and issue 10 ("Label-free targets that a shared model can learn"). Every
upload is a per-sample stack of the federation's K aligned taps at the loss token (``[N, K, d_b]``, one vector
per aligned layer) and a device-defined target (``[N, out_dim]``). :class:`FedSideModule` maps them as

    acts [N, K, d_b] --WidthAlignment (one projection per backbone type)--> [N, K, d*]
        --shared trunk (ParallelAdapterTrunk over the K taps, one token per sample)--> [N, d*]
        --target head (per device, or one shared)--> [N, out_dim]

and fits the targets with MSE. The trunk is MobiLLM's own (:class:`~lightning_mobillm.side.parallel_adapters.
ParallelAdapterTrunk`: gated residual ladder of identity-start bottleneck adapters over RMS-normalised taps,
then a norm), applied to the K aligned taps with a sequence length of 1 -- exactly what PAE's additive
adapter runs on the shortcut. The heads are the package's :class:`~lightning_mobillm.side.heads.LastTokenHead`.

Target spaces (one per federation, :data:`TARGET_SPACES`):

* ``device`` (default): each device sends ``T_d(onehot(y) - softmax(z_b))`` under its own secret key, so
  forty devices make forty incompatible target spaces. Each device gets a small linear head of its own
  (created when it first appears); only its key makes sense of that head's outputs. The trunk and the
  projections are shared.
* ``federation``: every device uses one key the server never sees: one shared head.
* ``plain``: the paper's residual ``onehot(y) - softmax(z_b)``, no transform: one shared head.

Every component (trunk, each type's projection, each head) has its own optimizer parameter groups, created
when the component appears (:meth:`FedSideModule.add_type`, :meth:`FedSideModule.add_device` with an
``optimizer``), so a running federation admits new devices and backbone types without rebuilding its
optimizer. Initial weights are seeded per component (the trunk by ``seed``, a projection by its type key, a
head by ``seed`` and its key), so they do not depend on the order in which devices and types joined.

What a device downloads to evaluate (:meth:`FedSideModule.download`): the trunk, its type's projection and
its own head (never another device's head), as a :class:`FedDownload`; :class:`FedDeviceModel` runs them and
composes ``softmax(z_b) + T^{-1}(outputs)`` with :func:`~lightning_mobillm.privacy.compose_prediction`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mobillm.fed.alignment import (
    AlignmentError,
    BackboneType,
    WidthAlignment,
    aligned_layers,
    shared_width,
)
from lightning_mobillm.privacy import TargetTransform, compose_prediction
from lightning_mobillm.side.heads import LastTokenHead
from lightning_mobillm.side.parallel_adapters import ParallelAdapterTrunk

__all__ = [
    "DOWNLOAD_DTYPES",
    "SHARED_HEAD",
    "TARGET_SPACES",
    "FedBatch",
    "FedDeviceModel",
    "FedDownload",
    "FedPart",
    "FedSideModule",
    "check_device_id",
]

#: who can read the targets of a federation (see the module docstring)
TARGET_SPACES = ("device", "federation", "plain")
#: the dtypes a device may download its parts in (``FedTrainer(download_dtype=...)``, ``server.fed_download_dtype``)
DOWNLOAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the head's key in the ``federation`` and ``plain`` spaces
SHARED_HEAD = "shared"
#: the shared neck's width by default (``FedSideModule(head_rank=...)``): on the ``small`` benchmark a 16-wide neck
#: lifted the ``device`` target space from 0.692 to 0.772 (``benchmarks/results/federated_head_rank16.json``)
DEFAULT_HEAD_RANK = 16

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}")
_CONFIG_KEYS = ("k", "out_dim", "d_star", "target_space", "reduction", "normalize_taps", "activation",
                "final_norm", "dropout", "head_rank", "lr", "weight_decay", "betas", "seed")
_DOWNLOAD_KEYS = ("k", "d_star", "width", "out_dim", "reduction", "normalize_taps", "activation", "final_norm",
                  "head_rank", "backbone_type", "device", "target_space")


def check_device_id(device: object) -> str:
    """A device id as the server keys heads, statistics and quotas by (``[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}``)."""
    if not isinstance(device, str) or not _DEVICE_ID.fullmatch(device):
        raise ValueError(f"a device id must match {_DEVICE_ID.pattern!r}, got {device!r}")
    return device


def _module_name(key: str) -> str:
    """A key as an ``nn.ModuleDict`` name (no ``.``): ``%`` and ``.`` percent-escaped, distinct keys stay distinct."""
    return key.replace("%", "%25").replace(".", "%2E")


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _seeded(seed: int, build):
    """``build()`` under a fixed torch seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class FedPart:
    """The samples of one backbone type in a batch: ``acts`` ``[n, K, d_b]``, the device of each sample (which
    head reads it), and the targets ``[n, out_dim]`` (``None`` to only run the model)."""

    backbone_type: str
    acts: Tensor
    devices: tuple[str, ...]
    targets: Tensor | None = None

    def __len__(self) -> int:
        return len(self.devices)


@dataclass
class FedBatch:
    """A mini-batch that may mix backbone types (their widths differ, so they cannot share one tensor)."""

    parts: list[FedPart] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


# ---------------------------------------------------------------------------------------------- the server's model
class FedSideModule(lightning.LightningModule):
    """The shared side network of a federation (see the module docstring).

    Args:
        types: the backbone types known at the start (:attr:`~lightning_mobillm.fed.alignment.BackboneType.key`
            to width ``d_b``); more join with :meth:`add_type`.
        k: the federation's number of aligned taps (:func:`~lightning_mobillm.fed.alignment.federation_k`).
        out_dim: the targets' width (the devices' transform ``out_dim``; the class count for ``plain``).
        d_star: the shared width; by default the lower median of ``types``' widths.
        target_space: ``device`` (a head per device), ``federation`` or ``plain`` (one shared head).
        reduction, normalize_taps, activation, final_norm: the trunk's knobs
            (:class:`~lightning_mobillm.side.parallel_adapters.ParallelAdapterTrunk`).
        dropout: dropout before each head's linear map.
        head_rank: an integer ``r`` (default :data:`DEFAULT_HEAD_RANK`): a shared linear ``neck`` maps the
            trunk's ``d*`` states to ``r`` first and each head is ``r x out_dim``: a device's head becomes a small
            map a few dozen samples can fit, on a subspace every device trains. ``None``: no neck, each head maps
            the ``d*`` states to ``out_dim`` (``d* x out_dim`` weights per device).
        lr, weight_decay, betas: AdamW's (constant learning rate: an asynchronous federation has no planned
            number of steps to schedule over; weight decay on matrices only, as :mod:`lightning_mobillm.optim`).
        seed: seeds the trunk and the heads.
    """

    def __init__(
        self,
        types: Mapping[str, int],
        k: int,
        out_dim: int,
        *,
        d_star: int | None = None,
        target_space: str = "device",
        reduction: int = 8,
        normalize_taps: bool = True,
        activation: str = "gelu",
        final_norm: str = "layernorm",
        dropout: float = 0.0,
        head_rank: int | None = DEFAULT_HEAD_RANK,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: Sequence[float] = (0.9, 0.999),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if target_space not in TARGET_SPACES:
            raise ValueError(f"target_space must be one of {TARGET_SPACES}, got {target_space!r}")
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive integer, got {out_dim!r}")
        if head_rank is not None and (isinstance(head_rank, bool) or not isinstance(head_rank, int)
                                      or head_rank < 1):
            raise ValueError(f"head_rank must be None or a positive integer, got {head_rank!r}")
        types = dict(types)
        d_star = shared_width(list(types.values()), d_star)
        self.save_hyperparameters({"k": k, "out_dim": out_dim, "d_star": d_star, "target_space": target_space,
                                   "reduction": reduction, "normalize_taps": bool(normalize_taps),
                                   "activation": activation, "final_norm": final_norm, "dropout": float(dropout),
                                   "head_rank": head_rank, "lr": float(lr), "weight_decay": float(weight_decay),
                                   "betas": [float(b) for b in betas], "seed": int(seed)})
        self.target_space = target_space
        self.out_dim = out_dim
        #: component names in the order they joined: ``trunk``, ``type:<key>``, ``head:<key>``; the order of
        #: the optimizer's parameter groups, kept to rebuild the module before loading a state
        self.components: list[str] = []
        self.alignment = WidthAlignment({}, k, d_star)
        self.trunk = _seeded(int(seed), lambda: ParallelAdapterTrunk(
            k, d_star, reduction=reduction, normalize_taps=normalize_taps, activation=activation,
            final_norm=final_norm))
        self.components.append("trunk")
        self.neck: nn.Linear | None = None
        if head_rank is not None:
            self.neck = _seeded(_seed("lightning_mobillm.fed.neck", seed), lambda: nn.Linear(d_star, head_rank))
            self.components.append("neck")
        self.heads = nn.ModuleDict()
        if target_space != "device":
            self._add_head(SHARED_HEAD)
        for key, width in types.items():
            self.add_type(key, width)

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.alignment.k

    @property
    def shared_width(self) -> int:
        return self.alignment.shared_width

    @property
    def head_width(self) -> int:
        """The width the heads read: ``head_rank`` with a neck, else ``d*``."""
        return self.hparams["head_rank"] or self.shared_width

    @property
    def types(self) -> dict[str, int]:
        """Known backbone types and their widths, in the order they joined."""
        return self.alignment.types

    @property
    def head_keys(self) -> list[str]:
        """The heads' keys (device ids, or :data:`SHARED_HEAD`), in the order they were made."""
        return [c.removeprefix("head:") for c in self.components if c.startswith("head:")]

    def head_key(self, device: str) -> str:
        """Which head reads a device's outputs: its own in the ``device`` space, else the shared one."""
        return device if self.target_space == "device" else SHARED_HEAD

    def has_head(self, device: str) -> bool:
        return _module_name(self.head_key(device)) in self.heads

    def head(self, device: str) -> nn.Module:
        """The head that reads ``device``'s outputs (ValueError for a device that has none yet)."""
        name = _module_name(self.head_key(device))
        if name not in self.heads:
            raise ValueError(f"device {device!r} has no head (add_device first)")
        return self.heads[name]

    def add_type(self, key: str, width: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Admit backbone type ``key`` of width ``width``; with ``optimizer``, its projection joins it as new
        parameter groups. Returns whether the type is new. A key that parses as a
        :class:`~lightning_mobillm.fed.alignment.BackboneType` must name this width and at least K layers."""
        if key in self.alignment:
            self.alignment.add_type(key, width)  # refuses another width
            return False
        try:
            parsed = BackboneType.from_key(key)
        except AlignmentError:
            parsed = None
        if parsed is not None:
            aligned_layers(parsed.num_layers, self.k, name=key)  # a backbone shallower than K is refused
        self.alignment.add_type(key, width)
        self.components.append(f"type:{key}")
        if optimizer is not None:
            self.extend_optimizer(optimizer, f"type:{key}")
        return True

    def add_device(self, device: str, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Make ``device``'s head if it has none (the ``device`` space; a shared head exists from the start);
        with ``optimizer`` the head joins it as new parameter groups. Returns whether a head was made."""
        check_device_id(device)
        if self.has_head(device):
            return False
        self._add_head(device)
        if optimizer is not None:
            self.extend_optimizer(optimizer, f"head:{device}")
        return True

    def _add_head(self, key: str) -> None:
        """A new head starts at zero: until a device's samples train it, its outputs are the constant 0, never
        random directions that would move the device's prediction away from its backbone's on classes its data
        never shows (what a device with a few classes evaluates on the pooled set)."""
        ref = self.trunk.gate_alpha
        head = LastTokenHead(self.head_width, self.out_dim, dropout=self.hparams["dropout"])
        nn.init.zeros_(head.proj.weight)
        nn.init.zeros_(head.proj.bias)
        self.heads[_module_name(key)] = head.to(device=ref.device, dtype=ref.dtype)
        self.components.append(f"head:{key}")

    def component(self, name: str) -> nn.Module:
        """The module of a component name (``trunk``, ``type:<key>``, ``head:<key>``)."""
        if name == "trunk":
            return self.trunk
        if name == "neck" and self.neck is not None:
            return self.neck
        if name.startswith("type:"):
            return self.alignment.projection(name.removeprefix("type:"))
        if name.startswith("head:") and _module_name(name.removeprefix("head:")) in self.heads:
            return self.heads[_module_name(name.removeprefix("head:"))]
        raise ValueError(f"no component {name!r}")

    def structure(self) -> dict[str, Any]:
        """What :meth:`rebuild` needs beyond :meth:`config` (plain data): the components in joining order
        and the types' widths."""
        return {"components": list(self.components), "widths": self.types}

    def config(self) -> dict[str, Any]:
        """The constructor's settings (``d_star`` resolved), plain data, without the types."""
        return {key: self.hparams[key] for key in _CONFIG_KEYS}

    @classmethod
    def rebuild(cls, config: Mapping[str, Any], structure: Mapping[str, Any]) -> FedSideModule:
        """A module with ``structure``'s components made in the same order (so that an optimizer state of
        the original fits the new module's :meth:`configure_optimizers`). Checked: unknown keys, components
        and widths are refused with ValueError."""
        if not isinstance(config, Mapping) or set(config) != set(_CONFIG_KEYS):
            raise ValueError(f"a module config holds exactly {sorted(_CONFIG_KEYS)}")
        if not isinstance(structure, Mapping) or set(structure) != {"components", "widths"}:
            raise ValueError("a module structure holds exactly components and widths")
        components, widths = structure["components"], structure["widths"]
        if not isinstance(components, list) or not isinstance(widths, Mapping):
            raise ValueError("structure components must be a list and widths a map")
        settings = {k: v for k, v in config.items() if k != "k" and k != "out_dim"}
        module = cls({}, config["k"], config["out_dim"], **settings)
        made = len(module.components)
        if components[:made] != module.components:
            raise ValueError(f"structure components must start with {module.components}")
        for name in components[made:]:
            if not isinstance(name, str):
                raise ValueError(f"a component name is a string, got {name!r}")
            if name.startswith("type:") and name.removeprefix("type:") in widths:
                if not module.add_type(name.removeprefix("type:"), widths[name.removeprefix("type:")]):
                    raise ValueError(f"component {name!r} appears twice")
            elif name.startswith("head:") and module.target_space == "device":
                if not module.add_device(name.removeprefix("head:")):
                    raise ValueError(f"component {name!r} appears twice")
            else:
                raise ValueError(f"unknown component {name!r} (or a type without a width)")
        if module.types != dict(widths):
            raise ValueError("structure widths name types that are not among its components")
        return module

    # ---- the optimizer -----------------------------------------------------------------------------
    def param_groups(self, name: str) -> list[dict[str, Any]]:
        """AdamW parameter groups of one component: matrices with weight decay, the rest (biases, norms,
        gates) without; each group named ``<component>`` or ``<component>/no_decay``."""
        decay, no_decay = [], []
        for p in self.component(name).parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = []
        if decay:
            groups.append({"params": decay, "weight_decay": self.hparams["weight_decay"], "name": name})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "name": f"{name}/no_decay"})
        return groups

    def configure_optimizers(self) -> torch.optim.AdamW:
        """AdamW over every component's groups, in :attr:`components` order (constant learning rate)."""
        hp = self.hparams
        groups = [g for name in self.components for g in self.param_groups(name)]
        return torch.optim.AdamW(groups, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"])

    def extend_optimizer(self, optimizer: torch.optim.Optimizer, name: str) -> None:
        """Add component ``name``'s parameter groups to a running ``optimizer`` (a torch optimizer, or one that
        wraps it as ``.optimizer``, like Fabric's and Lightning's): how a new head or projection starts
        training without a new optimizer. Groups get the optimizer's defaults (lr, betas)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        for group in self.param_groups(name):
            inner.add_param_group(group)

    # ---- forward and loss --------------------------------------------------------------------------
    def features(self, acts: Tensor, backbone_type: str) -> Tensor:
        """One type's taps ``[N, K, d_b]`` -> the per-sample states the heads read (``[N, d*]``, or
        ``[N, head_rank]`` after the neck)."""
        states = self.trunk(self.alignment(acts, backbone_type))
        return states if self.neck is None else self.neck(states)

    def forward(self, acts: Tensor, backbone_type: str, devices: str | Sequence[str]) -> Tensor:
        """One type's taps ``[N, K, d_b]`` -> ``[N, out_dim]``, each sample read by its device's head
        (``devices``: one id per sample, or one for all)."""
        states = self.features(acts, backbone_type)
        if isinstance(devices, str):
            return self.head(devices)(states)
        if len(devices) != states.shape[0]:
            raise ValueError(f"{len(devices)} device ids for {states.shape[0]} samples")
        rows: dict[str, list[int]] = {}
        for i, device in enumerate(devices):
            rows.setdefault(self.head_key(device), []).append(i)
        if len(rows) == 1:
            return self.head(devices[0])(states)
        index = [torch.tensor(r, device=states.device) for r in rows.values()]
        outputs = torch.cat([self.head(devices[r[0]])(states[i]) for r, i in zip(rows.values(), index)])
        return outputs[torch.argsort(torch.cat(index))]  # back to the samples' order (differentiable)

    def compute_loss(self, batch: FedBatch) -> tuple[Tensor, Tensor]:
        """MSE between each sample's output (its device's head) and its target, averaged over every sample and
        output of the batch; returns ``(loss, outputs)``, outputs in the parts' order."""
        if not batch.parts:
            raise ValueError("an empty batch")
        outputs, targets = [], []
        for part in batch.parts:
            if part.targets is None:
                raise ValueError("training needs targets")
            out = self(part.acts, part.backbone_type, part.devices)
            if part.targets.shape != out.shape:
                raise ValueError(f"targets must have shape {list(out.shape)}, got {list(part.targets.shape)}")
            outputs.append(out)
            targets.append(part.targets.to(device=out.device, dtype=out.dtype))
        out, target = torch.cat(outputs), torch.cat(targets)
        return F.mse_loss(out.float(), target.float()), out

    def training_step(self, batch: FedBatch, batch_idx: int) -> Tensor:
        loss, _ = self.compute_loss(batch)
        self.log("train_loss", loss, batch_size=batch.size)
        return loss

    # ---- what a device downloads -------------------------------------------------------------------
    def download(self, device: str, backbone_type: str, dtype: torch.dtype | None = None) -> FedDownload:
        """The parts ``device`` needs to evaluate: the trunk, ``backbone_type``'s projection and the head that
        reads its outputs (its own in the ``device`` space), copied to the CPU in ``dtype`` (``None``: the
        model's own). Never another device's head. The device's model computes in fp32 whatever the download's
        dtype (:meth:`FedDownload.build`), so a half-precision download halves the downlink for a rounding of
        the weights only."""
        if dtype is not None and dtype not in DOWNLOAD_DTYPES.values():
            raise ValueError(f"a download's dtype is one of {sorted(DOWNLOAD_DTYPES)}, got {dtype}")
        head = self.head(device)
        projection = self.alignment.projection(backbone_type)
        state: dict[str, Tensor] = {}
        parts = [("projection.", projection), ("trunk.", self.trunk), ("head.", head)]
        if self.neck is not None:
            parts.insert(2, ("neck.", self.neck))
        for prefix, part in parts:
            state.update({prefix + k: v.detach().to("cpu", dtype=dtype, copy=True)
                          for k, v in part.state_dict().items()})
        hp = self.hparams
        config = {"k": self.k, "d_star": self.shared_width, "width": self.types[backbone_type],
                  "out_dim": self.out_dim, "reduction": hp["reduction"], "normalize_taps": hp["normalize_taps"],
                  "activation": hp["activation"], "final_norm": hp["final_norm"], "head_rank": hp["head_rank"],
                  "backbone_type": backbone_type,
                  "device": device, "target_space": self.target_space}
        return FedDownload(config, state)


# ---------------------------------------------------------------------------------------------- the device's side
@dataclass
class FedDownload:
    """What one device downloads to evaluate: plain-data ``config`` (shapes and knobs, its type and id) and
    ``state`` (``projection.*``, ``trunk.*``, ``head.*`` tensors)."""

    config: dict[str, Any]
    state: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors: what the downlink is charged for."""
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def build(self) -> FedDeviceModel:
        """The device-side model with these weights."""
        model = FedDeviceModel(self.config)
        model.load_state_dict(self.state, strict=True)
        return model.eval()


class FedDeviceModel(nn.Module):
    """The shared model as one device runs it: its type's projection, the trunk and its head.

    ``forward(acts)``: decoded taps ``[N, K, d_b]`` of the device's backbone type -> ``[N, out_dim]`` (what the
    server's model gives for this device). :meth:`scores`: the device's final class scores
    ``softmax(z_b) + T^{-1}(outputs)`` (:func:`~lightning_mobillm.privacy.compose_prediction`; ``T`` is the
    device's transform, ``None`` for the ``plain`` space).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        if set(config) != set(_DOWNLOAD_KEYS):
            raise ValueError(f"a download config holds exactly {sorted(_DOWNLOAD_KEYS)}")
        self.config = dict(config)
        self.projection = nn.Linear(config["width"], config["d_star"])
        self.trunk = ParallelAdapterTrunk(config["k"], config["d_star"], reduction=config["reduction"],
                                          normalize_taps=config["normalize_taps"], activation=config["activation"],
                                          final_norm=config["final_norm"])
        rank = config["head_rank"]
        self.neck = nn.Linear(config["d_star"], rank) if rank else None
        self.head = LastTokenHead(rank or config["d_star"], config["out_dim"], dropout=0.0)

    def forward(self, acts: Tensor) -> Tensor:
        k, width = self.config["k"], self.config["width"]
        if not isinstance(acts, Tensor) or acts.ndim != 3 or tuple(acts.shape[1:]) != (k, width):
            got = list(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"acts must be [N, {k}, {width}] for {self.config['backbone_type']!r}, got {got}")
        states = self.trunk(self.projection(acts.to(self.projection.weight.dtype)))
        return self.head(states if self.neck is None else self.neck(states))

    @torch.no_grad()
    def scores(self, acts: Tensor, backbone_logits: Tensor, transform: TargetTransform | None = None) -> Tensor:
        """Class scores ``softmax(z_b) + T^{-1}(f(acts))`` (argmax = the prediction); ``transform=None`` is the
        identity (the ``plain`` space)."""
        out = self(acts)
        return compose_prediction(backbone_logits, out if transform is None else transform.inverse(out))
