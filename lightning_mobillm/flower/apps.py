"""Fed MobiLLM's Flower apps (needs ``pip install -e '.[flower]'``; ``apps/flower`` points Flower here).

**ClientApp** (:data:`client_app`):

* ``train.upload``: the node's :class:`~lightning_mobillm.flower.device.FlowerDevice` (its partition from the
  node config's ``partition-id`` / ``num-partitions``, its backbone from ``backbones`` or the node config's
  ``backbone``) forwards its shard once and replies with ``hello`` (a ``ConfigRecord``: the ``fed_hello``
  header), ``part.<i>`` (an ``ArrayRecord``: the codec's parts, int8 taps with float32 scales, and the float32
  keyed targets; never bfloat16, which Flower refuses), ``part.<i>.header`` (its sample keys and codec) and
  ``device`` (a ``MetricRecord``: samples, busy seconds, bytes). No label, token id or text.
* ``evaluate.parts``: builds the downloaded parts (``parts``, an ``ArrayRecord``, and ``parts.config``) and evaluates
  on the node; replies with metrics only.

**ServerApp** (:data:`server_app`), the shared-model policy of ``serve --role fed`` on Flower's grid: it waits
for ``flower.min_nodes`` nodes, pushes one ``train.upload`` message to each, and then polls
``grid.pull_messages`` (every ``flower.poll_interval_s``): each reply, as it arrives, goes through
:class:`~lightning_mobillm.flower.bridge.FederationBridge` into a
:class:`~lightning_mobillm.server.fed.FedServer` (same schemas, bounds, quotas, allow-list, checkpoints), and
between polls the server takes one step at a time (:meth:`~lightning_mobillm.server.fed.FedServer.step_pending`:
the oldest arrival's next batch, else a replay step of the whole cache). After the last reply (or
``flower.upload_timeout_s``) it finishes the arrivals and the replay budget (``server.fed_max_replay_steps``),
sends each node its parts in an ``evaluate.parts`` message, and writes ``summary.json``. Time is wall time
(``"clock": "wall"``): Flower's arrival order is real execution order, not the benchmark's virtual clock.

With ``method = "fedavg_lora"`` the ServerApp runs :func:`lightning_mobillm.flower.fedavg.run_fedavg` instead
(Flower's ``FedAvg``; the ClientApp's default ``train`` and ``evaluate`` handlers are FedAvg's).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lightning_mobillm.flower import fedavg
from lightning_mobillm.flower.bridge import FederationBridge
from lightning_mobillm.flower.device import HELLO_KEYS, PART_HEADER_KEYS, FlowerDevice
from lightning_mobillm.flower.records import tensors_of, to_record
from lightning_mobillm.flower.settings import FlowerSettings

log = logging.getLogger("flwr.mobillm")  # under Flower's logger: its handlers stream it to `flwr run`

__all__ = ["client_app", "parse_upload", "run_server", "server_app"]

#: the message type of the upload (``@client_app.train("upload")``)
UPLOAD = "train.upload"
#: the Fed MobiLLM evaluation (``@client_app.evaluate("parts")``); FedAvg's own ``evaluate`` is the default action
EVALUATE = "evaluate.parts"


def parse_upload(content: RecordDict) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, torch.Tensor]]],
                                                dict[str, float]]:
    """A ``train.upload`` reply's records: the hello, the parts in order and the device's metrics. A record
    outside ``hello``, ``device``, ``part.<i>`` and ``part.<i>.header`` is refused with its name (the frames'
    schemas then refuse unknown header keys and tensors)."""
    names = set(content.keys())
    if "hello" not in names:
        raise ValueError("the reply has no 'hello' record")
    count = sum(1 for n in names if n.startswith("part.") and not n.endswith(".header"))
    expected = {"hello", "device"} | {f"part.{i}" for i in range(count)} | {f"part.{i}.header" for i in range(count)}
    if names - expected:
        raise ValueError(f"unexpected records in an upload: {sorted(names - expected)[:5]}")
    hello = {k: v for k, v in content["hello"].items()}
    parts = []
    for i in range(count):
        header = {k: (list(v) if isinstance(v, list) else v) for k, v in content[f"part.{i}.header"].items()}
        parts.append((header, tensors_of(content[f"part.{i}"])))
    metrics = {k: float(v) for k, v in content["device"].items()} if "device" in names else {}
    return hello, parts, metrics


# ---------------------------------------------------------------------------------------------- ClientApp
client_app = ClientApp()


def _device(context: Context) -> FlowerDevice:
    settings = FlowerSettings.from_run_config(context.run_config)
    node = context.node_config
    return FlowerDevice(settings, int(node["partition-id"]), int(node["num-partitions"]),
                        backbone=str(node["backbone"]) if node.get("backbone") else None)


@client_app.train("upload")
def upload(msg: Message, context: Context) -> Message:
    """Forward this node's shard once and reply with the upload (no label, token id or text)."""
    hello, parts, metrics = _device(context).upload()
    assert set(hello) == set(HELLO_KEYS)
    content = RecordDict({"hello": ConfigRecord(hello), "device": MetricRecord(metrics)})
    for i, (header, tensors) in enumerate(parts):
        assert set(header) == set(PART_HEADER_KEYS)
        content[f"part.{i}"] = to_record(tensors)
        content[f"part.{i}.header"] = ConfigRecord(header)
    return Message(content, reply_to=msg)


