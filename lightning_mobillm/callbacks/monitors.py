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

    Args:
        summary_file: file name of the summary, written into ``trainer.log_dir``.
    """

    def __init__(self, summary_file: str = "summary.json") -> None:
        self.summary_file = summary_file
        self._t0 = 0.0
        self.history: list[dict[str, float]] = []
        self.summary: dict[str, Any] = {}

    @staticmethod
    def _link(trainer: L.Trainer) -> dict[str, int]:
        stats = getattr(trainer.strategy, "link_stats", None)
        return stats.snapshot() if stats is not None else {"bytes_up": 0, "bytes_down": 0, "calls": 0}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self.history = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        s = trainer.strategy
        link = self._link(trainer)
        metrics = {
            "comm/bytes_up": float(link["bytes_up"]),
            "comm/bytes_down": float(link["bytes_down"]),
            "time/device_step_s": float(getattr(s, "last_device_step_s", 0.0)),
            "time/server_step_s": float(getattr(s, "last_train_reply", {}).get("server_step_s", 0.0)),
            "mem/device_peak_rss_mb": peak_rss_mb(),
            "mem/device_rss_mb": psutil.Process().memory_info().rss / 2**20,
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        if "val/acc" in m:
            self.history.append({
                "elapsed_s": time.perf_counter() - self._t0,
                "step": trainer.global_step,
                "val_acc": float(m["val/acc"]),
                "val_f1": float(m.get("val/f1", float("nan"))),
            })

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = trainer.strategy
        link = self._link(trainer)
        m = trainer.callback_metrics
        steps = trainer.global_step
        samples = int(getattr(s, "train_samples", 0)) or None
        transfer = getattr(s, "transfer", None)
        self.summary = {
            "device_pid": os.getpid(),
            "server_pid": getattr(s, "server_pid", None),
            "codec": getattr(transfer, "codec", None),
            "select": getattr(s, "select", None),
            "pipeline_depth": getattr(s, "pipeline_depth", None),
            "steps": steps,
            "epochs": trainer.current_epoch,
            "bytes_up": link["bytes_up"],
            "bytes_down": link["bytes_down"],
            "calls": link["calls"],
            "train_samples": samples,
            "bytes_up_per_sample": link["bytes_up"] / samples if samples else None,
            "device_peak_rss_mb": peak_rss_mb(),
            "device_busy_s": getattr(s, "device_busy_s", None),
            "train_bytes_up_by_epoch": {str(k): v for k, v in getattr(s, "train_bytes_up_by_epoch", {}).items()},
            "device_busy_s_by_epoch": {str(k): v for k, v in getattr(s, "device_busy_by_epoch", {}).items()},
            "device_forwards": getattr(s, "device_forwards", None),
            "server_busy_s": getattr(s, "server_busy_s", None),
            "wall_s": time.perf_counter() - self._t0,
            "train_loss": float(m["train/loss_epoch"]) if "train/loss_epoch" in m else None,
            "val_acc": float(m["val/acc"]) if "val/acc" in m else None,
            "val_f1": float(m["val/f1"]) if "val/f1" in m else None,
            "quant_rel_error": getattr(transfer, "last_rel_error", None),
            "val_history": self.history,
        }
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.summary_file).write_text(json.dumps(self.summary, indent=2) + "\n")
