"""Heads that turn a pooled hidden state into outputs."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LastTokenHead"]


class LastTokenHead(nn.Module):
    """Dropout and a linear classifier over one pooled hidden state per sample (kept in fp32)."""

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.proj(self.dropout(pooled.to(self.proj.weight.dtype)))
