"""``ActivationCache``: the server keeps the activations of samples it has seen (PAE MobiLLM).

The backbone is frozen, so a sample's activations never go stale. In the first epoch the device
forwards every training sample once and the server stores what it receives under an opaque sample key;
in later epochs the device sends only the keys of a batch and forwards nothing. The keys are keyed
hashes (HMAC-SHA256 with a device secret) of the sample's token ids: they reveal to the server only
that two frames carry the same sample, never the text.
"""

from __future__ import annotations

import secrets
from typing import Any

import lightning as L
import torch

from lightning_mobillm.privacy import keyed_sample_hashes


class ActivationCache(L.Callback):
    """Cache training samples' loss-token activations (and targets) on the server.

    Needs the strategy's ``select: loss`` (one token per sample). The server stores the cache under its
    ``workdir`` (an embedded server: the run's log folder), spills to disk beyond ``memory_limit_mb``
    with a checksum per entry, and flushes its index with every checkpoint, so ``--ckpt_path`` resumes
    with the cache. A cache entry that is lost or corrupt is simply forwarded again by the device.

    The cache belongs to the session that opened it: the server names it with a token of its own making
    (kept in this callback's checkpoint state) that only this device's identity can use to reopen it.

    Args:
        memory_limit_mb: server memory to ask for before older samples spill to disk (the server grants
            at most its own ``cache_memory_mb``).
    """

    def __init__(self, memory_limit_mb: float = 512.0) -> None:
        if memory_limit_mb < 0:
            raise ValueError(f"ActivationCache: memory_limit_mb must be >= 0, got {memory_limit_mb}")
        self.memory_limit_mb = memory_limit_mb
        self.token: str | None = None  # the server's name for this run's cache, from the hello's reply
        self._secret = secrets.token_bytes(32)
        self.cached: set[str] = set()  # keys the server has acknowledged
        self.workdir: str | None = None  # an embedded server's cache folder, kept for resume
        self.hits = 0  # samples trained from the cache (device forward skipped)
        self.misses = 0  # samples the server asked for again
        self._server_bytes: float | None = None  # the server's cache size, from its last training reply

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        use = getattr(trainer.strategy, "use_cache", None)
        if use is None:
            raise TypeError(f"ActivationCache needs the mobillm strategy, not {type(trainer.strategy).__name__}")
        use(self)

    # ---- what the strategy asks and tells ---------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        """What the server needs to open (or reopen) this run's cache."""
        return {"memory_limit_mb": float(self.memory_limit_mb), **({"token": self.token} if self.token else {})}

    def on_hello_reply(self, reply: dict[str, Any]) -> None:
        """The server opened a cache: a new one (another token) holds none of the samples acknowledged before."""
        token = reply.get("cache_token")
        if token != self.token:
            self.cached.clear()
        self.token = token

    def sample_keys(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """One opaque key per sample: a keyed hash of its non-pad token ids under the device secret."""
        return [digest.hex()[:32] for digest in keyed_sample_hashes(self._secret, input_ids, attention_mask)]

    def all_cached(self, keys: list[str]) -> bool:
        return all(k in self.cached for k in keys)

    def remember_workdir(self, workdir: str | None) -> None:
        """Where an embedded server keeps the cache, so that a resumed run reopens it."""
        self.workdir = workdir

    def on_hits(self, keys: list[str]) -> None:
        """A batch trained from the cache: no device forward."""
        self.hits += len(keys)

    def on_missing(self, keys: list[str]) -> None:
        """The server lost these samples (evicted or corrupt): they are forwarded again."""
        self.misses += len(keys)
        self.cached.difference_update(keys)

    def on_server_reply(self, reply: dict[str, Any], keys: list[str] | None) -> None:
        """A training reply: keys the server stored are acknowledged; its cache counters are kept for logging."""
        if reply.get("cached") and keys is not None:
            self.cached.update(keys)
        if "cache_bytes" in reply:
            self._server_bytes = float(reply["cache_bytes"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics = {"cache/hits": float(self.hits), "cache/misses": float(self.misses),
                   "cache/size": float(len(self.cached))}
        if self._server_bytes is not None:
            metrics["cache/bytes"] = self._server_bytes
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        # The secret stays in the device's checkpoint: it is what makes keys unlinkable to text.
        return {"token": self.token, "secret": self._secret.hex(), "cached": sorted(self.cached),
                "hits": self.hits, "misses": self.misses, "workdir": self.workdir}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.token = state_dict.get("token")
        self._secret = bytes.fromhex(state_dict["secret"])
        self.cached = set(state_dict["cached"])
        self.hits = int(state_dict.get("hits", 0))
        self.misses = int(state_dict.get("misses", 0))
        self.workdir = state_dict.get("workdir")
