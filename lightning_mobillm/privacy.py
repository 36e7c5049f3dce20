"""Device-secret target transforms for PAE MobiLLM (label privacy).

In PAE mode the device never sends a label. It computes the backbone's own (zero-shot) prediction
``p_b = softmax(z_b)`` over the verbalizer tokens, forms the prediction difference
``delta = onehot(y) - p_b`` (``[B, K]``), and sends ``T(delta)`` where ``T`` is a transform whose secret
(a 32-byte key) never leaves the device. The server fits the side network's output ``f(acts)``
(``[B, out_dim]``) to the received targets (MSE); the device composes ``argmax(p_b + T.inverse(f(acts)))``.

Transforms (``make_transform(name, num_classes, key=..., **knobs)``):

* ``identity``: ``T(delta) = delta``. Naive: ``argmax(delta) == y`` for every sample (``delta_y = 1 - p_y
  >= 0`` and every other entry is ``-p_j <= 0``), so the label is sent in clear.
* ``rotation``: ``T(delta) = R delta`` with a secret Haar-random orthogonal ``R`` (K x K). Weak: a server
  that knows ``p_b`` (it can recompute it from the last layer's activations with the public final norm
  and LM head) undoes ``R`` by least squares with zero-shot pseudo-labels (measured: 100%).
* ``embed`` (the project's defence, together with not tapping the last blocks): a secret affine
  embedding into ``out_dim > K`` dimensions, ``T(delta) = A delta + b + sigma * n_i``:

  - ``A`` = ``[out_dim, K]`` with orthonormal columns (a random secret K-dim subspace of the output
    space, which also hides the class order) times secret per-dimension scales; ``b`` secret offsets.
  - ``n_i`` optional per-sample Gaussian noise (``sigma`` knob, default 0), drawn from a keyed hash of
    the device's *sample key*, so a sample that is sent twice gets the same noise (the server cannot
    average it away by asking again).

  ``inverse`` is the exact least-squares inverse ``A^+ (out - b)``; the noise is not inverted (it is
  zero-mean and independent of the activations, so the server's model averages it out in training).

Also :func:`randomized_response` (K-ary randomized response on the labels, epsilon-label-DP for the
targets of each sample, applied by the device *before* it forms ``delta``), kept for the trade-off study.

Secrets: every transform is built from ``key`` (bytes). All random quantities are derived from
``HMAC-SHA256(key, purpose)``; nothing secret is in :meth:`TargetTransform.public_config` (what may go
into hparams, logs and frames) or in ``repr``. Without ``key`` a fresh one is drawn with
``secrets.token_bytes``. Keep the key on the device (e.g. with :func:`new_key` and the device's own
keystore); the server needs only ``public_config()["out_dim"]`` to size its side network's head.

What this does not protect (see ``docs/threat-model.md``, measured by ``benchmarks/label_privacy.py``):
the side network the server trains is, by design, a classifier; its outputs cluster by class and a
server with any zero-shot signal can name the clusters. The transform keeps the *targets* from adding
to what the server's own model and the activations already reveal.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EmbedTransform",
    "IdentityTransform",
    "RotationTransform",
    "TargetTransform",
    "TRANSFORMS",
    "compose_prediction",
    "make_transform",
    "new_key",
    "prediction_difference",
    "randomized_response",
    "sample_seeds",
]

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh 32-byte device secret (``secrets.token_bytes``)."""
    return secrets.token_bytes(KEY_BYTES)


def _as_key(key: bytes | str | int | None) -> bytes:
    """Normalise a key. ``int``/``str`` keys are for tests and benchmarks (hashed to 32 bytes)."""
    if key is None:
        return new_key()
    if isinstance(key, bytes):
        if len(key) < 16:
            raise ValueError(f"a key must have at least 16 bytes, got {len(key)}")
        return key
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"key must be bytes, str or int, got {type(key).__name__}")
    return hashlib.sha256(f"lightning_mobillm/privacy-key/{key}".encode()).digest()