@client_app.evaluate("parts")
def evaluate_parts(msg: Message, context: Context) -> Message:
    """Evaluate the downloaded parts on this node; reply with metrics only."""
    config = json.loads(msg.content["parts.config"]["config"])
    metrics = _device(context).evaluate(config, tensors_of(msg.content["parts"]))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# the FedAvg-LoRA cross-check's node (method fedavg_lora): FedAvg sends the default train and evaluate actions
client_app.train()(fedavg.train)
client_app.evaluate()(fedavg.evaluate)

# ---------------------------------------------------------------------------------------------- ServerApp
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    settings = FlowerSettings.from_run_config(context.run_config)
    if settings.method == "fedavg_lora":
        fedavg.run_fedavg(grid, settings)
    else:
        run_server(grid, settings)


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float, poll_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() >= deadline:
            if len(nodes) < count:
                log.warning("only %d of %d nodes connected within %.0f s; going on with them", len(nodes), count,
                            timeout_s)
            return nodes
        time.sleep(poll_s)


def run_server(grid: Grid, settings: FlowerSettings) -> dict[str, Any]:
    """The asynchronous shared-model policy on Flower's grid (see the module docstring); returns the summary
    it writes."""
    from lightning_mobillm.server.fed import FedServer

    f = settings.flower
    server = FedServer(settings.server_config(workdir=str(settings.workdir())), background=False)
    bridge = FederationBridge(server)
    t0 = time.monotonic()
    node_ids = _wait_for_nodes(grid, int(f["min_nodes"]), float(f["wait_for_nodes_s"]), float(f["poll_interval_s"]))
    log.info("Fed MobiLLM on Flower: %d nodes; asking each for its upload", len(node_ids))
    by_identity = {bridge.identity(n): n for n in node_ids}
    ask = ConfigRecord({"run-id": settings.run_id})
    pushed = list(grid.push_messages([Message(RecordDict({"config": ask}), dst_node_id=n, message_type=UPLOAD)
                                      for n in node_ids]))
    pending = set(pushed)
    steps: Counter[str] = Counter()
    failures: dict[str, str] = {}
    poll = float(f["poll_interval_s"])
    deadline = t0 + float(f["upload_timeout_s"])
    next_pull = 0.0
    while pending and time.monotonic() < deadline:
        replies = []
        if time.monotonic() >= next_pull:
            replies = list(grid.pull_messages(list(pending)))
            next_pull = time.monotonic() + poll
        for reply in replies:
            pending.discard(reply.metadata.reply_to_message_id)
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures[bridge.identity(node)] = str(reply.error.reason)
                log.warning("flower node %s failed its upload: %s", node, reply.error.reason)
                continue
            try:
                hello, parts, metrics = parse_upload(reply.content)
            except Exception as err:  # noqa: BLE001 - a malformed reply is refused; the server keeps running
                bridge.node(node).refused.append(str(err))
                log.warning("flower node %s: upload refused: %s", node, err)
                continue
            got = bridge.accept(node, hello, parts, metrics)
            log.info("flower node %s: %d samples accepted (%d nodes still uploading)", node, got, len(pending))
        kind = server.step_pending()  # one step: the oldest arrival's next batch, else a replay step
        if kind is not None:
            steps[kind] += 1
        elif not replies:
            time.sleep(max(0.0, next_pull - time.monotonic()))
    upload_wall_s = time.monotonic() - t0
    if pending:
        log.warning("%d nodes did not upload within %.0f s (flower.upload_timeout_s)", len(pending),
                    f["upload_timeout_s"])
    for kind in server.run_pending():  # the arrivals left, then the replay budget (server.fed_max_replay_steps)
        steps[kind] += 1
    train_wall_s = time.monotonic() - t0

    # evaluation: each node downloads its parts and evaluates on its own data
    messages, bytes_down = [], {}
    for identity, record in bridge.nodes.items():
        if record.session is None or identity not in by_identity:
            continue
        config, state, server_steps = bridge.download(by_identity[identity])
        bytes_down[identity] = sum(t.numel() * t.element_size() for t in state.values())
        content = RecordDict({"parts": to_record(state),
                              "parts.config": ConfigRecord({"config": json.dumps(config), "steps": server_steps})})
        messages.append(Message(content, dst_node_id=by_identity[identity], message_type=EVALUATE))
    for reply in grid.send_and_receive(messages, timeout=float(f["eval_timeout_s"])):
        identity = bridge.identity(reply.metadata.src_node_id)
        if reply.has_error():
            failures[identity] = str(reply.error.reason)
            continue
        try:
            bridge.node(reply.metadata.src_node_id).evaluation = {k: float(v) for k, v in
                                                                   reply.content["metrics"].items()}
        except Exception as err:  # noqa: BLE001 - a malformed evaluation reply is recorded, not fatal
            failures[identity] = f"malformed evaluation reply: {err}"
    summary = _summary(settings, bridge, steps, failures, bytes_down, len(node_ids), upload_wall_s, train_wall_s,
                       time.monotonic() - t0)
    server.close()
    path = settings.write_summary(summary)
    log.info("Fed MobiLLM on Flower: val acc %s over %d nodes; summary in %s", summary["val_acc"],
             summary["nodes_evaluated"], path)
    return summary


