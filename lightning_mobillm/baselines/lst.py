"""Ladder Side-Tuning (LST; Sung, Cho, Bansal, NeurIPS 2022) trained on the device.

The frozen backbone runs forward without autograd; a thin "ladder" of transformer blocks at width
``d / reduction`` reads every tapped layer's hidden state through a linear down-projection and a learned
gate ``g_i = sigmoid(alpha_i / T)`` (``T = 0.1``, ``alpha_i`` starting at 0):

    s_0 = 0,    s_i = Block_i(g_i * Down_i(A_i) + (1 - g_i) * s_{i-1})

and the last side state, up-projected back to ``d``, is classified at the loss token. Only the ladder
trains, so no backbone activation is kept for a backward pass; unlike MobiLLM the backward pass and the
optimizer still run on the device. This is METHODS.md section 4 with two choices of ours: each side
block is a pre-norm transformer block (causal for decoder backbones) rather than a copy of the
backbone's block type, so one implementation serves every architecture; and each tap is divided by its
RMS first, as in MobiLLM's side network (SmolLM2's inner hidden states are not normalised). The
ladder's weights are randomly initialised (LST's pruned-backbone initialisation is not implemented).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mobillm.backbone import FrozenBackbone
from lightning_mobillm.baselines.common import OnDeviceClassifier
from lightning_mobillm.side.heads import LastTokenHead
from lightning_mobillm.side.parallel_adapters import rms_normalize
from lightning_mobillm.specs import BackboneConfig

__all__ = ["LadderSideNetwork", "LadderSideTuningClassifier"]


class LadderSideNetwork(nn.Module):
    """The ladder of LST over padded taps ``[B, T, L, d]`` with a mask ``[B, T]``; returns ``[B, T, d]``.

    Args:
        num_taps: tapped backbone layers ``L`` (one side block each).
        hidden_size: backbone width ``d``.
        reduction: side width is ``d // reduction``.
        num_heads: attention heads of each side block (must divide the side width).
        causal: causal self-attention (decoder backbones) or bidirectional (encoders).
        dropout: dropout inside the side blocks.
        gate_temperature: ``T`` of the gates.
    """

    def __init__(self, num_taps: int, hidden_size: int, reduction: int = 8, num_heads: int = 4,
                 causal: bool = True, dropout: float = 0.1, gate_temperature: float = 0.1) -> None:
        super().__init__()
        width = max(1, hidden_size // reduction)
        if width % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the side width {hidden_size}//{reduction}={width}")
        self.causal = causal
        self.gate_temperature = float(gate_temperature)
        self.down = nn.ModuleList(nn.Linear(hidden_size, width) for _ in range(num_taps))
        self.alpha = nn.Parameter(torch.zeros(num_taps))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=4 * width, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(num_taps)
        )
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden_size)

    def gates(self) -> Tensor:
        return torch.sigmoid(self.alpha / self.gate_temperature)

    def forward(self, taps: Tensor, mask: Tensor) -> Tensor:
        seqlen = taps.shape[1]
        attn_mask = (
            torch.ones(seqlen, seqlen, dtype=torch.bool, device=taps.device).triu(1) if self.causal else None
        )
        padding = ~mask.bool()
        gates = self.gates()
        state = None
        for i, (down, block) in enumerate(zip(self.down, self.blocks)):
            x = down(rms_normalize(taps[:, :, i]))
            x = x if state is None else gates[i] * x + (1 - gates[i]) * state
            state = block(x, src_mask=attn_mask, src_key_padding_mask=padding)
        return self.up(self.norm(state))


class LadderSideTuningClassifier(OnDeviceClassifier):
    """On-device LST: frozen backbone forward (no autograd) + the ladder side network trained locally.

    Args:
        reduction: side width ``d / reduction`` (LST's default is 8).
        num_heads: attention heads per side block.
        gate_temperature: ``T`` in ``sigmoid(alpha / T)``.
        **kwargs: see :class:`~lightning_mobillm.baselines.common.OnDeviceClassifier`. The backbone's
            ``layers`` chooses the tapped blocks (one side block each).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        lr: float = 1e-3,
        reduction: int = 8,
        num_heads: int = 4,
        gate_temperature: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, lr=lr, **kwargs)
        self.backbone: FrozenBackbone | None = None  # a plain object: not in the state dict or the optimizer
        self.ladder: LadderSideNetwork | None = None
        self.head: LastTokenHead | None = None

    def build(self) -> None:
        hp = self.hparams
        self.backbone = FrozenBackbone(self.backbone_config, device=self.device)
        spec = self.backbone.tap_spec
        self.ladder = LadderSideNetwork(spec.num_taps, spec.hidden_size, int(hp["reduction"]), int(hp["num_heads"]),
                                        causal=spec.is_decoder, dropout=float(hp["dropout"]),
                                        gate_temperature=float(hp["gate_temperature"]))
        self.head = LastTokenHead(spec.hidden_size, self.num_classes, float(hp["dropout"]))

    def on_fit_start(self) -> None:
        self.backbone.to(self.device)
        super().on_fit_start()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.backbone(input_ids, attention_mask, select="all")
        lengths = out.lengths.to(self.device)
        batch, seqlen = int(lengths.numel()), int(lengths.max())
        mask = torch.arange(seqlen, device=self.device)[None, :] < lengths[:, None]  # right padding
        taps = out.acts.new_zeros(batch, seqlen, *out.acts.shape[1:])
        taps[mask] = out.acts
        dtype = self.head.proj.weight.dtype
        side = self.ladder(taps.to(dtype), mask)
        last = lengths - 1 if self.backbone.is_decoder else torch.zeros_like(lengths)
        return self.head(side[torch.arange(batch, device=self.device), last])
