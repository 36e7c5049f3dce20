"""Generative side-tuning: the MobiLLM side network trained as a causal LM on answer tokens.

The device forwards prompt + answer once (teacher forcing) and sends the taps of the positions whose next
token is in the answer only (``select: answer``: exact, because the side network is token-wise) with those
next tokens as labels: **this mode sends labels** (answer token ids), like MobiLLM's classification, and
has no label privacy. The last block must be tapped: its output is the residual's base.

The server computes ``h = last_tap + W_o(trunk(taps))`` and a cross-entropy through the backbone's own frozen
final norm and LM head, which it reads itself from a checkpoint it allows (the packaged models by default,
``ServerConfig.allowed_backbones`` otherwise), checked against the digest the device declares in its hello;
the device never uploads weights. At step 0 ``W_o`` is zero and the loss is the backbone's own.

Evaluation needs no labels on the wire: the server returns the corrected hidden states ``h`` and the device
applies its own final norm and LM head (teacher-forced loss, perplexity, next-token accuracy).
:class:`~lightning_mobillm.generation.SideGeneration` generates with the trained side network on the device.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mobillm.data.instruction import answer_positions
from lightning_mobillm.side.causal_lm import OutputLayer, ResidualLMHead, chunked_cross_entropy
from lightning_mobillm.side.config import TRUNK_TYPES
from lightning_mobillm.side.network import SideNetwork
from lightning_mobillm.specs import BackboneConfig, TapSpec

from .side_tuning import SideTuningModule

__all__ = ["CausalLMSideModule", "CausalSideNetwork"]

log = logging.getLogger(__name__)


class CausalSideNetwork(SideNetwork):
    """A side trunk and a :class:`~lightning_mobillm.side.causal_lm.ResidualLMHead`: packed taps ``[N, L, d]``
    to corrected hidden states ``[N, d]`` (the last tap plus ``W_o`` of the trunk's state)."""

    @property
    def num_outputs(self) -> int:
        return int(self.head.out.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.out.weight.device

    def forward(self, acts: Tensor, lengths: Tensor) -> Tensor:
        self.check_lengths(lengths, acts.shape[0])
        return self.head(self.trunk(acts), acts[:, -1])


class CausalLMSideModule(SideTuningModule):
    """MobiLLM side-tuning for generation (a causal-LM side network over answer tokens).

    Args:
        backbone, reduction, normalize_taps, activation, final_norm, lr, weight_decay, betas, warmup_ratio,
            min_lr_ratio, total_steps, seed: as :class:`~lightning_mobillm.modules.SideTuningModule`.
        chunk_tokens: answer tokens per chunk of the cross-entropy (each chunk's ``[chunk, V]`` logits are
            recomputed in the backward pass, never all held at once), and of the device's evaluation.
        output_dtype: the dtype of the output layer whose digest the device declares (set from the backbone).
        max_new_tokens: tokens ``predict`` generates per prompt (greedy).
        residual_scale: ``"rms"`` (default): the side network's residual is measured in units of the last tap's
            RMS, so it acts on the scale the LM head reads after the final norm; ``"none"``: the plain
            ``last_tap + W_o(s)``, which the norm shrinks by the last state's RMS (about 34 on SmolLM2-135M), so it
            learns far more slowly (see :class:`~lightning_mobillm.side.causal_lm.ResidualLMHead`).
        num_classes, pool, dropout, label_smoothing: the classifier's knobs; fixed here (there are no classes:
            ``num_classes`` and ``num_outputs`` are ``W_o``'s width, the backbone's).
    """

    server_module_name = "causal_lm"
    device_only_hparams = (*SideTuningModule.device_only_hparams, "max_new_tokens")
    #: frames carry one label per sent token (the next answer token), not one per sample
    labels_per_token = True

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        reduction: int = 8,
        normalize_taps: bool = True,
        pool: Literal["last"] = "last",
        activation: str = "gelu",
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.06,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        total_steps: int | None = None,
        seed: int = 0,
        final_norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        chunk_tokens: int = 256,
        output_dtype: str | None = None,
        max_new_tokens: int = 32,
        residual_scale: Literal["rms", "none"] = "rms",
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, reduction=reduction,
                         normalize_taps=normalize_taps, pool=pool, activation=activation, dropout=dropout, lr=lr,
                         weight_decay=weight_decay, betas=betas, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio,
                         label_smoothing=label_smoothing, total_steps=total_steps, seed=seed, final_norm=final_norm)
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if residual_scale not in ResidualLMHead.SCALES:
            raise ValueError(f"residual_scale must be one of {ResidualLMHead.SCALES}, got {residual_scale!r}")
        self.hparams["chunk_tokens"] = int(chunk_tokens)
        self.hparams["residual_scale"] = residual_scale
        self.hparams["max_new_tokens"] = int(max_new_tokens)  # what `predict` generates per prompt
        self._warned_untrained = False
        # the dtype of the output layer the device declared a digest of (set on the device from its backbone)
        self.hparams["output_dtype"] = output_dtype
        self.output_layer: OutputLayer | None = None

    # ---- what the server and the device agree on -------------------------------------------------------
    def token_selection(self, is_decoder: bool) -> Literal["answer"]:
        """Only the positions whose next token is in the answer can reach the loss."""
        if not is_decoder:
            raise ValueError("generative side-tuning needs a causal LM backbone (a decoder)")
        return "answer"

    def token_positions(self, batch: dict[str, Tensor]) -> Tensor:
        return answer_positions(batch["labels"], batch.get("attention_mask"))

    def device_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """The next token of every sent position, in packed order: ``labels[b, t + 1]`` where position ``t`` of
        sample ``b`` is sent."""
        labels = batch["labels"]
        return labels[:, 1:][self.token_positions(batch)[:, :-1]].to(torch.int64)

    def batch_size(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    # ---- build --------------------------------------------------------------------------------------------
    def build(self, tap_spec: TapSpec, num_classes: int | None = None, num_outputs: int | None = None) -> None:
        """The trunk over the taps and a zero-initialised ``W_o`` back to the backbone's width (seeded)."""
        if isinstance(tap_spec, dict):
            tap_spec = TapSpec.from_dict(tap_spec)
        width = int(tap_spec.hidden_size)
        for name, value in (("num_outputs", num_outputs), ("num_classes", num_classes)):
            if value is not None and int(value) != width:
                raise ValueError(f"{name}={value}: a causal-LM side network outputs the backbone's width {width}")
        if self.is_built:
            assert self.tap_spec is not None
            if self.tap_spec.to_dict() != tap_spec.to_dict():
                raise ValueError(f"side network already built for {self.tap_spec}; cannot rebuild it for {tap_spec}")
            return
        if not tap_spec.is_decoder:
            raise ValueError("generative side-tuning needs a causal LM backbone (a decoder)")
        config = self.side_config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.hparams["seed"]))
            trunk = TRUNK_TYPES[config.trunk](tap_spec.num_taps, width, reduction=config.reduction,
                                              normalize_taps=config.normalize_taps, activation=config.activation,
                                              final_norm=config.final_norm)
            head = ResidualLMHead(trunk.out_features, width, scale=self.hparams["residual_scale"])
        self.hparams["num_classes"] = width
        self.tap_spec = TapSpec.from_dict(tap_spec.to_dict())
        self.side = CausalSideNetwork(trunk, head).to(self.device)
        self._sums: dict[str, list] = {}  # stage -> [loss sum, correct, tokens] of the epoch so far

    def attach_output_layer(self, output: OutputLayer) -> None:
        """The backbone's frozen final norm and LM head, in the side network's dtype (kept out of the module)."""
        if self.tap_spec is not None and output.hidden_size != self.tap_spec.hidden_size:
            raise ValueError(f"the output layer is {output.hidden_size} wide, the taps {self.tap_spec.hidden_size}")
        self.output_layer = output

    @property
    def label_bound(self) -> int:
        """Labels are token ids below the vocabulary size."""
        if self.output_layer is None:
            raise RuntimeError("no output layer attached")
        return self.output_layer.vocab_size

    def device_setup(self, backbone: Any, datamodule: Any) -> None:
        """Check that the last block is tapped, and keep the backbone's own output layer for evaluation."""
        last = backbone.num_blocks - 1
        if backbone.layers[-1] != last:
            raise ValueError(f"generative side-tuning needs the last block ({last}) tapped last: it is the residual's "
                             f"base; model.backbone.layers is {list(backbone.config.layers)!r}")
        self.attach_output_layer(OutputLayer.from_model(backbone.model))
        self.hparams["output_dtype"] = str(backbone.dtype).removeprefix("torch.")

    # ---- compute -------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the next answer tokens ``{"acts", "lengths", "labels"[N]}``; (loss, hidden states)."""
        side = self._require_built()
        if self.output_layer is None:
            raise RuntimeError("no output layer attached: the server attaches the backbone's final norm and LM head")
        acts = batch["acts"].to(device=side.device, dtype=self.side_dtype)
        labels = batch["labels"].to(device=acts.device, dtype=torch.long)
        if labels.shape != (acts.shape[0],):
            raise ValueError(f"labels must have one token per sent position, [N]=[{acts.shape[0]}], got "
                             f"{tuple(labels.shape)}")
        hidden = side(acts, batch["lengths"].to(acts.device))
        loss = chunked_cross_entropy(hidden, labels, self.output_layer, int(self.hparams["chunk_tokens"]))
        return loss, hidden

    def device_scores(self, out: Any, side_outputs: Tensor) -> Tensor:
        """The server's corrected hidden states ``[N, d]``: :meth:`update_eval_metrics` reads them through the
        device's own final norm and LM head, a chunk of tokens at a time (the ``[N, V]`` logits never exist)."""
        return side_outputs

    def device_eval_loss(self, scores: Tensor, labels: Tensor) -> None:
        return None  # computed with the accuracy, chunk by chunk, in update_eval_metrics

    def update_eval_metrics(self, stage: str, hidden: Tensor, labels: Tensor, loss: Tensor | float | None = None) -> None:
        """Accumulate the token-weighted loss and next-token accuracy of ``stage`` from hidden states ``[N, d]``
        through the output layer, ``chunk_tokens`` at a time (plain sums: no metric state that an
        inference-mode validation could turn into an inference tensor)."""
        key = self._stage(stage)
        if self.output_layer is None:
            raise RuntimeError("no output layer attached")
        labels = labels.to(hidden.device, torch.long)
        chunk = int(self.hparams["chunk_tokens"])
        sums = self._sums.setdefault(key, [0.0, 0.0, 0])
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                logits = self.output_layer(hidden[start:start + chunk].to(self.output_layer.weight.dtype)).float()
                y = labels[start:start + chunk]
                sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
                sums[1] += float((logits.argmax(-1) == y).sum())
        sums[2] += int(labels.numel())

    def compute_eval_metrics(self, stage: str) -> dict[str, float]:
        """``{stage}/loss`` (mean over answer tokens), ``{stage}/ppl`` and ``{stage}/token_acc`` so far."""
        key = self._stage(stage)
        loss_sum, correct, n = self._sums.get(key, [0.0, 0.0, 0])
        if not n:
            return {}
        loss = loss_sum / n
        return {f"{key}/loss": loss, f"{key}/ppl": math.exp(min(loss, 50.0)), f"{key}/token_acc": correct / n}

    def reset_eval_metrics(self, stage: str) -> None:
        self._sums.pop(self._stage(stage), None)

    def _stage(self, stage: str) -> str:
        key = {"val": "val", "validate": "val", "validation": "val", "test": "test"}.get(stage)
        if key is None:
            raise ValueError(f"stage must be val or test, got {stage!r}")
        return key

    def on_validation_epoch_start(self) -> None:
        self.reset_eval_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.reset_eval_metrics("test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        values = self.compute_eval_metrics(stage)
        if self._trainer is not None and values:
            self.log_dict(values, prog_bar=True)

    def generate_texts(self, batches: Any, backbone: Any = None, **kwargs: Any) -> list[tuple[int, str]]:
        """``(index, text)`` generated on the device for left-padded prompts: the frozen backbone's stock
        ``generate`` with this side network's hooks (``backbone``: default, the strategy's)."""
        from lightning_mobillm.generation import generate_texts  # device code: the server never imports it

        backbone = backbone if backbone is not None else self.trainer.strategy.backbone
        return generate_texts(backbone.model, backbone.tokenizer, batches, side=self._require_built(),
                              layers=backbone.layers, **kwargs)

    def device_predict(self, backbone: Any, batch: dict[str, Tensor]) -> dict[str, Any]:
        """``predict`` on the device: greedy generation of ``max_new_tokens`` for a batch of left-padded prompts with
        the side network, stopping at the data module's end of turn."""
        side = self._require_built()
        if not self._warned_untrained and not any(bool(p.any()) for p in side.head.parameters()):
            log.warning("predict with an untrained side network (W_o is zero): this is the backbone's own output; "
                        "pass --ckpt_path to a trained checkpoint")
            self._warned_untrained = True
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        produced = self.generate_texts([batch], backbone, max_new_tokens=int(self.hparams["max_new_tokens"]),
                                       stop_token_ids=getattr(dm, "stop_token_ids", None))
        return {"index": [i for i, _ in produced], "texts": [t for _, t in produced]}

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return {"hidden": self._require_built()(batch["acts"].to(self.side_dtype), batch["lengths"])}
