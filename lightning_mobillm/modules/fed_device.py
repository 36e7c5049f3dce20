"""``FedDeviceModule``: a Fed MobiLLM device as a Lightning run (issue 10, item 2; ``docs/protocol.md``, role
``fed``).

``python -m lightning_mobillm fit --config recipes/fed/<device>.yaml`` on a device:

1. **Its shard.** :func:`~lightning_mobillm.fed.partition.make_partition` over the data module's training
   split (``num_devices``, ``partition_scheme``, ``alpha``, ``partition_seed``): every device of a
   federation runs the same config with its own ``partition_id`` and gets a disjoint shard.
2. **One pass, no training.** Lightning's training loop walks the data module's training batches; each
   ``training_step`` keeps the rows of this device's partition (the batches carry their ``index`` in the
   split) and, every ``samples_per_upload`` samples, the :class:`~lightning_mobillm.fed.device.DeviceWorker`
   forwards them once through the frozen backbone, tapped at the federation's K aligned layers, and
   :class:`~lightning_mobillm.fed.client.FedClient` uploads the quantised taps, the device-defined targets
   and opaque sample keys. Acknowledgements are the only replies. There is no optimizer
   (``configure_optimizers`` returns None, manual optimisation) and ``max_epochs: 1``: a second epoch would
   find every sample uploaded.
3. **Evaluation, when asked.** Lightning's validation loop (at the end of the epoch, or ``validate``) waits
   (bounded) for the server to have trained on this device's uploads (and, if set, for ``wait_for_devices``
   devices and ``wait_min_steps`` steps), downloads the trunk, its type's projection and its own head, and
   evaluates on the device, on the data module's pooled validation split: ``val/acc`` (and the backbone's
   own ``val/zero_shot_acc``) go to Lightning's loggers. Labels never leave the device.
4. ``summary.json`` in the run's folder: :class:`~lightning_mobillm.callbacks.DeviceMonitor`'s keys (it
   reads :attr:`FedDeviceModule.device_stats`) plus ``samples_uploaded``, ``partition`` (its summary),
   ``partition_id``, ``partition_seed`` and a ``fed`` section (the federation's reply, the server's
   statistics, bytes, keys path).

**Why a LightningModule and no Strategy.** The device never trains: there is no backward, optimizer,
precision or gradient for a Strategy to place, so Lightning's default single-device strategy (``strategy:
auto``) runs the loop and the module holds the connection, as the split-learning baseline's module does. The
module is what LightningCLI already instantiates from a recipe (``model:``), so the CLI needed no change.

**Secrets.** The device's token comes from ``token_env`` or ``token_file``, never a config key. The key of
the ``device`` target space and the secret that names samples are drawn once and kept in the device's folder
under the user's cache (``<cache>/fed/<run_id>/<device_id>/device-keys.json``, mode 0600; ``keystore`` moves
it), never in the repo, the config or a checkpoint: a restarted device keeps its key (its head on the server
still fits its targets) and its sample keys. The keys of acknowledged samples are appended to
``uploaded.txt`` there, so a restarted device does not upload them again. The keys of the upload being sent
are written to ``inflight.txt`` before it leaves; a device that died after the server acknowledged it but
before the ledger said so learns from the server's count of its samples (the hello reply) how much of it
arrived, and sends only the rest (frames are acknowledged in order). The ``federation`` space's shared key is
read from ``federation_key_env`` (hex).

**Virtual devices.** ``partition_ids: [3, 7, 11]`` runs three devices in one process on one copy of the
backbone (a simulated fleet of one backbone type on one machine): each is a device of its own to the server
(its id ``<device_id>-<partition>``, keys, ledger, connection and token; ``token_file`` may hold
``{device_id}``), and evaluation forwards the held-out set once for all of them. Devices that reach the server
as one identity would share one head and one quota, so the module refuses them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from lightning_mobillm.assets import cache_dir
from lightning_mobillm.backbone import FrozenBackbone
from lightning_mobillm.client import ServerError, read_token
from lightning_mobillm.fed.alignment import BackboneType, aligned_backbone_config
from lightning_mobillm.fed.client import FedClient
from lightning_mobillm.fed.device import DeviceWorker, LocalShard, device_keys, device_transform
from lightning_mobillm.fed.partition import Partition, make_partition, scheme_knobs
from lightning_mobillm.modules.side_tuning import to_backbone_config
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.stats import DeviceStats
from lightning_mobillm.transport.link import Link

log = logging.getLogger(__name__)

__all__ = ["FedDeviceModule"]

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass
class _Member:
    """One device of this process (a virtual device when the process runs several partitions): its id, keys,
    shard, connection and ledger; never checkpointed."""

    device_id: str
    partition_id: int
    keystore: Path
    worker: DeviceWorker
    shard: frozenset[int]
    client: FedClient | None = None
    hello: dict[str, Any] = field(default_factory=dict)
    uploaded: set[str] = field(default_factory=set)
    pending: list[LocalShard] = field(default_factory=list)
    samples_uploaded: int = 0
    skipped_uploaded: int = 0
    duplicates: int = 0
    recovered: int = 0
    download_bytes: int = 0
    server_stats: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    side: Any = None  # the downloaded parts, built, during one validation loop
    eval_counts: dict[str, float] = field(default_factory=dict)

    @property
    def ledger(self) -> Path:
        """The keys of acknowledged samples, one per line: never uploaded again."""
        return self.keystore / "uploaded.txt"

    @property
    def inflight(self) -> Path:
        """The keys of the upload being sent, written before it leaves (see :meth:`FedDeviceModule._recover`)."""
        return self.keystore / "inflight.txt"


@dataclass
class _Live:
    """What a running process holds outside the module's ``state_dict``: the one backbone its devices share."""

    backbone: FrozenBackbone
    partition: Partition


