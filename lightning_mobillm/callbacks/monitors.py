"""``DeviceMonitor``: what the device spends (bytes on the wire, compute, memory) and a run summary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil

from lightning_mobillm.callbacks.quantized_transfer import QuantizedTransfer
from lightning_mobillm.rss import PeakPhases, peak_rss_mb
from lightning_mobillm.stats import DeviceStats


class DeviceMonitor(L.Callback):
    """Logs per step ``comm/bytes_up``, ``comm/bytes_down`` (cumulative, counted where frames are
    serialised), ``time/device_step_s``, ``time/server_step_s``, ``mem/device_peak_rss_mb``; and at the
    end of ``fit`` writes ``summary.json`` into the run's log folder.

    Memory is reported per phase (:class:`~lightning_mobillm.rss.PeakPhases`): ``device_load_peak_rss_mb``
    from the process start to the first training batch (loading the backbone, setup, the sanity check),
    ``device_first_step_peak_rss_mb`` for the first step (lazy allocations, optimizer state), and
    ``device_steady_peak_rss_mb`` for the rest of ``fit``; ``device_peak_rss_mb`` is the whole run's.
    The phases reset the process's high-water mark, so one monitor per process.

    It works for every method of the framework, on-device baselines included. A method that talks to a
    server keeps a :class:`~lightning_mobillm.stats.DeviceStats` (``device_stats`` on its strategy, or on
    its LightningModule) and the monitor reads that one typed object; an on-device baseline has none, and
    its device is busy for the whole training batch.

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
        self._phases = PeakPhases()

    @staticmethod
    def _stats(trainer: L.Trainer) -> DeviceStats | None:
        for owner in (trainer.strategy, trainer.lightning_module):
            stats = getattr(owner, "device_stats", None)
            if isinstance(stats, DeviceStats):
                return stats
        return None

    def _counters(self, trainer: L.Trainer) -> dict[str, float]:
        owned = self._stats(trainer)
        stats = owned or DeviceStats(device_busy_s=None)
        link = stats.link.snapshot()
        busy = stats.device_busy_s if stats.device_busy_s is not None else self._own_busy_s - stats.link_wait_s
        has_train_counts = owned is not None
        return {
            "steps": float(trainer.global_step),
            "samples": float(self._samples),
            "device_busy_s": float(busy),
            "server_busy_s": float(stats.server_busy_s),
            "bytes_up": float(stats.train_bytes_up if has_train_counts else link["bytes_up"]),
            "bytes_down": float(stats.train_bytes_down if has_train_counts else link["bytes_down"]),
            "wall_s": time.perf_counter() - self._t0,
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._own_busy_s = 0.0
        self._samples = 0
        self.history = []
        self.by_epoch = []
        self._phases = PeakPhases()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._phases.mark("load")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._counters(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._own_busy_s += time.perf_counter() - self._batch_t0
        if "first_step" not in self._phases.peaks_mb:
            self._phases.mark("first_step")
        labels = batch.get("labels") if isinstance(batch, dict) else None
        self._samples += int(labels.shape[0]) if labels is not None else 0
        stats = self._stats(trainer) or DeviceStats()
        link = stats.link.snapshot()
        metrics = {
            "comm/bytes_up": float(link["bytes_up"]),
            "comm/bytes_down": float(link["bytes_down"]),
            "time/device_step_s": float(stats.last_device_step_s),
            "time/server_step_s": float(stats.last_server_step_s),
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
        stats = self._stats(trainer) or DeviceStats(device_busy_s=None, device_forwards=None)
        link = stats.link.snapshot()
        m = trainer.callback_metrics
        counters = self._counters(trainer)
        samples = stats.train_samples or self._samples or None
        transfer = next((c for c in trainer.callbacks if isinstance(c, QuantizedTransfer)), None)
        peaks = self._phases.peaks_mb
        if "first_step" in peaks:
            self._phases.mark("steady")

        def per_sample(value: float | None) -> float | None:
            return value / samples if samples and value is not None else None

        self.summary = {
            "device_pid": os.getpid(),
            "server_pid": stats.server_pid,
            "method": type(pl_module).__name__,
            "codec": stats.run.get("codec", getattr(transfer, "codec", None)),
            "select": stats.run.get("select"),
            "eval_select": stats.run.get("eval_select"),
            "pipeline_depth": stats.run.get("pipeline_depth"),
            "overlap": stats.overlaps_server,
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
            "device_peak_rss_mb": self._phases.whole_run_mb,
            "device_load_peak_rss_mb": peaks.get("load"),
            "device_first_step_peak_rss_mb": peaks.get("first_step"),
            "device_steady_peak_rss_mb": peaks.get("steady"),
            "device_rss_phases_separated": self._phases.separated,
            "device_busy_s": counters["device_busy_s"],
            "device_busy_s_per_sample": per_sample(counters["device_busy_s"]),
            "train_bytes_up_by_epoch": {str(k): int(v["train_bytes_up"]) for k, v in stats.by_epoch.items()},
            "device_busy_s_by_epoch": {str(k): v["device_busy_s"] for k, v in stats.by_epoch.items()},
            "device_forwards": stats.device_forwards,
            "eval_cache_hits": stats.eval_cache_hits,
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
