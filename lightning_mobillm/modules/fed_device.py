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
``uploaded.txt`` there, so a restarted device does not upload them again. The ``federation`` space's shared
key is read from ``federation_key_env`` (hex).
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
from lightning_mobillm.fed.device import DeviceWorker, LocalShard, make_target_transform
from lightning_mobillm.fed.partition import Partition, make_partition
from lightning_mobillm.modules.side_tuning import to_backbone_config
from lightning_mobillm.privacy import new_key
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.stats import DeviceStats
from lightning_mobillm.transport.link import Link

log = logging.getLogger(__name__)

__all__ = ["FedDeviceModule"]

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass
class _Live:
    """What a running device holds outside the module's ``state_dict`` (never checkpointed)."""

    backbone: FrozenBackbone
    worker: DeviceWorker
    partition: Partition
    shard: frozenset[int]
    client: FedClient
    hello: dict[str, Any]
    uploaded: set[str] = field(default_factory=set)
    pending: list[LocalShard] = field(default_factory=list)


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
        partition_scheme: ``iid``, ``dirichlet`` (over labels) or ``by_size``.
        alpha: Dirichlet concentration (``dirichlet`` only; small: few classes per device).
        partition_seed: seed of the partition (the same on every device of the federation).
        min_partition_size: the smallest partition a Dirichlet draw may give (0 allows empty devices).
        partition_implementation: ``builtin`` (numpy) or ``flwr_datasets`` (or ``auto``); recorded in the
            summary.
        server: ``host:port`` of a ``serve --role fed`` server.
        token_env: environment variable holding this device's token (never a config key).
        token_file: a file holding this device's token (instead of ``token_env``).
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
        if not 0 <= partition_id < num_devices:
            raise ValueError(f"partition_id must be in [0, {num_devices}), got {partition_id}")
        if samples_per_upload < 1 or forward_batch_size < 1 or eval_forward_batch_size < 1:
            raise ValueError("samples_per_upload, forward_batch_size and eval_forward_batch_size must be "
                             ">= 1")
        device_id = device_id or f"device-{partition_id}"
        for name, value in (("device_id", device_id), ("run_id", run_id)):
            if not _DEVICE_ID.fullmatch(value):
                raise ValueError(f"{name} must be 1-64 characters of [A-Za-z0-9_.@-], got {value!r}")
        self.backbone_config = to_backbone_config(backbone)
        self.save_hyperparameters()
        self.hparams["backbone"] = self.backbone_config.to_dict()  # plain data, like every module's hparams
        self.automatic_optimization = False  # the device never trains: no optimizer, no backward
        self.device_id, self.run_id = device_id, run_id
        #: what this device spends (read by DeviceMonitor): upload compute, upload bytes and acknowledgements
        self.device_stats = DeviceStats(run={"codec": codec, "select": "loss", "pipeline_depth": 0})
        self.samples_uploaded = 0
        self.skipped_uploaded = 0
        self.download_bytes = 0
        self.eval_busy_s = 0.0
        self.server_stats: dict[str, Any] = {}
        self.evaluation: dict[str, Any] = {}
        #: tests and simulations: a callable returning a ready :class:`Link` (e.g. an ``InProcessLink``)
        self.link_factory: Callable[[], Link] | None = None
        self._live: _Live | None = None
        self._eval: dict[str, Any] | None = None

    # ---- where things live -----------------------------------------------------------------------
    @property
    def keystore(self) -> Path:
        """This device's folder of secrets (outside the repo and the config)."""
        given = self.hparams.keystore
        return Path(given).expanduser() if given else cache_dir() / "fed" / self.run_id / self.device_id

    @property
    def tokenizer(self):
        return self._live.backbone.tokenizer if self._live is not None else None

    def _keys(self) -> dict[str, bytes]:
        """The device's target key and sample secret: read from the keystore, or drawn once and written
        there."""
        path = self.keystore / "device-keys.json"
        if path.exists():
            data = json.loads(path.read_text())
            return {name: bytes.fromhex(data[name]) for name in ("target_key", "sample_secret")}
        keys = {"target_key": new_key(), "sample_secret": new_key()}
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({name: value.hex() for name, value in keys.items()}, f)
        log.info("new device keys in %s (keep them: the device's head on the server fits only this key)",
                 path)
        return keys

    def _transform(self, num_classes: int, target_key: bytes):
        hp = self.hparams
        if hp.target_space == "plain":
            return make_target_transform("plain", num_classes)
        if hp.target_space == "federation":
            hexkey = os.environ.get(hp.federation_key_env)
            if not hexkey:
                raise ValueError(f"the federation target space needs the shared key in "
                                 f"${hp.federation_key_env} (hex)")
            target_key = bytes.fromhex(hexkey.strip())
        return make_target_transform(hp.target_space, num_classes, target_key, out_dim=hp.out_dim,
                                     rr_epsilon=hp.rr_epsilon)

    def _connect(self, **hello: Any) -> FedClient:
        hp = self.hparams
        if self.link_factory is not None:
            return FedClient(self.link_factory(), retries=hp.retries, **hello)
        from lightning_mobillm.transport.security import TlsClientConfig

        tls = None
        if hp.tls_ca_file or hp.tls_cert_file:
            tls = TlsClientConfig(hp.tls_ca_file, hp.tls_cert_file, hp.tls_key_file, hp.tls_server_name)
        return FedClient.connect(hp.server, read_token(hp.token_env, hp.token_file), tls=tls,
                                 connect_timeout=hp.connect_timeout, call_timeout=hp.call_timeout,
                                 retries=hp.retries, **hello)

    # ---- lifecycle -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._live is not None:
            return
        hp = self.hparams
        data = self.trainer.datamodule
        class_names = data.class_names
        backbone = FrozenBackbone(aligned_backbone_config(self.backbone_config, hp.k), device="cpu")
        keys = self._keys()
        transform = self._transform(len(class_names), keys["target_key"])
        kind = BackboneType.of(backbone).key
        worker = DeviceWorker(backbone, class_names, transform, device=self.device_id,
                              target_space=hp.target_space, codec=hp.codec,
                              outlier_channels=hp.outlier_channels, batch_size=hp.forward_batch_size, k=hp.k,
                              backbone_type=kind,
                              secret=keys["sample_secret"])
        labels = list(data.split_dataset("train").labels)
        knobs: dict[str, Any] = {}
        if hp.partition_scheme == "dirichlet":
            knobs["alpha"] = hp.alpha
        if hp.partition_scheme != "iid":
            knobs["min_partition_size"] = hp.min_partition_size
        partition = make_partition(labels, hp.num_devices, hp.partition_scheme, seed=hp.partition_seed,
                                   implementation=hp.partition_implementation, **knobs)
        client = self._connect(device_id=self.device_id, run_id=self.run_id, backbone_type=kind, k=hp.k,
                               width=backbone.hidden_size, out_dim=transform.out_dim,
                               target_space=hp.target_space, codec=hp.codec)
        try:
            reply = client.hello()
        except BaseException:
            client.link.close()
            raise
        self.device_stats.server_pid = reply.get("server_pid")
        ledger = self.keystore / "uploaded.txt"
        uploaded = set(ledger.read_text().split()) if ledger.exists() else set()
        shard = frozenset(partition.indices[hp.partition_id])
        self._live = _Live(backbone, worker, partition, shard, client, reply, uploaded)
        log.info("fed device %s: %s, K = %d, partition %d of %d (%d samples), federation d* = %s, "
                 "server pid %s", self.device_id, kind, hp.k, hp.partition_id, hp.num_devices, len(shard),
                 reply.get("d_star"), reply.get("server_pid"))

    def teardown(self, stage: str) -> None:
        if self._live is not None:
            self._live.client.close()  # bye: the federation keeps this device's uploads and head
            self._live = None

    def configure_optimizers(self) -> None:
        return None  # nothing trains on the device

    # ---- the one pass ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        live = self._live
        rows = [i for i, index in enumerate(batch["index"].tolist()) if index in live.shard]
        if rows:
            where = torch.tensor(rows, dtype=torch.long)
            rows_of = {name: batch[name][where] for name in ("input_ids", "attention_mask", "labels")}
            live.pending.append(LocalShard.from_tensors(**rows_of))
            if sum(len(s) for s in live.pending) >= self.hparams.samples_per_upload:
                self._upload_pending()
        self.log("fed/samples_uploaded", float(self.samples_uploaded), on_step=True, on_epoch=False)
        return None

    def _upload_pending(self) -> None:
        """Forward the pending samples once (in chunks of ``samples_per_upload``) and upload them."""
        live = self._live
        if live is None or not live.pending:
            return
        shard = LocalShard([ids for s in live.pending for ids in s.input_ids],
                           [y for s in live.pending for y in s.labels])
        live.pending.clear()
        keep = [i for i, key in enumerate(live.worker.sample_keys(shard)) if key not in live.uploaded]
        self.skipped_uploaded += len(shard) - len(keep)
        if not keep:
            return
        shard = LocalShard([shard.input_ids[i] for i in keep], [shard.labels[i] for i in keep])
        epoch = self.current_epoch
        for upload, _record in live.worker.iter_uploads(shard, self.hparams.samples_per_upload):
            before = live.client.traffic
            acks = live.client.upload(upload)
            after = live.client.traffic
            self.device_stats.add_device_step(epoch, upload.device_compute_s,
                                              after["bytes_up"] - before["bytes_up"])
            self.device_stats.train_samples += len(upload)
            self.device_stats.train_bytes_down += after["bytes_down"] - before["bytes_down"]
            if acks:
                self.device_stats.last_train_reply = acks[-1]
            self.samples_uploaded += len(upload)
            live.uploaded.update(upload.keys)
            self.keystore.mkdir(parents=True, exist_ok=True, mode=0o700)
            with (self.keystore / "uploaded.txt").open("a") as f:  # acknowledged: never uploaded again
                f.write("".join(f"{key}\n" for key in upload.keys))

    def on_train_epoch_end(self) -> None:
        self._upload_pending()

    # ---- evaluation ------------------------------------------------------------------------------
    def _wait_for_server(self) -> dict[str, Any]:
        """Ask for the server's statistics until this device's uploads are trained on (and the configured
        devices and steps are there), at most ``wait_timeout_s``."""
        hp, client = self.hparams, self._live.client
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
        self._eval = None
        if self.trainer.sanity_checking or not self.hparams.evaluate or self._live is None:
            return
        self._upload_pending()  # the end-of-epoch validation runs before on_train_epoch_end
        self.server_stats = self._wait_for_server()
        client = self._live.client
        before = client.traffic["bytes_down"]
        try:
            parts = client.download_parts()
        except ServerError as err:
            log.warning("no evaluation: %s", err)
            return
        self.download_bytes += client.traffic["bytes_down"] - before
        self._eval = {"side": parts.build(), "correct": 0, "zero_shot": 0, "n": 0, "busy_s": 0.0}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self._eval is None:
            return None
        live = self._live
        shard = LocalShard.from_tensors(batch["input_ids"], batch["attention_mask"], batch["labels"])
        hp = self.hparams
        result = live.worker.evaluate(self._eval["side"], shard, batch_size=hp.eval_forward_batch_size,
                                      codec=hp.codec)
        n = result.num_samples
        self._eval["correct"] += round(result.accuracy * n)
        self._eval["zero_shot"] += round(result.zero_shot_accuracy * n)
        self._eval["n"] += n
        self._eval["busy_s"] += result.busy_s
        return None

    def on_validation_epoch_end(self) -> None:
        ev = self._eval
        if ev is None or not ev["n"]:
            return
        acc, zero_shot = ev["correct"] / ev["n"], ev["zero_shot"] / ev["n"]
        self.eval_busy_s += ev["busy_s"]
        self.evaluation = {"val_acc": acc, "val_zero_shot_acc": zero_shot, "val_samples": ev["n"],
                           "server_steps": self.server_stats.get("totals", {}).get("steps")}
        self.log_dict({"val/acc": acc, "val/zero_shot_acc": zero_shot}, on_epoch=True)
        log.info("fed device %s: val acc %.4f (zero-shot %.4f) on %d samples after %s server steps",
                 self.device_id, acc, zero_shot, ev["n"], self.evaluation["server_steps"])
        self._eval = None

    # ---- summary ---------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        """Add the federation's figures to ``summary.json`` (after :class:`DeviceMonitor` wrote its own, or
        alone)."""
        from lightning_mobillm.callbacks import DeviceMonitor

        trainer = self.trainer
        monitor = next((c for c in trainer.callbacks if isinstance(c, DeviceMonitor)), None)
        live, hp = self._live, self.hparams
        traffic = live.client.traffic if live is not None else self.device_stats.link.snapshot()
        summary: dict[str, Any] = dict(monitor.summary) if monitor is not None and monitor.summary else {
            "device_pid": os.getpid(), "codec": hp.codec, "steps": trainer.global_step,
            "bytes_up": self.device_stats.train_bytes_up, "bytes_down": self.device_stats.train_bytes_down,
            "device_busy_s": self.device_stats.device_busy_s}
        summary.update({
            "method": type(self).__name__,
            "server_pid": self.device_stats.server_pid,
            "samples_uploaded": self.samples_uploaded,
            "train_samples": self.samples_uploaded,
            "val_acc": self.evaluation.get("val_acc"),
            "val_zero_shot_acc": self.evaluation.get("val_zero_shot_acc"),
            "link_bytes_up": traffic["bytes_up"],
            "link_bytes_down": traffic["bytes_down"],
            "partition_id": hp.partition_id,
            "partition_seed": hp.partition_seed,
            "partition": live.partition.summary() if live is not None else None,
            "fed": {
                "device_id": self.device_id, "run_id": self.run_id,
                "backbone_type": live.worker.backbone_type if live is not None else None,
                "k": hp.k, "target_space": hp.target_space, "codec": hp.codec,
                "federation": live.hello if live is not None else None,
                "shard_size": len(live.shard) if live is not None else None,
                "samples_skipped_already_uploaded": self.skipped_uploaded,
                "upload_busy_s": self.device_stats.device_busy_s,
                "eval_busy_s": self.eval_busy_s,
                "download_bytes": self.download_bytes,
                "evaluation": self.evaluation,
                "server_stats": self.server_stats,
                "keystore": str(self.keystore),
            },
        })
        file = Path(monitor.summary_file if monitor is not None else "summary.json")
        path = file if file.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if monitor is not None:
            monitor.summary = summary
