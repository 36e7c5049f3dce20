"""``EvalTapCache``: the device keeps what its frozen backbone gave for the validation batches.

Validation runs the same batches again and again (five times an epoch in the benchmark presets), and the
backbone never changes, so every validation after the first would forward the same samples to the same
taps. The cache keeps each validation batch's frame tensors (the taps as the codec encoded them) and the
backbone's own outputs the module composes with; a batch seen before is sent to the server without a
forward. Only the side network, on the server, has changed since; the scores are the same as with a fresh
forward (a test checks this).

The cache lives in the device process only (nothing of it is sent), is keyed by a digest of the batch's
tensors together with the codec and token selection, and is bounded in bytes: a batch that would exceed the
bound is forwarded every time, so with every token of a sample evaluated (a few MB a sample: a head pooling
all tokens, or an outlier-aware codec) it simply stays mostly empty.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from lightning_mobillm.backbone import BackboneOutput
from lightning_mobillm.side.causal_lm import tensor_digest


class EvalTapCache:
    """Validation batches' frame tensors and backbone outputs, up to ``limit_mb`` (0 turns it off)."""

    def __init__(self, limit_mb: float) -> None:
        if limit_mb < 0:
            raise ValueError(f"eval_cache_mb must be >= 0, got {limit_mb}")
        self.limit_bytes = int(limit_mb * 2**20)
        self._entries: dict[str, tuple[dict[str, Tensor], BackboneOutput]] = {}
        self.bytes = 0

    @staticmethod
    def key(batch: dict[str, object], *, codec: str, select: str) -> str:
        tensors = [batch[k] for k in sorted(batch) if isinstance(batch[k], Tensor)]
        return f"{codec}/{select}/{sorted(batch)}/{tensor_digest(tensors)}"

    @property
    def enabled(self) -> bool:
        return self.limit_bytes > 0

    def get(self, key: str) -> tuple[dict[str, Tensor], BackboneOutput] | None:
        return self._entries.get(key)

    def put(self, key: str, tensors: dict[str, Tensor], out: BackboneOutput) -> bool:
        """Keep a batch's frame tensors and outputs if they fit under the bound; whether they were kept."""
        if not self.limit_bytes or key in self._entries:
            return False
        kept = replace(out, acts=None, sink=None)  # the taps are in ``tensors``, encoded; nothing else is needed
        held = list(tensors.values())
        held += [t for t in (kept.lengths, kept.logits) if t is not None and not any(t is h for h in held)]
        size = sum(t.nbytes for t in held)
        if self.bytes + size > self.limit_bytes:
            return False
        self._entries[key] = (tensors, kept)
        self.bytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
