"""Fed MobiLLM against its baselines on one partition, one set of device profiles and one virtual clock
(issue 10, "Measured in benchmarks/federated.py" and "Baselines in the same harness").

    python benchmarks/federated.py --preset smoke --out benchmarks/results/federated_smoke.json
    python benchmarks/federated.py --preset small --alpha 0.1 --out benchmarks/results/federated.json

What one run does:

1. **Data and devices.** BBC News' training split is partitioned across the preset's devices (Dirichlet over
   labels, seeded, empty devices allowed when ``min_partition_size`` is 0); each device gets a backbone type
   (dealt evenly in a seeded order) and a device profile (``assign_profiles`` over ``simulate.py``'s
   ``PROFILES`` and ``LINKS``, their speeds resolved against this CPU's measured GFLOPS, or ``--cpu-gflops``).
2. **The devices' one pass.** One backbone type at a time (one copy of the weights in memory, freed before the
   next): every device of that type runs ``DeviceWorker.upload`` on its shard (its own target key and sample
   secret), which measures its busy seconds; the pooled held-out set (the validation split) is forwarded once
   per type for the devices' local evaluations.
3. **The server's step costs** are measured once per backbone type on a scratch trainer and then replayed, so
   the simulations below are deterministic for those costs.
4. **The methods**, on the virtual clock (``lightning_mobillm.fed.clock``; nothing sleeps):

   * ``fed_mobillm``: ``FedTrainer`` + ``simulate_async`` over the uploads' arrival times (``plan_uploads``),
     training on each arrival, replaying the cache in between and for ``final_replay_epochs`` after the last;
     every ``eval_every_s`` virtual seconds each device downloads its parts and scores the held-out set.
   * ``no_replay``: the same without replay (shows arrival skew).
   * ``fed_mobillm_sync``: ``run_rounds``: round 0 waits for every device's upload, each round is one epoch of
     ``train_round`` over every upload so far.
   * ``single``: each device trains a side network of its own on its own upload only (on the device: its
     training steps count as its compute at its speed; nothing is sent).
   * ``centralized_pae``: per backbone type, one ``FedTrainer`` on all that type's uploads pooled, for
     ``centralized_epochs`` epochs (a reference, not a federation: no clock).
   * ``fedavg_lora``: synchronous FedAvg over PEFT LoRA (r 8 on q/v) plus a head at the loss token, trained for
     real (each selected device's forward and backward, measured), one FedAvg group per backbone type (FedAvg
     averages only within one architecture), ``fedavg_fraction`` of a group's devices per round, its own clock
     per group (``run_rounds``); the backbones are loaded again, one at a time.

5. **The live row** (``--live``, on by default): a real ``serve --role fed`` process (``recipes/fed/server.yaml``
   on loopback, per-device tokens) and one ``fit`` device process per backbone (``recipes/fed/<alias>-bbc.yaml``)
   over gRPC, on the preset's data subset: ``live`` holds the pids, backbone types and the devices' mean
   ``val_acc`` (null, with ``live_note`` saying why, when it did not run).

Per method (``methods`` in the JSON): ``val_acc`` (mean over the evaluated devices, each with its own download,
on the pooled held-out set), ``val_acc_min``/``val_acc_max`` (over backbone types, each type's mean over its
devices), ``device_compute_s_per_device`` (measured busy seconds / the profile's speed, mean over devices with
data), ``bytes_up_per_device`` and ``bytes_down_per_device`` (the tensors' bytes; one download of the parts a
device evaluates with), ``sim_time_to_target_s`` (first evaluation at or above ``target_acc``; null when not
reached), ``server_busy_s`` (virtual), ``rounds`` (round-based methods), and the curve on virtual time.

A run on a shared machine measures busy seconds that other processes can inflate: the JSON says so.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lightning_mobillm.fed.clock import (
    DeviceWork,
    FedDeviceProfile,
    assign_profiles,
    plan_uploads,
    run_rounds,
)
from lightning_mobillm.fed.device import evaluate_side
from lightning_mobillm.fed.model import DEFAULT_HEAD_RANK, FedDownload, FedSideModule
from lightning_mobillm.fed.trainer import FedTrainer, simulate_async
from lightning_mobillm.fed.upload import Upload
from lightning_mobillm.privacy import TargetTransform
from lightning_mobillm.simulate import LINKS, PROFILES, measure_cpu_gflops, reaches

REPO = Path(__file__).resolve().parents[1]
TARGET_ACC = 0.85
METHODS = ("fed_mobillm", "fed_mobillm_sync", "no_replay", "single", "fedavg_lora", "centralized_pae")
#: the fields every method's entry has (``None`` where a method has no such figure)
METHOD_FIELDS = ("val_acc", "val_acc_min", "val_acc_max", "device_compute_s_per_device", "bytes_up_per_device",
                 "bytes_down_per_device", "sim_time_to_target_s", "server_busy_s", "rounds")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """One size of the benchmark; ``small``/``medium``/``full`` differ from ``smoke`` only in these numbers.

    Args:
        devices: number of devices.
        backbones: packaged aliases (or hub ids / folders); K is the depth of the shallowest.
        alpha: Dirichlet concentration over labels.
        min_partition_size: the smallest device allowed (0: empty devices allowed).
        max_length: tokens per sample.
        limit_train_samples: a stratified subset of BBC News' training split (None: all 1602).
        limit_eval_samples: a stratified subset of the validation split, the pooled held-out set (None: 178).
        dtype: the backbones' dtype on the devices (profiles are resolved against this CPU's GFLOPS in it).
        forward_batch_size: samples per device forward.
        codec: the uploads' codec.
        out_dim: width of the devices' keyed targets.
        rr_epsilon: randomized response on the label before the transform (None: off).
        profile_mix: ``(device profile, link, weight)`` of ``simulate.PROFILES`` and ``simulate.LINKS``.
        batch_size: samples per server step (every method's side network).
        lr: the side networks' AdamW learning rate.
        arrival_epochs: passes over an arrival before the server goes back to replay.
        final_replay_epochs: replay epochs over the whole cache after the last arrival (Fed MobiLLM).
        evals: evaluations on the virtual clock over the asynchronous run (sets ``eval_every_s``).
        sync_rounds: rounds of the synchronous variant (one epoch over every upload each).
        single_epochs: epochs of each device's own side network (``single``).
        centralized_epochs: epochs of centralised PAE per backbone type.
        fedavg_rounds, fedavg_fraction, fedavg_local_epochs, fedavg_lora_r: the FedAvg-LoRA baseline's rounds
            (per backbone-type group), share of a group's devices per round, local epochs and LoRA rank.
        head_rank: the shared side networks' neck (``FedSideModule(head_rank=...)``, 16 as the server's default;
            None: a d* x out_dim head per device).
    """

    devices: int
    backbones: tuple[str, ...]
    alpha: float = 0.5
    min_partition_size: int = 0
    max_length: int = 128
    limit_train_samples: int | None = None
    limit_eval_samples: int | None = None
    dtype: str = "bfloat16"
    forward_batch_size: int = 8
    codec: str = "int8"
    out_dim: int = 16
    rr_epsilon: float | None = 4.0
    profile_mix: tuple[tuple[str, str, float], ...] = (
        ("phone", "10mbit", 2.0), ("phone", "50mbit", 1.0), ("jetson_xavier_nx", "50mbit", 1.0),
        ("this_cpu", "200mbit", 1.0))
    batch_size: int = 32
    lr: float = 1e-3
    arrival_epochs: int = 1
    final_replay_epochs: int = 10
    evals: int = 20
    sync_rounds: int = 20
    single_epochs: int = 20
    centralized_epochs: int = 30
    fedavg_rounds: int = 20
    fedavg_fraction: float = 0.5
    fedavg_local_epochs: int = 1
    fedavg_lora_r: int = 8
    head_rank: int | None = DEFAULT_HEAD_RANK


TWO = ("smollm2-135m", "gemma3-270m")
PRESETS: dict[str, Preset] = {
    # a few devices on tiny steps: does everything run (under 10 minutes here)
    "smoke": Preset(devices=4, backbones=TWO, max_length=64, limit_train_samples=48, limit_eval_samples=40,
                    batch_size=8, final_replay_epochs=5, evals=6, sync_rounds=3, single_epochs=5,
                    centralized_epochs=10, fedavg_rounds=2),
    # 20 devices of two types; FedAvg-LoRA samples 30% of a group per round (3 devices: 20 rounds fit in ~45 min)
    "small": Preset(devices=20, backbones=TWO, fedavg_fraction=0.3),
    "medium": Preset(devices=20, backbones=(*TWO, "qwen2.5-coder-0.5b"), fedavg_fraction=0.3),
    "full": Preset(devices=100, backbones=(*TWO, "qwen2.5-coder-0.5b")),
}


@dataclass
class Settings:
    """What the method runners need beyond the federation (plain numbers; the preset's, resolved)."""

    batch_size: int
    lr: float
    arrival_epochs: int
    final_replay_epochs: int
    evals: int
    sync_rounds: int
    single_epochs: int
    centralized_epochs: int
    target_acc: float = TARGET_ACC
    seed: int = 0
    #: the uploads' codec, applied to the held-out taps before the side network (what the server trained on)
    codec: str | None = None
    #: randomized response on the label before a keyed transform (the ``device`` and ``federation`` spaces)
    rr_epsilon: float | None = None
    #: ``FedSideModule``'s ``head_rank`` (None: no neck)
    head_rank: int | None = DEFAULT_HEAD_RANK

    @classmethod
    def of(cls, preset: Preset, seed: int, target_acc: float = TARGET_ACC) -> Settings:
        return cls(preset.batch_size, preset.lr, preset.arrival_epochs, preset.final_replay_epochs, preset.evals,
                   preset.sync_rounds, preset.single_epochs, preset.centralized_epochs, target_acc, seed,
                   preset.codec, preset.rr_epsilon, preset.head_rank)


# --------------------------------------------------------------------------- the federation (pure data)


@dataclass
class EvalSet:
    """The pooled held-out set as one backbone type sees it: aligned taps, zero-shot logits, labels."""

    acts: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor

    @property
    def zero_shot_acc(self) -> float:
        return float((self.logits.argmax(-1) == self.labels).float().mean()) if len(self.labels) else math.nan


@dataclass
class SimDevice:
    """One simulated device: its type, profile, the upload it made (None for an empty shard), its measured busy
    seconds (forward, targets, quantising) and its target transform (to evaluate; never sent)."""

    id: str
    backbone_type: str
    profile: FedDeviceProfile
    transform: TargetTransform
    upload: Upload | None = None
    busy_s: float = 0.0
    size: int = 0
    #: the shard's labels and zero-shot logits in upload order: the benchmark's own bookkeeping (who weighed
    #: when; the same uploads in another target space; the label attacks' ground truth), never sent
    labels: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None

    @property
    def compute_s(self) -> float:
        """Busy seconds on this device: measured / its speed."""
        return self.busy_s / self.profile.speed


@dataclass
class Federation:
    """Everything the method runners use: devices with their uploads, the types' widths, K, the targets' width,
    the held-out set per type and the server's measured seconds per step (``batch_size`` samples) per type."""

    devices: list[SimDevice]
    types: dict[str, int]
    k: int
    out_dim: int
    eval_sets: dict[str, EvalSet]
    step_s: dict[str, float]
    settings: Settings
    #: for the methods that need the real backbones (fedavg_lora): the partition, each type's alias and the data
    #: module's arguments; None on synthetic uploads
    source: dict[str, Any] | None = None
    #: the devices' target space (``device``: a key and a head per device)
    target_space: str = "device"

    @property
    def active(self) -> list[SimDevice]:
        """Devices that uploaded something (an empty device has no head and nothing to evaluate with)."""
        return [d for d in self.devices if d.upload is not None]

    def module(self, types: Mapping[str, int] | None = None) -> FedSideModule:
        return FedSideModule(dict(self.types if types is None else types), self.k, self.out_dim,
                             target_space=self.target_space, head_rank=self.settings.head_rank, lr=self.settings.lr,
                             seed=self.settings.seed)

    def trainer(self, types: Mapping[str, int] | None = None) -> FedTrainer:
        return FedTrainer(self.module(types), batch_size=self.settings.batch_size,
                          arrival_epochs=self.settings.arrival_epochs, seed=self.settings.seed)

    def steps(self, n: int) -> int:
        return -(-n // self.settings.batch_size)

    @property
    def replay_step_s(self) -> float:
        """One mixed mini-batch: the types' step costs weighted by their share of the uploaded samples."""
        counts = {t: sum(d.size for d in self.active if d.backbone_type == t) for t in self.types}
        total = sum(counts.values())
        if not total:
            return sum(self.step_s.values()) / len(self.step_s)
        return sum(self.step_s[t] * c for t, c in counts.items()) / total


# --------------------------------------------------------------------------- evaluation and figures


def evaluate_devices(fed: Federation, download_of: Callable[[SimDevice], FedDownload | None]) -> dict[str, Any]:
    """Every active device downloads its parts (``download_of``) and scores the held-out set locally. Returns the
    mean accuracy over devices, each type's mean and the min/max over types. A device with nothing to download
    yet (``download_of`` gives None: the server has not taken its upload) counts with its backbone's zero-shot
    accuracy, what it has without the shared model."""
    per_type: dict[str, list[float]] = {}
    downloaded = 0
    for dev in fed.active:
        download = download_of(dev)
        ev = fed.eval_sets[dev.backbone_type]
        if download is None:  # nothing to download yet: the device has its backbone's zero-shot prediction
            accuracy = ev.zero_shot_acc
        else:
            accuracy = evaluate_side(download.build(), ev.acts, ev.logits, ev.labels, dev.transform,
                                     codec=fed.settings.codec).accuracy
            downloaded += 1
        per_type.setdefault(dev.backbone_type, []).append(accuracy)
    accs = [a for v in per_type.values() for a in v]
    means = {t: sum(v) / len(v) for t, v in per_type.items()}
    return {"val_acc": sum(accs) / len(accs) if accs else None,
            "val_acc_min": min(means.values()) if means else None,
            "val_acc_max": max(means.values()) if means else None,
            "val_acc_by_type": means, "devices_evaluated": len(accs), "devices_with_download": downloaded}


def time_to_target(curve: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """The virtual time of the first curve point whose ``val_acc`` reaches ``target`` (None: never)."""
    return next((row["t"] for row in curve if row.get("val_acc") is not None and reaches(row["val_acc"], target)),
                None)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _entry(fed: Federation, final: Mapping[str, Any], curve: list[dict[str, Any]], **figures: Any) -> dict[str, Any]:
    """A method's JSON entry: the final evaluation, the figures given, the time to target from the curve."""
    out = {"status": "ran", "val_acc": final["val_acc"], "val_acc_min": final["val_acc_min"],
           "val_acc_max": final["val_acc_max"], "val_acc_by_type": final["val_acc_by_type"],
           "devices_evaluated": final["devices_evaluated"], "rounds": None,
           "zero_shot_val_acc_by_type": {t: e.zero_shot_acc for t, e in fed.eval_sets.items()}}
    out.update(figures)
    out["sim_time_to_target_s"] = time_to_target(curve, fed.settings.target_acc)
    out["best_val_acc"] = max((r["val_acc"] for r in curve if r.get("val_acc") is not None), default=None)
    out["curve"] = [{k: v for k, v in r.items() if k != "val_acc_by_type"} for r in curve]
    return out


def _upload_figures(fed: Federation, download_bytes: Sequence[int]) -> dict[str, Any]:
    """Device compute and bytes of the methods where a device forwards once, uploads once and downloads once."""
    act = fed.active
    return {"device_compute_s_per_device": _mean([d.compute_s for d in act]),
            "bytes_up_per_device": _mean([d.upload.nbytes for d in act]),
            "bytes_down_per_device": _mean(list(download_bytes))}


# --------------------------------------------------------------------------- the methods


def run_fed_mobillm(fed: Federation, replay: bool = True) -> dict[str, Any]:
    """Fed MobiLLM (``replay=False``: the ablation): asynchronous, on the uploads' arrival times."""
    s = fed.settings
    trainer = fed.trainer()
    uploads = [d.upload for d in fed.active]
    if not uploads:
        return not_run("no device has data")
    replay_s = fed.replay_step_s
    total = sum(len(u) for u in uploads)
    final_steps = fed.steps(total) * s.final_replay_epochs if replay else 0
    last = max(u.arrival_s for u in uploads)
    eval_every_s = max((last + final_steps * replay_s) / max(s.evals, 1), 1e-6)

    def step_cost(kind: str, batch: tuple[Upload, ...]) -> float:
        if kind == "arrival":
            return sum(fed.steps(len(u)) * s.arrival_epochs * fed.step_s[u.backbone_type] for u in batch)
        return replay_s

    def evaluate(tr: FedTrainer) -> dict[str, Any]:
        return evaluate_devices(fed, lambda d: tr.download(d.id) if d.id in tr.statistics()["devices"] else None)

    result = simulate_async(trainer, uploads, step_cost, evaluate=evaluate, eval_every_s=eval_every_s,
                            replay=replay, final_replay_steps=final_steps, record_samples=True)
    final = result.curve[-1]
    downloads = [trainer.download(d.id).nbytes for d in fed.active]
    stats = trainer.statistics()["totals"]
    return _entry(fed, final, result.curve, **_upload_figures(fed, downloads),
                  server_busy_s=result.run.server_busy_s, end_s=result.run.end_s, eval_every_s=eval_every_s,
                  steps={k: stats[k] for k in ("steps", "arrival_steps", "replay_steps", "replay_epochs")},
                  refused=result.refused, simulator_wall_s=result.run.wall_s,
                  timeline=timeline(fed, trainer, result.steps, result.run.end_s))


def timeline(fed: Federation, trainer: FedTrainer, steps: Sequence[Mapping[str, Any]], end_s: float,
             bins: int = 24) -> dict[str, Any]:
    """Who weighed when, on the virtual clock in ``bins`` equal bins: uploads (and their samples) landing in
    each bin, and each class's share of the sample-steps trained in it (arrival and replay steps alike; a step
    counts in the bin where it ends). The labels are the benchmark's own bookkeeping: the server never has them."""
    label = {(d.id, k): y for d in fed.active for k, y in zip(d.upload.keys, d.labels, strict=True)}
    classes = max((max(d.labels) for d in fed.active if d.labels), default=-1) + 1
    width = end_s / bins if end_s > 0 else 1.0
    edges = [i * width for i in range(bins + 1)]
    arrivals, arrived_samples = [0] * bins, [0] * bins
    for d in fed.active:
        b = min(int(d.upload.arrival_s // width), bins - 1)
        arrivals[b] += 1
        arrived_samples[b] += len(d.upload)
    counts = [[0] * classes for _ in range(bins)]
    for step in steps:
        b = min(int(step["t"] // width), bins - 1)
        for sid in trainer.sample_ids(step.get("rows", ())):
            counts[b][label[sid]] += 1
    shares = [[c / sum(row) if sum(row) else 0.0 for c in row] for row in counts]
    pooled = [sum(d.labels.count(c) for d in fed.active) for c in range(classes)]
    return {"bin_edges_s": edges, "arrivals": arrivals, "arrived_samples": arrived_samples,
            "sample_steps": [sum(row) for row in counts], "class_share": shares,
            "pooled_class_share": [c / max(sum(pooled), 1) for c in pooled]}


def run_fed_sync(fed: Federation) -> dict[str, Any]:
    """Fed MobiLLM synchronous: round 0 waits for every device's upload; each round is one epoch of
    ``train_round`` over every upload accepted so far (a device that missed a round uploads in a later one)."""
    s = fed.settings
    trainer = fed.trainer()
    devices = fed.devices
    accepted: set[int] = set()
    curve: list[dict[str, Any]] = []
    replay_s = fed.replay_step_s

    def work(r: int, d: int) -> DeviceWork:
        dev = devices[d]
        if dev.upload is None or d in accepted:
            return DeviceWork(0.0, 0.0)
        return DeviceWork(dev.busy_s, dev.upload.nbytes)

    def cost(kind: str, returned: tuple) -> float:
        new = {u.device for u in returned if devices[u.device].upload is not None} - accepted
        samples = sum(devices[d].size for d in accepted | new)
        return fed.steps(samples) * replay_s if samples else 0.0

    def on_round(rnd) -> None:
        for u in rnd.returned:
            dev = devices[u.device]
            if dev.upload is not None and u.device not in accepted:
                trainer.accept(dev.upload)
                accepted.add(u.device)
        ups = [devices[d].upload for d in sorted(accepted)]
        losses = trainer.train_round(ups) if ups else []
        row = {"t": rnd.end, "round": rnd.index, "loss": _mean(losses)}
        row.update(evaluate_devices(fed, lambda dv: trainer.download(dv.id)
                                    if dv.id in trainer.statistics()["devices"] else None))
        curve.append(row)

    run = run_rounds([d.profile for d in devices], work, cost, on_round, rounds=s.sync_rounds, seed=s.seed)
    downloads = [trainer.download(d.id).nbytes for d in fed.active if d.id in trainer.statistics()["devices"]]
    return _entry(fed, curve[-1], curve, **_upload_figures(fed, downloads), server_busy_s=run.server_busy_s,
                  rounds=len(run.rounds), end_s=run.end_s)


def run_single(fed: Federation) -> dict[str, Any]:
    """Each device trains a side network of its own, on its own upload only, on the device (nothing is sent).

    Its training costs ``steps x the server's measured step seconds for its type`` on this CPU, divided by the
    device's speed like its forward. Epoch ``e``'s evaluation is placed when the slowest device finished it."""
    s = fed.settings
    trainers = {}
    for dev in fed.active:
        tr = fed.trainer({dev.backbone_type: fed.types[dev.backbone_type]})
        tr.accept(dev.upload)
        trainers[dev.id] = tr
    curve: list[dict[str, Any]] = []
    train_s = {d.id: fed.steps(d.size) * fed.step_s[d.backbone_type] for d in fed.active}
    for epoch in range(1, s.single_epochs + 1):
        losses = [loss for dev in fed.active for loss in trainers[dev.id].train_round([dev.upload])]
        t = max((d.busy_s + epoch * train_s[d.id]) / d.profile.speed for d in fed.active)
        row = {"t": t, "epoch": epoch, "loss": _mean(losses)}
        row.update(evaluate_devices(fed, lambda d: trainers[d.id].download(d.id)))
        curve.append(row)
    compute = [(d.busy_s + s.single_epochs * train_s[d.id]) / d.profile.speed for d in fed.active]
    return _entry(fed, curve[-1], curve, device_compute_s_per_device=_mean(compute), bytes_up_per_device=0,
                  bytes_down_per_device=0, server_busy_s=0.0, epochs=s.single_epochs)


def run_centralized(fed: Federation) -> dict[str, Any]:
    """Centralised PAE, per backbone type: one ``FedTrainer`` on all that type's uploads pooled (each device keeps
    its own head, as its targets need), ``centralized_epochs`` epochs. A reference without a clock: its curve is
    indexed by epoch and its ``sim_time_to_target_s`` is null."""
    s = fed.settings
    trainers: dict[str, FedTrainer] = {}
    for key, width in fed.types.items():
        ups = [d.upload for d in fed.active if d.backbone_type == key]
        if ups:
            trainers[key] = fed.trainer({key: width})
            for u in ups:
                trainers[key].accept(u)
    curve: list[dict[str, Any]] = []
    busy = 0.0
    for epoch in range(1, s.centralized_epochs + 1):
        losses = []
        for key, tr in trainers.items():
            ups = [d.upload for d in fed.active if d.backbone_type == key]
            losses += tr.train_round(ups)
            busy += fed.steps(sum(len(u) for u in ups)) * fed.step_s[key]
        row = {"t": None, "epoch": epoch, "loss": _mean(losses)}
        row.update(evaluate_devices(fed, lambda d: trainers[d.backbone_type].download(d.id)))
        curve.append(row)
    downloads = [trainers[d.backbone_type].download(d.id).nbytes for d in fed.active]
    out = _entry(fed, curve[-1], curve, **_upload_figures(fed, downloads), server_busy_s=busy,
                 epochs=s.centralized_epochs)
    out["sim_time_to_target_s"] = None
    out["note"] = ("a reference on the pooled uploads, one trainer per backbone type; not a federation, so not "
                   "timed on the virtual clock (sim_time_to_target_s is null for that reason, not because the "
                   "target was missed: see best_val_acc)")
    return out


def not_run(reason: str, **settings: Any) -> dict[str, Any]:
    """A method that did not run: every field null, and why (never a made-up number)."""
    return {"status": "not run", "reason": reason, **dict.fromkeys(METHOD_FIELDS), **settings}


def fedavg_lora_todo(preset: Preset) -> dict[str, Any]:
    """FedAvg-LoRA needs the real backbones: on synthetic uploads it is an honest "not run" entry."""
    return not_run(
        "TODO here: FedAvg-LoRA (PEFT LoRA on q/v per backbone-type group, each device's real forward+backward) "
        "needs the real backbones and data; this federation has synthetic uploads only",
        settings={"rounds": preset.fedavg_rounds, "fraction": preset.fedavg_fraction,
                  "local_epochs": preset.fedavg_local_epochs, "lora_r": preset.fedavg_lora_r,
                  "target_modules": ["q_proj", "v_proj"], "groups": "one FedAvg group per backbone type"})


def _fedavg_group(fed: Federation, preset: Preset, data: Any, key: str, alias: str,
                  members: list[tuple[int, SimDevice]], tally: dict[str, Any]) -> dict[str, Any]:
    """One FedAvg-LoRA group (the devices of one backbone type): its rounds on its own clock. Adds each device's
    compute and bytes and the server's averaging seconds to ``tally``; returns the group's record and curve."""
    from lightning_mobillm.fed.lora import LoraClassifier

    s = fed.settings
    partition = fed.source["partition"]
    lora = LoraClassifier(alias, len(data.class_names), r=preset.fedavg_lora_r, seed=s.seed)
    data.set_tokenizer(lora.tokenizer)
    train, val = data.split_dataset("train"), data.split_dataset("validation")
    # adapters and head travel in float16 both ways, as Fed MobiLLM's downloads do (the same policy for both)
    state = {"global": lora.state()}
    nbytes = lora.nbytes
    returned: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
    points: list[dict[str, float]] = []

    def work(r: int, j: int) -> DeviceWork:
        i, dev = members[j]
        lora.load_state(state["global"])
        ids = [train.input_ids[t] for t in partition.indices[i]]
        ys = [train.labels[t] for t in partition.indices[i]]
        busy = lora.train_local(ids, ys, epochs=preset.fedavg_local_epochs, batch_size=preset.forward_batch_size,
                                lr=5e-4, order_seed=f"fedavg/{s.seed}/{r}/{i}")
        returned[j] = (lora.state(), len(ids))
        for what, value in (("compute", busy / dev.profile.speed), ("up", nbytes), ("down", nbytes)):
            tally[what][dev.id] = tally[what].get(dev.id, 0.0) + value
        return DeviceWork(busy, nbytes, nbytes)

    def evaluate() -> float:
        lora.load_state(state["global"])
        return lora.evaluate(val.input_ids, val.labels, 16)

    def on_round(rnd) -> bool:
        t0 = time.perf_counter()
        got = [returned[u.device] for u in rnd.returned if u.device in returned]
        if got:
            total = sum(n for _, n in got)
            state["global"] = {name: sum(st[name] * (n / total) for st, n in got).half().float()
                               for name in state["global"]}
        tally["server_busy_s"] += time.perf_counter() - t0
        returned.clear()
        points.append({"t": rnd.end, "val_acc": evaluate()})
        return points[-1]["val_acc"] >= s.target_acc  # "at least 20 rounds or until the target"

    run = run_rounds([d.profile for _, d in members], work, lambda kind, ups: 0.0, on_round,
                     rounds=preset.fedavg_rounds, fraction=preset.fedavg_fraction, seed=s.seed)
    for _, d in members:  # the final download every device evaluates with
        tally["down"][d.id] = tally["down"].get(d.id, 0.0) + nbytes
    data.set_tokenizer(None)
    return {"alias": alias, "devices": len(members), "rounds": len(run.rounds), "end_s": run.end_s,
            "adapter_and_head_bytes": nbytes, "curve": points, "zero_shot_val_acc": fed.eval_sets[key].zero_shot_acc}


def run_fedavg_lora(fed: Federation, preset: Preset) -> dict[str, Any]:
    """Synchronous FedAvg over PEFT LoRA (r on q/v) plus a classification head at the loss token, trained for real:
    each selected device trains ``fedavg_local_epochs`` on its shard with its backbone's forward and backward (bf16
    autocast over fp32 weights, AdamW, a fresh optimizer per round), its measured seconds become its compute on the
    clock (``run_rounds``); the server averages the returned adapters and heads weighted by samples. FedAvg
    averages only within one architecture: one group (its own clock, rounds and global model) per backbone type,
    run one after the other with one backbone in memory. Every device of a group evaluates the group's global model
    on the held-out set (before its first round: its zero-shot accuracy); the mean over devices is placed on the
    clock at every round's end of any group."""
    from lightning_mobillm.data import TextClassificationDataModule

    if fed.source is None:
        return fedavg_lora_todo(preset)
    data = TextClassificationDataModule(**fed.source["data"])
    tally: dict[str, Any] = {"compute": {}, "up": {}, "down": {}, "server_busy_s": 0.0}
    groups: dict[str, dict[str, Any]] = {}
    for key, alias in fed.source["aliases"].items():
        members = [(i, d) for i, d in enumerate(fed.devices) if d.backbone_type == key and d.upload is not None]
        if members:
            groups[key] = _fedavg_group(fed, preset, data, key, alias, members, tally)
            gc.collect()  # one backbone at a time
    if not groups:
        return not_run("no device has data")
    # the combined curve: at each round's end (any group), every device with its group's latest global accuracy
    active = [d for d in fed.active if d.backbone_type in groups]

    def acc_at(key: str, t: float) -> float:
        seen = [row["val_acc"] for row in groups[key]["curve"] if row["t"] <= t]
        return seen[-1] if seen else groups[key]["zero_shot_val_acc"]

    curve = []
    for t in sorted({row["t"] for g in groups.values() for row in g["curve"]}):
        by_type = {key: acc_at(key, t) for key in groups}
        accs = [by_type[d.backbone_type] for d in active]
        curve.append({"t": t, "val_acc": sum(accs) / len(accs), "val_acc_min": min(by_type.values()),
                      "val_acc_max": max(by_type.values()), "val_acc_by_type": by_type,
                      "devices_evaluated": len(accs)})
    return _entry(fed, curve[-1], curve,
                  device_compute_s_per_device=_mean([tally["compute"].get(d.id, 0.0) for d in active]),
                  bytes_up_per_device=_mean([tally["up"].get(d.id, 0.0) for d in active]),
                  bytes_down_per_device=_mean([tally["down"].get(d.id, 0.0) for d in active]),
                  server_busy_s=tally["server_busy_s"], rounds=max(g["rounds"] for g in groups.values()),
                  groups=groups,
                  note="one FedAvg group per backbone type (FedAvg averages only within one architecture); "
                       f"PEFT LoRA r {preset.fedavg_lora_r} on q_proj/v_proj + a head at the loss token, bf16 "
                       f"autocast over fp32 weights, adapters and head sent as float16 both ways, {preset.fedavg_fraction:.0%} of a group's devices per round, "
                       f"{preset.fedavg_local_epochs} local epoch(s); server_busy_s is the measured averaging; "
                       "device compute and bytes are averaged over every device with data (unselected ones add 0)")


# --------------------------------------------------------------------------- target spaces and label attacks

TARGET_SPACE_ORDER = ("device", "federation", "plain")


def respace(fed: Federation, space: str) -> Federation:
    """The same federation (activations, sample keys, arrivals, profiles) with every device's targets formed in
    another target space from its own labels and zero-shot logits: ``device`` (a key per device), ``federation``
    (one key all devices share, never the server's) or ``plain`` (the paper's ``onehot(y) - softmax(z_b)``). The
    keyed spaces draw randomized response from the upload's sample keys, the same way in both."""
    from lightning_mobillm.fed.device import make_target_transform
    from lightning_mobillm.privacy import prediction_difference

    classes = next(iter(fed.eval_sets.values())).logits.shape[1]
    seed, rr = fed.settings.seed, fed.settings.rr_epsilon
    devices, out_dim = [], classes
    for i, dev in enumerate(fed.devices):
        if space == "plain":
            transform = make_target_transform("plain", classes)
        else:
            key = _key(seed, "federation") if space == "federation" else _key(seed, "respace", i)
            transform = make_target_transform(space, classes, key, out_dim=fed.out_dim, rr_epsilon=rr)
        out_dim = transform.out_dim
        upload = dev.upload
        if upload is not None:
            delta = prediction_difference(torch.tensor(dev.labels), dev.logits)
            keys = list(upload.keys) if transform.needs_sample_keys else None
            upload = replace(upload, targets=transform.forward(delta, keys).float().contiguous(), target_space=space)
        devices.append(replace(dev, transform=transform, upload=upload))
    return replace(fed, devices=devices, out_dim=out_dim, target_space=space)


def _label_privacy():
    """``benchmarks/label_privacy.py``'s attacks (loaded by path: the benchmarks are scripts, not a package)."""
    import importlib.util

    if "label_privacy" not in sys.modules:
        spec = importlib.util.spec_from_file_location("label_privacy", Path(__file__).with_name("label_privacy.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["label_privacy"]


def label_attacks(fed: Federation) -> dict[str, Any]:
    """What an honest-but-curious server learns about the labels from the targets it received, per target space.

    The server sees each upload's targets and its device id. In the ``plain`` and ``federation`` spaces every
    device's targets live in one space, so the attacks pool all of them; in the ``device`` space each device is
    attacked on its own samples (its key is its own). The server recomputes the backbone's zero-shot logits
    exactly (the last aligned tap is always the last block, and the head is public); the attacks get the
    devices' own logits, which is the same thing. Attacks from ``benchmarks/label_privacy.py``: (a) argmax,
    (b) EM least squares undoing an affine key, (c) k-means named by the zero-shot signal; a group's accuracy is
    its best attack chosen with the true labels (an upper bound on a server that must pick blindly). Reference:
    the zero-shot prediction's accuracy on the same samples. Label advantage = attack - reference."""
    lp = _label_privacy()
    active = [d for d in fed.active if d.logits is not None]
    classes = next(iter(fed.eval_sets.values())).logits.shape[1]
    pooled = fed.target_space in ("plain", "federation")
    groups = [active] if pooled else [[d] for d in active]
    correct = reference = total = 0.0
    chosen: dict[str, int] = {}
    for group in groups:
        t = torch.cat([d.upload.targets.float() for d in group])
        y = torch.tensor([label for d in group for label in d.labels])
        p = torch.softmax(torch.cat([d.logits for d in group]).float(), -1)
        sig = {"zs": (p.argmax(1), p)}
        res = lp.attack_argmax(t, y, sig, classes)
        if len(y) >= 2 * classes + 2:
            res |= lp.attack_linear(t, y, p, sig, classes)
        if len(y) >= 4 * classes:
            res |= lp.attack_cluster(t, y, p, sig, classes, seed=fed.settings.seed)
        res["reference"] = lp.acc(p.argmax(1), y)
        value, name = lp.best(res)
        chosen[name.split("[")[0]] = chosen.get(name.split("[")[0], 0) + 1
        correct += value * len(y)
        reference += res["reference"] * len(y)
        total += len(y)
    return {"attack_acc": correct / total, "reference_acc": reference / total,
            "label_advantage": (correct - reference) / total, "samples": int(total),
            "groups": len(groups), "best_attacks": chosen,
            "attacked": "all devices pooled" if pooled else "each device on its own samples"}


def run_target_spaces(fed: Federation, spaces: Sequence[str] = TARGET_SPACE_ORDER,
                      ran: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Fed MobiLLM (asynchronous, replay on) in each target space on the same federation, with the label attacks
    on what the server received: accuracy against label privacy. ``ran``: the ``fed_mobillm`` entry already
    run on ``fed`` itself (its own space, ``fed.target_space``), reused with ``fed``'s own uploads attacked."""
    out: dict[str, dict[str, Any]] = {}
    for space in spaces:
        t0 = time.perf_counter()
        reuse = ran is not None and ran.get("status") == "ran" and space == fed.target_space
        other = fed if reuse else respace(fed, space)
        entry = ran if reuse else run_fed_mobillm(other)
        out[space] = {k: entry.get(k) for k in ("val_acc", "val_acc_min", "val_acc_max", "best_val_acc",
                                                  "sim_time_to_target_s", "bytes_down_per_device")}
        out[space]["out_dim"] = other.out_dim
        out[space]["heads"] = "one per device" if space == "device" else "one shared"
        out[space]["run"] = "the fed_mobillm entry (the same run)" if reuse else "re-run on re-formed targets"
        out[space]["label_attacks"] = label_attacks(other)
        out[space]["wall_s"] = time.perf_counter() - t0
    return out


def targets(methods: Mapping[str, Mapping[str, Any]], target_acc: float) -> dict[str, dict[str, Any]]:
    """Issue 10's targets on ``small`` for Fed MobiLLM against its baselines, each with the measured value, the
    threshold and ``met`` (``None`` when a method it needs did not run). Time to target against FedAvg-LoRA that
    never reached it is a lower bound: its last round's end over Fed MobiLLM's time (``bound: "at least"``)."""
    fed, lora = methods.get("fed_mobillm", {}), methods.get("fedavg_lora", {})
    central, single = methods.get("centralized_pae", {}), methods.get("single", {})

    def ran(*entries: Mapping[str, Any]) -> bool:
        return all(e.get("status") == "ran" for e in entries)

    out: dict[str, dict[str, Any]] = {}
    if ran(fed, central):
        gap = central["val_acc"] - fed["val_acc"]
        out["accuracy_within_2_points_of_centralized_pae"] = {"value": gap, "threshold": 0.02, "met": gap <= 0.02}
    if ran(fed, single):
        lead = fed["val_acc"] - single["val_acc"]
        out["shared_above_single_by_3_points"] = {"value": lead, "threshold": 0.03, "met": lead >= 0.03}
    if ran(fed, lora):
        less = 1 - fed["device_compute_s_per_device"] / lora["device_compute_s_per_device"]
        out["device_compute_95_percent_below_fedavg_lora"] = {"value": less, "threshold": 0.95, "met": less >= 0.95}
        mine = fed["bytes_up_per_device"] + fed["bytes_down_per_device"]
        less = 1 - mine / (lora["bytes_up_per_device"] + lora["bytes_down_per_device"])
        out["bytes_90_percent_below_fedavg_lora"] = {"value": less, "threshold": 0.90, "met": less >= 0.90}
        t_fed, t_lora = fed.get("sim_time_to_target_s"), lora.get("sim_time_to_target_s")
        row: dict[str, Any] = {"threshold": 5.0, "target_acc": target_acc}
        if t_fed is None:
            row.update(value=None, met=False, reason="Fed MobiLLM did not reach the target")
        elif t_lora is not None:
            row.update(value=t_lora / t_fed, bound="exact", met=t_lora / t_fed >= 5.0)
        else:
            end = max(r["t"] for r in lora["curve"])
            row.update(value=end / t_fed, bound="at least", met=(end / t_fed >= 5.0) or None,
                       reason=f"FedAvg-LoRA did not reach the target in its {lora.get('rounds')} rounds "
                              f"(best {lora.get('best_val_acc')}); the ratio uses its last round's end")
        out["time_to_target_5x_faster_than_fedavg_lora"] = row
    return out


RUNNERS: dict[str, Callable[[Federation], dict[str, Any]]] = {
    "fed_mobillm": run_fed_mobillm,
    "no_replay": lambda fed: run_fed_mobillm(fed, replay=False),
    "fed_mobillm_sync": run_fed_sync,
    "single": run_single,
    "centralized_pae": run_centralized,
}


def run_methods(fed: Federation, methods: Sequence[str], preset: Preset,
                on_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``methods`` in order (each gets its own entry with ``wall_s``; a method that raises gets an entry
    with the error, and the rest still run)."""
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        t0 = time.perf_counter()
        try:
            if m == "fedavg_lora":
                entry = run_fedavg_lora(fed, preset)
            else:
                entry = RUNNERS[m](fed)
        except Exception as err:  # noqa: BLE001 - one failing method must not lose the others' numbers
            entry = not_run(f"failed: {type(err).__name__}: {err}")
        entry["wall_s"] = time.perf_counter() - t0
        out[m] = entry
        if on_done is not None:
            on_done(m, entry)
    return out


# --------------------------------------------------------------------------- server step costs


def _synthetic_upload(device: str, key: str, width: int, k: int, out_dim: int, n: int, seed: int,
                      codec: str = "int8") -> Upload:
    from lightning_mobillm.protocol import pack_acts

    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, k, width, generator=g)
    parts = pack_acts(acts, torch.ones(n, dtype=torch.int64), codec)
    return Upload(device=device, backbone_type=key, keys=[f"x{seed}-{i}" for i in range(n)],
                  acts={p: t for p, t in parts.items() if p != "lengths"}, codec=codec,
                  targets=torch.randn(n, out_dim, generator=g))


def measure_step_costs(types: Mapping[str, int], k: int, out_dim: int, batch_size: int, steps: int = 8,
                       seed: int = 0, head_rank: int | None = DEFAULT_HEAD_RANK) -> dict[str, float]:
    """Seconds per server step (``batch_size`` samples) per backbone type, measured once on a scratch trainer of
    the federation's shape (the median of ``steps`` steps after a warm-up)."""
    module = FedSideModule(dict(types), k, out_dim, head_rank=head_rank)
    trainer = FedTrainer(module, batch_size=batch_size)
    out = {}
    for i, (key, width) in enumerate(types.items()):
        ups = [_synthetic_upload(f"probe-{i}", key, width, k, out_dim, batch_size, seed + j) for j in range(steps + 1)]
        times = []
        for j, up in enumerate(ups):
            trainer.accept(up)
            t0 = time.perf_counter()
            trainer.train_round([up])  # one step of batch_size samples
            if j:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        out[key] = sorted(times)[len(times) // 2]
    return out


# --------------------------------------------------------------------------- building the federation (real backbones)


def _key(seed: int, *parts: object) -> bytes:
    return hashlib.sha256("/".join(map(str, ("federated-benchmark", seed, *parts))).encode()).digest()


def deal_types(n: int, backbones: Sequence[str], seed: int) -> list[str]:
    """Backbone aliases for devices ``0..n-1``: as even as possible, in a seeded order."""
    dealt = [backbones[i % len(backbones)] for i in range(n)]
    random.Random(f"federated-benchmark/types/{seed}").shuffle(dealt)
    return dealt


def stamp_arrivals(devices: Sequence[SimDevice], seed: int) -> list[int]:
    """Each device forwards once and uploads once (``plan_uploads``): its upload gets its virtual arrival time.
    Devices that dropped out or whose windows ran out lose their upload (it never arrives); returns them."""
    work = [DeviceWork(d.busy_s, d.upload.nbytes if d.upload is not None else 0) for d in devices]
    plan = plan_uploads([d.profile for d in devices], work, seed=seed)
    for event in plan.uploads:
        dev = devices[event.device]
        if dev.upload is not None:
            dev.upload = replace(dev.upload, arrival_s=event.at)
    lost = sorted(set(plan.dropped) | set(plan.unavailable))
    for d in lost:
        devices[d].upload = None
    return lost


def build_federation(preset: Preset, seed: int, cpu_gflops: float, log: Callable[[str], None] = print
                     ) -> tuple[Federation, dict[str, Any]]:
    """Partition, profiles, the devices' one pass (one backbone type at a time) and the held-out set per type.
    Returns the federation and what the JSON records about it."""
    from lightning_mobillm.backbone import FrozenBackbone
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.fed.alignment import (
        BackboneType,
        aligned_backbone_config,
        backbone_shape,
        federation_k,
    )
    from lightning_mobillm.fed.device import DeviceWorker, LocalShard, make_target_transform
    from lightning_mobillm.fed.partition import make_partition
    from lightning_mobillm.specs import BackboneConfig

    configs = {alias: BackboneConfig(source=alias, dtype=preset.dtype) for alias in dict.fromkeys(preset.backbones)}
    shapes = {alias: backbone_shape(cfg) for alias, cfg in configs.items()}
    k = federation_k({alias: shape[2] for alias, shape in shapes.items()})
    data = TextClassificationDataModule(dataset="bbc_news", max_length=preset.max_length, seed=seed,
                                        limit_train_samples=preset.limit_train_samples,
                                        limit_eval_samples=preset.limit_eval_samples)
    class_names = data.class_names
    mix = [(FedDeviceProfile.from_names(p, lk).resolve(cpu_gflops), w) for p, lk, w in preset.profile_mix]
    profiles = assign_profiles(preset.devices, mix, seed=seed)
    aliases = deal_types(preset.devices, preset.backbones, seed)
    partition = None
    devices: list[SimDevice | None] = [None] * preset.devices
    types: dict[str, int] = {}
    eval_sets: dict[str, EvalSet] = {}
    per_type: dict[str, dict[str, Any]] = {}
    for alias, config in configs.items():
        t0 = time.perf_counter()
        backbone = FrozenBackbone(aligned_backbone_config(config, k), device="cpu")
        key = BackboneType.of(backbone).key
        types[key] = backbone.hidden_size
        load_s = time.perf_counter() - t0
        data.set_tokenizer(backbone.tokenizer)
        train = data.split_dataset("train")
        if partition is None:
            partition = make_partition(list(train.labels), preset.devices, "dirichlet", seed=seed,
                                       alpha=preset.alpha, min_partition_size=preset.min_partition_size,
                                       num_classes=len(class_names))
        mine = [d for d in range(preset.devices) if aliases[d] == alias]
        forward_s, duplicates = 0.0, 0
        for d in mine:
            device_id = f"device-{d:03d}"
            transform = make_target_transform("device", len(class_names), _key(seed, "target", d),
                                              out_dim=preset.out_dim, rr_epsilon=preset.rr_epsilon)
            dev = SimDevice(device_id, key, profiles[d], transform, size=len(partition.indices[d]))
            if dev.size:
                worker = DeviceWorker(backbone, class_names, transform, device=device_id, codec=preset.codec,
                                      batch_size=preset.forward_batch_size, k=k, backbone_type=key,
                                      secret=_key(seed, "secret", d))
                run = worker.upload(LocalShard.from_split(train, partition.indices[d]))
                dev.upload, dev.busy_s, dev.size = run.uploads[0], run.busy_s, len(run)
                duplicates += worker.duplicates_dropped
                dev.labels, dev.logits = run.local.labels.tolist(), run.local.backbone_logits.float()
                forward_s += run.busy_s
            devices[d] = dev
        # the pooled held-out set, forwarded once for every device of this type (their local evaluations)
        worker = DeviceWorker(backbone, class_names, make_target_transform("plain", len(class_names)),
                              device="eval", target_space="plain", batch_size=preset.forward_batch_size, k=k,
                              backbone_type=key)
        feats = worker.features(LocalShard.from_split(data.split_dataset("validation")))
        eval_sets[key] = EvalSet(feats.acts.float(), feats.backbone_logits, feats.labels)
        samples = sum(devices[d].size for d in mine)
        per_type[key] = {"alias": alias, "devices": len(mine), "samples": samples, "load_s": load_s,
                         "forward_busy_s": forward_s, "busy_s_per_sample": forward_s / samples if samples else None,
                         "eval_forward_s": feats.busy_s, "eval_samples": len(feats),
                         "duplicates_dropped": duplicates,
                         "zero_shot_val_acc": eval_sets[key].zero_shot_acc}
        log(f"{key}: {len(mine)} devices, {samples} samples forwarded in {forward_s:.1f} s; held-out set "
            f"({len(feats)}) in {feats.busy_s:.1f} s; zero-shot {eval_sets[key].zero_shot_acc:.3f}")
        del backbone, worker, feats, train
        data.set_tokenizer(None)
        gc.collect()  # one backbone's weights at a time
    lost = stamp_arrivals(devices, seed)
    settings = Settings.of(preset, seed)
    step_s = measure_step_costs(types, k, preset.out_dim, preset.batch_size, seed=seed, head_rank=preset.head_rank)
    source = {"partition": partition, "aliases": {key: r["alias"] for key, r in per_type.items()},
              "data": dict(dataset="bbc_news", max_length=preset.max_length, seed=seed,
                           limit_train_samples=preset.limit_train_samples,
                           limit_eval_samples=preset.limit_eval_samples)}
    fed = Federation(list(devices), types, k, preset.out_dim, eval_sets, step_s, settings, source)
    record = {
        "k": k,
        "class_names": list(class_names),
        "types": per_type,
        "partition": partition.summary(),
        "step_s": step_s,
        "replay_step_s": fed.replay_step_s,
        "dropped_or_unavailable": lost,
        "per_device": [{"id": d.id, "backbone_type": d.backbone_type, "profile": d.profile.name,
                        "speed": d.profile.speed, "samples": d.size, "busy_s": d.busy_s,
                        "compute_s": d.compute_s, "bytes_up": d.upload.nbytes if d.upload is not None else 0,
                        "arrival_s": d.upload.arrival_s if d.upload is not None else None} for d in devices],
    }
    return fed, record


# --------------------------------------------------------------------------- the live row


LIVE_RECIPES = {"smollm2-135m": "recipes/fed/smollm2-135m-bbc.yaml", "gemma3-270m": "recipes/fed/gemma3-270m-bbc.yaml",
                "qwen2.5-coder-0.5b": "recipes/fed/qwen2.5-coder-0.5b-bbc.yaml"}


def run_live(preset: Preset, seed: int, workdir: Path, timeout_s: float = 600.0) -> dict[str, Any]:
    """The path the simulation stands for: a real ``serve --role fed`` process (``recipes/fed/server.yaml`` on
    127.0.0.1, a free port, per-device tokens, no TLS on loopback) and one ``fit`` device process per backbone of
    the preset (its ``recipes/fed/`` recipe), on a 2+-device Dirichlet partition of the preset's data subset, over
    gRPC. Each device uploads its partition, waits for the others, downloads its parts and evaluates locally."""
    from lightning_mobillm.client import start_serve, stop_process
    from lightning_mobillm.transport.link import LinkError
    from lightning_mobillm.transport.security import hash_token, new_token

    aliases = [a for a in dict.fromkeys(preset.backbones) if a in LIVE_RECIPES]
    if len(aliases) < 2:
        return {"status": "not run", "reason": "the live row needs two backbones with a recipes/fed/ recipe"}
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"live-{a.split('-')[0]}" for a in aliases]
    tokens = {n: new_token() for n in names}
    (workdir / "tokens.txt").write_text("".join(f"{n} {hash_token(t)}\n" for n, t in tokens.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "LIGHTNING_MOBILLM_CACHE": str(workdir / "cache")}
    env.pop("MOBILLM_TOKEN", None)
    t0 = time.perf_counter()
    procs: list[subprocess.Popen] = []
    try:
        try:
            server, ready = start_serve(
                ["--config", str(REPO / "recipes/fed/server.yaml"), "--server.host", "127.0.0.1", "--server.port", "0",
                 "--server.tokens_file", "tokens.txt", "--server.tls_cert_file", "null", "--server.tls_key_file",
                 "null", "--server.allow_insecure", "true", "--server.device", "cpu",
                 "--server.fed_max_replay_steps", "200", "--server.fed_seed", str(seed)],
                log_path=workdir / "server.stderr", cwd=workdir, env=env)
        except LinkError:
            return {"status": "failed", "error": "serve exited: " + (workdir / "server.stderr").read_text()[-2000:]}
        procs.append(server)
        address = f"127.0.0.1:{ready['port']}"
        devices = {}
        for pid, (alias, name) in enumerate(zip(aliases, names)):
            cwd = workdir / name
            cwd.mkdir(exist_ok=True)
            init = "--model.init_args."
            args = [sys.executable, "-m", "lightning_mobillm", "fit", "--config", str(REPO / LIVE_RECIPES[alias]),
                    f"{init}server", address, f"{init}partition_id", str(pid), f"{init}device_id", name,
                    f"{init}num_devices", str(len(aliases)), f"{init}alpha", str(preset.alpha),
                    f"{init}min_partition_size", "1", f"{init}partition_seed", str(seed),
                    f"{init}wait_for_devices", str(len(aliases)), f"{init}poll_interval_s", "1.0",
                    f"{init}wait_timeout_s", str(int(timeout_s / 2)), f"{init}tls_ca_file", "null",
                    f"{init}token_file", "null", f"{init}keystore", str(cwd / "keys"),
                    "--data.init_args.max_length", str(preset.max_length), "--data.init_args.seed", str(seed),
                    "--data.init_args.limit_train_samples", str(preset.limit_train_samples or "null"),
                    "--data.init_args.limit_eval_samples", str(preset.limit_eval_samples or "null")]
            with (cwd / "stdout").open("w") as out, (cwd / "stderr").open("w") as err:
                proc = subprocess.Popen(args, cwd=cwd, env={**env, "MOBILLM_TOKEN": tokens[name]},
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            procs.append(proc)
            devices[name] = (alias, proc, cwd)
        rows = {}
        for name, (alias, proc, cwd) in devices.items():
            proc.communicate(timeout=timeout_s)
            if proc.returncode != 0:
                return {"status": "failed", "error": f"{name} exited {proc.returncode}: "
                        + (cwd / "stderr").read_text()[-2000:]}
            summary = json.loads(next((cwd / "runs").glob("*/version_0/summary.json")).read_text())
            rows[name] = {"alias": alias, "pid": proc.pid, "val_acc": summary.get("val_acc"),
                          "samples_uploaded": summary.get("samples_uploaded"), "bytes_up": summary.get("bytes_up"),
                          "download_bytes": summary.get("fed", {}).get("download_bytes"),
                          "device_busy_s": summary.get("device_busy_s"),
                          "backbone_type": summary.get("fed", {}).get("backbone_type")}
        accs = [r["val_acc"] for r in rows.values() if r["val_acc"] is not None]
        return {"status": "ran", "server_pid": server.pid, "device_pids": [r["pid"] for r in rows.values()],
                "backbones": [r["backbone_type"] or r["alias"] for r in rows.values()],
                "val_acc": sum(accs) / len(accs) if accs else None, "devices": rows, "address": address,
                "wall_s": time.perf_counter() - t0,
                "note": "a real serve --role fed process and one fit process per backbone over gRPC on loopback "
                        "(per-device tokens, no TLS), the preset's data subset partitioned among these devices only"}
    except (OSError, subprocess.TimeoutExpired, StopIteration, ValueError) as err:
        return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    finally:
        for proc in procs:
            stop_process(proc, 30)


# --------------------------------------------------------------------------- the report


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "lightning", "numpy", "peft", "lightning-mobillm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out


def machine(cpu_gflops: float, dtype: str, measured: bool) -> dict[str, Any]:
    model = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "torch_threads": torch.get_num_threads(),
            "cpu_gflops": cpu_gflops, "cpu_gflops_dtype": dtype,
            "profile_speeds": "resolved against this CPU's measured GFLOPS (simulate.measure_cpu_gflops)"
            if measured else "fixed by --cpu-gflops",
            "shared": "a shared machine: other processes ran beside this benchmark, so measured busy seconds "
                      "(device forwards, server step costs) may be inflated"}


def summary_table(methods: Mapping[str, Mapping[str, Any]]) -> str:
    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = ["| method | status | val acc | min | max | device s | up B | down B | s to target | server s | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, e in methods.items():
        lines.append(f"| {m} | {e['status']} | {fmt(e['val_acc'], '.3f')} | {fmt(e['val_acc_min'], '.3f')} | "
                     f"{fmt(e['val_acc_max'], '.3f')} | {fmt(e['device_compute_s_per_device'], '.2f')} | "
                     f"{fmt(e['bytes_up_per_device'], ',.0f')} | {fmt(e['bytes_down_per_device'], ',.0f')} | "
                     f"{fmt(e['sim_time_to_target_s'], '.1f')} | {fmt(e['server_busy_s'], '.2f')} | "
                     f"{fmt(e['rounds'], 'd')} |")
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def live_row(args: argparse.Namespace, preset: Preset, report: dict[str, Any]) -> None:
    """Run the live row into ``report`` (``live``, or ``live_note`` saying why it is null)."""
    if not args.live:
        report["live_note"] = "not run (--no-live)"
        return
    import tempfile

    live = run_live(preset, args.seed, Path(tempfile.mkdtemp(prefix="mobillm-fed-live-")), args.live_timeout_s)
    report["live"] = live if live.get("status") == "ran" else None
    if live.get("status") != "ran":
        report["live_note"] = live
    print(f"live: {live.get('status')}, val acc {live.get('val_acc')}", flush=True)


def run_live_only(args: argparse.Namespace, preset: Preset, out_path: Path, wall0: float, cpu_gflops: float,
                  measured: bool) -> None:
    """``--methods "" --no-target-spaces``: only the live row, in a report of its own (merge its ``live`` into
    the preset's full report by hand, saying so)."""
    report: dict[str, Any] = {"preset": args.preset,
                              "live": None, "methods": {}, "targets": {},
                              "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "versions": versions(), "machine": machine(cpu_gflops, preset.dtype, measured),
                              "note": "the live row alone (no simulated method ran)"}
    live_row(args, preset, report)
    report["wall_s"] = time.perf_counter() - wall0
    write_json(out_path, report)
    print(f"\nwrote {out_path} in {report['wall_s']:.0f} s")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default benchmarks/results/federated_<preset>.json)")
    p.add_argument("--seed", type=int, default=0, help="partition, profiles, types, keys and the side networks")
    p.add_argument("--alpha", type=float, default=None, help="override the preset's Dirichlet alpha")
    p.add_argument("--head-rank", type=int, default=None, help="override the preset's head_rank (a shared neck; 0: none)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--cpu-gflops", type=float, default=None,
                   help="fix this CPU's GFLOPS for the profiles' speeds instead of measuring it")
    p.add_argument("--target-acc", type=float, default=TARGET_ACC)
    p.add_argument("--target-spaces", action=argparse.BooleanOptionalAction, default=True,
                   help="also run Fed MobiLLM in the device, federation and plain target spaces, with label attacks")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=True,
                   help="run the live row: a serve --role fed process and one device process per backbone over gRPC")
    p.add_argument("--live-timeout-s", type=float, default=1800.0,
                   help="how long the live row's device processes may take (three backbones on two cores: ~15 min)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]  # "" runs none (e.g. only --target-spaces)
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    preset = PRESETS[args.preset]
    if args.alpha is not None:
        preset = replace(preset, alpha=args.alpha)
    if args.head_rank is not None:
        preset = replace(preset, head_rank=args.head_rank or None)
    out_path = args.out or REPO / f"benchmarks/results/federated_{args.preset}.json"
    wall0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    measured = args.cpu_gflops is None
    cpu_gflops = measure_cpu_gflops(preset.dtype) if measured else args.cpu_gflops
    print(f"this CPU: {cpu_gflops:.1f} GFLOPS ({preset.dtype}, {'measured' if measured else 'given'})", flush=True)
    from lightning_mobillm.assets import resolve_source

    for alias in preset.backbones:  # a packaged model's one-time conversion stays outside every measurement
        for dtype in dict.fromkeys((preset.dtype, "float32")):  # the devices' dtype; FedAvg-LoRA's float32
            resolve_source(alias, dtype=dtype)
    if not methods and not args.target_spaces:  # the live row alone: no simulated federation to build
        run_live_only(args, preset, out_path, wall0, cpu_gflops, measured)
        return
    fed, record = build_federation(preset, args.seed, cpu_gflops, log=lambda s: print(s, flush=True))
    fed.settings.target_acc = args.target_acc
    report: dict[str, Any] = {
        "preset": args.preset,
        "devices": preset.devices,
        "backbones": [{"alias": r["alias"], "type": key, "devices": r["devices"]}
                      for key, r in record["types"].items()],
        "partition": record["partition"],
        "class_names": record["class_names"],
        "target_acc": args.target_acc,
        "live": None,
        "methods": {},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {**asdict(preset), "seed": args.seed, "k": record["k"], "target_space": "device",
                     "profiles": {f"{pn}@{ln}": {"weight": w, "speed": FedDeviceProfile.from_names(pn, ln)
                                                 .resolve(cpu_gflops).speed, **asdict(PROFILES[pn]),
                                                 "link": asdict(LINKS[ln])}
                                  for pn, ln, w in preset.profile_mix}},
        "federation": {k: v for k, v in record.items() if k != "partition"},
        "versions": versions(),
        "machine": machine(cpu_gflops, preset.dtype, measured),
        "wall_s": None,
        "targets": {},
    }

    def done(m: str, entry: dict[str, Any]) -> None:
        report["methods"][m] = entry
        report["targets"] = targets(report["methods"], args.target_acc)
        report["wall_s"] = time.perf_counter() - wall0
        write_json(out_path, report)  # after every method: an interrupted run keeps what it measured
        acc = entry["val_acc"]
        print(f"{m}: {entry['status']}, val acc {'-' if acc is None else f'{acc:.3f}'}, {entry['wall_s']:.1f} s",
              flush=True)

    run_methods(fed, methods, preset, on_done=done)
    if args.target_spaces:
        report["target_spaces"] = run_target_spaces(fed, ran=report["methods"].get("fed_mobillm"))
        write_json(out_path, report)
        for space, row in report["target_spaces"].items():
            la = row["label_attacks"]
            print(f"target space {space}: val acc {row['val_acc']:.3f}, label attack {la['attack_acc']:.3f} "
                  f"(zero-shot {la['reference_acc']:.3f}, advantage {la['label_advantage']:+.3f})", flush=True)
    if args.live:
        del fed
        gc.collect()
    live_row(args, preset, report)
    report["wall_s"] = time.perf_counter() - wall0
    write_json(out_path, report)
    print(summary_table(report["methods"]))
    for name, row in report["targets"].items():
        print(f"{name}: {row.get('value')} (threshold {row['threshold']}): {'met' if row['met'] else 'MISSED'}")
    print(f"\nwrote {out_path} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
