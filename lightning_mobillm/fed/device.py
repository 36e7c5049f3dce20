"""Fed MobiLLM's device worker: forward a shard once, upload, never train (issue 10; METHODS.md section 3).

A device holds a frozen backbone tapped at the federation's ``K`` aligned layers
(:func:`~lightning_mobillm.fed.alignment.aligned_backbone_config`) and a shard of labelled samples. It
forwards the shard **once**, in inference mode and in batches, and builds an
:class:`~lightning_mobillm.fed.upload.Upload`:

* ``acts``: the ``K`` aligned hidden states at the loss token of each sample (the shortcut: ``[N, K, d_b]``),
  quantised with a codec as the ``acts.*`` parts of :func:`~lightning_mobillm.protocol.pack_acts`;
* ``targets``: ``T(onehot(y) - softmax(z_b))``, where ``z_b`` are the backbone's zero-shot logits of the
  class names' verbalizer tokens (PAE's prior) and ``T`` the device's target transform
  (:func:`make_target_transform`);
* ``keys``: opaque sample keys, the keyed hash the activation cache uses (HMAC of the token ids under a
  device secret), so the server can tell samples apart without seeing them.

Labels, token ids and texts stay on the device: the upload has no field for them and its ``meta`` holds only
timing and chunk numbers. What the device keeps for itself (labels and zero-shot logits) is a
:class:`LocalRecord`. Evaluation is the device's too (:func:`evaluate_side`): it runs the downloaded side
network (any callable ``acts -> outputs``) on its own activations, inverts its transform and composes with
its zero-shot prediction (:func:`~lightning_mobillm.privacy.compose_prediction`).

Memory stays bounded: the backbone sees ``batch_size`` samples at a time, and :meth:`DeviceWorker.iter_uploads`
holds at most ``max_samples`` samples' activations before it hands an upload over.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_mobillm.backbone import FrozenBackbone
from lightning_mobillm.fed.alignment import AlignmentError, BackboneType, aligned_layers
from lightning_mobillm.fed.upload import Upload
from lightning_mobillm.privacy import (
    TargetTransform,
    compose_prediction,
    keyed_sample_hashes,
    make_defence,
    make_transform,
    new_key,
    prediction_difference,
)
from lightning_mobillm.protocol import pack_acts, unpack_acts
from lightning_mobillm.transport import codecs

__all__ = [
    "TARGET_SPACES",
    "DeviceEvaluation",
    "DeviceRun",
    "DeviceWorker",
    "LocalFeatures",
    "LocalRecord",
    "LocalShard",
    "META_KEYS",
    "device_keys",
    "device_transform",
    "evaluate_side",
    "make_target_transform",
]

log = logging.getLogger(__name__)

#: who can read an upload's targets (see :attr:`Upload.target_space`)
TARGET_SPACES = ("device", "federation", "plain")
#: the only keys an upload's ``meta`` may carry: nothing derived from a sample
META_KEYS = frozenset({"cpu_s", "chunk", "chunks"})


def make_target_transform(target_space: str, num_classes: int, key: bytes | str | int | None = None,
                          **knobs: Any) -> TargetTransform:
    """The target transform of a target space.

    * ``device``: the project's defence (:func:`~lightning_mobillm.privacy.make_defence`) under the device's
      own key: only this device's head on the server fits its targets. With ``key=None`` a fresh key is drawn
      and lost with the transform; pass one from :func:`~lightning_mobillm.privacy.new_key` kept in the
      device's keystore to evaluate after a restart.
    * ``federation``: the same defence under a key every device of the federation shares and the server never
      sees (``key`` required): one shared head.
    * ``plain``: the identity, the paper's residual ``onehot(y) - softmax(z_b)`` (no ``key``, no knobs).

    ``knobs`` override the defence's (e.g. ``rr_epsilon=None``, ``out_dim=8``).
    """
    if target_space == "plain":
        if key is not None or knobs:
            raise ValueError("the plain target space has no key and no knobs (it is the identity)")
        return make_transform("identity", num_classes)
    if target_space == "federation" and key is None:
        raise ValueError("the federation target space needs the key all devices share (never the server's)")
    if target_space not in TARGET_SPACES:
        raise ValueError(f"target_space must be one of {TARGET_SPACES}, got {target_space!r}")
    return make_defence(num_classes, key=key, **knobs)


def device_keys(keystore: Path) -> dict[str, bytes]:
    """A device's ``target_key`` (its transform's key in the ``device`` space) and ``sample_secret`` (its
    sample keys): read from ``<keystore>/device-keys.json``, or drawn once and written there (mode 0600, never
    overwritten). Keep the folder: the device's head on the server fits only this key."""
    path = Path(keystore) / "device-keys.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {name: bytes.fromhex(data[name]) for name in ("target_key", "sample_secret")}
    keys = {"target_key": new_key(), "sample_secret": new_key()}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({name: value.hex() for name, value in keys.items()}, f)
    log.info("new device keys in %s (keep them: the device's head on the server fits only this key)", path)
    return keys


