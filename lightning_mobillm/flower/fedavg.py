"""Synchronous FedAvg-LoRA on Flower's own ``FedAvg`` (``method = "fedavg_lora"``; needs the extra).

A cross-check of ``benchmarks/federated.py``'s FedAvg-LoRA baseline (the benchmark's remains the one it reports):
the same device model (:class:`~lightning_mobillm.fed.lora.LoraClassifier`: LoRA r on q/v and a loss-token head,
bf16 autocast over float32 weights, AdamW, adapters and head sent as float16 both ways), the same partitions,
trained by Flower: ``flwr.serverapp.strategy.FedAvg`` samples ``fedavg.fraction_train`` of the nodes per round,
sends them the global adapters and head (``arrays``), each trains ``fedavg.local_epochs`` on its shard and
returns its adapters and head with ``num-examples``, and FedAvg averages them weighted by samples; every node
then evaluates the global model on the held-out split and returns its accuracy. FedAvg averages only within one
architecture, so a run has exactly one backbone (one run per type).

The handlers are registered on :data:`lightning_mobillm.flower.apps.client_app` (``train`` and ``evaluate``, the
default actions FedAvg sends) and :func:`run_fedavg` is what the ServerApp runs for this method.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from lightning_mobillm.flower.records import tensors_of, to_record
from lightning_mobillm.flower.settings import FlowerSettings

__all__ = ["evaluate", "run_fedavg", "train"]


def _one_backbone(settings: FlowerSettings) -> str:
    if len(settings.backbones) != 1:
        raise ValueError(f"FedAvg averages only within one architecture: method fedavg_lora takes one backbone, "
                         f"got {settings.backbones} (one run per backbone type)")
    return settings.backbones[0]


def _node(settings: FlowerSettings, context: Context):
    """The node's LoRA model, data module and shard (the same partition as the node's Fed MobiLLM device)."""
    from lightning_mobillm.backbone import load_tokenizer
    from lightning_mobillm.fed.lora import LoraClassifier
    from lightning_mobillm.flower.device import node_data
    from lightning_mobillm.specs import BackboneConfig

    node = context.node_config
    source = _one_backbone(settings)
    if node.get("backbone") and str(node["backbone"]) != source:
        raise ValueError(f"this node runs {node['backbone']!r}, the FedAvg run {source!r}: one architecture per run")
    # the tokenizer first: the data's class count sizes the head
    tokenizer = load_tokenizer(BackboneConfig(source=source, dtype="float32"))
    data, _, shard = node_data(settings, tokenizer, int(node["partition-id"]), int(node["num-partitions"]))
    f = settings.fedavg
    return LoraClassifier(source, len(data.class_names), r=f["lora_r"], seed=f["seed"]), data, shard


def _half(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return to_record({n: t.half() for n, t in state.items()})


def train(msg: Message, context: Context) -> Message:
    """One round on this node: load the global adapters and head, train locally, return them (float16)."""
    settings = FlowerSettings.from_run_config(context.run_config)
    lora, _, shard = _node(settings, context)
    lora.load_state({n: t.float() for n, t in tensors_of(msg.content["arrays"]).items()})
    f, rnd = settings.fedavg, int(msg.content["config"]["server-round"])
    busy = lora.train_local(shard.input_ids, shard.labels, epochs=f["local_epochs"], batch_size=f["batch_size"],
                            lr=f["lr"], order_seed=f"fedavg/{f['seed']}/{rnd}/{context.node_config['partition-id']}")
    metrics = MetricRecord({"num-examples": len(shard), "busy_s": busy, "bytes_up": lora.nbytes})
    return Message(RecordDict({"arrays": _half(lora.state()), "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """The global adapters and head on this node's held-out split: accuracy and samples only."""
    settings = FlowerSettings.from_run_config(context.run_config)
    lora, data, _ = _node(settings, context)
    lora.load_state({n: t.float() for n, t in tensors_of(msg.content["arrays"]).items()})
    val = data.split_dataset("validation")
    accuracy = lora.evaluate(val.input_ids, val.labels, 16)
    return Message(RecordDict({"metrics": MetricRecord({"accuracy": accuracy, "num-examples": len(val.labels)})}),
                   reply_to=msg)


def run_fedavg(grid: Grid, settings: FlowerSettings) -> dict[str, Any]:
    """FedAvg-LoRA for ``fedavg.rounds`` rounds with Flower's ``FedAvg``; writes and returns the summary (the
    accuracy after every round, wall time; ``"clock": "wall"``)."""
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.fed.lora import LoraClassifier

    source = _one_backbone(settings)
    f, fl = settings.fedavg, settings.flower
    data = TextClassificationDataModule(**settings.data)
    lora = LoraClassifier(source, len(data.class_names), r=f["lora_r"], seed=f["seed"])
    initial = _half(lora.state())
    del lora
    strategy = FedAvg(fraction_train=float(f["fraction_train"]), fraction_evaluate=1.0, min_train_nodes=1,
                      min_evaluate_nodes=1, min_available_nodes=int(fl["min_nodes"]))
    t0 = time.monotonic()
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(f["rounds"]),
                            timeout=float(fl["upload_timeout_s"]), train_config=ConfigRecord({}))
    curve = [{"round": int(r), "val_acc": float(m["accuracy"])}
             for r, m in sorted(result.evaluate_metrics_clientapp.items()) if "accuracy" in m]
    summary = {"clock": "wall", "engine": "flower", "method": "fedavg_lora", "run_id": settings.run_id,
               "backbone": source, "rounds": int(f["rounds"]), "curve": curve,
               "val_acc": curve[-1]["val_acc"] if curve else None,
               "best_val_acc": max((c["val_acc"] for c in curve), default=None),
               "adapter_and_head_bytes": sum(len(a.data) for a in initial.values()), "wall_s": time.monotonic() - t0,
               "train_metrics": {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
               "settings": {"data": settings.data, "device": settings.device, "fedavg": f}}
    settings.write_summary(summary)
    return summary
