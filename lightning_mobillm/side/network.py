"""``SideNetwork``: a trunk over the backbone's taps and a head, the shape of every side network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SideNetwork"]


class SideNetwork(nn.Module):
    """``head(trunk(acts), lengths)``: the trunk maps packed taps ``[N, L, d]`` to per-token states
    ``[N, d_side]`` (token-wise, so sending only some tokens is exact), the head pools each sample's
    tokens and maps them to ``[B, num_outputs]``."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    @property
    def num_outputs(self) -> int:
        return self.head.num_outputs

    @property
    def dtype(self) -> torch.dtype:
        return self.head.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.proj.weight.device

    @staticmethod
    def check_lengths(lengths: Tensor, n: int) -> None:
        if not isinstance(lengths, Tensor):
            raise ValueError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
        if lengths.dim() != 1 or lengths.numel() < 1:
            raise ValueError(f"lengths must be a non-empty 1-D tensor [B], got shape {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        bad = (lengths < 1).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"every sample needs at least one token: lengths must all be >= 1, "
                f"but {bad.numel()} are not (lengths[{i}] = {int(lengths[i])})"
            )
        total = int(lengths.sum())
        if total != n:
            raise ValueError(f"lengths sum to {total} but acts holds N={n} packed tokens")

    def forward(self, acts: Tensor, lengths: Tensor) -> Tensor:
        """Map packed activations ``[N, L, d]`` and ``lengths`` ``[B]`` to outputs ``[B, num_outputs]``."""
        states = self.trunk(acts)
        self.check_lengths(lengths, acts.shape[0])
        return self.head(states, lengths)