class FedDeviceModule(L.LightningModule):
    """A Fed MobiLLM device: forwards its partition once, uploads, never trains; evaluates locally.

    Args:
        backbone: the frozen backbone (its ``layers`` are replaced by the federation's K aligned layers).
        num_classes: linked from the data module by the CLI.
        k: the federation's K aligned taps (the depth of its shallowest backbone); the server refuses another.
        target_space: ``device`` (the device's own secret key; a head of its own on the server),
            ``federation`` (a key every device shares, from ``federation_key_env``; one shared head) or
            ``plain`` (the residual ``onehot(y) - softmax(z_b)``, no key).
        out_dim: width of the keyed targets (``device``/``federation``; ``plain`` uses the class count).
        rr_epsilon: randomized response on the label before the transform (epsilon-label-DP); None: off.
        codec: codec of the uploaded taps (``int8``, ``fp16``, ...).
        outlier_channels: channels per tap kept in fp16 by ``int8o``/``int4o``.
        forward_batch_size: samples per backbone forward on the device.
        samples_per_upload: the device forwards and uploads whenever this many of its samples are pending
            (and the rest at the end of the pass).
        num_devices: devices the training split is partitioned among.
        partition_id: this device's partition, ``0 .. num_devices-1``.
        partition_ids: run several devices in this process instead (virtual devices of one backbone type on
            one copy of its weights): each partition is a device of its own (id ``<device_id>-<partition>``,
            default prefix ``device``; keys in ``<keystore>/<id>``; its own connection and token), forwarded
            once; evaluation forwards the held-out set once for all of them. ``partition_id`` is then unused.
        partition_scheme: ``iid``, ``dirichlet`` (over labels) or ``by_size``.
        alpha: Dirichlet concentration (``dirichlet`` only; small: few classes per device).
        partition_seed: seed of the partition (the same on every device of the federation).
        min_partition_size: the smallest partition a Dirichlet draw may give (0 allows empty devices).
        partition_implementation: ``builtin`` (numpy) or ``flwr_datasets`` (or ``auto``); recorded in the
            summary.
        server: ``host:port`` of a ``serve --role fed`` server.
        token_env: environment variable holding this device's token (never a config key).
        token_file: a file holding this device's token (instead of ``token_env``); ``{device_id}`` in it is
            replaced by each device's id (one token per virtual device).
        tls_ca_file: the CA certificate that signed the server's (PEM): the link runs over TLS.
        tls_cert_file, tls_key_file: this device's certificate and key, for mutual TLS.
        tls_server_name: the name to check the server's certificate against.
        device_id: this device's name in the hello (1-64 of ``[A-Za-z0-9_.@-]``; default
            ``device-<partition_id>``).
            With per-device tokens the server files the device under its token's identity instead.
        run_id: the federation's run name (the session's name on the server, and the keystore's folder).
        keystore: folder of this device's keys (default ``<cache>/fed/<run_id>/<device_id>``).
        federation_key_env: environment variable with the shared hex key of the ``federation`` target space.
        evaluate: evaluate in the validation loop (download, then locally); False: validation logs nothing.
        wait_for_devices: before evaluating, wait until this many devices have uploaded (0: do not wait for
            others).
        wait_min_steps: before evaluating, wait until the shared model has taken this many optimizer steps.
        wait_timeout_s: the longest wait for the server's progress; then it evaluates what it has (warned).
        poll_interval_s: seconds between two statistics requests while waiting.
        connect_timeout: seconds to keep trying to reach the server.
        call_timeout: deadline of one call, seconds.
        retries: how often a frame is sent again after the link failed to deliver it.
        eval_forward_batch_size: samples per side-network batch during evaluation (the backbone forwards
            ``forward_batch_size`` at a time).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        k: int = 18,
        target_space: Literal["device", "federation", "plain"] = "device",
        out_dim: int = 16,
        rr_epsilon: float | None = 4.0,
        codec: str = "int8",
        outlier_channels: int = 8,
        forward_batch_size: int = 8,
        samples_per_upload: int = 64,
        num_devices: int = 1,
        partition_id: int = 0,
        partition_ids: list[int] | None = None,
        partition_scheme: Literal["iid", "dirichlet", "by_size"] = "iid",
        alpha: float = 0.5,
        partition_seed: int = 0,
        min_partition_size: int = 0,
        partition_implementation: Literal["builtin", "flwr_datasets", "auto"] = "builtin",
        server: str = "127.0.0.1:50051",
        token_env: str = "MOBILLM_TOKEN",
        token_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_server_name: str | None = None,
        device_id: str | None = None,
        run_id: str = "fed",
        keystore: str | None = None,
        federation_key_env: str = "MOBILLM_FED_KEY",
        evaluate: bool = True,
        wait_for_devices: int = 0,
        wait_min_steps: int = 0,
        wait_timeout_s: float = 600.0,
        poll_interval_s: float = 1.0,
        connect_timeout: float = 60.0,
        call_timeout: float = 600.0,
        retries: int = 2,
        eval_forward_batch_size: int = 32,
    ) -> None:
        super().__init__()
        ids = [partition_id] if partition_ids is None else list(partition_ids)
        if not ids or len(set(ids)) != len(ids) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_devices for i in ids):
            key = "partition_id" if partition_ids is None else "partition_ids"
            raise ValueError(f"{key} must name distinct partitions in [0, {num_devices}), got "
                             f"{partition_id if partition_ids is None else partition_ids!r}")
        if samples_per_upload < 1 or forward_batch_size < 1 or eval_forward_batch_size < 1:
            raise ValueError("samples_per_upload, forward_batch_size and eval_forward_batch_size must be "
                             ">= 1")
        if partition_ids is None:
            device_ids = [device_id or f"device-{partition_id}"]
        else:
            device_ids = [f"{device_id or 'device'}-{i}" for i in ids]
        for name, value in (*(("device_id", d) for d in device_ids), ("run_id", run_id)):
            if not _DEVICE_ID.fullmatch(value):
                raise ValueError(f"{name} must be 1-64 characters of [A-Za-z0-9_.@-], got {value!r}")
        self.backbone_config = to_backbone_config(backbone)
        self.save_hyperparameters()
        self.hparams["backbone"] = self.backbone_config.to_dict()  # plain data, like every module's hparams
        self.automatic_optimization = False  # the device never trains: no optimizer, no backward
        self.partition_ids, self.device_ids, self.run_id = ids, device_ids, run_id
        self.device_id = device_ids[0]
        #: what this process spends (read by DeviceMonitor): upload compute, upload bytes and acknowledgements
        self.device_stats = DeviceStats(run={"codec": codec, "select": "loss", "pipeline_depth": 0})
        self.eval_busy_s = 0.0
        self.evaluation: dict[str, Any] = {}
        #: tests and simulations: ``link_factory(device_id)`` returns a ready :class:`Link` (an ``InProcessLink``)
        self.link_factory: Callable[[str], Link] | None = None
        #: this process's devices (one, or the virtual devices of ``partition_ids``); kept after the run ends
        self.members: list[_Member] = []
        self._live: _Live | None = None
        self._evaluating = False

    # ---- what the process's devices add up to -------------------------------------------------------
    @property
    def samples_uploaded(self) -> int:
        return sum(m.samples_uploaded for m in self.members)

    @property
    def skipped_uploaded(self) -> int:
        return sum(m.skipped_uploaded for m in self.members)

    @property
    def download_bytes(self) -> int:
        return sum(m.download_bytes for m in self.members)

    @property
    def server_stats(self) -> dict[str, Any]:
        """The last statistics the server gave (the first device's; every device has its own)."""
        return self.members[0].server_stats if self.members else {}

    # ---- where things live -----------------------------------------------------------------------
    def keystore_of(self, device_id: str) -> Path:
        """A device's folder of secrets (outside the repo and the config): ``keystore`` itself for one device,
        ``keystore/<device_id>`` for virtual devices; default ``<cache>/fed/<run_id>/<device_id>``."""
        given = self.hparams.keystore
        if not given:
            return cache_dir() / "fed" / self.run_id / device_id
        root = Path(given).expanduser()
        return root if self.hparams.partition_ids is None else root / device_id

    @property
    def keystore(self) -> Path:
        """The (first) device's folder of secrets."""
        return self.keystore_of(self.device_id)

    @property
    def tokenizer(self):
        return self._live.backbone.tokenizer if self._live is not None else None

    def _transform(self, num_classes: int, target_key: bytes):
        hp = self.hparams
        return device_transform(hp.target_space, num_classes, target_key, out_dim=hp.out_dim,
                                rr_epsilon=hp.rr_epsilon, federation_key_env=hp.federation_key_env)

    def _connect(self, device_id: str, **hello: Any) -> FedClient:
        hp = self.hparams
        if self.link_factory is not None:
            return FedClient(self.link_factory(device_id), retries=hp.retries, device_id=device_id, **hello)
        from lightning_mobillm.transport.security import TlsClientConfig

        tls = None
        if hp.tls_ca_file or hp.tls_cert_file:
            tls = TlsClientConfig(hp.tls_ca_file, hp.tls_cert_file, hp.tls_key_file, hp.tls_server_name)
        token_file = hp.token_file.format(device_id=device_id) if hp.token_file else None
        return FedClient.connect(hp.server, read_token(hp.token_env, token_file), tls=tls,
                                 connect_timeout=hp.connect_timeout, call_timeout=hp.call_timeout,
                                 retries=hp.retries, device_id=device_id, **hello)

    # ---- lifecycle -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._live is not None:
            return
        hp = self.hparams
        data = self.trainer.datamodule
        class_names = data.class_names
        backbone = FrozenBackbone(aligned_backbone_config(self.backbone_config, hp.k), device="cpu")
        kind = BackboneType.of(backbone).key
        labels = list(data.split_dataset("train").labels)
        knobs = scheme_knobs(hp.partition_scheme, alpha=hp.alpha, min_partition_size=hp.min_partition_size)
        partition = make_partition(labels, hp.num_devices, hp.partition_scheme, seed=hp.partition_seed,
                                   implementation=hp.partition_implementation, **knobs)
        self._live = _Live(backbone, partition)
        self.members = []
        owners: dict[str, str] = {}
        try:
            for device_id, pid in zip(self.device_ids, self.partition_ids, strict=True):
                keystore = self.keystore_of(device_id)
                keys = device_keys(keystore)
                transform = self._transform(len(class_names), keys["target_key"])
                worker = DeviceWorker(backbone, class_names, transform, device=device_id,
                                      target_space=hp.target_space, codec=hp.codec,
                                      outlier_channels=hp.outlier_channels, batch_size=hp.forward_batch_size,
                                      k=hp.k, backbone_type=kind, secret=keys["sample_secret"],
                                      verbalizers=getattr(data, "verbalizer_words", None))
                member = _Member(device_id, pid, keystore, worker, frozenset(partition.indices[pid]))
                self.members.append(member)
                member.client = self._connect(device_id, run_id=self.run_id, backbone_type=kind, k=hp.k,
                                              width=backbone.hidden_size, out_dim=transform.out_dim,
                                              target_space=hp.target_space, codec=hp.codec)
                member.hello = member.client.hello()
                owner = str(member.hello.get("session", "")).rsplit("/", 1)[0]
                if owner in owners:
                    raise ValueError(f"devices {owners[owner]} and {device_id} reached the server as the same "
                                     f"identity {owner!r}: virtual devices need a token each (token_file with "
                                     "{device_id} in it) or a server with one shared token")
                owners[owner] = device_id
                member.uploaded = set(member.ledger.read_text().split()) if member.ledger.exists() else set()
                self._recover(member)
        except BaseException:
            self.teardown(stage)
            raise
        self.device_stats.server_pid = self.members[0].hello.get("server_pid")
        for m in self.members:
            log.info("fed device %s: %s, K = %d, partition %d of %d (%d samples), federation d* = %s, "
                     "server pid %s", m.device_id, kind, hp.k, m.partition_id, hp.num_devices, len(m.shard),
                     m.hello.get("d_star"), m.hello.get("server_pid"))

    @staticmethod
    def _recover(member: _Member) -> None:
        """After a crash between an acknowledgement and the ledger's write: the server says how many of this
        device's samples it holds (``samples`` in its hello reply). Frames go, and are acknowledged, in order,
        so what it holds beyond the ledger is a prefix of the upload that was in flight: those keys join the
        ledger (never sent again), the rest are sent again."""
        if not member.inflight.exists():
            return
        inflight = member.inflight.read_text().split()
        held = int(member.hello.get("samples", 0)) - len(member.uploaded)
        if 0 <= held <= len(inflight):
            if held:
                with member.ledger.open("a") as f:
                    f.write("".join(f"{key}\n" for key in inflight[:held]))
                member.uploaded.update(inflight[:held])
                member.recovered += held
                log.warning("fed device %s: the server had acknowledged %d samples the ledger missed (a crash "
                            "after their acknowledgement); they are not sent again", member.device_id, held)
        else:
            log.warning("fed device %s: the server holds %s samples of this device, the ledger %d (+%d in flight): "
                        "another keystore or federation? Sending what the ledger lacks", member.device_id,
                        member.hello.get("samples"), len(member.uploaded), len(inflight))
        member.inflight.unlink()

    def teardown(self, stage: str) -> None:
        for m in self.members:
            if m.client is not None:
                m.client.close()  # bye: the federation keeps this device's uploads and head
                m.client = None
        self._live = None

    def configure_optimizers(self) -> None:
        return None  # nothing trains on the device

    # ---- the one pass ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        index = batch["index"].tolist()
        for member in self.members:
            rows = [i for i, j in enumerate(index) if j in member.shard]
            if rows:
                where = torch.tensor(rows, dtype=torch.long)
                rows_of = {name: batch[name][where] for name in ("input_ids", "attention_mask", "labels")}
                member.pending.append(LocalShard.from_tensors(**rows_of))
                if sum(len(s) for s in member.pending) >= self.hparams.samples_per_upload:
                    self._upload_pending(member)
        self.log("fed/samples_uploaded", float(self.samples_uploaded), on_step=True, on_epoch=False)
        return None

    def _upload_pending(self, member: _Member) -> None:
        """Forward a device's pending samples once (in chunks of ``samples_per_upload``) and upload them."""
        if member.client is None or not member.pending:
            return
        shard = LocalShard([ids for s in member.pending for ids in s.input_ids],
                           [y for s in member.pending for y in s.labels])
        member.pending.clear()
        keep = [i for i, key in enumerate(member.worker.sample_keys(shard)) if key not in member.uploaded]
        member.skipped_uploaded += len(shard) - len(keep)
        if not keep:
            return
        shard = LocalShard([shard.input_ids[i] for i in keep], [shard.labels[i] for i in keep])
        epoch, client = self.current_epoch, member.client
        member.keystore.mkdir(parents=True, exist_ok=True, mode=0o700)
        for upload, _record in member.worker.iter_uploads(shard, self.hparams.samples_per_upload):
            tmp = member.inflight.with_suffix(".tmp")  # in flight, on disk before it leaves (see _recover)
            tmp.write_text("".join(f"{key}\n" for key in upload.keys))
            os.replace(tmp, member.inflight)
            before = client.traffic
            acks = client.upload(upload)
            after = client.traffic
            with member.ledger.open("a") as f:  # acknowledged: never uploaded again
                f.write("".join(f"{key}\n" for key in upload.keys))
            member.inflight.unlink()
            member.uploaded.update(upload.keys)
            member.samples_uploaded += len(upload)
            self.device_stats.add_device_step(epoch, upload.device_compute_s,
                                              after["bytes_up"] - before["bytes_up"])
            self.device_stats.train_samples += len(upload)
            self.device_stats.train_bytes_down += after["bytes_down"] - before["bytes_down"]
            if acks:
                self.device_stats.last_train_reply = acks[-1]
        member.duplicates += member.worker.duplicates_dropped

    def on_train_epoch_end(self) -> None:
        for member in self.members:
            self._upload_pending(member)

    # ---- evaluation ------------------------------------------------------------------------------
    def _wait_for_server(self, member: _Member) -> dict[str, Any]:
        """Ask for the server's statistics until this device's uploads are trained on (and the configured
        devices and steps are there), at most ``wait_timeout_s``."""
        hp, client = self.hparams, member.client
        deadline = time.monotonic() + hp.wait_timeout_s
        while True:
            stats = client.stats()
            totals = stats["totals"]
            ready = (stats["queued_samples"] == 0 and totals["devices"] >= hp.wait_for_devices
                     and totals["steps"] >= hp.wait_min_steps)
            if ready:
                return stats
            if time.monotonic() >= deadline:
                log.warning("the server's progress did not arrive within %.0f s (devices %d/%d, steps %d/%d, "
                            "own samples queued %d): evaluating what it has", hp.wait_timeout_s,
                            totals["devices"], hp.wait_for_devices, totals["steps"], hp.wait_min_steps,
                            stats["queued_samples"])
                return stats
            time.sleep(hp.poll_interval_s)

    def on_validation_epoch_start(self) -> None:
        self._evaluating = False
        if self.trainer.sanity_checking or not self.hparams.evaluate or self._live is None:
            return
        for member in self.members:
            self._upload_pending(member)  # the end-of-epoch validation runs before on_train_epoch_end
        for member in self.members:
            member.server_stats = self._wait_for_server(member)
            member.side = None
            before = member.client.traffic["bytes_down"]
            try:
                parts = member.client.download_parts()
            except ServerError as err:
                log.warning("no evaluation for %s: %s", member.device_id, err)
                continue
            member.download_bytes += member.client.traffic["bytes_down"] - before
            member.side = parts.build()
            member.eval_counts = {"correct": 0, "zero_shot": 0, "n": 0, "busy_s": 0.0}
            self._evaluating = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if not self._evaluating:
            return None
        hp = self.hparams
        shard = LocalShard.from_tensors(batch["input_ids"], batch["attention_mask"], batch["labels"])
        first = self.members[0].worker
        t0 = time.perf_counter()
        feats = first.features(shard)  # one forward for every device of this process (one backbone)
        forward_s = time.perf_counter() - t0
        for member in self.members:
            if member.side is None:
                continue
            result = member.worker.evaluate(member.side, feats, batch_size=hp.eval_forward_batch_size,
                                            codec=hp.codec)
            n, counts = result.num_samples, member.eval_counts
            counts["correct"] += round(result.accuracy * n)
            counts["zero_shot"] += round(result.zero_shot_accuracy * n)
            counts["n"] += n
            counts["busy_s"] += result.busy_s + forward_s / len(self.members)
        return None

    def on_validation_epoch_end(self) -> None:
        if not self._evaluating:
            return
        self._evaluating = False
        done = []
        for member in self.members:
            counts = member.eval_counts
            if member.side is None or not counts.get("n"):
                continue
            member.side = None
            self.eval_busy_s += counts["busy_s"]
            member.evaluation = {"val_acc": counts["correct"] / counts["n"],
                                 "val_zero_shot_acc": counts["zero_shot"] / counts["n"], "val_samples": counts["n"],
                                 "server_steps": member.server_stats.get("totals", {}).get("steps")}
            done.append(member)
            log.info("fed device %s: val acc %.4f (zero-shot %.4f) on %d samples after %s server steps",
                     member.device_id, member.evaluation["val_acc"], member.evaluation["val_zero_shot_acc"],
                     counts["n"], member.evaluation["server_steps"])
        if not done:
            return
        acc = sum(m.evaluation["val_acc"] for m in done) / len(done)
        zero_shot = sum(m.evaluation["val_zero_shot_acc"] for m in done) / len(done)
        self.evaluation = {"val_acc": acc, "val_zero_shot_acc": zero_shot,
                           "val_samples": done[0].evaluation["val_samples"], "devices_evaluated": len(done),
                           "server_steps": max(m.evaluation["server_steps"] or 0 for m in done)}
        self.log_dict({"val/acc": acc, "val/zero_shot_acc": zero_shot}, on_epoch=True)

    # ---- summary ---------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        """Add the federation's figures to ``summary.json`` (after :class:`DeviceMonitor` wrote its own, or
        alone)."""
        from lightning_mobillm.callbacks import DeviceMonitor

        trainer = self.trainer
        monitor = next((c for c in trainer.callbacks if isinstance(c, DeviceMonitor)), None)
        live, hp = self._live, self.hparams
        traffic = {"bytes_up": 0, "bytes_down": 0}
        for m in self.members:
            if m.client is not None:
                for name in traffic:
                    traffic[name] += m.client.traffic[name]
        summary: dict[str, Any] = dict(monitor.summary) if monitor is not None and monitor.summary else {
            "device_pid": os.getpid(), "codec": hp.codec, "steps": trainer.global_step,
            "bytes_up": self.device_stats.train_bytes_up, "bytes_down": self.device_stats.train_bytes_down,
            "device_busy_s": self.device_stats.device_busy_s}
        first = self.members[0] if self.members else None
        summary.update({
            "method": type(self).__name__,
            "server_pid": self.device_stats.server_pid,
            "samples_uploaded": self.samples_uploaded,
            "train_samples": self.samples_uploaded,
            "val_acc": self.evaluation.get("val_acc"),
            "val_zero_shot_acc": self.evaluation.get("val_zero_shot_acc"),
            "link_bytes_up": traffic["bytes_up"],
            "link_bytes_down": traffic["bytes_down"],
            "partition_id": hp.partition_id if hp.partition_ids is None else list(self.partition_ids),
            "partition_seed": hp.partition_seed,
            "partition": live.partition.summary() if live is not None else None,
            "fed": {
                "device_id": self.device_id, "run_id": self.run_id,
                "backbone_type": first.worker.backbone_type if first is not None else None,
                "k": hp.k, "target_space": hp.target_space, "codec": hp.codec,
                "federation": first.hello if first is not None else None,
                "shard_size": sum(len(m.shard) for m in self.members),
                "samples_skipped_already_uploaded": self.skipped_uploaded,
                "samples_recovered_after_a_crash": sum(m.recovered for m in self.members),
                "samples_dropped_as_duplicates": sum(m.duplicates for m in self.members),
                "upload_busy_s": self.device_stats.device_busy_s,
                "eval_busy_s": self.eval_busy_s,
                "download_bytes": self.download_bytes,
                "evaluation": self.evaluation,
                "server_stats": self.server_stats,
                "keystore": str(self.keystore),
                "devices": [{"device_id": m.device_id, "partition_id": m.partition_id, "shard_size": len(m.shard),
                             "samples_uploaded": m.samples_uploaded, "download_bytes": m.download_bytes,
                             "evaluation": m.evaluation, "keystore": str(m.keystore)} for m in self.members],
            },
        })
        file = Path(monitor.summary_file if monitor is not None else "summary.json")
        path = file if file.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if monitor is not None:
            monitor.summary = summary
