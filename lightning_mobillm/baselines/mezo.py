"""MeZO: zeroth-order fine-tuning on the device with forward passes only (Malladi et al., NeurIPS 2023).

The other way to fine-tune at the memory of inference, with no server at all. Each step draws a random
direction ``z`` (regenerated from a seed, never stored), runs the batch twice, at ``theta + eps z`` and
``theta - eps z``, and moves ``theta`` along ``z`` by the projected gradient
``g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)``. No activation is kept for a backward pass and no
gradient or optimizer state exists, so the device holds the weights and one forward's activations: the
footprint of inference. The price is steps: the estimate has the variance of one random direction, and
the paper trains for tens of thousands of them.

As in the paper, the classifier is prompt-based: the logits are the LM head's scores of the verbalizer
tokens (the first tokens of the data module's ``verbalizer_words``) at the loss token, so step 0 is the
backbone's zero-shot prediction rather than a random head that zeroth-order steps would take long to fit.
What trains are LoRA adapters (PEFT; B starts at zero, so the model starts exactly at zero-shot), the
"MeZO (LoRA)" variant of the paper; ``trainable: all`` perturbs every weight (full-parameter MeZO).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mobillm.backbone import (
    add_lora,
    is_decoder_config,
    load_hf_model,
    load_tokenizer,
    loss_token_index,
    verbalizer_token_ids,
)
from lightning_mobillm.baselines.common import OnDeviceClassifier
from lightning_mobillm.data.text_classification import verbalizer_words
from lightning_mobillm.specs import BackboneConfig

__all__ = ["MeZO", "MeZOClassifier"]


class MeZOClassifier(OnDeviceClassifier):
    """Zeroth-order fine-tuning (MeZO) of a decoder's LoRA adapters, scored through its own LM head.

    Args:
        lr: the step size of ``theta -= lr * g * z`` (constant, as in the paper; its LoRA runs use 1e-4 to
            5e-5 with ``eps`` 1e-2; full-parameter runs 1e-6 to 1e-7 with ``eps`` 1e-3).
        eps: the perturbation scale.
        trainable: ``lora`` (adapters on ``target_modules``) or ``all`` (every weight of the backbone).
        r, alpha, target_modules: the LoRA adapters (``trainable: lora``).
        weight_decay: decoupled weight decay per step (``theta -= lr * weight_decay * theta``).
        **kwargs: see :class:`~lightning_mobillm.baselines.common.OnDeviceClassifier` (``warmup_ratio``,
            ``betas``, ``dropout`` and ``label_smoothing`` play no part here).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        lr: float = 1e-4,
        eps: float = 1e-2,
        trainable: Literal["lora", "all"] = "lora",
        r: int = 8,
        alpha: int = 16,
        target_modules: list[str] | None = None,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if trainable not in ("lora", "all"):
            raise ValueError(f"trainable must be 'lora' or 'all', got {trainable!r}")
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        super().__init__(backbone=backbone, num_classes=num_classes, lr=lr, weight_decay=weight_decay, **kwargs)
        self.automatic_optimization = False  # no backward pass: training_step calls the MeZO optimizer itself
        self.encoder: nn.Module | None = None
        self.decoder: nn.Module | None = None
        self.label_token_ids: list[int] | None = None
        self._softcap: float | None = None

    # ------------------------------------------------------------------------------ networks
    def build(self) -> None:
        model, _ = load_hf_model(self.backbone_config, lm_head=True)
        if not is_decoder_config(model.config):
            raise ValueError("MeZO scores classes through a causal LM head: the backbone must be a decoder")
        model.eval()  # no dropout: the two forwards of a step must differ only by the perturbation
        hp = self.hparams
        if hp["trainable"] == "lora":
            targets = hp["target_modules"] or ["q_proj", "v_proj"]
            model = add_lora(model, int(hp["r"]), int(hp["alpha"]), 0.0, list(targets))
            model.eval()
        else:
            model.requires_grad_(True)
        self.encoder = model
        self.decoder = model.get_decoder()
        self._softcap = getattr(model.config, "final_logit_softcapping", None)

    def setup(self, stage: str) -> None:
        """The verbalizer: the data module's ``verbalizer_words`` (its class names unless the recipe gives
        ``data.verbalizers``) through the backbone's tokenizer."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.label_token_ids is None:
            words = verbalizer_words(datamodule, "MeZO")
            tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(self.backbone_config)
            self.set_verbalizer(tokenizer, words)

    def set_verbalizer(self, tokenizer: Any, words: Sequence[str]) -> None:
        """Score class ``i`` with the LM-head logit of ``words[i]``'s first token."""
        if len(words) != self.num_classes:
            raise ValueError(f"verbalizers has {len(words)} words for {self.num_classes} classes")
        self.label_token_ids = verbalizer_token_ids(tokenizer, list(words))

    def _verbalizer(self) -> Tensor:
        assert self.encoder is not None and self.label_token_ids is not None
        head = self.encoder.get_output_embeddings()
        ids = torch.as_tensor(self.label_token_ids, dtype=torch.long, device=head.weight.device)
        return head.weight.index_select(0, ids)  # re-read each call: `trainable: all` perturbs tied embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, C]`` verbalizer logits at the loss token (only those rows go through the LM head)."""
        if self.decoder is None or self.label_token_ids is None:
            raise RuntimeError("build the module and set its verbalizer (a Trainer does both) before calling it")
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        idx = loss_token_index(attention_mask, True)
        last = hidden[torch.arange(len(idx), device=idx.device), idx]
        logits = (last @ self._verbalizer().T).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    # ------------------------------------------------------------------------------ the MeZO step
    def configure_optimizers(self) -> MeZO:
        hp = self.hparams
        return MeZO([p for _, p in self.trainable_parameters()], lr=float(hp["lr"]), eps=float(hp["eps"]),
                    weight_decay=float(hp["weight_decay"]), seed=int(hp["seed"]))

    @torch.no_grad()
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        labels = batch["labels"]
        loss = optimizer.step(closure=lambda: self._loss(self(batch["input_ids"], batch["attention_mask"]), labels))
        size = len(labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/projected_grad", optimizer.optimizer.param_groups[0]["projected_grad"], on_step=True,
                 on_epoch=False, batch_size=size)
        return loss

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels.long())


