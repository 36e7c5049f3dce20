"""``DeviceStats``: what a device spends on a server-assisted run, as one typed object.

The strategy (MobiLLM, PAE) or a module that talks to a server itself (the split-learning baseline) keeps
one and updates it where the work happens; :class:`~lightning_mobillm.callbacks.DeviceMonitor` reads it,
and nothing reads the strategy's attributes by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_mobillm.transport.link import LinkStats

__all__ = ["DeviceStats"]


@dataclass
class DeviceStats:
    """Counters of one device run (training only, unless named ``link``).

    Attributes:
        device_busy_s: seconds of device compute for training (forward, quantise, frame); None when the
            owner does not measure it (the monitor then takes the batch time less ``link_wait_s``).
        link_wait_s: seconds training steps spent blocked on the server (not device compute).
        server_busy_s: seconds the server spent on this device's training steps (from its replies).
        train_bytes_up, train_bytes_down: bytes of training frames and their replies, counted where they
            are (de)serialised.
        train_samples: training samples sent (or named by cache key).
        device_forwards: backbone forwards on the device (training and evaluation); None if not counted.
        eval_cache_hits: validation batches sent from the device's :class:`EvalTapCache`, without a forward.
        by_epoch: ``{epoch: {"device_busy_s": s, "train_bytes_up": n}}``.
        last_device_step_s, last_server_step_s: the latest training step's times.
        last_train_reply: the latest training reply's header (loss, lr, cache counters...).
        overlaps_server: whether the device computes while the link and the server work.
        server_pid: the server process (None before connecting; this process for an in-process link).
        link: every byte on the link, validation included.
        run: how the run is set up (codec, token selection, pipeline depth), for the summary.
    """

    device_busy_s: float | None = 0.0
    link_wait_s: float = 0.0
    server_busy_s: float = 0.0
    train_bytes_up: int = 0
    train_bytes_down: int = 0
    train_samples: int = 0
    device_forwards: int | None = 0
    eval_cache_hits: int = 0
    by_epoch: dict[int, dict[str, float]] = field(default_factory=dict)
    last_device_step_s: float = 0.0
    last_server_step_s: float = 0.0
    last_train_reply: dict[str, Any] = field(default_factory=dict)
    overlaps_server: bool = False
    server_pid: int | None = None
    link: LinkStats = field(default_factory=LinkStats)
    run: dict[str, Any] = field(default_factory=dict)

    def add_device_step(self, epoch: int, seconds: float, frame_bytes: int) -> None:
        """A training frame was built in ``seconds`` of device compute and is ``frame_bytes`` long."""
        self.last_device_step_s = seconds
        self.device_busy_s = (self.device_busy_s or 0.0) + seconds
        self.train_bytes_up += frame_bytes
        epoch_stats = self.by_epoch.setdefault(epoch, {"device_busy_s": 0.0, "train_bytes_up": 0})
        epoch_stats["device_busy_s"] += seconds
        epoch_stats["train_bytes_up"] += frame_bytes

    def add_server_reply(self, reply: dict[str, Any], reply_bytes: int) -> None:
        """A training reply arrived (its header and length)."""
        self.train_bytes_down += reply_bytes
        self.last_train_reply = reply
        self.last_server_step_s = float(reply.get("server_step_s", 0.0))
        self.server_busy_s += self.last_server_step_s
