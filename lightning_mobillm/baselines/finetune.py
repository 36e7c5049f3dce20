"""On-device full fine-tuning and on-device LoRA (the PEFT library): backbone + a head at the loss token.

Both keep the whole pretrained model on the device and backpropagate through it there: that is what
they cost a phone, and what MobiLLM avoids. The classification head reads the backbone's last hidden
state at the loss token (the last non-pad token of a decoder, ``[CLS]`` of an encoder), the token the
MobiLLM side network classifies from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mobillm.backbone import add_lora, is_decoder_config, load_hf_model, loss_token_index
from lightning_mobillm.baselines.common import OnDeviceClassifier
from lightning_mobillm.side.heads import LastTokenHead
from lightning_mobillm.specs import BackboneConfig

__all__ = ["FullFineTuneClassifier", "LoRAClassifier"]


class FullFineTuneClassifier(OnDeviceClassifier):
    """On-device full fine-tuning: every backbone weight and the head train with AdamW on the device.

    Args:
        gradient_checkpointing: recompute the blocks' activations in the backward pass (less memory,
            about a third more compute).
        **kwargs: see :class:`~lightning_mobillm.baselines.common.OnDeviceClassifier`.
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        lr: float = 5e-5,
        gradient_checkpointing: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, lr=lr, **kwargs)
        self.encoder: nn.Module | None = None
        self.head: LastTokenHead | None = None
        self.is_decoder = True

    def build(self) -> None:
        model, _ = load_hf_model(self.backbone_config, lm_head=False)
        self.is_decoder = is_decoder_config(model.config)
        if self.hparams["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained returns eval mode; dropout of the backbone is part of fine-tuning
        self.encoder = self.adapt(model)
        self.head = LastTokenHead(int(model.config.hidden_size), self.num_classes, float(self.hparams["dropout"]))

    def adapt(self, model: nn.Module) -> nn.Module:
        """What trains in the backbone: everything here; subclasses wrap or freeze it."""
        model.requires_grad_(True)
        return model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kwargs = {"use_cache": False} if self.is_decoder else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        idx = loss_token_index(attention_mask, self.is_decoder)
        return self.head(hidden[torch.arange(len(idx), device=idx.device), idx])


class LoRAClassifier(FullFineTuneClassifier):
    """On-device LoRA with the PEFT library: low-rank adapters on the attention projections plus the head.

    The frozen weights stay in the backbone's dtype; the backward pass still runs through every block on
    the device (activations of all layers are kept for it).

    Args:
        r: LoRA rank.
        alpha: LoRA scaling numerator (``alpha / r`` scales the update).
        lora_dropout: dropout on the LoRA input.
        target_modules: module names that get adapters (``q_proj``/``v_proj`` for Llama/Qwen/Gemma;
            ``query``/``value`` for BERT).
        **kwargs: see :class:`FullFineTuneClassifier`.
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        lr: float = 5e-4,
        r: int = 8,
        alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] | None = None,
        **kwargs,
    ) -> None:
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        super().__init__(backbone=backbone, num_classes=num_classes, lr=lr, **kwargs)

    def adapt(self, model: nn.Module) -> nn.Module:
        hp = self.hparams
        targets = hp["target_modules"] or (["q_proj", "v_proj"] if self.is_decoder else ["query", "value"])
        return add_lora(model, int(hp["r"]), int(hp["alpha"]), float(hp["lora_dropout"]), list(targets))
