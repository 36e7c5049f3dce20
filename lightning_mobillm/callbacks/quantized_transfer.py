"""``QuantizedTransfer``: which codec carries activations from the device to the server."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_mobillm.protocol.packing import acts_tensors
from lightning_mobillm.transport import codecs


class QuantizedTransfer(L.Callback):
    """Chooses the codec for activations on the wire and measures what it costs in accuracy.

    Args:
        codec: ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``int4`` (per-token absmax scales; int4 packs two
            values a byte), or ``int8o``/``int4o``: the same with ``outlier_channels`` channels per tapped
            layer (the largest in the frame) sent in fp16, so the outliers of LLM hidden states no longer
            spend the integer range.
        outlier_channels: channels per layer kept in fp16 by the ``*o`` codecs.
        measure_every_n_steps: every n-th training batch, decode what was sent on the device and log the
            relative error ``||decode(encode(x)) - x|| / ||x||`` as ``comm/quant_rel_error`` (0 disables).
    """

    def __init__(self, codec: str = "fp16", outlier_channels: int = 8, measure_every_n_steps: int = 50) -> None:
        if codec not in codecs.CODECS:
            raise ValueError(f"QuantizedTransfer: unknown codec {codec!r}; choose one of {list(codecs.CODECS)}")
        if outlier_channels < 0:
            raise ValueError(f"QuantizedTransfer: outlier_channels must be >= 0, got {outlier_channels}")
        self.codec = codec
        self.outlier_channels = outlier_channels
        self.measure_every_n_steps = measure_every_n_steps
        self.last_rel_error: float | None = None
        self._packed = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        use = getattr(trainer.strategy, "use_transfer", None)  # strategies that send activations offer it
        if use is not None:
            use(self)

    def layer_encoder(self, n_tokens: int, n_layers: int, d: int) -> codecs.LayerEncoder:
        """The sink of a backbone forward (``FrozenBackbone.forward(sink=...)``): each tapped layer is quantised
        into the frame as the forward produces it, so the float ``[N, L, d]`` stack never exists. Every
        ``measure_every_n_steps``-th frame also sums its relative error, layer by layer."""
        measure = bool(self.measure_every_n_steps) and self._packed % self.measure_every_n_steps == 0
        return codecs.LayerEncoder(n_tokens, n_layers, d, self.codec, self.outlier_channels, measure=measure)

    def pack_written(self, encoder: codecs.LayerEncoder, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of a frame whose activations a :meth:`layer_encoder` sink holds (what
        ``protocol.pack_acts`` gives for the same activations)."""
        tensors = acts_tensors(encoder.parts(), lengths)
        self._packed += 1
        if encoder.rel_error is not None:
            self.last_rel_error = encoder.rel_error
        return tensors

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.last_rel_error is not None:
            pl_module.log("comm/quant_rel_error", self.last_rel_error, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "outlier_channels": self.outlier_channels}