def _derive(key: bytes, purpose: str) -> bytes:
    return hmac.new(key, purpose.encode(), hashlib.sha256).digest()


def _generator(key: bytes, purpose: str) -> torch.Generator:
    seed = int.from_bytes(_derive(key, purpose)[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


def sample_seeds(key: bytes, sample_keys: Sequence[int] | Tensor, purpose: str = "noise") -> list[int]:
    """One 63-bit seed per sample: ``HMAC-SHA256(key, purpose | sample_key)``. Deterministic per sample and
    unpredictable without ``key``."""
    if isinstance(sample_keys, Tensor):
        sample_keys = sample_keys.reshape(-1).tolist()
    out = []
    for s in sample_keys:
        msg = s if isinstance(s, bytes) else str(int(s)).encode()
        d = hmac.new(key, purpose.encode() + b"|" + msg, hashlib.sha256).digest()
        out.append(int.from_bytes(d[:8], "little") & ((1 << 63) - 1))
    return out


def _keyed_normal(key: bytes, sample_keys: Sequence[int] | Tensor, dim: int, purpose: str) -> Tensor:
    """``[B, dim]`` standard normal rows, row ``i`` a function of ``(key, sample_keys[i])`` only."""
    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in sample_seeds(key, sample_keys, purpose)]
    return torch.stack(rows) if rows else torch.zeros(0, dim)


def _keyed_uniform(key: bytes, sample_keys: Sequence[int] | Tensor, purpose: str) -> Tensor:
    seeds = sample_seeds(key, sample_keys, purpose)
    return torch.tensor([torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in seeds])


def _haar_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def prediction_difference(labels: Tensor, backbone_logits: Tensor) -> Tensor:
    """``delta = onehot(y) - softmax(z_b)``, ``[B, K]`` float32."""
    probs = torch.softmax(backbone_logits.float(), dim=-1)
    return torch.nn.functional.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype) - probs


def compose_prediction(backbone_logits: Tensor, correction: Tensor) -> Tensor:
    """The device's final class scores ``softmax(z_b) + correction`` (``correction = T.inverse(f(acts))``).

    Composed in probability space, where ``delta`` was defined (adding the correction to the logits is
    much worse: 84% vs 97.8% on BBC News)."""
    return torch.softmax(backbone_logits.float(), dim=-1) + correction.float()


def randomized_response(labels: Tensor, num_classes: int, epsilon: float, key: bytes | str | int,
                        sample_keys: Sequence[int] | Tensor) -> Tensor:
    """K-ary randomized response: keep ``y`` with probability ``e^eps / (e^eps + K - 1)``, else one of the
    other ``K - 1`` classes uniformly. epsilon-label-DP for the target each sample sends. The coin of a
    sample is a keyed hash of its sample key (the same answer if it is sent twice).

    Note: label DP bounds what one sample's target reveals about that sample's label beyond the rest of the
    data; it does not stop a model trained on all samples from predicting labels (the model attack)."""
    key = _as_key(key)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    labels = labels.long().reshape(-1)
    keep = math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)
    u = _keyed_uniform(key, sample_keys, "rr-coin")
    v = _keyed_uniform(key, sample_keys, "rr-class")
    other = (labels + 1 + (v * (num_classes - 1)).long().clamp(max=num_classes - 2)) % num_classes
    return torch.where(u < keep, labels, other)


