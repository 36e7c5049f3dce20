"""The shared-model trainer of Fed MobiLLM: the transport-free core a server policy wraps (issue 10).

:class:`FedTrainer` holds one :class:`~lightning_mobillm.fed.model.FedSideModule` in a training engine, an
in-memory cache of every accepted upload, and per-device and per-type statistics:

* :meth:`FedTrainer.accept` validates an upload (allow-listed backbone type, K and width of that type, target
  width, a codec that decodes to finite values, well-formed sample keys the device has not uploaded before,
  the device's quota) and refuses it with a ValueError naming the problem, changing nothing; an accepted
  upload is decoded once into the cache, and a new type or device gets its projection or head, added to the
  running optimizer as new parameter groups.
* :meth:`FedTrainer.train_on`: optimizer steps on one arrival, mini-batched in the upload's order.
* :meth:`FedTrainer.replay_step`: one shuffled mini-batch of the whole cache, without replacement per epoch.
* :meth:`FedTrainer.train_round`: the synchronous variant, a round's uploads pooled in a fixed order.
* :func:`simulate_async`: the asynchronous federation on :func:`~lightning_mobillm.fed.clock.run_async`'s
  virtual clock, with the caller's evaluation callback giving the accuracy/loss curve on virtual time.

**The engine.** The shared model trains through :class:`~lightning_mobillm.engine.TrainingEngine` (the
engine every server role uses: Lightning Fabric, all-or-nothing steps with an undo of a failed optimizer step,
untrusted states checked before they load), from ``engine_factory(module)``; the default sets it up on one CPU
device, a server passes its own Fabric. New projections and heads join the running optimizer as parameter
groups, which is why the asynchronous phase stays in one process (``../shared/FED.md``).

**Memory.** The cache holds every accepted sample decoded to float32: ``K * d_b * 4`` bytes of activations plus
``out_dim * 4`` of targets and its key, per sample (SmolLM2-135M at K = 18: 41 KB a sample, 66 MB for BBC
News' 1602 training samples), plus a few Python ints of index per sample. Decoding once trades 4x the int8
upload's bytes for no decoding on each replay step; the server's disk-backed activation store is the place
for caches that outgrow memory.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from lightning.fabric import Fabric
from torch import Tensor

from lightning_mobillm.engine import TrainingEngine
from lightning_mobillm.fed import clock as _clock
from lightning_mobillm.fed.alignment import AlignmentError, BackboneType, aligned_layers
from lightning_mobillm.fed.model import (
    DOWNLOAD_DTYPES,
    FedBatch,
    FedDownload,
    FedPart,
    FedSideModule,
    check_device_id,
)
from lightning_mobillm.fed.upload import Upload

__all__ = ["FedTrainer", "SimulationResult", "StepEngine", "UploadRefused", "simulate_async"]

_SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_STATE_FORMAT = 1


class UploadRefused(ValueError):
    """An upload the trainer will not take (the message names the device and the problem); nothing changed."""


class StepEngine(Protocol):
    """What :class:`FedTrainer` needs of a training engine (:class:`~lightning_mobillm.engine.TrainingEngine`)."""

    model: Any
    optimizer: Any
    step: int

    def train_step(self, compute_loss: Callable[[], tuple[Tensor, Tensor]]) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------- the cache
@dataclass
class _Chunk:
    """One accepted upload, decoded."""

    device: str
    backbone_type: str
    keys: list[str]
    acts: Tensor  # [n, K, d_b] float32
    targets: Tensor  # [n, out_dim] float32


def _new_device_stats(backbone_type: str) -> dict[str, Any]:
    return {"backbone_type": backbone_type, "uploads": 0, "samples": 0, "steps": 0, "sample_steps": 0}


def _new_type_stats() -> dict[str, Any]:
    return {"devices": 0, "uploads": 0, "samples": 0, "steps": 0, "sample_steps": 0}


_COUNTS = ("steps", "arrival_steps", "replay_steps", "round_steps", "replay_epochs")


# ---------------------------------------------------------------------------------------------- the trainer
class FedTrainer:
    """One shared side network trained from many devices' uploads (see the module docstring).

    Args:
        module: the shared model.
        engine_factory: ``engine_factory(module) -> engine`` (:class:`StepEngine`); default a
            :class:`~lightning_mobillm.engine.TrainingEngine` on one CPU device with ``grad_clip``. Called again for the module :meth:`load_state_dict` rebuilds.
        batch_size: samples per optimizer step (arrival, replay and round steps alike).
        arrival_epochs: passes over an arrival's samples in :meth:`train_on`.
        allowed_types: the backbone types (keys) whose uploads are taken; ``None`` = every well-formed type.
        max_samples_per_device: a device's quota of samples over all its uploads (``None``: no quota): how much
            one device can weigh in the shared model.
        seed: seeds the replay order (:meth:`replay_step` without ``rng``).
        grad_clip: the default engine's gradient clipping.
        download_dtype: the dtype of what devices download (:meth:`download`): ``float16`` (default) halves
            the downlink of ``float32``; the device computes in fp32 either way.
    """

    def __init__(
        self,
        module: FedSideModule,
        *,
        engine_factory: Callable[[FedSideModule], StepEngine] | None = None,
        batch_size: int = 32,
        arrival_epochs: int = 1,
        allowed_types: Collection[str] | None = None,
        max_samples_per_device: int | None = None,
        seed: int = 0,
        grad_clip: float | None = 1.0,
        download_dtype: str = "float16",
    ) -> None:
        if download_dtype not in DOWNLOAD_DTYPES:
            raise ValueError(f"download_dtype must be one of {sorted(DOWNLOAD_DTYPES)}, got {download_dtype!r}")
        self.download_dtype = download_dtype
        for name, value, low in (("batch_size", batch_size, 1), ("arrival_epochs", arrival_epochs, 1),
                                 ("max_samples_per_device", max_samples_per_device, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.batch_size = batch_size
        self.arrival_epochs = arrival_epochs
        self.allowed_types = None if allowed_types is None else frozenset(allowed_types)
        self.max_samples_per_device = max_samples_per_device
        self.engine_factory = engine_factory or (lambda m: TrainingEngine.for_module(
            Fabric(accelerator="cpu", devices=1), m, grad_clip=grad_clip))
        self._install(module, self._make_engine(module))
        self._chunks: list[_Chunk] = []
        self._refs: list[tuple[int, int]] = []  # flat sample index -> (chunk, row)
        self._index: dict[tuple[str, str], int] = {}  # (device, sample key) -> flat sample index
        self._devices: dict[str, dict[str, Any]] = {}
        self._types: dict[str, dict[str, Any]] = {}
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._perm: list[int] = []  # this replay epoch's order of flat indices
        #: a list to record the flat indices every optimizer step trains on (:meth:`sample_ids` names them);
        #: ``None`` (default): not recorded
        self.trained_rows: list[int] | None = None
        self._pos = 0
        self.generator = torch.Generator().manual_seed(int(seed))

    def _make_engine(self, module: FedSideModule) -> StepEngine:
        engine = self.engine_factory(module)
        mark = getattr(engine.model, "mark_forward_method", None)
        if mark is not None:  # compute_loss goes through Fabric's wrapper as forward does (precision, strategy)
            mark("compute_loss")
        return engine

    def _install(self, module: FedSideModule, engine: StepEngine) -> None:
        self.module, self.engine = module, engine

    # ---- accepting uploads -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples in the cache."""
        return len(self._refs)

    def accept(self, upload: Upload) -> int:
        """Validate ``upload`` and cache it decoded (a new type's projection and a new device's head join the
        optimizer). Returns the number of samples taken. Raises :class:`UploadRefused` (a ValueError naming the
        device and the problem) and changes nothing when the upload does not fit."""
        module = self.module
        device = upload.device
        try:
            check_device_id(device)
        except ValueError as err:
            raise UploadRefused(f"upload refused: {err}") from None

        def refuse(problem: str) -> UploadRefused:
            return UploadRefused(f"upload of device {device!r} refused: {problem}")

        if upload.target_space != module.target_space:
            raise refuse(f"target space {upload.target_space!r}, but this federation trains {module.target_space!r}")
        key = upload.backbone_type
        if self.allowed_types is not None and key not in self.allowed_types:
            raise refuse(f"backbone type {key!r} is not in the allow-list {sorted(self.allowed_types)}")
        try:
            backbone = BackboneType.from_key(key)
            aligned_layers(backbone.num_layers, module.k, name=key)
        except AlignmentError as err:
            raise refuse(str(err)) from None
        width = module.types.get(key, backbone.hidden_size)
        known = self._devices.get(device)
        if known is not None and known["backbone_type"] != key:
            raise refuse(f"it uploaded with backbone type {known['backbone_type']!r} before, now {key!r}")
        keys = upload.keys
        n = len(keys) if isinstance(keys, list) else 0
        if n < 1:
            raise refuse("sample keys must be a non-empty list")
        bad = next((k for k in keys if not isinstance(k, str) or not _SAMPLE_KEY.fullmatch(k)), None)
        if bad is not None:
            raise refuse(f"sample key {bad!r} is not of the form {_SAMPLE_KEY.pattern}")
        if len(set(keys)) != n:
            raise refuse("the upload repeats a sample key")
        again = next((k for k in keys if (device, k) in self._index), None)
        if again is not None:
            raise refuse(f"sample {again!r} was uploaded before")
        have = known["samples"] if known is not None else 0
        if self.max_samples_per_device is not None and have + n > self.max_samples_per_device:
            raise refuse(f"{have} + {n} samples exceed its quota of {self.max_samples_per_device}")
        targets = upload.targets
        if (not isinstance(targets, Tensor) or not targets.is_floating_point()
                or tuple(targets.shape) != (n, module.out_dim)):
            got = f"{list(targets.shape)} {targets.dtype}" if isinstance(targets, Tensor) else type(targets).__name__
            raise refuse(f"targets must be floating [{n}, {module.out_dim}], got {got}")
        if not bool(torch.isfinite(targets).all()):
            raise refuse("targets hold non-finite values")
        parts = upload.acts
        if not isinstance(parts, Mapping) or any(
                not isinstance(t, Tensor) or t.numel() > n * module.k * width for t in parts.values()):
            raise refuse(f"activation parts must be tensors no larger than [{n}, {module.k}, {width}] "
                         f"(checked before decoding)")
        try:
            acts = upload.decoded()
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise refuse(f"activations do not decode with codec {upload.codec!r}: {str(err)[:200]}") from None
        if tuple(acts.shape) != (n, module.k, width):
            raise refuse(f"activations must be [{n}, {module.k}, {width}] (K = {module.k} aligned taps of "
                         f"{key!r}), got {list(acts.shape)}")
        if not bool(torch.isfinite(acts).all()):
            raise refuse("activations decode to non-finite values")
        # ---- nothing above changed anything; from here on the upload is taken
        optimizer = self.engine.optimizer
        module.add_type(key, width, optimizer)
        module.add_device(device, optimizer)
        chunk = len(self._chunks)
        self._chunks.append(_Chunk(device, key, list(keys), acts.float().contiguous(),
                                   targets.detach().float().cpu().contiguous()))
        for row, k in enumerate(keys):
            self._index[(device, k)] = len(self._refs)
            self._refs.append((chunk, row))
        stats = self._devices.setdefault(device, _new_device_stats(key))
        if key not in self._types:
            self._types[key] = _new_type_stats()
        self._types[key]["devices"] += known is None
        for s in (stats, self._types[key]):
            s["uploads"] += 1
            s["samples"] += n
        return n

    def rows_of(self, upload: Upload) -> list[int]:
        """The cache's flat indices of an accepted upload's samples, in its order (ValueError if not accepted)."""
        try:
            return [self._index[(upload.device, k)] for k in upload.keys]
        except (KeyError, TypeError):
            raise ValueError(f"the upload of device {upload.device!r} was not accepted (accept it first)") from None

    # ---- training ----------------------------------------------------------------------------------
    def batch(self, rows: Sequence[int]) -> FedBatch:
        """The mini-batch of cached samples ``rows``: one part per backbone type, in order of first appearance,
        samples in ``rows`` order within a part."""
        by_type: dict[str, list[tuple[int, int]]] = {}
        for i in rows:
            c, r = self._refs[i]
            by_type.setdefault(self._chunks[c].backbone_type, []).append((c, r))
        device = self.module.trunk.gate_alpha.device
        parts = []
        for key, refs in by_type.items():
            acts = torch.stack([self._chunks[c].acts[r] for c, r in refs]).to(device)
            targets = torch.stack([self._chunks[c].targets[r] for c, r in refs]).to(device)
            parts.append(FedPart(key, acts, tuple(self._chunks[c].device for c, _ in refs), targets))
        return FedBatch(parts)

    def sample_ids(self, rows: Sequence[int]) -> list[tuple[str, str]]:
        """``(device, sample key)`` of the cache's flat indices ``rows`` (what a step trained on)."""
        return [(self._chunks[c].device, self._chunks[c].keys[r]) for c, r in (self._refs[i] for i in rows)]

    def _step(self, rows: Sequence[int], kind: str) -> float:
        if self.trained_rows is not None:
            self.trained_rows.extend(rows)
        batch = self.batch(rows)
        engine = self.engine
        result = engine.train_step(lambda: engine.model.compute_loss(batch))
        self._counts["steps"] += 1
        self._counts[f"{kind}_steps"] += 1
        per_device: dict[str, int] = {}
        for part in batch.parts:
            for device in part.devices:
                per_device[device] = per_device.get(device, 0) + 1
        per_type: dict[str, int] = {}
        for device, n in per_device.items():
            stats = self._devices[device]
            stats["steps"] += 1
            stats["sample_steps"] += n
            per_type[stats["backbone_type"]] = per_type.get(stats["backbone_type"], 0) + n
        for key, n in per_type.items():
            self._types[key]["steps"] += 1
            self._types[key]["sample_steps"] += n
        return float(result.loss)

    def _chunked(self, rows: Sequence[int]) -> list[list[int]]:
        return [list(rows[i:i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]

    def train_on(self, upload: Upload) -> list[float]:
        """Optimizer steps on an accepted arrival: ``arrival_epochs`` passes over its samples in their order,
        ``batch_size`` at a time (the last batch of a pass may be smaller). Returns the steps' losses."""
        rows = self.rows_of(upload)
        return [self._step(b, "arrival") for _ in range(self.arrival_epochs) for b in self._chunked(rows)]

    def replay_step(self, rng: torch.Generator | None = None) -> float | None:
        """One mini-batch of the cache: an epoch is a shuffled order of the samples cached when it began
        (drawn with ``rng``, default the trainer's seeded generator), each visited once, ``batch_size`` at a
        time (an epoch's last batch may be smaller); samples cached during an epoch join the next one. Returns
        the loss, or ``None`` when the cache is empty."""
        if not self._refs:
            return None
        if self._pos >= len(self._perm):
            self._perm = torch.randperm(len(self._refs), generator=self.generator if rng is None else rng).tolist()
            self._pos = 0
            self._counts["replay_epochs"] += 1
        rows = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += len(rows)
        return self._step(rows, "replay")

    @staticmethod
    def round_order(uploads: Sequence[Upload]) -> list[Upload]:
        """The synchronous variant's fixed order: by device id, a device's uploads as given (so a round's result
        does not depend on the order in which its uploads arrived)."""
        return sorted(uploads, key=lambda u: u.device)

    def train_round(self, uploads: Sequence[Upload], epochs: int = 1) -> list[float]:
        """The synchronous variant: a round's accepted uploads pooled in :meth:`round_order`, ``epochs`` passes
        in that order, ``batch_size`` samples a step (batches span uploads). Returns the steps' losses. One
        round with no replay is centralised training on the pooled uploads in that order."""
        rows = [i for u in self.round_order(uploads) for i in self.rows_of(u)]
        return [self._step(b, "round") for _ in range(epochs) for b in self._chunked(rows)]

    # ---- what devices download ---------------------------------------------------------------------
    def download(self, device: str) -> FedDownload:
        """What ``device`` downloads to evaluate: the trunk, its type's projection and its head (never another
        device's head). ValueError for a device that never uploaded."""
        if device not in self._devices:
            raise ValueError(f"device {device!r} has not uploaded anything")
        return self.module.download(device, self._devices[device]["backbone_type"],
                                    DOWNLOAD_DTYPES[self.download_dtype])

    # ---- statistics --------------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """JSON-able: per device (type, uploads, samples, optimizer steps its data took part in, and the sum of
        its samples over those steps), per backbone type (the same summed, and its number of devices), and
        totals (steps by kind, replay epochs begun, cached samples)."""
        return {"devices": copy.deepcopy(self._devices), "types": copy.deepcopy(self._types),
                "totals": {**self._counts, "samples": len(self._refs), "devices": len(self._devices),
                           "types": len(self._types)}}

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue: the module's config and structure (types and device heads in joining order),
        the engine's state, the cache (every accepted upload, decoded), statistics, the replay epoch's order and
        position, and the replay generator. Tensors, numbers, strings, lists and dicts only (loads with
        ``torch.load(weights_only=True)``)."""
        return {
            "format": _STATE_FORMAT,
            "module": {"config": self.module.config(), "structure": self.module.structure()},
            "engine": self.engine.state_dict(),
            "cache": [{"device": c.device, "backbone_type": c.backbone_type, "keys": list(c.keys),
                       "acts": c.acts, "targets": c.targets} for c in self._chunks],
            "stats": self.statistics(),
            "replay": {"perm": list(self._perm), "pos": self._pos},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the module is rebuilt from its structure (new types and heads in their
        order), a fresh engine is made and loaded, the cache and statistics are checked, and only then is
        anything replaced. All or nothing: ValueError (and nothing changed) for a state that does not fit,
        including one of a federation with another configuration."""
        if not isinstance(state, Mapping) or set(state) != {"format", "module", "engine", "cache", "stats",
                                                                  "replay", "generator"}:
            raise ValueError("not a FedTrainer state")
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"FedTrainer state format {state['format']!r}, expected {_STATE_FORMAT}")
        saved = state["module"]
        if not isinstance(saved, Mapping) or set(saved) != {"config", "structure"}:
            raise ValueError("the state's module holds config and structure")
        if saved["config"] != self.module.config():
            raise ValueError(f"the state is of a federation configured otherwise: {saved['config']} "
                             f"instead of {self.module.config()}")
        try:
            module = FedSideModule.rebuild(saved["config"], saved["structure"])
        except AlignmentError as err:
            raise ValueError(str(err)) from None
        engine = self._make_engine(module)
        engine.load_state_dict(state["engine"])
        chunks, refs, index = self._check_cache(module, state["cache"])
        devices, types, counts = self._check_stats(module, chunks, state["stats"])
        replay = state["replay"]
        if not isinstance(replay, Mapping) or set(replay) != {"perm", "pos"}:
            raise ValueError("the state's replay holds perm and pos")
        perm, pos = replay["perm"], replay["pos"]
        if (not isinstance(perm, list) or sorted(perm) != list(range(len(perm))) or len(perm) > len(refs)
                or type(pos) is not int or not 0 <= pos <= len(perm)):
            raise ValueError("the state's replay order must be a permutation of cached samples, pos within it")
        generator = torch.Generator()
        try:
            generator.set_state(state["generator"])
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"the state's generator does not load: {err}") from None
        # ---- everything fits: replace
        self._install(module, engine)
        self._chunks, self._refs, self._index = chunks, refs, index
        self._devices, self._types, self._counts = devices, types, counts
        self._perm, self._pos, self.generator = list(perm), pos, generator

    @staticmethod
    def _check_cache(module: FedSideModule, cache: Any):
        if not isinstance(cache, list):
            raise ValueError("the state's cache is a list of uploads")
        chunks, refs, index = [], [], {}
        kinds: dict[str, str] = {}
        for entry in cache:
            if not isinstance(entry, Mapping) or set(entry) != {"device", "backbone_type", "keys", "acts", "targets"}:
                raise ValueError("a cached upload holds device, backbone_type, keys, acts and targets")
            device, key, keys = entry["device"], entry["backbone_type"], entry["keys"]
            check_device_id(device)
            if key not in module.types or kinds.setdefault(device, key) != key or not module.has_head(device):
                raise ValueError(f"cached upload of device {device!r}: type {key!r} or its head is not in the model")
            if (not isinstance(keys, list) or not keys
                    or not all(isinstance(k, str) and _SAMPLE_KEY.fullmatch(k) for k in keys)):
                raise ValueError(f"cached upload of device {device!r}: malformed sample keys")
            n = len(keys)
            for name, tensor, shape in (("acts", entry["acts"], (n, module.k, module.types[key])),
                                        ("targets", entry["targets"], (n, module.out_dim))):
                if (not isinstance(tensor, Tensor) or tensor.dtype != torch.float32 or tuple(tensor.shape) != shape
                        or not bool(torch.isfinite(tensor).all())):
                    raise ValueError(f"cached upload of device {device!r}: {name} must be finite float32 {list(shape)}")
            for row, k in enumerate(keys):
                if (device, k) in index:
                    raise ValueError(f"cached upload of device {device!r}: sample {k!r} twice")
                index[(device, k)] = len(refs)
                refs.append((len(chunks), row))
            chunks.append(_Chunk(device, key, list(keys), entry["acts"].contiguous(), entry["targets"].contiguous()))
        return chunks, refs, index

    @staticmethod
    def _check_stats(module: FedSideModule, chunks: list[_Chunk], stats: Any):
        """Uploads and samples are recounted from the cache; step counts are taken, checked as ints >= 0."""
        if not isinstance(stats, Mapping) or not {"devices", "types", "totals"} <= set(stats):
            raise ValueError("the state's statistics hold devices, types and totals")

        def count(value: Any, what: str) -> int:
            if type(value) is not int or value < 0:
                raise ValueError(f"the state's statistics: {what} must be an int >= 0, got {value!r}")
            return value

        devices: dict[str, dict[str, Any]] = {}
        types: dict[str, dict[str, Any]] = {}
        for chunk in chunks:
            d = devices.setdefault(chunk.device, _new_device_stats(chunk.backbone_type))
            t = types.setdefault(chunk.backbone_type, _new_type_stats())
            t["devices"] += d["uploads"] == 0
            for s in (d, t):
                s["uploads"] += 1
                s["samples"] += len(chunk.keys)
        for table, saved, what in ((devices, stats["devices"], "device"), (types, stats["types"], "type")):
            if not isinstance(saved, Mapping) or set(saved) != set(table):
                raise ValueError(f"the state's statistics must have one entry per cached {what}")
            for name, entry in table.items():
                for field_ in ("steps", "sample_steps"):
                    entry[field_] = count(saved[name].get(field_) if isinstance(saved[name], Mapping) else None,
                                          f"{what} {name!r} {field_}")
        totals = stats["totals"]
        if not isinstance(totals, Mapping):
            raise ValueError("the state's statistics: totals must be a map")
        return devices, types, {k: count(totals.get(k), k) for k in _COUNTS}


# ---------------------------------------------------------------------------------------------- the async simulation
@dataclass
class SimulationResult:
    """What :func:`simulate_async` did.

    ``run``: the clock's :class:`~lightning_mobillm.fed.clock.AsyncRun`; ``steps``: one row per server step
    (``t`` = its end on the virtual clock, ``kind``, ``loss``: the mean of its optimizer steps' losses, ``None``
    when it trained nothing, ``samples`` accepted for an arrival); ``curve``: one row per evaluation (``t``,
    ``step``: server steps done, ``loss``: the mean loss of the steps since the last evaluation, and what the
    caller's ``evaluate`` returned); ``refused``: device -> why, for uploads :meth:`FedTrainer.accept` refused.
    """

    run: _clock.AsyncRun
    steps: list[dict[str, Any]]
    curve: list[dict[str, Any]]
    refused: dict[str, str]


def simulate_async(
    trainer: FedTrainer,
    uploads: Sequence[Upload],
    step_cost: Callable[[str, tuple[Upload, ...]], float],
    *,
    evaluate: Callable[[FedTrainer], Mapping[str, Any]] | None = None,
    eval_every_s: float | None = None,
    buffer: int = 1,
    replay: bool = True,
    final_replay_steps: int = 0,
    until_s: float | None = None,
    max_steps: int | None = None,
    record_samples: bool = False,
) -> SimulationResult:
    """Fed MobiLLM's asynchronous server on the virtual clock (:func:`~lightning_mobillm.fed.clock.run_async`).

    Each upload lands at its ``arrival_s``. An ``arrival`` step accepts its uploads (a refusal is recorded in
    ``refused``, not raised) and trains on each (:meth:`FedTrainer.train_on`); a ``replay`` step is one
    :meth:`FedTrainer.replay_step`. ``step_cost(kind, uploads)`` prices a step in virtual seconds (the uploads
    of an arrival, an empty tuple for a replay; > 0 for a replay). ``evaluate(trainer)`` (e.g. every device
    downloads its parts and scores its held-out data) runs at the end of the first step ending at or after each
    multiple of ``eval_every_s`` and once at the end; it returns the metrics of one ``curve`` row. ``buffer``,
    ``replay``, ``final_replay_steps``, ``until_s`` and ``max_steps`` are the clock's. ``record_samples``:
    each row of ``steps`` also holds ``rows``, the cache indices the step trained on (``trainer.sample_ids``
    names them), for who-weighed-when analyses.
    """
    for u in uploads:
        if not (isinstance(u.arrival_s, (int, float)) and math.isfinite(u.arrival_s) and u.arrival_s >= 0):
            raise ValueError(f"upload of device {u.device!r}: arrival_s must be finite and >= 0, got {u.arrival_s}")
    if eval_every_s is not None and not eval_every_s > 0:
        raise ValueError(f"eval_every_s must be > 0, got {eval_every_s}")
    events = [_clock.Upload(i, float(u.arrival_s)) for i, u in enumerate(uploads)]
    steps: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    refused: dict[str, str] = {}
    pending_losses: list[float] = []
    next_eval = eval_every_s

    def record(t: float, step_index: int) -> None:
        row = {"t": t, "step": step_index,
               "loss": sum(pending_losses) / len(pending_losses) if pending_losses else None}
        row.update(evaluate(trainer) if evaluate is not None else {})
        curve.append(row)
        pending_losses.clear()

    def cost(kind: str, batch: tuple[_clock.Upload, ...]) -> float:
        return step_cost(kind, tuple(uploads[e.device] for e in batch))

    def on_step(step: _clock.Step) -> None:
        nonlocal next_eval
        losses: list[float] = []
        taken = 0
        if record_samples:
            trainer.trained_rows = []
        if step.kind == "arrival":
            for event in step.uploads:
                upload = uploads[event.device]
                try:
                    taken += trainer.accept(upload)
                except UploadRefused as err:
                    refused[upload.device] = str(err)
                    continue
                losses += trainer.train_on(upload)
        else:
            loss = trainer.replay_step()
            losses += [] if loss is None else [loss]
        pending_losses.extend(losses)
        steps.append({"t": step.end, "kind": step.kind, "loss": sum(losses) / len(losses) if losses else None,
                      "samples": taken})
        if record_samples:
            steps[-1]["rows"], trainer.trained_rows = trainer.trained_rows, None
        if next_eval is not None and step.end >= next_eval:
            record(step.end, step.index + 1)
            next_eval = (math.floor(step.end / eval_every_s) + 1) * eval_every_s

    run = _clock.run_async(events, cost, on_step, buffer=buffer, replay=replay,
                           final_replay_steps=final_replay_steps, until_s=until_s, max_steps=max_steps)
    if not curve or curve[-1]["step"] != len(run.steps):
        record(run.end_s, len(run.steps))
    return SimulationResult(run, steps, curve, refused)
