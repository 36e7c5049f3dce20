"""Device-secret target transforms for PAE MobiLLM (label privacy).

In PAE mode the device never sends a label. It computes the backbone's own (zero-shot) prediction
``p_b = softmax(z_b)`` over the verbalizer tokens, forms the prediction difference
``delta = onehot(y) - p_b`` (``[B, K]``), and sends ``T(delta)`` where ``T`` is a transform whose secret
(a 32-byte key) never leaves the device. The server fits the side network's output ``f(acts)``
(``[B, out_dim]``) to the received targets (MSE); the device composes ``argmax(p_b + T.inverse(f(acts)))``.

Transforms (``make_transform(name, num_classes, key=..., **knobs)``; the defence: ``make_defence(K, key)``):

* ``identity``: ``T(delta) = delta``. Naive: ``argmax(delta) == y`` for every sample (``delta_y = 1 - p_y
  > 0`` and every other entry is ``-p_j < 0``), so the label is sent in clear.
* ``rotation``: ``T(delta) = R delta`` with a secret Haar-random orthogonal ``R`` (K x K). Weak: since
  ``argmax(R^T t) = y`` exactly, a server fits a linear decoder from the targets to zero-shot pseudo-labels
  and iterates (self-training), with or without the last blocks tapped.
* ``embed``: a secret affine embedding into ``out_dim >= K`` dimensions,
  ``T(delta) = A delta' + b + sigma * n_i``:

  - ``A`` = ``[out_dim, K]`` with orthonormal columns (a random secret K-dim subspace of the output
    space, which also hides the class order) times secret per-dimension scales; ``b`` secret offsets.
    Alone this only defeats the naive argmax: any invertible *linear* map of ``delta`` is undone by the
    same self-training decoder.
  - ``rr_epsilon`` (the part that protects): K-ary randomized response on the label inside ``forward``,
    ``delta' = unbiased_onehot(y_rr) - p_b``; the coin of each sample is a keyed hash of its sample key,
    so a resent sample gets the same answer (no averaging). epsilon-label-DP per sample for everything the
    server receives (the activations do not depend on the label; the rest is post-processing).
  - ``sigma``: optional keyed Gaussian noise ``n_i`` (measured: a worse trade-off than randomized response).

  ``inverse`` is the exact least-squares inverse ``A^+ (out - b)`` (randomisation and noise are not
  inverted: they are zero-mean given the activations, so the server's model averages them out).

**The defence** (:data:`DEFENCE_KNOBS`): ``embed`` with ``out_dim=16, rr_epsilon=4``, all blocks tapped
(:data:`DEFAULT_PAE_LAYERS`).

Device-side use (per batch; ``sample_keys`` = the keyed sample hashes the activation cache uses)::

    T = make_defence(num_classes, key=device_key)          # once; key from new_key(), kept on the device
    target = T.forward(prediction_difference(labels, z_b), sample_keys)   # [B, T.out_dim] -> server
    scores = compose_prediction(z_b, T.inverse(side_out))  # side_out: the server's [B, T.out_dim]
    pred = scores.argmax(-1)

Secrets: every transform is built from ``key`` (bytes). All random quantities are derived from
``HMAC-SHA256(key, purpose)``; nothing secret is in :meth:`TargetTransform.public_config` (what may go
into hparams, logs and frames) or in ``repr``. Without ``key`` a fresh one is drawn with
``secrets.token_bytes``. Keep the key on the device (e.g. with :func:`new_key` and the device's own
keystore); the server needs only ``public_config()["out_dim"]`` to size its side network's head.

What this does not protect (see ``docs/threat-model.md``, measured by ``benchmarks/label_privacy.py``):
the activations themselves (on BBC News a server that knows the public backbone labels most of the samples
from them alone, with no target), and the side network the server trains, which is by design a
classifier whose outputs a server can cluster and name with its zero-shot signal. The transform bounds
what the *targets* add beyond that.
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
    "DEFAULT_PAE_LAYERS",
    "DEFENCE_KNOBS",
    "EmbedTransform",
    "IdentityTransform",
    "RotationTransform",
    "TargetTransform",
    "TRANSFORMS",
    "compose_prediction",
    "make_defence",
    "make_transform",
    "new_key",
    "prediction_difference",
    "randomized_response",
    "sample_seeds",
    "unbiased_onehot",
]

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh 32-byte device secret (``secrets.token_bytes``)."""
    return secrets.token_bytes(KEY_BYTES)


def keyed_sample_hashes(key: bytes, input_ids: Tensor, attention_mask: Tensor) -> list[bytes]:
    """One HMAC-SHA256 per sample of its non-pad token ids under ``key``: names a sample (the same text
    gives the same digest in every epoch) without revealing it to anyone without the key. The activation
    cache's sample keys and PAE's per-sample randomness both use it, each under a key of its own."""
    return [hmac.new(key, ids[mask.bool()].to(torch.int64).numpy().tobytes(), hashlib.sha256).digest()
            for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]


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


def sample_seeds(key: bytes, sample_keys: Sequence[int | bytes | str] | Tensor, purpose: str = "noise") -> list[int]:
    """One 63-bit seed per sample: ``HMAC-SHA256(key, purpose | sample_key)``. Deterministic per sample and
    unpredictable without ``key``."""
    if isinstance(sample_keys, Tensor):
        sample_keys = sample_keys.reshape(-1).tolist()
    out = []
    for s in sample_keys:
        if isinstance(s, bytes):
            msg = s
        elif isinstance(s, str):
            msg = s.encode()
        else:
            msg = str(int(s)).encode()
        d = hmac.new(key, purpose.encode() + b"|" + msg, hashlib.sha256).digest()
        out.append(int.from_bytes(d[:8], "little") & ((1 << 63) - 1))
    return out


