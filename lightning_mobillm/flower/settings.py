"""Flower's run config mapped onto the project's recipe keys (no ``flwr`` import).

Flower hands an app one flat mapping of TOML scalars (``[tool.flwr.app.config]`` in ``apps/flower/pyproject.toml``,
overridden with ``flwr run --run-config 'k=v'``). Its keys are the recipes' keys under four prefixes:

* ``data.<key>``: :class:`~lightning_mobillm.data.TextClassificationDataModule`'s arguments (``data.dataset``,
  ``data.max_length``, ...), as under ``data.init_args`` in a device recipe;
* ``device.<key>``: the device's settings, named as :class:`~lightning_mobillm.modules.FedDeviceModule`'s
  (``device.k``, ``device.target_space``, ``device.alpha``, ...; :data:`DEVICE_DEFAULTS`);
* ``server.<key>``: :class:`~lightning_mobillm.server_config.ServerConfig`'s fields (``server.fed_lr``,
  ``server.allowed_backbones``, ...), as under ``server:`` in ``recipes/fed/server.yaml``;
* ``flower.<key>``: what only the Flower app has (:data:`FLOWER_DEFAULTS`: how many nodes to wait for, poll
  interval, timeouts, where the summary goes); replay after the last upload is the server's own
  ``server.fed_max_replay_steps``, as for ``serve``;

* ``fedavg.<key>``: the FedAvg-LoRA cross-check's rounds, fraction, local epochs, rank (:data:`FEDAVG_DEFAULTS`);

plus ``method`` (``fed_mobillm``, the default, or ``fedavg_lora``), ``run-id`` (the federation's name) and ``backbones`` (comma-separated aliases or folders: node ``i`` of
the simulation takes ``backbones[i % n]``; a SuperNode's ``--node-config "backbone=..."`` chooses its own).

TOML has no null: an empty string means None (``server.fed_d_star = ""``), and a list is a comma-separated
string (``server.allowed_backbones``). A key outside these sets is refused with its name.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEVICE_DEFAULTS", "FEDAVG_DEFAULTS", "FLOWER_DEFAULTS", "METHODS", "FlowerSettings", "SettingsError"]

#: the device's settings (FedDeviceModule's names) and their defaults
DEVICE_DEFAULTS: dict[str, Any] = {
    "dtype": "bfloat16",  # the backbone's dtype on the device
    "k": 18,  # the federation's K aligned taps
    "target_space": "device",  # device, federation or plain
    "out_dim": 16,  # width of the keyed targets
    "rr_epsilon": 4.0,  # randomized response on the label before the transform (None: off)
    "codec": "int8",  # the taps' codec
    "outlier_channels": 8,  # int8o/int4o only
    "forward_batch_size": 8,  # samples per backbone forward
    "samples_per_message": 512,  # samples per upload part of the reply (one fed_upload frame each)
    "partition_scheme": "dirichlet",  # iid, dirichlet or by_size
    "alpha": 0.5,  # Dirichlet concentration
    "partition_seed": 0,  # the same on every node: disjoint partitions
    "min_partition_size": 10,  # fewest samples a node may get (0: empty nodes allowed)
    "partition_implementation": "builtin",  # builtin or flwr_datasets
    "keystore": None,  # None: <cache>/fed/<run-id>/flower-<partition-id>
    "federation_key_env": "MOBILLM_FED_KEY",  # the federation space's shared hex key (an environment variable)
    "eval_forward_batch_size": 32,  # samples per forward during evaluation
}

#: what only the Flower app has, and its defaults
FLOWER_DEFAULTS: dict[str, Any] = {
    "min_nodes": 2,  # the ServerApp waits for this many nodes before it pushes the upload messages
    "wait_for_nodes_s": 120.0,  # at most this long
    "poll_interval_s": 0.2,  # between two pull_messages while nothing is pending to train on
    "upload_timeout_s": 3600.0,  # stragglers are not waited for beyond this (their later replies are dropped)
    "eval_timeout_s": 1800.0,  # bound on the evaluation round
    "summary": "",  # where the ServerApp writes summary.json ("": <server.workdir>/summary.json)
}

#: the FedAvg-LoRA cross-check's settings (``method = "fedavg_lora"``; benchmarks/federated.py's baseline)
FEDAVG_DEFAULTS: dict[str, Any] = {
    "rounds": 20,  # FedAvg rounds
    "fraction_train": 0.3,  # of the nodes, per round
    "local_epochs": 1,  # per selected node and round
    "lora_r": 8,  # LoRA rank on q_proj/v_proj (alpha 2r)
    "lr": 5e-4,  # AdamW, fresh every round
    "batch_size": 8,  # samples per local step
    "seed": 0,  # the adapters' and head's initial weights; each node's sample order
}
#: what the ServerApp runs
METHODS = ("fed_mobillm", "fedavg_lora")

_LIST_KEYS = frozenset({"server.allowed_backbones", "data.class_names"})


class SettingsError(ValueError):
    """A run config key that does not exist or a value of the wrong type; the message names the key."""


def _data_keys() -> set[str]:
    from lightning_mobillm.data import TextClassificationDataModule

    return set(inspect.signature(TextClassificationDataModule.__init__).parameters) - {"self"}


def _server_keys() -> set[str]:
    from lightning_mobillm.server_config import ServerConfig

    return {f.name for f in dataclasses.fields(ServerConfig)}


def _value(key: str, value: Any) -> Any:
    if value == "":
        return None
    if key in _LIST_KEYS and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


@dataclass
class FlowerSettings:
    """A Flower run's settings, per section (see the module docstring)."""

    method: str = "fed_mobillm"
    run_id: str = "bbc-news-flower"
    backbones: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    data: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=lambda: dict(DEVICE_DEFAULTS))
    server: dict[str, Any] = field(default_factory=dict)
    flower: dict[str, Any] = field(default_factory=lambda: dict(FLOWER_DEFAULTS))
    fedavg: dict[str, Any] = field(default_factory=lambda: dict(FEDAVG_DEFAULTS))

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FlowerSettings:
        """Parse Flower's flat run config; a key outside the sections, or an unknown key in one, is refused
        with its name."""
        allowed = {"data": _data_keys(), "device": set(DEVICE_DEFAULTS), "server": _server_keys(),
                   "flower": set(FLOWER_DEFAULTS), "fedavg": set(FEDAVG_DEFAULTS)}
        settings = cls()
        for key, raw in config.items():
            value = _value(key, raw)
            if key == "method":
                if value not in METHODS:
                    raise SettingsError(f"method must be one of {list(METHODS)}, got {raw!r}")
                settings.method = value
                continue
            if key == "run-id":
                if not isinstance(value, str) or not value:
                    raise SettingsError(f"run-id must be a non-empty string, got {raw!r}")
                settings.run_id = value
                continue
            if key == "backbones":
                names = [b.strip() for b in str(raw).split(",") if b.strip()]
                if not names:
                    raise SettingsError("backbones must name at least one backbone (comma-separated)")
                settings.backbones = names
                continue
            section, _, name = key.partition(".")
            if section not in allowed:
                raise SettingsError(f"run config key {key!r}: not method, run-id, backbones or a data., device., "
                                    "server., flower. or fedavg. key")
            if name not in allowed[section]:
                raise SettingsError(f"run config key {key!r}: {section} has no key {name!r} (known: "
                                    f"{sorted(allowed[section])})")
            getattr(settings, section)[name] = value
        return settings

    def backbone_for(self, partition_id: int, node_config: Mapping[str, Any] | None = None) -> str:
        """The node's backbone: its node config's ``backbone`` when set, else ``backbones[partition_id % n]``."""
        chosen = (node_config or {}).get("backbone")
        if chosen:
            return str(chosen)
        return self.backbones[int(partition_id) % len(self.backbones)]

    def server_config(self, **overrides: Any):
        """The :class:`~lightning_mobillm.server_config.ServerConfig` of the ``server.`` keys (its own checks
        name a bad value)."""
        from lightning_mobillm.server_config import ServerConfig

        return ServerConfig(**{**self.server, **overrides})

    def workdir(self) -> Path:
        """The server's folder (``server.workdir``, absolute; default ``flower-fed-server`` in the ServerApp's)."""
        return Path(self.server.get("workdir") or "flower-fed-server").expanduser().resolve()

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` (``flower.summary``, default ``<server.workdir>/summary.json``) atomically."""
        path = Path(self.flower["summary"]).expanduser() if self.flower.get("summary") else (
            self.workdir() / "summary.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        os.replace(tmp, path)
        return path
