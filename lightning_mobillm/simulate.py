"""Time-to-accuracy on other devices and links, simulated from what a run measured on this machine.

A benchmark run measures, per epoch, the device's busy seconds, the bytes sent each way, the server's busy
seconds and the steps taken (``summary.json``, written by :class:`~lightning_mobillm.callbacks.DeviceMonitor`).
This module turns those measurements into the wall time the same epoch would take with another device
(a :class:`DeviceProfile`, a compute speed relative to the CPU the benchmark ran on) and another link
(a :class:`Link`, bandwidth and round-trip latency). Only the device's compute is rescaled: the server's
seconds are used as measured and the bytes are what the run actually sent.

Everything here is plain Python arithmetic except :func:`measure_cpu_gflops`, which imports torch to
measure this CPU; ``docs/profiles.md`` says where every profile's number comes from.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class DeviceProfile:
    """A device the measured run is projected onto.

    The one quantity the simulation uses is the device's compute speed relative to the CPU the benchmark
    ran on (:meth:`factor`): ``speed_vs_this_cpu`` when given, else ``achievable_gflops`` divided by this
    CPU's measured GFLOPS (:func:`measure_cpu_gflops`, in the dtype the benchmark's backbone ran in).

    Args:
        name: short name, the key in :data:`PROFILES` and in the benchmark's JSON.
        speed_vs_this_cpu: a fixed speed factor (2.0 = computes twice as fast as this CPU), or ``None``
            to derive it from ``achievable_gflops``.
        achievable_gflops: sustained GFLOPS the device reaches on this kind of workload (dense layers of
            a small transformer), not its peak.
        memory_gb: the device's memory, reported next to the measured peak memory of each method.
        notes: how ``achievable_gflops`` was derived.
        source: where the figures come from.
    """

    name: str
    speed_vs_this_cpu: float | None = None
    achievable_gflops: float | None = None
    memory_gb: float | None = None
    notes: str = ""
    source: str = ""

    def factor(self, cpu_gflops: float | None) -> float:
        """Speed of this device relative to the benchmark's CPU, which measured ``cpu_gflops``."""
        if self.speed_vs_this_cpu is not None:
            return self.speed_vs_this_cpu
        if self.achievable_gflops is None or not cpu_gflops:
            raise ValueError(
                f"profile {self.name!r} needs speed_vs_this_cpu, or achievable_gflops and the "
                f"measured GFLOPS of this CPU"
            )
        return self.achievable_gflops / cpu_gflops


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="this_cpu",
            speed_vs_this_cpu=1.0,
            notes="the CPU the benchmark ran on: factor 1 by definition",
            source="measured",
        ),
        DeviceProfile(
            name="jetson_xavier_nx",
            achievable_gflops=422.4,
            memory_gb=8.0,
            notes="Volta GPU fp32 peak 384 CUDA cores x 2 FLOP per FMA x 1.1 GHz = 844.8 GFLOPS; assumed "
            "50% of peak sustained on small transformer layers (an assumption, see docs/profiles.md)",
            source="NVIDIA Jetson Xavier NX data sheet DA-09366-001 (384 CUDA cores, 48 Tensor cores, GPU "
            "max 1100 MHz, 8 GB LPDDR4x); the MobiLLM paper (IEEE JSTSP 2025) ran its device on it",
        ),
        DeviceProfile(
            name="phone",
            achievable_gflops=30.0,
            memory_gb=12.0,
            notes="flagship phone CPU (Snapdragon 8 series): upper end of the 15-30 GFLOPS measured for "
            "on-device DNN training on the CPU (faster there than on the phone's GPU); memory of a "
            "2024 flagship (assumed)",
            source="Das, Kwon, Chauhan, Mascolo: Enabling On-Device Smartphone GPU based Training: Lessons "
            "Learned, arXiv:2202.10100 (2022)",
        ),
    )
}


@dataclass(frozen=True)
class Link:
    """The network between the device and the server.

    Args:
        name: short name, the key in :data:`LINKS` and in the benchmark's JSON.
        mbit_per_s: uplink bandwidth (device to server), in megabits (10^6 bits) per second.
        latency_ms: round-trip time, charged once per training step that exchanges bytes.
        down_mbit_per_s: downlink bandwidth; ``None`` = the same as the uplink.
    """

    name: str
    mbit_per_s: float
    latency_ms: float = 20.0
    down_mbit_per_s: float | None = None

    def transfer_s(self, bytes_up: float, bytes_down: float) -> float:
        """Seconds to send ``bytes_up`` up and ``bytes_down`` down, latency excluded."""
        down = self.mbit_per_s if self.down_mbit_per_s is None else self.down_mbit_per_s
        return bytes_up * 8 / (self.mbit_per_s * 1e6) + bytes_down * 8 / (down * 1e6)


LINKS: dict[str, Link] = {
    lk.name: lk for lk in (Link("10mbit", 10.0), Link("50mbit", 50.0), Link("200mbit", 200.0))
}


def parse_profile(spec: str) -> DeviceProfile:
    """A profile from the command line: ``NAME=FACTOR`` (speed vs this CPU) or ``NAME=<G>gflops``."""
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=FACTOR or NAME=<G>gflops, got {spec!r}")
    if value.lower().endswith("gflops"):
        return DeviceProfile(name, achievable_gflops=float(value[: -len("gflops")]), notes="command line")
    return DeviceProfile(name, speed_vs_this_cpu=float(value), notes="command line")