class MeZO(torch.optim.Optimizer):
    """The MeZO update as a torch optimizer: ``step(closure)`` evaluates the loss twice, at ``theta + eps z``
    and ``theta - eps z``, and moves ``theta -= lr * (g * z + weight_decay * theta)`` with the projected
    gradient ``g``. ``closure`` returns the loss and does no backward pass.

    ``z ~ N(0, I)`` is drawn from a seed fixed by ``seed`` and the step count (kept in the state dict), in
    parameter order, and regenerated rather than stored: the optimizer holds no per-parameter state, and a
    resumed run draws the same directions.
    """

    def __init__(self, params, lr: float = 1e-4, eps: float = 1e-2, weight_decay: float = 0.0, seed: int = 0):
        if not lr > 0 or not eps > 0 or weight_decay < 0:
            raise ValueError(f"MeZO needs lr > 0, eps > 0 and weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay, "seed": int(seed), "step": 0,
                                  "projected_grad": 0.0})

    def _direction_seed(self, group: dict) -> int:
        return (group["seed"] * 1_000_003 + group["step"] * 7919 + 17) % (2**63 - 1)

    @torch.no_grad()
    def perturb(self, group: dict, scale: float, seed: int) -> None:
        """``theta += scale * z(seed)`` over ``group``'s parameters."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for p in group["params"]:
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_(z.to(device=p.device, dtype=p.dtype), alpha=scale)

    @torch.no_grad()
    def projected_gradient(self, closure, group: dict, seed: int) -> tuple[float, float]:
        """``(g, mean loss)`` along ``z(seed)``; ``theta`` is back where it was afterwards (up to rounding)."""
        eps = group["eps"]
        self.perturb(group, eps, seed)
        plus = float(closure())
        self.perturb(group, -2 * eps, seed)
        minus = float(closure())
        self.perturb(group, eps, seed)
        return (plus - minus) / (2 * eps), (plus + minus) / 2

    @torch.no_grad()
    def step(self, closure=None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("MeZO evaluates the loss itself: call step(closure) with a closure returning the loss")
        losses = []
        for group in self.param_groups:
            seed = self._direction_seed(group)
            g, loss = self.projected_gradient(closure, group, seed)
            if not math.isfinite(g):
                raise FloatingPointError(f"MeZO's projected gradient is {g} at step {group['step']}: "
                                         "lower lr or eps")
            if group["weight_decay"]:
                for p in group["params"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
            self.perturb(group, -group["lr"] * g, seed)
            group["step"] += 1
            group["projected_grad"] = g
            losses.append(loss)
        return torch.tensor(sum(losses) / len(losses))
