"""On-device generative baselines: zero-shot, LoRA (PEFT) and full fine-tuning of the causal LM itself.

The same data (:class:`~lightning_mobillm.data.InstructionDataModule`), the same loss (cross-entropy of the answer
tokens, mean over tokens) and the same metrics (teacher-forced loss, perplexity and next-token accuracy;
:class:`~lightning_mobillm.callbacks.GenerationEval` for ROUGE or exact match) as the MobiLLM side network
(:class:`~lightning_mobillm.modules.CausalLMSideModule`), trained where a user without a server would train:
on the device, backpropagating through the backbone. Only the answer positions go through the LM head (the
``[B, T, V]`` logits of every position are never built).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mobillm.backbone import add_lora, load_hf_model
from lightning_mobillm.data.instruction import answer_positions
from lightning_mobillm.modules.side_tuning import to_backbone_config
from lightning_mobillm.optim import adamw_warmup_cosine
from lightning_mobillm.specs import BackboneConfig

__all__ = ["OnDeviceCausalLM"]


class OnDeviceCausalLM(lightning.LightningModule):
    """A causal LM fine-tuned (or only evaluated) on the device.

    Args:
        backbone: the pretrained model (``layers`` is ignored).
        trainable: ``lora`` (PEFT adapters on ``target_modules``), ``full`` (every weight) or ``none`` (the
            zero-shot reference: ``validate`` only).
        lr, weight_decay, betas, warmup_ratio, min_lr_ratio: AdamW with warmup and cosine decay.
        r, alpha, lora_dropout, target_modules: the LoRA adapters.
        gradient_checkpointing: recompute the blocks in the backward pass (less memory, more compute).
        seed: seed of the adapters' initial weights.
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        trainable: Literal["lora", "full", "none"] = "lora",
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.06,
        min_lr_ratio: float = 0.0,
        r: int = 8,
        alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if trainable not in ("lora", "full", "none"):
            raise ValueError(f"trainable must be 'lora', 'full' or 'none', got {trainable!r}")
        if lr <= 0 or r < 1:
            raise ValueError(f"lr must be > 0 and r >= 1, got lr={lr}, r={r}")
        self._backbone = to_backbone_config(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams["backbone"] = self._backbone.to_dict()
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self._sums: dict[str, list] = {}

    @property
    def backbone_config(self) -> BackboneConfig:
        """The backbone; the data module loads its tokenizer from here."""
        return self._backbone

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from lightning_mobillm.backbone import load_tokenizer

        model, _ = load_hf_model(self._backbone, lm_head=True)
        hp = self.hparams
        if hp["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(hp["seed"]))
            if hp["trainable"] == "lora":
                model = add_lora(model, int(hp["r"]), int(hp["alpha"]), float(hp["lora_dropout"]),
                                 list(hp["target_modules"] or ["q_proj", "v_proj"]))
            else:
                model.requires_grad_(hp["trainable"] == "full")
        self.model = model
        self.tokenizer = load_tokenizer(self._backbone)

    # ---- the loss over answer tokens --------------------------------------------------------------------
    def answer_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Logits ``[N, V]`` of the positions whose next token is in the answer, and those tokens ``[N]``."""
        assert self.model is not None
        labels = batch["labels"]
        positions = answer_positions(labels, batch["attention_mask"])
        causal = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = causal.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
        logits = causal.lm_head(hidden[positions])
        cap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float(), labels[:, 1:][positions[:, :-1]]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits, targets = self.answer_logits(batch)
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=int(targets.numel()))
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        logits, targets = self.answer_logits(batch)
        sums = self._sums.setdefault(stage, [0.0, 0.0, 0])
        sums[0] += float(F.cross_entropy(logits, targets, reduction="sum"))
        sums[1] += float((logits.argmax(-1) == targets).sum())
        sums[2] += int(targets.numel())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def compute_eval_metrics(self, stage: str) -> dict[str, float]:
        """``{stage}/loss`` (mean over answer tokens), ``{stage}/ppl``, ``{stage}/token_acc`` of the epoch."""
        loss_sum, correct, n = self._sums.get(stage, [0.0, 0.0, 0])
        if not n:
            return {}
        loss = loss_sum / n
        return {f"{stage}/loss": loss, f"{stage}/ppl": math.exp(min(loss, 50.0)), f"{stage}/token_acc": correct / n}

    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._sums.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.compute_eval_metrics("val"), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.compute_eval_metrics("test"), prog_bar=True)

    # ---- generation ---------------------------------------------------------------------------------------
    def generate_texts(self, batches: Iterable[dict[str, Tensor]], **kwargs: Any) -> list[tuple[int, str]]:
        """``(index, text)`` generated for left-padded prompts by the (adapted) model."""
        from lightning_mobillm.generation import generate_texts

        assert self.model is not None
        was_training = self.model.training
        self.model.eval()
        try:
            return generate_texts(self.model, self.tokenizer, batches, **kwargs)
        finally:
            self.model.train(was_training)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        produced = self.generate_texts([batch], max_new_tokens=32)
        return {"index": [i for i, _ in produced], "texts": [t for _, t in produced]}

    # ---- optimizer ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("trainable='none' has nothing to train: it is the zero-shot reference (use validate)")
        total = self.trainer.estimated_stepping_batches
        if total is None or not math.isfinite(float(total)) or total < 1:
            raise ValueError("cannot size the lr schedule: set trainer.max_steps or trainer.max_epochs")
        optimizer, scheduler = adamw_warmup_cosine(
            params, lr=hp["lr"], weight_decay=hp["weight_decay"], betas=hp["betas"], total_steps=int(total),
            warmup_ratio=hp["warmup_ratio"], min_lr_ratio=hp["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