class TargetTransform:
    """A device-secret map of the prediction difference ``delta`` [B, K] to the sent target [B, out_dim].

    Subclasses define ``name``, ``out_dim`` and implement :meth:`_forward`/:meth:`_inverse` on float64.

    Attributes:
        num_classes: ``K``.
        out_dim: width of the target the server receives (and of the side network's head).
        needs_sample_keys: ``forward`` needs per-sample keys (``sample_keys`` argument).
    """

    name = "base"
    needs_sample_keys = False

    def __init__(self, num_classes: int, key: bytes | str | int | None = None) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self._key = _as_key(key)

    @property
    def out_dim(self) -> int:
        return self.num_classes

    # ------------------------------------------------------------------ public surface
    def forward(self, delta: Tensor, sample_keys: Sequence[int] | Tensor | None = None) -> Tensor:
        """``[B, K]`` prediction differences -> ``[B, out_dim]`` float32 targets to send.

        Args:
            delta: ``onehot(y) - softmax(z_b)`` (see :func:`prediction_difference`).
            sample_keys: ``[B]`` device-side sample keys (ints, or bytes), needed when
                ``needs_sample_keys``; a sample must always get the same key (use the keyed hash of the
                sample that the activation cache uses).
        """
        if delta.dim() != 2 or delta.shape[-1] != self.num_classes:
            raise ValueError(f"delta must be [B, {self.num_classes}], got {tuple(delta.shape)}")
        if self.needs_sample_keys:
            if sample_keys is None:
                raise ValueError(f"the {self.name!r} transform needs sample_keys")
            n = sample_keys.numel() if isinstance(sample_keys, Tensor) else len(sample_keys)
            if n != delta.shape[0]:
                raise ValueError(f"got {n} sample keys for {delta.shape[0]} samples")
        out = self._forward(delta.detach().to("cpu", torch.float64), sample_keys)
        return out.to(device=delta.device, dtype=torch.float32)

    def inverse(self, out: Tensor) -> Tensor:
        """``[B, out_dim]`` (the server's side-network outputs) -> ``[B, K]`` float32 correction."""
        if out.dim() != 2 or out.shape[-1] != self.out_dim:
            raise ValueError(f"out must be [B, {self.out_dim}], got {tuple(out.shape)}")
        res = self._inverse(out.detach().to("cpu", torch.float64))
        return res.to(device=out.device, dtype=torch.float32)

    __call__ = forward

    def public_config(self) -> dict[str, Any]:
        """What may leave the device or go into hparams/logs: no secret."""
        return {"name": self.name, "num_classes": self.num_classes, "out_dim": self.out_dim, **self._public_knobs()}

    def key_fingerprint(self) -> str:
        """A short id of the key (HMAC of a constant; reveals nothing about the key), to check that training
        and inference use the same secret."""
        return _derive(self._key, "fingerprint").hex()[:12]

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.public_config().items() if k != "name")
        return f"{type(self).__name__}({knobs}, key=<secret>)"

    def __getstate__(self):
        raise TypeError(
            "a TargetTransform holds a device secret and is not picklable; persist its key with the device's "
            "keystore and rebuild it with make_transform(**public_config(), key=key)"
        )

    # ------------------------------------------------------------------ to implement
    def _public_knobs(self) -> dict[str, Any]:
        return {}

    def _forward(self, delta: Tensor, sample_keys) -> Tensor:
        raise NotImplementedError

    def _inverse(self, out: Tensor) -> Tensor:
        raise NotImplementedError


class IdentityTransform(TargetTransform):
    """``T(delta) = delta``: no protection (``argmax`` of the target is the label). The naive baseline."""

    name = "identity"

    def _forward(self, delta: Tensor, sample_keys) -> Tensor:
        return delta.clone()

    def _inverse(self, out: Tensor) -> Tensor:
        return out.clone()


class RotationTransform(TargetTransform):
    """``T(delta) = R delta`` with a secret Haar-random orthogonal ``R`` (K x K). Undone by a server that
    recomputes ``p_b`` (see the threat model); kept as the weak baseline."""

    name = "rotation"

    def __init__(self, num_classes: int, key: bytes | str | int | None = None) -> None:
        super().__init__(num_classes, key)
        self._R = _haar_orthogonal(self.num_classes, _generator(self._key, "rotation"))

    def _forward(self, delta: Tensor, sample_keys) -> Tensor:
        return delta @ self._R.T

    def _inverse(self, out: Tensor) -> Tensor:
        return out @ self._R


