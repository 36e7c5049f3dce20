"""``ActivationCache``: the server keeps the activations of samples it has seen (PAE MobiLLM).

The backbone is frozen, so a sample's activations never go stale. In the first epoch the device
forwards every training sample once and the server stores what it receives under an opaque sample key;
in later epochs the device sends only the keys of a batch and forwards nothing. The keys are keyed
hashes (HMAC-SHA256 with a device secret) of the sample's token ids: they reveal to the server only
that two frames carry the same sample, never the text.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import lightning as L
import torch


class ActivationCache(L.Callback):
    """Cache training samples' loss-token activations (and targets) on the server.

    Needs the strategy's ``select: loss`` (one token per sample). The server stores the cache under its
    ``workdir`` (an embedded server: the run's log folder), spills to disk beyond ``memory_limit_mb``
    with a checksum per entry, and flushes its index with every checkpoint, so ``--ckpt_path`` resumes
    with the cache. A cache entry that is lost or corrupt is simply forwarded again by the device.

    Args:
        memory_limit_mb: server memory for cached samples before older ones spill to disk.
    """

    def __init__(self, memory_limit_mb: float = 512.0) -> None:
        if memory_limit_mb < 0:
            raise ValueError(f"ActivationCache: memory_limit_mb must be >= 0, got {memory_limit_mb}")
        self.memory_limit_mb = memory_limit_mb
        self.cache_id = secrets.token_hex(8)
        self._secret = secrets.token_bytes(32)
        self.cached: set[str] = set()  # keys the server has acknowledged
        self.workdir: str | None = None  # an embedded server's cache folder, kept for resume
        self.hits = 0  # samples trained from the cache (device forward skipped)
        self.misses = 0  # samples the server asked for again

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if not hasattr(strategy, "cache"):
            raise TypeError(f"ActivationCache needs the mobillm strategy, not {type(strategy).__name__}")
        if getattr(strategy, "select", "loss") != "loss":
            raise ValueError("ActivationCache needs trainer.strategy.init_args.select: loss (one token per sample)")
        strategy.cache = self

    def hello(self) -> dict[str, Any]:
        """What the server needs to open (or reopen) this run's cache."""
        return {"cache_id": self.cache_id, "memory_limit_mb": float(self.memory_limit_mb)}

    def sample_keys(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """One opaque key per sample: HMAC-SHA256 of its non-pad token ids under the device secret."""
        keys = []
        for ids, mask in zip(input_ids.cpu(), attention_mask.cpu().bool()):
            data = ids[mask].to(torch.int64).numpy().tobytes()
            keys.append(hmac.new(self._secret, data, hashlib.sha256).hexdigest()[:32])
        return keys

    def all_cached(self, keys: list[str]) -> bool:
        return all(k in self.cached for k in keys)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        reply = getattr(trainer.strategy, "last_train_reply", {})
        metrics = {"cache/hits": float(self.hits), "cache/misses": float(self.misses),
                   "cache/size": float(len(self.cached))}
        if "cache_bytes" in reply:
            metrics["cache/bytes"] = float(reply["cache_bytes"])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        # The secret stays in the device's checkpoint: it is what makes keys unlinkable to text.
        return {"cache_id": self.cache_id, "secret": self._secret.hex(), "cached": sorted(self.cached),
                "hits": self.hits, "misses": self.misses, "workdir": self.workdir}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cache_id = state_dict["cache_id"]
        self._secret = bytes.fromhex(state_dict["secret"])
        self.cached = set(state_dict["cached"])
        self.hits = int(state_dict.get("hits", 0))
        self.misses = int(state_dict.get("misses", 0))
        self.workdir = state_dict.get("workdir")