def parse_link(spec: str) -> Link:
    """A link from the command line: ``NAME=UP_MBIT[/DOWN_MBIT][@LATENCY_MS]``, e.g. ``lte=20/50@40``."""
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=UP_MBIT[/DOWN_MBIT][@LATENCY_MS], got {spec!r}")
    rates, _, latency = value.partition("@")
    up, _, down = rates.partition("/")
    link = Link(name, float(up), down_mbit_per_s=float(down) if down else None)
    return replace(link, latency_ms=float(latency)) if latency else link


def measure_cpu_gflops(
    dtype: str = "float32", n: int = 1024, window_s: float = 0.5, windows: int = 3
) -> float:
    """GFLOPS of this CPU on an ``n x n`` matmul in ``dtype`` with torch's default threads.

    Each of ``windows`` windows repeats the matmul for about ``window_s`` seconds; the best window counts
    (interference from other processes only ever slows a window down). A matmul is ``2 n^3`` FLOPs.
    """
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(windows):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < window_s:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / elapsed / 1e9)
    return best


def simulate_epoch_time(
    device_busy_s: float,
    bytes_up: float,
    bytes_down: float,
    server_busy_s: float,
    steps: int,
    profile_factor: float,
    link: Link,
    overlap: bool,
) -> float:
    """Seconds one training epoch takes on a device ``profile_factor`` times as fast as the benchmark's CPU.

    With ``device = device_busy_s / profile_factor``, ``comm = link.transfer_s(bytes_up, bytes_down) +
    steps * latency_ms / 1000`` and ``server = server_busy_s``:

    * no bytes exchanged (training on the device): ``device``; there is no link and no server;
    * ``overlap=False`` (each step waits for the previous one): ``device + comm + server``;
    * ``overlap=True`` (MobiLLM's pipeline: the device forwards batch k+1 while the link and the server
      handle batch k): a three-stage pipeline over ``steps`` equal steps takes
      ``max(device, comm, server) + (device + comm + server - max(device, comm, server)) / steps``: the
      slowest stage runs for the whole epoch, and the first step still has to pass through the other two
      stages (pipeline fill). It assumes enough batches in flight to keep every stage busy.
    """
    if profile_factor <= 0:
        raise ValueError(f"profile_factor must be > 0, got {profile_factor}")
    device = device_busy_s / profile_factor
    if bytes_up + bytes_down == 0:
        return device
    if steps < 1:
        raise ValueError(f"an epoch that exchanged bytes needs steps >= 1, got {steps}")
    comm = link.transfer_s(bytes_up, bytes_down) + steps * link.latency_ms / 1000
    if not overlap:
        return device + comm + server_busy_s
    slowest = max(device, comm, server_busy_s)
    return slowest + (device + comm + server_busy_s - slowest) / steps


def simulated_curve(
    summary: Mapping[str, Any], profile_factor: float, link: Link, overlap: bool
) -> list[tuple[float, float]]:
    """``(simulated seconds, val_acc)`` for every validation point of a run, in step order.

    Uses ``summary["by_epoch"]`` (per epoch: ``epoch``, ``steps``, ``device_busy_s``, ``server_busy_s``,
    ``bytes_up``, ``bytes_down``) and ``summary["val_history"]`` (``step``, ``epoch``, ``val_acc``). A
    validation point in epoch ``e`` at global step ``s`` is placed at the simulated end of the epochs before
    ``e`` plus ``(s - steps before e) / steps of e`` of epoch ``e``'s simulated time (linear within the
    epoch). Validation passes themselves take no simulated time.
    """
    start_s, first_step, bounds = 0.0, 0, {}
    for ep in sorted(summary["by_epoch"], key=lambda e: e["epoch"]):
        seconds = simulate_epoch_time(
            ep["device_busy_s"],
            ep["bytes_up"],
            ep["bytes_down"],
            ep["server_busy_s"],
            ep["steps"],
            profile_factor,
            link,
            overlap,
        )
        bounds[ep["epoch"]] = (first_step, ep["steps"], start_s, seconds)
        start_s += seconds
        first_step += ep["steps"]
    curve = []
    for point in sorted(summary["val_history"], key=lambda v: v["step"]):
        first, steps, start, seconds = bounds[point["epoch"]]
        share = min(max((point["step"] - first) / steps, 0.0), 1.0) if steps else 1.0
        curve.append((start + share * seconds, point["val_acc"]))
    return curve


#: How far below a target an accuracy may read and still reach it: accuracies are logged in float32, where 108
#: of 120 reads 0.89999998; a real shortfall this small would need over a million validation samples.
ACC_TOLERANCE = 1e-6


def reaches(acc: float, target_acc: float) -> bool:
    """Whether a logged accuracy reaches ``target_acc`` (up to the float32 rounding of :data:`ACC_TOLERANCE`)."""
    return acc >= target_acc - ACC_TOLERANCE


def time_to_accuracy(
    summary: Mapping[str, Any], profile_factor: float, link: Link, overlap: bool, target_acc: float
) -> float | None:
    """The first simulated time at which validation accuracy reached ``target_acc`` (a fraction, see
    :func:`reaches`), or ``None`` when no validation point did (see :func:`simulated_curve`)."""
    for seconds, acc in simulated_curve(summary, profile_factor, link, overlap):
        if reaches(acc, target_acc):
            return seconds
    return None