class EmbedTransform(TargetTransform):
    """Secret affine embedding into ``out_dim`` dimensions, with optional keyed per-sample noise:
    ``T(delta) = A delta + b + sigma * n_i``.

    ``A = diag(s) Q`` where ``Q`` ([out_dim, K]) has orthonormal columns spanning a secret random subspace,
    ``s`` are secret per-dimension scales (log-uniform in ``[1/scale_range, scale_range]``), ``b`` secret
    offsets (``N(0, offset_std^2)``). ``n_i ~ N(0, I)`` is derived from ``HMAC(key, sample_key_i)``.
    The inverse is the least-squares ``(A^T A)^{-1} A^T (out - b)``.

    Args:
        num_classes: ``K``.
        key: the device secret.
        out_dim: target width (>= K; default 16).
        sigma: per-sample noise std in target units (0 = off; then ``sample_keys`` are not needed).
        scale_range: the per-dimension scales are in ``[1/scale_range, scale_range]``.
        offset_std: std of the secret offsets.
    """

    name = "embed"

    def __init__(
        self,
        num_classes: int,
        key: bytes | str | int | None = None,
        out_dim: int = 16,
        sigma: float = 0.0,
        scale_range: float = 2.0,
        offset_std: float = 1.0,
    ) -> None:
        super().__init__(num_classes, key)
        if int(out_dim) < self.num_classes:
            raise ValueError(f"out_dim must be >= num_classes ({self.num_classes}), got {out_dim}")
        if sigma < 0 or scale_range < 1 or offset_std < 0:
            raise ValueError("need sigma >= 0, scale_range >= 1, offset_std >= 0")
        self._out_dim = int(out_dim)
        self.sigma = float(sigma)
        self.scale_range = float(scale_range)
        self.offset_std = float(offset_std)
        gen = _generator(self._key, "embed")
        q = _haar_orthogonal(self._out_dim, gen)[:, : self.num_classes]
        log_s = (torch.rand(self._out_dim, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(self.scale_range)
        self._A = torch.exp(log_s).unsqueeze(1) * q  # [D, K]
        self._b = torch.randn(self._out_dim, generator=gen, dtype=torch.float64) * self.offset_std
        self._pinv = torch.linalg.pinv(self._A)  # [K, D]

    @property
    def out_dim(self) -> int:
        return self._out_dim

    @property
    def needs_sample_keys(self) -> bool:  # type: ignore[override]
        return self.sigma > 0

    def _public_knobs(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "scale_range": self.scale_range, "offset_std": self.offset_std}

    def _forward(self, delta: Tensor, sample_keys) -> Tensor:
        out = delta @ self._A.T + self._b
        if self.sigma > 0:
            out = out + self.sigma * _keyed_normal(self._key, sample_keys, self._out_dim, "embed-noise").double()
        return out

    def _inverse(self, out: Tensor) -> Tensor:
        return (out - self._b) @ self._pinv.T


TRANSFORMS: dict[str, type[TargetTransform]] = {
    "identity": IdentityTransform,
    "rotation": RotationTransform,
    "embed": EmbedTransform,
}


def make_transform(name: str, num_classes: int, key: bytes | str | int | None = None, **knobs: Any) -> TargetTransform:
    """Build a transform by name (``identity``, ``rotation``, ``embed``) from its public knobs and the
    device's secret ``key``. ``out_dim`` of ``identity``/``rotation`` is ``num_classes`` (passing it equal
    to ``num_classes`` is accepted, so ``make_transform(**t.public_config(), key=key)`` round-trips)."""
    try:
        cls = TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown target transform {name!r}; choose one of {sorted(TRANSFORMS)}") from None
    if cls is not EmbedTransform:
        od = knobs.pop("out_dim", num_classes)
        if od != num_classes:
            raise ValueError(f"the {name!r} transform has out_dim = num_classes = {num_classes}, got {od}")
        if knobs:
            raise ValueError(f"unexpected knobs for {name!r}: {sorted(knobs)}")
    return cls(num_classes, key=key, **knobs)
