"""Fed MobiLLM on Flower, without Flower (issue 12): the run config's mapping onto the recipes' keys, a node's
device (:class:`FlowerDevice`) and the server side (:class:`FederationBridge`) that turns a node's upload into our
link's frames for :class:`FedServer`. Two tiny random backbones of different types (a Llama 32 x 4 and a Gemma 3
48 x 6, K = 4) on the tiny data set; the server's loop runs synchronously (``background=False``): no sleeping.
The Flower simulation itself is ``tests/test_flower.py`` (``pytest -m flower``, with the extra)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.flower.bridge import FederationBridge
from lightning_mobillm.flower.device import HELLO_KEYS, PART_HEADER_KEYS, FlowerDevice
from lightning_mobillm.flower.settings import (
    DEVICE_DEFAULTS,
    FEDAVG_DEFAULTS,
    FLOWER_DEFAULTS,
    FlowerSettings,
    SettingsError,
)
from lightning_mobillm.server.fed import FedServer
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from _flower import REPO, UPLOAD_TENSORS, app_run_config, tiny_run_config, upload_over_our_link  # noqa: E402


@pytest.fixture
def federation(request, tmp_path, monkeypatch, tiny_llama_dir, tiny_gemma_dir, tiny_data_file):
    """Settings for 4 nodes of two types, and a function building node ``i``'s device (run config overrides from
    ``@pytest.mark.run_config(...)``)."""
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", str(tmp_path / "cache"))  # the nodes' keystores
    marker = request.node.get_closest_marker("run_config")
    settings = FlowerSettings.from_run_config(tiny_run_config(tmp_path, tiny_data_file, [tiny_llama_dir, tiny_gemma_dir],
                                                              **(marker.kwargs if marker else {})))
    return settings, lambda i: FlowerDevice(settings, i, 4)


# ---------------------------------------------------------------------------------------------- settings
def test_every_key_of_the_app_config_is_a_recipe_key_and_parses():
    settings = FlowerSettings.from_run_config(app_run_config())
    assert settings.backbones == ["smollm2-135m", "gemma3-270m"]
    assert settings.data["max_length"] == 128 and settings.data["data_files"] is None  # "" is None
    assert set(settings.device) == set(DEVICE_DEFAULTS) and set(settings.flower) == set(FLOWER_DEFAULTS)
    assert set(settings.fedavg) == set(FEDAVG_DEFAULTS) and settings.method == "fed_mobillm"
    assert {k: v for k, v in settings.fedavg.items()} == FEDAVG_DEFAULTS  # the defaults in code and in the app agree
    assert settings.server["allowed_backbones"] == ["smollm2-135m/llama/d576-L30", "gemma3-270m/gemma3_text/d640-L18"]
    config = settings.server_config()
    assert config.fed_k == 18 and config.fed_d_star is None and config.allowed_backbones[1].startswith("gemma3")
    assert settings.backbone_for(3) == "gemma3-270m" and settings.backbone_for(3, {"backbone": "x"}) == "x"


def test_the_app_config_and_the_fed_recipes_agree():
    """The Flower app's defaults are those of recipes/fed/server.yaml where both set a key."""
    import yaml

    server = yaml.safe_load((REPO / "recipes" / "fed" / "server.yaml").read_text())["server"]
    settings = FlowerSettings.from_run_config(app_run_config())
    for key in ("fed_k", "fed_out_dim", "fed_target_space", "fed_head_rank", "fed_batch_size", "fed_lr",
                "fed_max_samples_per_device", "fed_download_dtype"):
        assert settings.server[key] == server[key], key


@pytest.mark.parametrize("key, message", [("data.nope", "data has no key 'nope'"),
                                          ("server.fed_lrr", "server has no key 'fed_lrr'"),
                                          ("model.k", "not method, run-id, backbones"), ("method", "method must be one of")])
def test_an_unknown_run_config_key_is_named(key, message):
    with pytest.raises(SettingsError, match=message):
        FlowerSettings.from_run_config({**app_run_config(), key: "nope"})


