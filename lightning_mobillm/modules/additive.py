"""PAE MobiLLM's additive adapter: a side network trained on device-defined prediction differences.

The device computes the frozen backbone's own prediction ``p_b = softmax(z_b)`` over the class names'
verbalizer tokens, the difference ``delta = onehot(y) - p_b``, and sends ``T(delta)`` where ``T`` is a
transform whose key never leaves the device (:mod:`lightning_mobillm.privacy`). The server fits the side
network's output to what it received (MSE) and never sees a label. The device composes the final
prediction ``p_b + T^{-1}(f(acts))`` in the space the target was defined in (probabilities).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mobillm import protocol as P
from lightning_mobillm.data.text_classification import verbalizer_words
from lightning_mobillm.modules.side_tuning import SideTuningModule
from lightning_mobillm.privacy import TargetTransform, keyed_sample_hashes, make_transform, new_key

if TYPE_CHECKING:  # the server builds these modules without loading any backbone code
    from lightning_mobillm.backbone import BackboneOutput, FrozenBackbone


class AdditiveAdapterModule(SideTuningModule):
    """The PAE additive adapter (a LightningModule whose training step runs on the server).

    Args:
        transform: device-secret target transform: ``embed`` (default: a secret affine embedding into
            ``transform_dim`` dimensions), ``rotation`` or ``identity`` (no protection; for measurements).
            See ``docs/threat-model.md``.
        transform_dim: width of the transformed target (``embed`` only; the side network's output).
        transform_sigma: std of keyed per-sample noise added to the targets (``embed`` only; 0 = off).
        transform_rr_epsilon: randomized response on the label inside the transform (``embed`` only):
            epsilon-label-DP per sample, the part of the defence that actually protects. The default 4.0
            is the project's defence;
            ``null`` turns it off.
        secret_env: environment variable holding the device's transform key (hex). If unset, a fresh key
            is drawn on the device and kept in the device's checkpoints (never in hparams or frames).
        loss: ``mse`` or ``smooth_l1`` between the side network's output and the received target.
        **kwargs: the side network and optimiser settings of :class:`SideTuningModule`.
    """

    server_module_name = "additive_adapter"
    #: the transform and its key stay on the device: the server fits whatever targets it receives
    device_only_hparams = (*SideTuningModule.device_only_hparams, "transform", "transform_dim", "transform_sigma",
                           "transform_rr_epsilon", "secret_env")
    #: frames of this module carry device-defined targets, never labels
    label_free = True

    def __init__(
        self,
        transform: Literal["embed", "rotation", "identity"] = "embed",
        transform_dim: int = 16,
        transform_sigma: float = 0.0,
        transform_rr_epsilon: float | None = 4.0,
        secret_env: str = "MOBILLM_LABEL_SECRET",
        loss: Literal["mse", "smooth_l1"] = "mse",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loss not in ("mse", "smooth_l1"):
            raise ValueError(f"loss must be 'mse' or 'smooth_l1', got {loss!r}")
        self.hparams.update(
            transform=transform,
            transform_dim=int(transform_dim),
            transform_sigma=float(transform_sigma),
            transform_rr_epsilon=None if transform_rr_epsilon is None else float(transform_rr_epsilon),
            secret_env=secret_env,
            loss=loss,
        )
        # The key lives only in this attribute (not a parameter or buffer: state_dict goes to the server).
        self._key: bytes | None = None
        self._transform: TargetTransform | None = None

    # ---- the transform (device side) -------------------------------------------------------------
    def _knobs(self) -> dict[str, Any]:
        hp = self.hparams
        if hp["transform"] == "embed":
            return {"out_dim": hp["transform_dim"], "sigma": hp["transform_sigma"],
                    "rr_epsilon": hp.get("transform_rr_epsilon")}
        return {}

    def default_num_outputs(self, num_classes: int) -> int:
        return make_transform(self.hparams["transform"], num_classes, key=b"\0" * 32, **self._knobs()).out_dim

    @property
    def transform(self) -> TargetTransform:
        """The device-secret transform (built on first use on the device; the server never needs it)."""
        if self._transform is None:
            if self.num_classes is None:
                raise RuntimeError("build the module before using its transform")
            if self._key is None:
                secret = os.environ.get(self.hparams["secret_env"])
                self._key = bytes.fromhex(secret) if secret else new_key()
            self._transform = make_transform(self.hparams["transform"], self.num_classes, key=self._key,
                                             **self._knobs())
        return self._transform

    def sample_keys(self, input_ids: Tensor, attention_mask: Tensor) -> list[bytes]:
        """Stable per-sample keys for the transform's keyed randomness: HMAC of the non-pad token ids under
        a key derived from the device secret (the same sample gets the same coin in every epoch)."""
        self.transform  # noqa: B018 - makes sure the key exists
        mac_key = hmac.new(self._key, b"pae-sample-key", hashlib.sha256).digest()
        return keyed_sample_hashes(mac_key, input_ids, attention_mask)

    def device_targets(self, backbone_logits: Tensor, labels: Tensor, input_ids: Tensor | None = None,
                       attention_mask: Tensor | None = None) -> Tensor:
        """``T(onehot(y) - softmax(z_b))``: what leaves the device instead of the label."""
        p = torch.softmax(backbone_logits.float(), dim=-1)
        delta = F.one_hot(labels.long(), num_classes=p.shape[-1]).float() - p
        keys = None
        if self.transform.needs_sample_keys:
            if input_ids is None or attention_mask is None:
                raise ValueError("this transform draws keyed per-sample randomness: pass input_ids and attention_mask")
            keys = self.sample_keys(input_ids, attention_mask)
        return self.transform.forward(delta, keys).float()

    # ---- what the device does for PAE ---------------------------------------------------------------
    def device_setup(self, backbone: FrozenBackbone, datamodule: Any) -> None:
        """The verbalizer: the first tokens of the data module's ``verbalizer_words`` (its class names unless
        the recipe gives words), whose LM-head logits are the backbone's prior."""
        self.backbone_label_token_ids = backbone.verbalizer_token_ids(verbalizer_words(datamodule, "PAE"))

    def training_payload(self, batch: dict[str, Tensor], out: BackboneOutput) -> tuple[str, dict[str, Tensor]]:
        """A ``train_target`` frame: the device-defined target, never the label."""
        targets = self.device_targets(out.logits, batch["labels"], batch["input_ids"], batch["attention_mask"])
        return P.TRAIN_TARGET, {"targets": targets.float().cpu()}

    def device_scores(self, out: BackboneOutput, side_outputs: Tensor) -> Tensor:
        return self.compose(out.logits, side_outputs)

    def device_eval_loss(self, scores: Tensor, labels: Tensor) -> Tensor | None:
        return None  # the composed scores are probabilities, not logits: no cross-entropy

    def compose(self, backbone_logits: Tensor, side_outputs: Tensor) -> Tensor:
        """The final class scores ``softmax(z_b) + T^{-1}(f(acts))`` (argmax is the prediction)."""
        p = torch.softmax(backbone_logits.float(), dim=-1)
        return p + self.transform.inverse(side_outputs.float().to(p.device)).float()

    # ---- server side -------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Regression of the side output onto ``batch["targets"]``; returns (loss, outputs)."""
        side = self._require_built()
        acts = batch["acts"].to(device=side.device, dtype=self.side_dtype)
        outputs = side(acts, batch["lengths"].to(acts.device))
        targets = batch["targets"].to(device=acts.device, dtype=outputs.dtype)
        if targets.shape != outputs.shape:
            raise ValueError(f"targets must have shape {tuple(outputs.shape)}, got {tuple(targets.shape)}")
        fn = F.mse_loss if self.hparams["loss"] == "mse" else F.smooth_l1_loss
        return fn(outputs.float(), targets.float()), outputs

    # ---- checkpoints: the key stays with the device ------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._key is not None and not os.environ.get(self.hparams["secret_env"]):
            checkpoint["pae_transform_key"] = self._key.hex()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "pae_transform_key" in checkpoint:
            self._key = bytes.fromhex(checkpoint["pae_transform_key"])
            self._transform = None