def _keyed_normal(key: bytes, sample_keys: Sequence[int | bytes | str] | Tensor, dim: int, purpose: str) -> Tensor:
    """``[B, dim]`` standard normal rows, row ``i`` a function of ``(key, sample_keys[i])`` only."""
    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in sample_seeds(key, sample_keys, purpose)]
    return torch.stack(rows) if rows else torch.zeros(0, dim)


def _keyed_uniform(key: bytes, sample_keys: Sequence[int | bytes | str] | Tensor, purpose: str) -> Tensor:
    """``[B]`` float64 in [0, 1), entry ``i`` a function of ``(key, sample_keys[i])`` only."""
    return torch.tensor([s / 2.0**63 for s in sample_seeds(key, sample_keys, purpose)], dtype=torch.float64)


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
    much worse on BBC News)."""
    return torch.softmax(backbone_logits.float(), dim=-1) + correction.float()


def randomized_response(labels: Tensor, num_classes: int, epsilon: float, key: bytes | str | int,
                        sample_keys: Sequence[int | bytes | str] | Tensor) -> Tensor:
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


def unbiased_onehot(noisy_labels: Tensor, num_classes: int, epsilon: float) -> Tensor:
    """The one-hot of randomized-response labels, debiased so that its expectation is ``onehot(y)``:
    ``(onehot(y_rr) - q) / (keep - q)`` with ``q = (1 - keep) / (K - 1)``. Use it in place of ``onehot(y)``
    when forming ``delta`` (the side network then still learns ``onehot(y) - p_b`` on average)."""
    keep = math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)
    q = (1 - keep) / (num_classes - 1)
    onehot = torch.nn.functional.one_hot(noisy_labels.long(), num_classes).float()
    return (onehot - q) / (keep - q)


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
    def forward(self, delta: Tensor, sample_keys: Sequence[int | bytes | str] | Tensor | None = None) -> Tensor:
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
        sigma: per-sample noise std in target units (0 = off).
        scale_range: the per-dimension scales are in ``[1/scale_range, scale_range]``.
        offset_std: std of the secret offsets.
        rr_epsilon: if set, K-ary randomized response on the label inside ``forward`` (epsilon-label-DP per
            sample): ``y = argmax(delta)`` and ``p_b = onehot(y) - delta`` are recovered exactly from ``delta``,
            ``y`` is replaced by its randomized response (a keyed coin per sample key) and ``delta`` by
            ``unbiased_onehot(y_rr) - p_b`` before the embedding. ``delta`` must then be exactly
            ``onehot(y) - softmax(z_b)`` (checked).

    ``sample_keys`` are needed when ``sigma > 0`` or ``rr_epsilon`` is set.
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
        rr_epsilon: float | None = None,
    ) -> None:
        super().__init__(num_classes, key)
        if rr_epsilon is not None and not rr_epsilon > 0:
            raise ValueError(f"rr_epsilon must be > 0 (or None), got {rr_epsilon}")
        self.rr_epsilon = None if rr_epsilon is None else float(rr_epsilon)
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
        return self.sigma > 0 or self.rr_epsilon is not None

    def _public_knobs(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "scale_range": self.scale_range,
            "offset_std": self.offset_std,
            "rr_epsilon": self.rr_epsilon,
        }

    def _forward(self, delta: Tensor, sample_keys) -> Tensor:
        if self.rr_epsilon is not None:
            y = delta.argmax(-1)
            onehot = torch.nn.functional.one_hot(y, self.num_classes).to(delta.dtype)
            probs = onehot - delta
            if not (bool((probs > -1e-4).all()) and torch.allclose(probs.sum(-1), torch.ones_like(probs[:, 0]), atol=1e-3)):
                raise ValueError("with rr_epsilon, delta must be onehot(y) - softmax(z_b) (hard labels)")
            y_rr = randomized_response(y, self.num_classes, self.rr_epsilon, self._key, sample_keys)
            delta = unbiased_onehot(y_rr, self.num_classes, self.rr_epsilon).to(delta.dtype) - probs
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


#: The project's defence (see docs/threat-model.md): the secret affine embedding into 16 dims with keyed
#: randomized response at epsilon = 4 (6.8% of the labels flipped for K = 5), with every block tapped
#: (DEFAULT_PAE_LAYERS). Lower epsilon = less leak, less accuracy (benchmarks/label_privacy.py trade-off).
DEFENCE_KNOBS: dict[str, Any] = {"out_dim": 16, "rr_epsilon": 4.0}
#: Which blocks PAE taps by default: all of them. Not sending the last blocks hides z_b but, measured, buys no
#: label privacy against a server with unlabeled public text (a tuned lens recovers the zero-shot signal from
#: block 23 or even 11) and costs accuracy.
DEFAULT_PAE_LAYERS = "all"


def make_defence(num_classes: int, key: bytes | str | int | None = None, **overrides: Any) -> EmbedTransform:
    """The project's defence: ``make_transform("embed", num_classes, key, **DEFENCE_KNOBS)`` (knobs overridable)."""
    return EmbedTransform(num_classes, key=key, **{**DEFENCE_KNOBS, **overrides})


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