def _summary(settings: FlowerSettings, bridge: FederationBridge, steps: Counter, failures: dict[str, str],
             bytes_down: dict[str, int], nodes: int, upload_wall_s: float, train_wall_s: float,
             wall_s: float) -> dict[str, Any]:
    base = bridge.summary()
    per_type: dict[str, list[float]] = {}
    for identity, node in base["nodes"].items():
        node["bytes_down"] = bytes_down.get(identity, 0)
        if "val_acc" in node["evaluation"]:
            per_type.setdefault(node["backbone_type"], []).append(node["evaluation"]["val_acc"])
    accs = [a for values in per_type.values() for a in values]
    type_means = {k: statistics.fmean(v) for k, v in per_type.items()}
    return {"clock": "wall", "engine": "flower", "run_id": settings.run_id, "nodes": nodes,
            "nodes_uploaded": sum(1 for n in base["nodes"].values() if n["samples_accepted"]),
            "nodes_evaluated": len(accs), "val_acc": statistics.fmean(accs) if accs else None,
            "val_acc_by_type": type_means, "val_acc_min": min(type_means.values()) if type_means else None,
            "val_acc_max": max(type_means.values()) if type_means else None, "steps": dict(steps),
            "upload_wall_s": upload_wall_s, "train_wall_s": train_wall_s, "wall_s": wall_s, "failures": failures,
            "frames_refused": base["frames_refused"], "statistics": base["statistics"], "nodes_detail": base["nodes"],
            "settings": {"backbones": settings.backbones, "data": settings.data, "device": settings.device,
                         "server": settings.server, "flower": settings.flower}}
