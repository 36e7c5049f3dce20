"""``DeviceMonitor``: what the device spends (bytes on the wire, compute, memory) and a run summary."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, in MiB (Linux ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DeviceMonitor(L.Callback):
    """Logs per step ``comm/bytes_up``, ``comm/bytes_down`` (cumulative, counted where frames are
    serialised), ``time/device_step_s``, ``time/server_step_s``, ``mem/device_peak_rss_mb``; and at the
    end of ``fit`` writes ``summary.json`` into the run's log folder.

    It works for every method of the framework, on-device baselines included. The counters come from
    whichever of the strategy or the LightningModule has them:

    * ``train_bytes_up`` / ``train_bytes_down``: bytes of the training frames and their replies (what
      ``bytes_up``/``bytes_down`` and the per-sample figures report; validation traffic excluded);
    * ``link_stats`` (a :class:`~lightning_mobillm.transport.link.LinkStats`): every byte on the wire
      (``link_bytes_up``/``link_bytes_down``; also ``bytes_*`` when there are no training counters);
    * ``device_busy_s``: seconds of compute on the device (excluding waits for the server); without
      it, the device is busy for the whole training batch less ``link_wait_s`` (seconds blocked on the
      link, e.g. split learning), if given;
    * ``server_busy_s``: seconds the server spent on this device's training steps;
    * ``overlaps_server``: True when the device computes while the link and the server work.

    Args:
        summary_file: file name of the summary, written into ``trainer.log_dir`` (or an absolute path).
    """

    def __init__(self, summary_file: str = "summary.json") -> None:
        self.summary_file = summary_file
        self._t0 = 0.0
        self._batch_t0 = 0.0
        self._own_busy_s = 0.0
        self._samples = 0
        self._epoch_start: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.by_epoch: list[dict[str, float]] = []
        self.summary: dict[str, Any] = {}

    @staticmethod
    def _attr(trainer: L.Trainer, name: str) -> Any:
        for owner in (trainer.strategy, trainer.lightning_module):
            value = getattr(owner, name, None)
            if value is not None:
                return value
        return None

    def _link(self, trainer: L.Trainer) -> dict[str, int]:
        stats = self._attr(trainer, "link_stats")
        return stats.snapshot() if stats is not None else {"bytes_up": 0, "bytes_down": 0, "calls": 0}

    def _counters(self, trainer: L.Trainer) -> dict[str, float]:
        link = self._link(trainer)
        up, down = self._attr(trainer, "train_bytes_up"), self._attr(trainer, "train_bytes_down")
        busy = self._attr(trainer, "device_busy_s")
        return {
            "steps": float(trainer.global_step),
            "samples": float(self._samples),
            "device_busy_s": float(busy if busy is not None
                                   else self._own_busy_s - float(self._attr(trainer, "link_wait_s") or 0.0)),
            "server_busy_s": float(self._attr(trainer, "server_busy_s") or 0.0),
            "bytes_up": float(up if up is not None else link["bytes_up"]),
            "bytes_down": float(down if down is not None else link["bytes_down"]),
            "wall_s": time.perf_counter() - self._t0,
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._own_busy_s = 0.0
        self._samples = 0
        self.history = []
        self.by_epoch = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._counters(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._own_busy_s += time.perf_counter() - self._batch_t0
        labels = batch.get("labels") if isinstance(batch, dict) else None
        self._samples += int(labels.shape[0]) if labels is not None else 0
        link = self._link(trainer)
        s = trainer.strategy
        metrics = {
            "comm/bytes_up": float(link["bytes_up"]),
            "comm/bytes_down": float(link["bytes_down"]),
            "time/device_step_s": float(getattr(s, "last_device_step_s", 0.0)),
            "time/server_step_s": float(getattr(s, "last_train_reply", {}).get("server_step_s", 0.0)),
            "mem/device_peak_rss_mb": peak_rss_mb(),
            "mem/device_rss_mb": psutil.Process().memory_info().rss / 2**20,
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = self._counters(trainer)
        entry: dict[str, float] = {"epoch": trainer.current_epoch}
        for key, value in now.items():
            delta = value - self._epoch_start.get(key, 0.0)
            entry[key] = int(delta) if key in ("steps", "samples", "bytes_up", "bytes_down") else delta
        self.by_epoch.append(entry)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        if "val/acc" in m:
            self.history.append({
                "elapsed_s": time.perf_counter() - self._t0,
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "val_acc": float(m["val/acc"]),
                "val_f1": float(m.get("val/f1", float("nan"))),
            })

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = trainer.strategy
        link = self._link(trainer)
        m = trainer.callback_metrics
        counters = self._counters(trainer)
        samples = int(getattr(s, "train_samples", 0)) or self._samples or None
        transfer = getattr(s, "transfer", None)

        def per_sample(value: float | None) -> float | None:
            return value / samples if samples and value is not None else None

        self.summary = {
            "device_pid": os.getpid(),
            "server_pid": self._attr(trainer, "server_pid"),
            "method": type(pl_module).__name__,
            "codec": getattr(transfer, "codec", None),
            "select": getattr(s, "select", None),
            "pipeline_depth": getattr(s, "pipeline_depth", None),
            "overlap": bool(self._attr(trainer, "overlaps_server")),
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "bytes_up": int(counters["bytes_up"]),
            "bytes_down": int(counters["bytes_down"]),
            "link_bytes_up": link["bytes_up"],
            "link_bytes_down": link["bytes_down"],
            "calls": link["calls"],
            "train_samples": samples,
            "bytes_up_per_sample": per_sample(counters["bytes_up"]),
            "bytes_down_per_sample": per_sample(counters["bytes_down"]),
            "device_peak_rss_mb": peak_rss_mb(),
            "device_busy_s": counters["device_busy_s"],
            "device_busy_s_per_sample": per_sample(counters["device_busy_s"]),
            "train_bytes_up_by_epoch": {str(k): v for k, v in getattr(s, "train_bytes_up_by_epoch", {}).items()},
            "device_busy_s_by_epoch": {str(k): v for k, v in getattr(s, "device_busy_by_epoch", {}).items()},
            "device_forwards": getattr(s, "device_forwards", None),
            "server_busy_s": counters["server_busy_s"],
            "wall_s": counters["wall_s"],
            "train_loss": float(m["train/loss_epoch"]) if "train/loss_epoch" in m else None,
            "val_acc": float(m["val/acc"]) if "val/acc" in m else None,
            "val_f1": float(m["val/f1"]) if "val/f1" in m else None,
            "quant_rel_error": getattr(transfer, "last_rel_error", None),
            "val_history": self.history,
            "by_epoch": self.by_epoch,
        }
        path = Path(self.summary_file)
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary, indent=2) + "\n")