def test_the_core_never_imports_flower():
    """The settings, device and bridge modules load without ``flwr`` (the core works without the extra)."""
    code = ("import sys, lightning_mobillm.flower.bridge, lightning_mobillm.flower.device, "
            "lightning_mobillm.flower.settings; print(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- device and bridge
# the paper's plain residual and one shared head: a target space in which this tiny, skewed federation learns
# within a few hundred steps (a head per device fits its own few classes; see README, Fed MobiLLM)
@pytest.mark.run_config(**{"device.target_space": "plain", "server.fed_target_space": "plain", "server.fed_out_dim": "",
                           "server.fed_max_replay_steps": 150})
def test_nodes_upload_through_the_bridge_and_the_shared_model_learns(federation):
    settings, device = federation
    server = FedServer(settings.server_config(), background=False)
    bridge = FederationBridge(server)
    devices = [device(i) for i in range(4)]
    assert len({d.backbone_type for d in devices}) == 2
    shards = [set(map(tuple, d.shard.input_ids)) for d in devices]
    assert sum(len(s) for s in shards) == len(set().union(*shards))  # disjoint partitions
    for i, dev in enumerate(devices):
        hello, parts, metrics = dev.upload()
        sent = len(dev.shard) - dev.worker.duplicates_dropped
        assert set(hello) == set(HELLO_KEYS) and len(parts) == math.ceil(sent / 16)  # 16 samples a part
        for header, tensors in parts:  # nothing but keys and codec; the codec's parts and targets
            assert set(header) == set(PART_HEADER_KEYS) and set(tensors) <= UPLOAD_TENSORS
            assert tensors["acts.q"].dtype == torch.int8 and all(t.dtype != torch.bfloat16 for t in tensors.values())
        assert bridge.accept(100 + i, hello, parts, metrics) == sent == metrics["samples"]
    kinds = server.run_pending()
    total = sum(n["samples_accepted"] for n in bridge.summary()["nodes"].values())
    assert kinds.count("arrival") >= total // 16 and "replay" in kinds
    accs, zero = [], []
    for i, dev in enumerate(devices):
        config, state, steps = bridge.download(100 + i)
        assert steps == len(kinds) and config["backbone_type"] == dev.backbone_type
        metrics = dev.evaluate(config, state)
        accs.append(metrics["val_acc"])
        zero.append(metrics["val_zero_shot_acc"])
    assert sum(accs) / 4 > sum(zero) / 4 + 0.2  # random tiny backbones: near chance alone
    summary = bridge.summary()
    assert [n["samples_accepted"] for n in summary["nodes"].values()] == [
        len(d.shard) - d.worker.duplicates_dropped for d in devices]
    assert summary["frames_refused"] == 0 and not any(n["refused"] for n in summary["nodes"].values())
    for node in summary["nodes"].values():  # the audit trail of what crossed
        assert node["received"]["hello"] == sorted(HELLO_KEYS) and node["received"]["header"] == sorted(PART_HEADER_KEYS)
    server.close()


def test_the_bridge_equals_our_link(federation):
    """The same uploads through the bridge and through FedClient over the in-process link train the same
    shared model: Flower's path is our link's frames."""
    settings, device = federation
    devices = [device(0), device(1)]
    uploads = [d.upload() for d in devices]
    states = []
    for route in ("bridge", "link"):
        server = FedServer(settings.server_config(workdir=str(Path(settings.server["workdir"]) / route)),
                           background=False)
        if route == "bridge":
            bridge = FederationBridge(server)
            for i, (hello, parts, _) in enumerate(uploads):
                bridge.accept(i, hello, parts)
        else:
            for i, dev in enumerate(devices):
                upload_over_our_link(server, i, dev)
        server.run_pending()
        states.append({k: v.clone() for k, v in server.trainer.module.state_dict().items()})
        server.close()
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], msg=name)


def test_a_label_or_an_unknown_key_is_refused_and_changes_nothing(federation):
    settings, device = federation
    server = FedServer(settings.server_config(), background=False)
    bridge = FederationBridge(server)
    dev = device(0)
    hello, parts, _ = dev.upload()
    header, tensors = parts[0]
    labels = torch.zeros(len(header["keys"]), dtype=torch.int64)
    assert bridge.accept(1, {**hello, "labels": [0, 1]}, parts) == 0  # a hello with a place for labels
    assert "fed_hello" in bridge.node(1).refused[0] and server.trainer is None
    assert bridge.accept(1, hello, [(header, {**tensors, "labels": labels})]) == 0  # a part carrying labels
    assert bridge.accept(1, hello, [({**header, "text": "an article"}, tensors)]) == 0  # a header with text
    assert bridge.accept(1, hello, [({**header, "keys": b"raw"}, tensors)]) == 0  # not even JSON
    assert server.trainer.num_samples == 0 and len(bridge.node(1).refused) == 4
    sent = len(dev.shard) - dev.worker.duplicates_dropped
    assert bridge.accept(1, hello, parts) == sent  # the same node, well-formed: accepted
    assert server.trainer.num_samples == sent


def test_a_type_outside_the_allow_list_and_a_wrong_width_are_refused(federation):
    settings, device = federation
    llama = device(0)
    server = FedServer(settings.server_config(allowed_backbones=[llama.backbone_type]), background=False)
    bridge = FederationBridge(server)
    gemma = device(1)
    hello, parts, _ = gemma.upload()
    assert bridge.accept(2, hello, parts) == 0 and "allow-list" in bridge.node(2).refused[0]
    hello, parts, _ = llama.upload()
    assert bridge.accept(3, {**hello, "width": hello["width"] + 1}, parts) == 0
    assert "width" in bridge.node(3).refused[0]
    header, tensors = parts[0]
    wrong = {**tensors, "acts.q": tensors["acts.q"][:, :, :-1].contiguous()}  # one channel short
    assert bridge.accept(3, hello, [(header, wrong)]) == 0
    assert server.trainer.num_samples == 0
    assert bridge.accept(3, hello, parts) == len(llama.shard) - llama.worker.duplicates_dropped


def test_a_node_reads_only_its_own_parts(federation):
    """Sessions belong to the node's identity: node 1's session and secret do not serve node 2."""
    settings, device = federation
    server = FedServer(settings.server_config(), background=False)
    bridge = FederationBridge(server)
    hello, parts, _ = device(0).upload()
    bridge.accept(1, hello, parts)
    own = bridge.node(1)
    frame = Frame(kind=P.FED_DOWNLOAD, header={"session": own.session, "secret": own.secret})
    reply = decode_frame(server.handle(encode_frame(frame), bridge.identity(2)), P.FED_REPLY_SCHEMAS,
                         require_finite=False)
    assert reply.kind == P.ERROR
    with pytest.raises(ValueError, match="no session"):
        bridge.download(2)
