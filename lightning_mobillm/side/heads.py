"""Heads: from per-token side states (or a pooled hidden state) to outputs."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["LastTokenHead", "PoolMode", "PooledLinearHead"]

PoolMode = Literal["last", "mean", "first"]


class LastTokenHead(nn.Module):
    """Dropout and a linear classifier over one pooled hidden state per sample (kept in fp32)."""

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.proj(self.dropout(pooled.to(self.proj.weight.dtype)))


class PooledLinearHead(nn.Module):
    """Pool each sample's packed token states ``[N, d]`` (``lengths`` ``[B]``), dropout, a linear map to
    ``num_outputs``: class logits for a classifier, the target space for PAE's additive adapter.

    Args:
        in_features: width of the trunk's states.
        num_outputs: output width.
        pool: ``"last"``, ``"mean"`` or ``"first"`` token of each sample.
        dropout: dropout before the linear map.
    """

    def __init__(self, in_features: int, num_outputs: int, pool: PoolMode = "last", dropout: float = 0.0) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if pool not in ("last", "mean", "first"):
            raise ValueError(f"pool must be 'last', 'mean' or 'first', got {pool!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.pool = pool
        self.num_outputs = int(num_outputs)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(int(in_features), self.num_outputs)

    def pool_tokens(self, states: Tensor, lengths: Tensor) -> Tensor:
        """Pool per-token states ``[N, d]`` into per-sample vectors ``[B, d]`` (vectorised, no loop over samples)."""
        lengths = lengths.to(device=states.device, dtype=torch.long)
        if self.pool == "last":
            return states.index_select(0, torch.cumsum(lengths, 0) - 1)
        if self.pool == "first":
            return states.index_select(0, torch.cumsum(lengths, 0) - lengths)
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=states.device), lengths)
        sums = states.new_zeros(lengths.numel(), states.shape[-1]).index_add_(0, segment, states)
        return sums / lengths.to(states.dtype).unsqueeze(-1)

    def forward(self, states: Tensor, lengths: Tensor) -> Tensor:
        return self.proj(self.dropout(self.pool_tokens(states, lengths)))
