"""The MobiLLM side-tuning LightningModule: the parallel-adapter side network, its loss and optimiser.

The network's shape depends on the backbone's taps, which are only known once the device has loaded
the backbone, so the module is created empty and :meth:`SideTuningModule.build` is called with the
backbone's :class:`~lightning_mobillm.specs.TapSpec`. Building is seeded, so the device and the server
construct identical initial weights independently.

The module works both inside a Lightning ``Trainer`` and in a plain loop (the server)::

    module = SideTuningModule.from_hparams_dict(d)
    module.build(spec)
    module.total_steps = n
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    loss, _ = module.compute_loss(batch); loss.backward(); opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_mobillm import protocol as P
from lightning_mobillm.optim import adamw_warmup_cosine
from lightning_mobillm.side.config import KNOBS as SIDE_KNOBS
from lightning_mobillm.side.config import SideConfig
from lightning_mobillm.side.network import SideNetwork
from lightning_mobillm.specs import BackboneConfig, TapSpec

if TYPE_CHECKING:  # the server builds these modules without loading any backbone code
    from lightning_mobillm.backbone import BackboneOutput, FrozenBackbone

__all__ = ["SideTuningModule", "classification_metrics"]

_STAGES = ("val", "test")
_STAGE_ALIASES = {"val": "val", "validate": "val", "validation": "val", "test": "test"}


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy (micro) and macro-F1, logged as ``{prefix}acc`` and ``{prefix}f1`` by every method."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
        },
        prefix=prefix,
    )


def to_backbone_config(backbone: BackboneConfig | dict | None) -> BackboneConfig:
    if backbone is None:
        return BackboneConfig()
    if isinstance(backbone, BackboneConfig):
        return backbone
    if isinstance(backbone, dict):
        return BackboneConfig(**backbone)
    raise TypeError(f"backbone must be a BackboneConfig, a dict or None, got {type(backbone).__name__}")


class SideTuningModule(lightning.LightningModule):
    """MobiLLM parallel-adapter side network. Its training step runs wherever the strategy puts it (the server).

    Args:
        backbone: which frozen backbone the device runs (kept in the hyperparameters as a plain dict).
        num_classes: number of classes; may instead be given to :meth:`build`.
        reduction, normalize_taps, pool, activation, dropout, final_norm: side-network knobs, see
            :class:`~lightning_mobillm.side.config.SideConfig` (the side network is built from it).
        lr, weight_decay, betas: AdamW settings (no weight decay on biases, norm weights and gates).
        warmup_ratio: fraction of the total steps spent in linear warmup.
        min_lr_ratio: the cosine schedule ends at ``min_lr_ratio * lr``.
        label_smoothing: cross-entropy label smoothing.
        total_steps: optimizer steps of the whole run; if ``None`` it is taken from the attached
            Trainer's ``estimated_stepping_batches``. A plain attribute, settable before
            :meth:`configure_optimizers`.
        seed: seed of the side network's initial weights (device and server build the same network).
    """

    #: the name a server knows this module by (see ``lightning_mobillm.server.runtime.MODULE_REGISTRY``)
    server_module_name = "side_tuning"

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        reduction: int = 8,
        normalize_taps: bool = True,
        pool: Literal["last", "mean"] = "last",
        activation: str = "gelu",
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.06,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        total_steps: int | None = None,
        seed: int = 0,
        final_norm: Literal["layernorm", "rmsnorm"] = "layernorm",
    ) -> None:
        super().__init__()
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        self._backbone = to_backbone_config(backbone)
        # Hyperparameters are plain data: JSON-able, and loadable with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "backbone": self._backbone.to_dict(),
                "num_classes": None if num_classes is None else int(num_classes),
                "reduction": int(reduction),
                "normalize_taps": bool(normalize_taps),
                "pool": pool,
                "activation": activation,
                "dropout": float(dropout),
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "betas": tuple(float(b) for b in betas),
                "warmup_ratio": float(warmup_ratio),
                "min_lr_ratio": float(min_lr_ratio),
                "label_smoothing": float(label_smoothing),
                "total_steps": None if total_steps is None else int(total_steps),
                "seed": int(seed),
                "final_norm": final_norm,
            }
        )
        self.total_steps = total_steps
        self.tap_spec: TapSpec | None = None
        self.side: SideNetwork | None = None
        self.val_metrics: MetricCollection | None = None
        self.test_metrics: MetricCollection | None = None

    # ------------------------------------------------------------------------------ configuration
    @property
    def backbone_config(self) -> BackboneConfig:
        return self._backbone

    @property
    def num_classes(self) -> int | None:
        return self.hparams.get("num_classes")

    @property
    def num_outputs(self) -> int | None:
        """Width of the side network's output (the number of classes for a classifier)."""
        return self.side.num_outputs if self.side is not None else None

    def default_num_outputs(self, num_classes: int) -> int:
        """Output width when :meth:`build` is not told one: a classifier head."""
        return num_classes

    @property
    def is_built(self) -> bool:
        return self.side is not None

    def hparams_dict(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-able dict (``num_classes`` and ``total_steps`` as they are now)."""
        d: dict[str, Any] = {}
        for key, value in self.hparams.items():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            d[key] = value
        d["backbone"] = self._backbone.to_dict()
        d["total_steps"] = self.total_steps
        return d

    #: hyperparameters that stay on the device (its backbone's location, seeds, secrets): never in a hello
    device_only_hparams: tuple[str, ...] = ("backbone", "seed", "num_classes", "total_steps")

    @property
    def side_config(self) -> SideConfig:
        """The side network's type and shape, from this module's hyperparameters."""
        return SideConfig(**{k: self.hparams[k] for k in SIDE_KNOBS if k in self.hparams})

    def token_selection(self, is_decoder: bool) -> Literal["all", "loss"]:
        """The tokens whose activations can reach the loss, which a strategy's ``select: auto`` sends. The side
        network is token-wise (nothing mixes tokens before the head pools them), so a head that pools the loss
        token (a decoder's last, an encoder's first) needs only that token (``loss``, the same loss at a
        fraction of the bytes); any other pooling needs them ``all``."""
        loss_pool = "last" if is_decoder else "first"
        return "loss" if self.side_config.pool == loss_pool else "all"

    def server_hparams(self) -> dict[str, Any]:
        """What the server needs to train this module besides the side config (the optimiser, the loss);
        the hello carries the side config, tap spec, class count and planned steps separately."""
        return {k: v for k, v in self.hparams_dict().items()
                if k not in self.device_only_hparams and k not in SIDE_KNOBS}

    @classmethod
    def from_hparams_dict(cls, d: dict[str, Any]) -> SideTuningModule:
        """Rebuild an (unbuilt) module from :meth:`hparams_dict` output, e.g. after a JSON round trip."""
        kwargs = dict(d)
        if isinstance(kwargs.get("backbone"), dict):
            kwargs["backbone"] = BackboneConfig(**kwargs["backbone"])
        if kwargs.get("betas") is not None:
            kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
        return cls(**kwargs)

    # ------------------------------------------------------------------------------------- build
    def build(self, tap_spec: TapSpec, num_classes: int | None = None, num_outputs: int | None = None) -> None:
        """Create the side network for the backbone's taps (seeded; idempotent for the same spec).

        ``num_outputs`` is the width of the side network's output; it defaults to ``num_classes`` (a
        classifier head). Subclasses that fit other targets (PAE) give it explicitly.
        """
        if isinstance(tap_spec, dict):
            tap_spec = TapSpec.from_dict(tap_spec)
        if not isinstance(tap_spec, TapSpec):
            raise TypeError(f"tap_spec must be a TapSpec, got {type(tap_spec).__name__}")
        if tap_spec.num_taps < 1 or tap_spec.hidden_size < 1:
            raise ValueError(f"tap_spec needs at least one tapped layer and a positive width, got {tap_spec}")
        known = self.num_classes
        if num_classes is not None and known is not None and int(num_classes) != int(known):
            raise ValueError(f"num_classes={num_classes} conflicts with the module's num_classes={known}")
        n_classes = int(num_classes) if num_classes is not None else known
        if n_classes is None:
            raise ValueError("num_classes is unknown: pass it to SideTuningModule(...) or to build()")
        if n_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {n_classes}")

        n_outputs = int(num_outputs) if num_outputs is not None else self.default_num_outputs(n_classes)
        if self.is_built:
            assert self.tap_spec is not None
            if self.tap_spec.to_dict() != tap_spec.to_dict() or n_outputs != self.num_outputs:
                raise ValueError(
                    f"side network already built for {self.tap_spec}; cannot rebuild it for {tap_spec}"
                )
            return

        side = self.side_config.build(tap_spec, n_outputs, seed=int(self.hparams["seed"]))
        self.hparams["num_classes"] = n_classes
        self.tap_spec = TapSpec.from_dict(tap_spec.to_dict())
        self.side = side.to(self.device)
        self.val_metrics = classification_metrics(n_classes, "val/").to(self.device)
        self.test_metrics = classification_metrics(n_classes, "test/").to(self.device)

    def _require_built(self) -> SideNetwork:
        if self.side is None:
            raise RuntimeError(
                "the side network is not built yet: call module.build(tap_spec) once the backbone's TapSpec is known"
            )
        return self.side

    def configure_model(self) -> None:
        """No-op when built (the strategy builds the network once the backbone's taps are known)."""
        if not self.is_built and self.tap_spec is not None:
            self.build(self.tap_spec)

    # ---------------------------------------------------- what the device does for this module
    # The strategy runs the backbone and talks to the server; these say what this method sends for a
    # batch, and how the device turns the side network's outputs into predictions.
    #: token ids whose frozen LM-head logits at the loss token the device computes (None: not needed)
    backbone_label_token_ids: list[int] | None = None

    def device_setup(self, backbone: FrozenBackbone, datamodule: Any) -> None:
        """Called on the device once the backbone is loaded, before the server is greeted."""

    def token_positions(self, batch: dict[str, Tensor]) -> Tensor | None:
        """``[B, T]`` the tokens to send when :meth:`token_selection` says ``answer`` (None: not such a module)."""
        return None

    def device_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """The labels of a batch as the loss and the metrics see them: one class per sample."""
        return batch["labels"]

    def batch_size(self, batch: dict[str, Tensor]) -> int:
        """Samples in a batch."""
        return int(batch["labels"].shape[0])

    def training_payload(self, batch: dict[str, Tensor], out: BackboneOutput) -> tuple[str, dict[str, Tensor]]:
        """The frame kind and the tensors a training frame carries besides the activations: the labels."""
        return P.TRAIN, {"labels": self.device_labels(batch).to(torch.int64).cpu()}

    def device_scores(self, out: BackboneOutput, side_outputs: Tensor) -> Tensor:
        """Class scores on the device from the side network's outputs: its logits."""
        return side_outputs

    def device_eval_loss(self, scores: Tensor, labels: Tensor) -> Tensor | None:
        """The evaluation loss the device logs (cross-entropy of the logits)."""
        return F.cross_entropy(scores, labels)

    # ------------------------------------------------------------------------------ checkpointing
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tap_spec is not None:
            checkpoint["tap_spec"] = self.tap_spec.to_dict()
            checkpoint["side_num_classes"] = self.num_classes
            checkpoint["side_num_outputs"] = self.num_outputs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = checkpoint.get("tap_spec")
        if spec is not None:
            self.build(TapSpec.from_dict(spec), num_classes=checkpoint.get("side_num_classes"),
                       num_outputs=checkpoint.get("side_num_outputs"))

    # ------------------------------------------------------------------------------------ compute
    def forward(self, acts: Tensor, lengths: Tensor) -> Tensor:
        return self._require_built()(acts, lengths)

    @property
    def side_dtype(self) -> torch.dtype:
        return self._require_built().dtype

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-entropy (with label smoothing) of a batch ``{"acts", "lengths", "labels"}``; returns (loss, logits)."""
        side = self._require_built()
        acts = batch["acts"].to(device=side.device, dtype=self.side_dtype)
        lengths = batch["lengths"].to(device=acts.device)
        labels = batch["labels"].to(device=acts.device, dtype=torch.long)
        logits = side(acts, lengths)
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"labels must have shape [B]=[{logits.shape[0]}], got {tuple(labels.shape)}")
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=float(self.hparams["label_smoothing"]))
        return loss, logits

    def _can_log(self) -> bool:
        return self._trainer is not None and self._current_fx_name is not None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> Tensor:
        loss, _ = self.compute_loss(batch)
        if self._can_log():
            self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["lengths"].numel()))
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> Tensor:
        loss, logits = self.compute_loss(batch)
        self.update_eval_metrics(stage, logits, batch["labels"], loss=loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> Tensor:
        return self._eval_step("test", batch)

    def predict_step(
        self, batch: dict[str, Tensor], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        side = self._require_built()
        acts = batch["acts"].to(device=side.device, dtype=self.side_dtype)
        logits = side(acts, batch["lengths"].to(acts.device))
        return {"logits": logits, "preds": logits.argmax(dim=-1)}

    # ------------------------------------------------------------------------------------ metrics
    def eval_metrics(self, stage: str) -> MetricCollection:
        """The metric collection of a stage (``"val"``/``"validate"`` or ``"test"``)."""
        self._require_built()
        key = _STAGE_ALIASES.get(stage)
        if key is None:
            raise ValueError(f"stage must be one of {sorted(_STAGE_ALIASES)}, got {stage!r}")
        metrics = self.val_metrics if key == "val" else self.test_metrics
        assert metrics is not None
        return metrics

    def update_eval_metrics(
        self, stage: str, logits: Tensor, labels: Tensor, loss: Tensor | float | None = None
    ) -> None:
        """Accumulate accuracy/macro-F1 for ``stage`` from logits computed anywhere (e.g. on the server).

        When called inside a Trainer hook (``validation_step``/``test_step``, including the strategy's),
        it also logs ``{stage}/loss`` (if given), ``{stage}/acc`` and ``{stage}/f1`` on epoch.
        """
        metrics = self.eval_metrics(stage)
        key = _STAGE_ALIASES[stage]
        device = next(iter(metrics.values())).device if len(metrics) else logits.device
        logits = logits.detach().to(device)
        labels = labels.detach().to(device=device, dtype=torch.long)
        metrics.update(logits, labels)
        if self._can_log():
            batch_size = int(labels.shape[0])
            if loss is not None:
                self.log(
                    f"{key}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size
                )
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)

    def compute_eval_metrics(self, stage: str) -> dict[str, float]:
        """Current values of ``{stage}/acc`` and ``{stage}/f1`` as floats (outside a Trainer)."""
        return {k: float(v) for k, v in self.eval_metrics(stage).compute().items()}

    def reset_eval_metrics(self, stage: str) -> None:
        self.eval_metrics(stage).reset()

    # --------------------------------------------------------------------------------- optimizers
    def resolve_total_steps(self) -> int:
        if self.total_steps is not None:
            total = int(self.total_steps)
        elif self._trainer is not None:
            est = self.trainer.estimated_stepping_batches
            if est is None or not math.isfinite(float(est)):
                raise ValueError(
                    "cannot size the lr schedule: the Trainer's estimated_stepping_batches is infinite; "
                    "set max_steps/max_epochs or SideTuningModule(total_steps=...)"
                )
            total = int(est)
        else:
            raise ValueError(
                "cannot size the lr schedule: set module.total_steps (or total_steps=...) "
                "when configure_optimizers() is called outside a Trainer"
            )
        if total < 1:
            raise ValueError(f"total_steps must be >= 1, got {total}")
        return total

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer, scheduler = adamw_warmup_cosine(
            self._require_built().parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=hp["betas"],
            total_steps=self.resolve_total_steps(), warmup_ratio=hp["warmup_ratio"], min_lr_ratio=hp["min_lr_ratio"],
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
