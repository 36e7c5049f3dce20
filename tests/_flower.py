"""Shared by tests/test_flower_bridge.py and tests/test_flower.py: the Flower app's run config, as Flower hands it
to the apps, with a tiny federation's overrides."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "flower"
#: tensors an upload part may carry: the codec's parts and the keyed targets (docs/protocol.md, role fed)
UPLOAD_TENSORS = {"acts.q", "acts.scale", "acts.d", "acts.oidx", "acts.oval", "targets"}


def flatten(table: dict, prefix: str = "") -> dict:
    """A TOML table flattened as Flower flattens the run config (``data.max_length``)."""
    out = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def app_run_config(**overrides) -> dict:
    """The app's run config (its pyproject's defaults) with overrides, as Flower hands it to the apps."""
    config = flatten(tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    unknown = set(overrides) - set(config)
    assert not unknown, f"not keys of the app's run config: {unknown}"
    return {**config, **overrides}


def tiny_run_config(tmp_path: Path, data_file: Path, backbones: list[Path], **overrides) -> dict:
    return app_run_config(**{
        "run-id": "tiny-flower", "backbones": ",".join(str(b) for b in backbones),
        "data.dataset": "json", "data.data_files": str(data_file), "data.prompt": "Article : {text} Topic :",
        "data.max_length": 24, "device.dtype": "float32", "device.k": 4, "device.rr_epsilon": "",
        "device.samples_per_message": 16, "device.keystore": "", "server.workdir": str(tmp_path / "server"),
        "server.device": "cpu", "server.allowed_backbones": "", "server.fed_k": 4, "server.fed_batch_size": 16,
        "server.fed_lr": 0.01, "server.fed_max_replay_steps": 60, "flower.min_nodes": 4, **overrides})


def upload_over_our_link(server, node: int, device):
    """``device`` (a :class:`~lightning_mobillm.flower.device.FlowerDevice`) uploads its shard to ``server`` over
    our link (FedClient over the in-process link, as the bridge's node ``node``); returns the open client."""
    from lightning_mobillm.fed.client import FedClient
    from lightning_mobillm.flower.bridge import FederationBridge
    from lightning_mobillm.transport.link import InProcessLink

    hello = device.hello()
    per_frame = device.settings.device["samples_per_message"]
    client = FedClient(InProcessLink(server.handle, identity=FederationBridge.identity(node)),
                       device_id=hello["device_id"], run_id=hello["run_id"], backbone_type=hello["backbone_type"],
                       k=hello["k"], width=hello["width"], out_dim=hello["out_dim"], target_space=hello["target_space"],
                       codec=hello["codec"], max_samples_per_frame=per_frame)
    client.hello()
    for up, _ in device.worker.iter_uploads(device.shard, per_frame):
        client.upload(up)
    return client
