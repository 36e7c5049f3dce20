"""A Flower node's Fed MobiLLM device (no ``flwr`` import): the same device worker as our link's.

:class:`FlowerDevice` builds what :class:`~lightning_mobillm.modules.FedDeviceModule` builds for a ``fit`` run,
from :class:`~lightning_mobillm.flower.settings.FlowerSettings` and the node's partition: the data module, the
node's frozen backbone tapped at the federation's K aligned layers, its shard of a seeded partition, its keys
(:func:`~lightning_mobillm.fed.device.device_keys`, in a keystore under the user's cache) and its
:class:`~lightning_mobillm.fed.device.DeviceWorker`. :meth:`FlowerDevice.upload` forwards the shard once and
returns the upload as plain data, the ``fed_hello`` header and one ``(header, tensors)`` part per
``samples_per_message`` samples (the ``fed_upload`` frame's keys and codec parts and targets): no label, token
id or text. :meth:`FlowerDevice.evaluate` builds the downloaded parts and evaluates on the device.

Each Flower message runs in a fresh client process, so the backbone is loaded per message; the keystore keeps
the device's keys from one message to the next (its head on the server fits only its key).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_mobillm import protocol as P
from lightning_mobillm.assets import cache_dir
from lightning_mobillm.fed.device import DeviceWorker, LocalShard, device_keys, device_transform
from lightning_mobillm.flower.settings import FlowerSettings

log = logging.getLogger(__name__)

__all__ = ["FlowerDevice", "HELLO_KEYS", "PART_HEADER_KEYS", "node_data"]

#: what a node's hello declares (``fed_hello``'s header, docs/protocol.md); the bridge adds nothing else
HELLO_KEYS = ("protocol", "device_id", "run_id", "backbone_type", "k", "width", "out_dim", "target_space", "codec")
#: what each upload part's header carries besides the session (``fed_upload``'s ``codec`` and ``keys``)
PART_HEADER_KEYS = ("codec", "keys")


def node_data(settings: FlowerSettings, tokenizer: Any, partition_id: int, num_partitions: int):
    """A node's data: the data module (tokenised with ``tokenizer``), the seeded partition of its training split
    over ``num_partitions`` nodes (``device.partition_*``, the same on every node) and the node's shard."""
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.fed.partition import make_partition, scheme_knobs

    d = settings.device
    data = TextClassificationDataModule(**settings.data)
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    train = data.split_dataset("train")
    knobs = scheme_knobs(d["partition_scheme"], alpha=d["alpha"], min_partition_size=d["min_partition_size"])
    partition = make_partition(list(train.labels), num_partitions, d["partition_scheme"], seed=d["partition_seed"],
                               implementation=d["partition_implementation"], **knobs)
    return data, partition, LocalShard.from_split(train, partition.indices[partition_id])


class FlowerDevice:
    """One node's device: its partition ``partition_id`` of ``num_partitions`` and its backbone.

    Args:
        settings: the run's settings.
        partition_id, num_partitions: the node's partition (Flower's node config).
        backbone: alias or folder (default: :meth:`FlowerSettings.backbone_for` the partition).
    """

    def __init__(self, settings: FlowerSettings, partition_id: int, num_partitions: int,
                 backbone: str | None = None) -> None:
        from lightning_mobillm.backbone import FrozenBackbone
        from lightning_mobillm.fed.alignment import BackboneType, aligned_backbone_config
        from lightning_mobillm.specs import BackboneConfig

        if not 0 <= int(partition_id) < int(num_partitions):
            raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
        self.settings = settings
        self.partition_id, self.num_partitions = int(partition_id), int(num_partitions)
        d = settings.device
        self.source = backbone or settings.backbone_for(partition_id)
        self.device_id = f"flower-{self.partition_id}"
        self.backbone = FrozenBackbone(aligned_backbone_config(BackboneConfig(source=self.source, dtype=d["dtype"]),
                                                               d["k"]), device="cpu")
        self.backbone_type = BackboneType.of(self.backbone).key
        self.data, self.partition, self.shard = node_data(settings, self.backbone.tokenizer, self.partition_id,
                                                          self.num_partitions)
        self.keystore = Path(d["keystore"]).expanduser() if d["keystore"] else (
            cache_dir() / "fed" / settings.run_id / self.device_id)
        keys = device_keys(self.keystore)
        class_names = self.data.class_names
        transform = device_transform(d["target_space"], len(class_names), keys["target_key"], out_dim=d["out_dim"],
                                     rr_epsilon=d["rr_epsilon"], federation_key_env=d["federation_key_env"])
        self.worker = DeviceWorker(self.backbone, class_names, transform, device=self.device_id,
                                   target_space=d["target_space"], codec=d["codec"],
                                   outlier_channels=d["outlier_channels"], batch_size=d["forward_batch_size"],
                                   k=d["k"], backbone_type=self.backbone_type, secret=keys["sample_secret"],
                                   verbalizers=getattr(self.data, "verbalizer_words", None))

    def hello(self) -> dict[str, Any]:
        """The ``fed_hello`` header this device declares (no session: the server side opens it)."""
        return {"protocol": P.PROTOCOL_VERSION, "device_id": self.device_id, "run_id": self.settings.run_id,
                "backbone_type": self.backbone_type, "k": self.worker.k, "width": self.backbone.hidden_size,
                "out_dim": self.worker.transform.out_dim, "target_space": self.worker.target_space,
                "codec": self.worker.codec}

    def upload(self) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Tensor]]], dict[str, float]]:
        """Forward the shard once: the hello, the upload's parts (``{"codec", "keys"}`` headers and the codec's
        parts plus ``targets``) and the device's metrics (samples, busy seconds, bytes)."""
        t0 = time.perf_counter()
        parts: list[tuple[dict[str, Any], dict[str, Tensor]]] = []
        busy = nbytes = 0.0
        for up, _record in self.worker.iter_uploads(self.shard, self.settings.device["samples_per_message"]):
            parts.append(({"codec": up.codec, "keys": list(up.keys)}, {**up.acts, "targets": up.targets}))
            busy += up.device_compute_s
            nbytes += up.nbytes
        metrics = {"samples": float(sum(len(h["keys"]) for h, _ in parts)), "busy_s": busy,
                   "wall_s": time.perf_counter() - t0, "bytes_up": nbytes,
                   "partition_id": float(self.partition_id)}
        log.info("flower device %s (%s): %d samples in %d parts, %.1f s busy", self.device_id, self.backbone_type,
                 int(metrics["samples"]), len(parts), busy)
        return self.hello(), parts, metrics

    def evaluate(self, config: dict[str, Any], state: dict[str, Tensor]) -> dict[str, float]:
        """Evaluate the downloaded parts on this device's held-out split (the data module's validation split,
        the same on every node): accuracy, the backbone's zero-shot accuracy, samples, busy seconds."""
        from lightning_mobillm.fed.model import FedDownload

        if config.get("backbone_type") != self.backbone_type:
            raise ValueError(f"the download is for {config.get('backbone_type')!r}, this device is "
                             f"{self.backbone_type!r}")
        model = FedDownload(config, state).build()
        shard = LocalShard.from_split(self.data.split_dataset("validation"))
        result = self.worker.evaluate(model, shard, batch_size=self.settings.device["eval_forward_batch_size"],
                                      codec=self.worker.codec)
        return {"val_acc": result.accuracy, "val_zero_shot_acc": result.zero_shot_accuracy,
                "num-examples": float(result.num_samples), "busy_s": result.busy_s}
