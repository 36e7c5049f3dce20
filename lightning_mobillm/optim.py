"""The one optimiser every method uses, on the device or on a server: AdamW with warmup and cosine decay."""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosineLambda", "adamw_warmup_cosine"]


class WarmupCosineLambda:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_lr_ratio``.

    For optimizer step ``t`` (the value ``LambdaLR`` passes, 0 for the first step):

    * ``t < warmup_steps``: ``(t + 1) / warmup_steps`` (the first step already uses a non-zero lr);
    * otherwise, with ``p = min(1, (t - warmup_steps) / max(1, total_steps - warmup_steps))``:
      ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * p))``.

    A plain class holding numbers only, so ``LambdaLR.state_dict()`` (which stores a callable
    object's ``__dict__``) stays pure numbers and the scheduler pickles cleanly.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    params, *, lr: float, weight_decay: float, betas, total_steps: int, warmup_ratio: float, min_lr_ratio: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only; none on biases, norm weights and gates) with linear warmup
    over ``warmup_ratio`` of ``total_steps`` then cosine decay (:class:`WarmupCosineLambda`). Every
    method's optimiser, on the device or on a server, is built here."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters to optimise")
    groups = [{"params": decay, "weight_decay": float(weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=float(lr), betas=tuple(float(b) for b in betas))
    warmup = min(total_steps, int(round(float(warmup_ratio) * total_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosineLambda(total_steps, warmup, float(min_lr_ratio))
    )
    return optimizer, scheduler