def device_transform(target_space: str, num_classes: int, target_key: bytes, *, out_dim: int,
                     rr_epsilon: float | None, federation_key_env: str = "MOBILLM_FED_KEY") -> TargetTransform:
    """A device's target transform from its settings: the identity for ``plain``; the defence under
    ``target_key`` (from :func:`device_keys`) for ``device``; under the shared hex key in
    ``$federation_key_env`` for ``federation`` (never a config value)."""
    if target_space == "plain":
        return make_target_transform("plain", num_classes)
    if target_space == "federation":
        hexkey = os.environ.get(federation_key_env)
        if not hexkey:
            raise ValueError(f"the federation target space needs the shared key in ${federation_key_env} (hex)")
        target_key = bytes.fromhex(hexkey.strip())
    return make_target_transform(target_space, num_classes, target_key, out_dim=out_dim, rr_epsilon=rr_epsilon)


# ---------------------------------------------------------------------------------------------- local data
@dataclass
class LocalShard:
    """A device's samples: unpadded prompt token ids and class indices. Never leaves the device.

    Build it from the data module's tokenized split (:meth:`from_split`, optionally a partition's indices),
    from texts with the prompt template (:meth:`from_texts`) or from padded tensors (:meth:`from_tensors`).
    """

    input_ids: list[list[int]] = field(repr=False)
    labels: list[int] = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} samples but {len(self.labels)} labels")
        self.input_ids = [[int(t) for t in ids] for ids in self.input_ids]
        self.labels = [int(y) for y in self.labels]
        if any(not ids for ids in self.input_ids):
            raise ValueError("every sample needs at least one token")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"LocalShard({len(self)} samples)"

    def slice(self, start: int, stop: int) -> LocalShard:
        return LocalShard(self.input_ids[start:stop], self.labels[start:stop])

    @classmethod
    def from_split(cls, split: Any, indices: Sequence[int] | None = None) -> LocalShard:
        """From a :class:`~lightning_mobillm.data.TokenizedSplit` (anything with ``input_ids`` and ``labels``
        lists), all of it or the samples at ``indices`` (a device's partition), in that order."""
        idx = range(len(split.labels)) if indices is None else [int(i) for i in indices]
        return cls([split.input_ids[i] for i in idx], [split.labels[i] for i in idx])

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Sequence[str], labels: Sequence[int | str],
                   prompt: str = "Article: {text}\nTopic:", max_length: int = 128,
                   class_names: Sequence[str] | None = None) -> LocalShard:
        """Tokenize texts the way the data module does (:func:`~lightning_mobillm.data.encode_prompts`: the
        prompt template, only the text truncated). String labels are looked up in ``class_names``."""
        from lightning_mobillm.data.text_classification import encode_prompts  # imports Lightning: lazily

        if any(isinstance(y, str) for y in labels):
            if class_names is None:
                raise ValueError("string labels need class_names")
            index = {name: i for i, name in enumerate(class_names)}
            unknown = sorted({str(y) for y in labels if isinstance(y, str) and y not in index})
            if unknown:
                raise ValueError(f"labels {unknown} are not among the class names {list(class_names)}")
            labels = [index[y] if isinstance(y, str) else int(y) for y in labels]
        return cls(encode_prompts(tokenizer, list(texts), prompt, max_length), list(labels))  # type: ignore[arg-type]

    @classmethod
    def from_tensors(cls, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | Sequence[int]) -> LocalShard:
        """From padded ``[N, T]`` token ids and attention mask (either padding side) and ``[N]`` labels."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [N, T]; got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        mask = attention_mask.bool().cpu()
        ids = [row[m].tolist() for row, m in zip(input_ids.cpu(), mask)]
        return cls(ids, torch.as_tensor(labels).reshape(-1).tolist())


@dataclass
class LocalRecord:
    """What a device keeps of what it uploaded, for itself: per sample (in upload order) its key, label and
    the backbone's zero-shot logits. Never sent."""

    keys: list[str]
    labels: Tensor = field(repr=False)
    backbone_logits: Tensor = field(repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def zero_shot_accuracy(self) -> float:
        """Accuracy of the backbone's own prediction ``argmax(z_b)`` on these samples (nan when empty)."""
        if not len(self):
            return float("nan")
        return float((self.backbone_logits.argmax(-1) == self.labels).float().mean())

    @classmethod
    def concat(cls, records: Sequence[LocalRecord], num_classes: int) -> LocalRecord:
        if not records:
            return cls([], torch.zeros(0, dtype=torch.int64), torch.zeros(0, num_classes))
        return cls([k for r in records for k in r.keys], torch.cat([r.labels for r in records]),
                   torch.cat([r.backbone_logits for r in records]))


@dataclass
class LocalFeatures:
    """A shard forwarded for local use (evaluation): ``acts`` ``[N, K, d_b]`` in the backbone's dtype, the
    zero-shot logits ``[N, C]`` and the labels ``[N]``, in shard order."""

    acts: Tensor = field(repr=False)
    backbone_logits: Tensor = field(repr=False)
    labels: Tensor = field(repr=False)
    busy_s: float = 0.0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DeviceRun:
    """One device's whole upload: the uploads (one per chunk), what it kept locally, and its busy time.

    ``busy_s`` is wall time (``time.perf_counter``) spent forwarding, forming targets, hashing and
    quantising; ``cpu_s`` the process's CPU time over the same spans (all threads: about ``busy_s`` times the
    intra-op threads used; meaningful when nothing else runs in the process).
    """

    uploads: list[Upload]
    local: LocalRecord
    busy_s: float
    cpu_s: float

    def __len__(self) -> int:
        return len(self.local)

    @property
    def zero_shot_accuracy(self) -> float:
        return self.local.zero_shot_accuracy


@dataclass
class DeviceEvaluation:
    """The device's own evaluation of a downloaded side network: accuracy of the composed prediction, the
    zero-shot accuracy of its backbone on the same samples, and the predictions (kept locally)."""

    accuracy: float
    zero_shot_accuracy: float
    num_samples: int
    predictions: Tensor = field(repr=False)
    busy_s: float = 0.0


# ---------------------------------------------------------------------------------------------- the worker
class DeviceWorker:
    """A Fed MobiLLM device: forwards its shard once and uploads; it never trains.

    Args:
        backbone: a decoder :class:`FrozenBackbone` tapping the federation's aligned layers (built from
            :func:`~lightning_mobillm.fed.alignment.aligned_backbone_config`); checked against ``k``.
        class_names: the classes, in label order; their verbalizer tokens give the zero-shot logits ``z_b``.
        transform: the device's target transform (:func:`make_target_transform` of ``target_space``).
        device: the device's id (goes into every upload).
        target_space: ``device``, ``federation`` or ``plain``; ``plain`` needs the identity transform and the
            other two a non-identity one.
        codec: the activations' codec (:data:`~lightning_mobillm.transport.codecs.CODECS`), int8 by default.
        outlier_channels: channels per tap kept in fp16 by ``int8o``/``int4o``.
        batch_size: samples per backbone forward (bounds the device's activation memory).
        k: the federation's K (default: the backbone's number of taps, which must then be aligned layers).
        backbone_type: the type key uploads carry (default: :meth:`BackboneType.of` the backbone).
        secret: the device's secret for sample keys (>= 16 bytes; a fresh one when None). Keep it to get the
            same keys after a restart.
        verbalizers: one word per class whose first token scores it (default: the class names; the data
            module's ``verbalizer_words``).
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        class_names: Sequence[str],
        transform: TargetTransform,
        *,
        device: str,
        target_space: str = "device",
        codec: str = "int8",
        outlier_channels: int = 8,
        batch_size: int = 8,
        k: int | None = None,
        backbone_type: str | None = None,
        secret: bytes | None = None,
        verbalizers: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty string, got {device!r}")
        if target_space not in TARGET_SPACES:
            raise ValueError(f"target_space must be one of {TARGET_SPACES}, got {target_space!r}")
        if (target_space == "plain") != (transform.name == "identity"):
            raise ValueError(f"target space {target_space!r} does not go with the {transform.name!r} transform "
                             f"(plain is the identity; device and federation need a keyed transform)")
        if transform.num_classes != len(class_names):
            raise ValueError(f"the transform has {transform.num_classes} classes, class_names {len(class_names)}")
        if verbalizers is not None and len(verbalizers) != len(class_names):
            raise ValueError(f"verbalizers has {len(verbalizers)} words for {len(class_names)} classes")
        if codec not in codecs.CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {list(codecs.CODECS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not backbone.is_decoder:
            raise ValueError("the device worker needs a decoder backbone: the zero-shot prior is its LM head's")
        k = backbone.num_taps if k is None else k
        expected = aligned_layers(backbone.num_blocks, k, name=backbone.config.source)
        if list(backbone.layers) != expected:
            raise AlignmentError(f"the backbone taps layers {list(backbone.layers)}, not the K = {k} aligned "
                                 f"layers {expected} of its {backbone.num_blocks}: build it from "
                                 f"aligned_backbone_config(config, {k})")
        if secret is None:
            secret = new_key()
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        self.backbone = backbone
        self.class_names = list(class_names)
        self.transform = transform
        self.device = device
        self.target_space = target_space
        self.codec = codec
        self.outlier_channels = outlier_channels
        #: samples of the last shard given to :meth:`iter_uploads` that repeated an earlier one (sent once)
        self.duplicates_dropped = 0
        self.batch_size = batch_size
        self.k = k
        self.backbone_type = backbone_type or BackboneType.of(backbone).key
        self.label_token_ids = backbone.verbalizer_token_ids(list(verbalizers or self.class_names))
        # two keys of their own: the upload's sample keys, and the transform's per-sample randomness
        self._key_mac = hmac.new(secret, b"fed-upload-key", hashlib.sha256).digest()
        self._target_mac = hmac.new(secret, b"fed-target-sample-key", hashlib.sha256).digest()
        self._pad_id = backbone.tokenizer.pad_token_id or 0

    def __repr__(self) -> str:
        return (f"DeviceWorker(device={self.device!r}, backbone_type={self.backbone_type!r}, k={self.k}, "
                f"target_space={self.target_space!r}, codec={self.codec!r}, batch_size={self.batch_size})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ uploads
    def upload(self, shard: LocalShard, max_samples: int | None = None) -> DeviceRun:
        """Forward ``shard`` once and return its uploads (one, or one per ``max_samples`` samples; none for an
        empty shard) with what the device keeps locally."""
        uploads, records = [], []
        for up, record in self.iter_uploads(shard, max_samples):
            uploads.append(up)
            records.append(record)
        return DeviceRun(uploads, LocalRecord.concat(records, self.num_classes),
                         busy_s=sum(u.device_compute_s for u in uploads),
                         cpu_s=sum(u.meta["cpu_s"] for u in uploads))

    def iter_uploads(self, shard: LocalShard, max_samples: int | None = None) -> Iterator[tuple[Upload, LocalRecord]]:
        """Forward ``shard`` in chunks of at most ``max_samples`` samples (all at once when None), yielding each
        chunk's :class:`Upload` and :class:`LocalRecord` as soon as it is built: at most one chunk's
        activations are held. Each upload's ``device_compute_s`` is the busy time of its own chunk.

        A sample whose tokens repeat an earlier one of ``shard`` (real corpora hold duplicates: BBC News has
        about a hundred) has the same key and is the same sample: it is forwarded and uploaded once, and the
        repeats are counted in ``duplicates_dropped`` (the server refuses an upload that repeats a key)."""
        self._check_labels(shard.labels)
        first: dict[str, int] = {}
        for i, key in enumerate(self.sample_keys(shard)):
            first.setdefault(key, i)
        self.duplicates_dropped = len(shard) - len(first)
        if self.duplicates_dropped:
            keep = sorted(first.values())
            shard = LocalShard([shard.input_ids[i] for i in keep], [shard.labels[i] for i in keep])
        n = len(shard)
        if max_samples is None:
            max_samples = max(n, 1)
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
        chunks = -(-n // max_samples)
        for chunk, start in enumerate(range(0, n, max_samples)):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            part = shard.slice(start, start + max_samples)
            acts, logits, keys, target_keys = self._forward(part, with_keys=True)
            labels = torch.tensor(part.labels, dtype=torch.int64)
            delta = prediction_difference(labels, logits)
            sample_keys = target_keys if self.transform.needs_sample_keys else None
            targets = self.transform.forward(delta, sample_keys).float().contiguous()
            lengths = torch.ones(acts.shape[0], dtype=torch.int64)
            packed = pack_acts(acts, lengths, self.codec, outlier_channels=self.outlier_channels)
            parts = {name: t for name, t in packed.items() if name.startswith("acts.")}
            del acts, packed
            busy, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            upload = Upload(device=self.device, backbone_type=self.backbone_type, keys=keys, acts=parts,
                            codec=self.codec, targets=targets, target_space=self.target_space,
                            device_compute_s=busy, meta={"cpu_s": cpu, "chunk": chunk, "chunks": chunks})
            yield upload, LocalRecord(list(keys), labels, logits)

    def sample_keys(self, shard: LocalShard) -> list[str]:
        """The opaque key each sample of ``shard`` gets in an upload (no forward): a keyed hash of its token
        ids, the same for the same tokens in any shard, batch or padding. Two samples with the same tokens
        (a duplicated document) get the same key: to the server they are one sample."""
        return [self._hex_key(ids) for ids in shard.input_ids]

    # ------------------------------------------------------------------ evaluation
    def features(self, shard: LocalShard) -> LocalFeatures:
        """Forward ``shard`` for local use (no targets, no quantising): aligned taps, zero-shot logits, labels."""
        self._check_labels(shard.labels)
        wall0 = time.perf_counter()
        acts, logits, _, _ = self._forward(shard, with_keys=False)
        return LocalFeatures(acts, logits, torch.tensor(shard.labels, dtype=torch.int64),
                             busy_s=time.perf_counter() - wall0)

    def evaluate(self, side: Callable[[Tensor], Tensor], data: LocalShard | LocalFeatures,
                 batch_size: int = 64, codec: str | None = None) -> DeviceEvaluation:
        """:func:`evaluate_side` on this device's samples with its own transform (``data`` is forwarded first
        when it is a shard)."""
        feats = data if isinstance(data, LocalFeatures) else self.features(data)
        return evaluate_side(side, feats.acts, feats.backbone_logits, feats.labels, self.transform,
                             batch_size=batch_size, codec=codec, outlier_channels=self.outlier_channels)

    # ------------------------------------------------------------------ internals
    def _check_labels(self, labels: Sequence[int]) -> None:
        bad = sorted({y for y in labels if not 0 <= y < self.num_classes})
        if bad:
            raise ValueError(f"labels {bad[:5]} are outside 0..{self.num_classes - 1} ({self.num_classes} classes)")

    def _hex_key(self, ids: Sequence[int]) -> str:
        t = torch.tensor([list(ids)], dtype=torch.int64)
        return keyed_sample_hashes(self._key_mac, t, torch.ones_like(t))[0].hex()[:32]

    def _forward(self, shard: LocalShard, with_keys: bool) -> tuple[Tensor, Tensor, list[str], list[bytes]]:
        """Aligned loss-token taps ``[n, K, d]`` (backbone dtype) and zero-shot logits ``[n, C]`` of every
        sample, in shard order; with ``with_keys`` also the upload keys and the transform's sample keys.

        Samples are batched in order of length (each batch is trimmed to its longest sample), then put back."""
        n, bb = len(shard), self.backbone
        acts = torch.empty(n, bb.num_taps, bb.hidden_size, dtype=bb.dtype)
        logits = torch.empty(n, self.num_classes, dtype=torch.float32)
        keys: list[str] = [""] * n if with_keys else []
        target_keys: list[bytes] = [b""] * n if with_keys else []
        order = sorted(range(n), key=lambda i: len(shard.input_ids[i]))
        for b in range(0, n, self.batch_size):
            idx = order[b : b + self.batch_size]
            width = max(len(shard.input_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), self._pad_id, dtype=torch.int64)
            mask = torch.zeros((len(idx), width), dtype=torch.int64)
            for row, i in enumerate(idx):
                ids[row, : len(shard.input_ids[i])] = torch.tensor(shard.input_ids[i], dtype=torch.int64)
                mask[row, : len(shard.input_ids[i])] = 1
            out = bb.forward(ids, mask, select="loss", label_token_ids=self.label_token_ids)
            where = torch.tensor(idx, dtype=torch.int64)
            acts.index_copy_(0, where, out.acts.to("cpu"))
            logits.index_copy_(0, where, out.logits.to("cpu", torch.float32))
            if with_keys:
                for row, (k, t) in enumerate(zip(keyed_sample_hashes(self._key_mac, ids, mask),
                                                 keyed_sample_hashes(self._target_mac, ids, mask))):
                    keys[idx[row]], target_keys[idx[row]] = k.hex()[:32], t
            del out
        return acts, logits, keys, target_keys


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_side(
    side: Callable[[Tensor], Tensor],
    acts: Tensor,
    backbone_logits: Tensor,
    labels: Tensor,
    transform: TargetTransform,
    batch_size: int = 64,
    codec: str | None = None,
    outlier_channels: int = 8,
) -> DeviceEvaluation:
    """The device's accuracy with a downloaded side network, computed on the device.

    ``side`` maps aligned taps ``[n, K, d_b]`` (float32) to outputs ``[n, out_dim]`` in the device's target
    space, e.g. the shared trunk after this backbone type's projection, ending in this device's head (put a
    module in eval mode first). The prediction is ``argmax(softmax(z_b) + T^-1(side(acts)))``
    (:func:`~lightning_mobillm.privacy.compose_prediction`). With ``codec`` the taps go through that codec
    first, so the side network sees what the server trained on. Labels and logits never leave the device.
    """
    n = int(labels.shape[0])
    if acts.ndim != 3 or acts.shape[0] != n or backbone_logits.shape != (n, transform.num_classes):
        raise ValueError(f"need acts [N, K, d], logits [N, {transform.num_classes}] and labels [N]; got "
                         f"{tuple(acts.shape)}, {tuple(backbone_logits.shape)} and {tuple(labels.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    wall0 = time.perf_counter()
    preds = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, batch_size):
        x = acts[start : start + batch_size]
        if codec is not None:
            lengths = torch.ones(x.shape[0], dtype=torch.int64)
            x = unpack_acts(pack_acts(x, lengths, codec, outlier_channels=outlier_channels), codec)[0]
        out = side(x.float())
        if not isinstance(out, Tensor) or tuple(out.shape) != (x.shape[0], transform.out_dim):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the side network must return [n, {transform.out_dim}], got {got}")
        correction = transform.inverse(out.float().cpu())
        preds[start : start + x.shape[0]] = compose_prediction(backbone_logits[start : start + batch_size],
                                                               correction).argmax(-1)
    labels = labels.long().cpu()
    zero_shot = (backbone_logits.argmax(-1).cpu() == labels).float().mean() if n else torch.tensor(float("nan"))
    accuracy = (preds == labels).float().mean() if n else torch.tensor(float("nan"))
    return DeviceEvaluation(float(accuracy), float(zero_shot), n, preds, busy_s=time.perf_counter() - wall0)
