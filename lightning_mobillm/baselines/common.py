"""What every on-device baseline shares: the backbone config, the loss token, metrics, optimiser, logging.

A baseline is an ordinary ``LightningModule`` trained by an ordinary strategy in the device process (the
``Trainer`` of the recipe sets ``strategy: auto``), so its memory, compute and accuracy are measured by
the same :class:`~lightning_mobillm.callbacks.DeviceMonitor` and logged under the same names
(``train/loss``, ``val/acc``, ``val/f1``, ``test/acc``, ``test/f1``) as the MobiLLM runs.

Subclasses implement :meth:`OnDeviceClassifier.build` (create the networks once the Trainer asks for
them) and :meth:`OnDeviceClassifier.forward` (``input_ids, attention_mask -> logits [B, C]``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mobillm.modules.side_tuning import classification_metrics, to_backbone_config
from lightning_mobillm.optim import adamw_warmup_cosine
from lightning_mobillm.specs import BackboneConfig

__all__ = ["OnDeviceClassifier"]


class OnDeviceClassifier(lightning.LightningModule):
    """Base class of the baselines that train in the device process.

    Args:
        backbone: the pretrained model (same :class:`~lightning_mobillm.specs.BackboneConfig` as MobiLLM's;
            ``layers`` is ignored except by LST).
        num_classes: number of classes (linked from the data module by the CLI).
        lr, weight_decay, betas: AdamW settings (no weight decay on biases and norm weights).
        warmup_ratio: share of the steps spent in linear warmup, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: see ``warmup_ratio``.
        label_smoothing: cross-entropy label smoothing.
        dropout: dropout before the classification head.
        seed: seed of the newly created weights (head, adapters, side network).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.06,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self._backbone = to_backbone_config(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams["backbone"] = self._backbone.to_dict()
        self.val_metrics = None
        self.test_metrics = None
        self._built = False

    # ------------------------------------------------------------------------------ configuration
    @property
    def backbone_config(self) -> BackboneConfig:
        """The backbone; the data module loads its tokenizer from here."""
        return self._backbone

    @property
    def num_classes(self) -> int:
        n = self.hparams.get("num_classes")
        if n is None:
            raise ValueError("num_classes is unknown: set model.init_args.num_classes or use the data module's")
        return int(n)

    def build(self) -> None:
        """Create the networks (called once, from :meth:`configure_model`)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        if self._built:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.hparams["seed"]))
            self.build()
        self.val_metrics = classification_metrics(self.num_classes, "val/")
        self.test_metrics = classification_metrics(self.num_classes, "test/")
        self._built = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- steps
    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels.long(), label_smoothing=float(self.hparams["label_smoothing"]))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = self._loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"].long()
        loss = self._loss(logits, labels)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits.detach().float(), labels)
        size = len(labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step("test", batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return {"logits": logits.float(), "preds": logits.argmax(dim=-1)}

    # --------------------------------------------------------------------------------- optimizers
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        if total is None or not math.isfinite(float(total)) or total < 1:
            raise ValueError("cannot size the lr schedule: set trainer.max_steps or trainer.max_epochs")
        optimizer, scheduler = adamw_warmup_cosine(
            (p for _, p in self.trainable_parameters()), lr=hp["lr"], weight_decay=hp["weight_decay"],
            betas=hp["betas"], total_steps=int(total), warmup_ratio=hp["warmup_ratio"],
            min_lr_ratio=hp["min_lr_ratio"],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        n_train = sum(p.numel() for _, p in self.trainable_parameters())
        n_all = sum(p.numel() for p in self.parameters())
        self.print(f"{type(self).__name__}: {n_train:,} trainable of {n_all:,} parameters on the device")
