"""``FedDeviceModule`` as a Lightning run against a ``FedServer`` in this process (an ``InProcessLink``: the
same frames, encoded, validated and counted): partitions, one pass of uploads, no training on the device, local
evaluation with the downloaded parts, the summary, and a restarted device that keeps its keys."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import yaml

from lightning_mobillm.callbacks import DeviceMonitor
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.fed.alignment import BackboneType, shared_width
from lightning_mobillm.modules import FedDeviceModule
from lightning_mobillm.server.fed import FedServer
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.transport.link import InProcessLink

pytestmark = pytest.mark.usefixtures("one_torch_thread", "restore_seed_env")

K = 2
PROMPT = "Article : {text} Topic :"


@pytest.fixture
def server(tmp_path):
    """A fed server whose training loop runs, synchronously, before every call it answers (no thread)."""
    config = ServerConfig(device="cpu", workdir=str(tmp_path / "server"), fed_batch_size=8, fed_lr=1e-2,
                          fed_max_replay_steps=4, fed_k=K)
    server = FedServer(config, background=False)
    yield server
    server.close()


def _link(server: FedServer, identity: str) -> InProcessLink:
    def handle(data: bytes, who: str) -> bytes:
        server.run_pending()
        return server.handle(data, who)

    return InProcessLink(handle, identity=identity)


def _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, partition_id: int, factory=None,
         **kwargs) -> tuple[FedDeviceModule, dict]:
    data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), max_length=24,
                                        batch_size=8, eval_batch_size=16, prompt=PROMPT, limit_eval_samples=24)
    settings = {"k": K, "num_devices": 2, "partition_id": partition_id, "partition_scheme": "dirichlet",
                "alpha": 0.5, "partition_seed": 3, "samples_per_upload": 16,
                "keystore": str(tmp_path / f"keys-{partition_id}"), "run_id": "unit", "wait_for_devices": 1,
                "wait_timeout_s": 30, "poll_interval_s": 0.0, **kwargs}
    model = FedDeviceModule(backbone=BackboneConfig(source=str(tiny_llama_dir)), num_classes=data.num_classes,
                            **settings)
    model.link_factory = factory or (lambda device_id: _link(server, f"phone-{partition_id}"))
    monitor = DeviceMonitor()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[monitor], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path / f"run-{partition_id}")
    trainer.fit(model, data)
    summary = json.loads((tmp_path / f"run-{partition_id}" / "summary.json").read_text())
    return model, summary


def test_two_devices_upload_disjoint_shards_and_evaluate(server, tiny_llama_dir, tiny_data_file, tmp_path):
    _, first = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0)
    model, second = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 1, wait_for_devices=2)
    sizes = first["partition"]["sizes"]
    assert first["partition"] == second["partition"] and first["partition"]["scheme"] == "dirichlet"
    assert [first["samples_uploaded"], second["samples_uploaded"]] == sizes and sum(sizes) > 0
    stats = server.trainer.statistics()
    assert stats["totals"]["samples"] == sum(sizes) and stats["totals"]["devices"] == 2
    per_device = {d: s["samples"] for d, s in stats["devices"].items()}
    assert per_device == {"phone-0": sizes[0], "phone-1": sizes[1]}
    for summary in (first, second):
        assert 0.0 <= summary["val_acc"] <= 1.0 and summary["fed"]["evaluation"]["val_samples"] > 0
        assert summary["bytes_up"] > 0 and summary["link_bytes_down"] > summary["bytes_down"] > 0
        assert summary["fed"]["download_bytes"] > 0 and summary["server_pid"] == summary["device_pid"]
        assert summary["method"] == "FedDeviceModule" and summary["partition_seed"] == 3
        assert summary["fed"]["server_stats"]["queued_samples"] == 0
    # the device never trained: no parameter, no optimizer
    assert not list(model.parameters())
    assert [type(o).__name__ for o in model.trainer.optimizers] == ["_MockOptimizer"]  # Lightning's "none"
    assert second["fed"]["server_stats"]["totals"]["devices"] == 2


def test_a_restarted_device_keeps_its_keys_and_uploads_nothing_twice(server, tiny_llama_dir, tiny_data_file,
                                                                      tmp_path):
    _, first = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0, evaluate=False)
    keys = (tmp_path / "keys-0" / "device-keys.json").read_text()
    assert oct((tmp_path / "keys-0" / "device-keys.json").stat().st_mode & 0o777) == "0o600"
    _, again = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0)
    assert (tmp_path / "keys-0" / "device-keys.json").read_text() == keys
    assert first["samples_uploaded"] > 0 and again["samples_uploaded"] == 0
    assert again["fed"]["samples_skipped_already_uploaded"] == first["samples_uploaded"]
    assert again["val_acc"] is not None  # it evaluates with its old head: its key still fits it
    assert len((tmp_path / "keys-0" / "uploaded.txt").read_text().split()) == first["samples_uploaded"]
    # `validate` (no fit): a later evaluation, nothing uploaded
    data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), max_length=24,
                                        batch_size=8, eval_batch_size=16, prompt=PROMPT, limit_eval_samples=24)
    model = FedDeviceModule(backbone=BackboneConfig(source=str(tiny_llama_dir)), num_classes=data.num_classes, k=K,
                            num_devices=2, partition_scheme="dirichlet", partition_seed=3, run_id="unit",
                            keystore=str(tmp_path / "keys-0"), poll_interval_s=0.0)
    model.link_factory = lambda device_id: _link(server, "phone-0")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(model, data)
    assert metrics["val/acc"] == pytest.approx(again["val_acc"]) and model.samples_uploaded == 0


def test_a_crash_between_acknowledgement_and_ledger_loses_nothing_and_sends_nothing_twice(
        server, tiny_llama_dir, tiny_data_file, tmp_path):
    """The device died after the server acknowledged its last upload but before its ledger said so: the keys of
    that upload are still "in flight". On restart the server's count of this device's samples shows that they
    arrived: they join the ledger and are not sent again (the server would refuse them as a repeat)."""
    _, first = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0, evaluate=False, samples_per_upload=4)
    ledger, inflight = tmp_path / "keys-0" / "uploaded.txt", tmp_path / "keys-0" / "inflight.txt"
    keys = ledger.read_text().split()
    assert len(keys) == first["samples_uploaded"] > 4 and not inflight.exists()
    ledger.write_text("".join(f"{k}\n" for k in keys[:-3]))  # the crash: the last upload's keys never logged
    inflight.write_text("".join(f"{k}\n" for k in keys[-3:]))
    held = server.trainer.statistics()["totals"]["samples"]
    _, again = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0)
    assert again["samples_uploaded"] == 0 and again["fed"]["samples_recovered_after_a_crash"] == 3
    assert server.trainer.statistics()["totals"]["samples"] == held  # nothing cached twice
    assert sorted(ledger.read_text().split()) == sorted(keys) and not inflight.exists()
    # the other case: the device died before the server took the upload, so the keys are sent again
    ledger.write_text("".join(f"{k}\n" for k in keys))
    _, other = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 1, evaluate=False, samples_per_upload=4)
    ledger1, inflight1 = tmp_path / "keys-1" / "uploaded.txt", tmp_path / "keys-1" / "inflight.txt"
    assert other["samples_uploaded"] > 0
    server.close()
    fresh = FedServer(ServerConfig(device="cpu", workdir=str(tmp_path / "server2"), fed_batch_size=8,
                                   fed_lr=1e-2, fed_max_replay_steps=4, fed_k=K), background=False)
    try:  # a new federation has none of device 1's samples: its in-flight keys are sent again
        inflight1.write_text(ledger1.read_text())
        ledger1.write_text("")
        _, resent = _fit(fresh, tiny_llama_dir, tiny_data_file, tmp_path, 1, evaluate=False)
        assert resent["samples_uploaded"] == other["samples_uploaded"]
        assert resent["fed"]["samples_recovered_after_a_crash"] == 0
    finally:
        fresh.close()


def test_virtual_devices_share_one_backbone_and_are_devices_of_their_own(server, tiny_llama_dir, tiny_data_file,
                                                                        tmp_path):
    """Three partitions in one process: one backbone forward per sample, one connection and identity per device,
    a head per device, one held-out forward for all three evaluations."""
    model, summary = _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0, num_devices=3,
                          partition_ids=[0, 1, 2], device_id="fleet", keystore=str(tmp_path / "fleet"),
                          wait_for_devices=3, factory=lambda device_id: _link(server, device_id))
    stats = server.trainer.statistics()
    sizes = summary["partition"]["sizes"]
    assert model.device_ids == ["fleet-0", "fleet-1", "fleet-2"]
    assert {d: s["samples"] for d, s in stats["devices"].items()} == {
        f"fleet-{i}": sizes[i] for i in range(3) if sizes[i]}
    assert summary["samples_uploaded"] == sum(sizes) and summary["partition_id"] == [0, 1, 2]
    assert {m.worker.backbone for m in model.members} == {model.members[0].worker.backbone}  # one copy
    keys = {(tmp_path / "fleet" / d / "device-keys.json").read_text() for d in model.device_ids}
    assert len(keys) == 3  # a key each: three target spaces, three heads
    assert set(server.trainer.module.components) >= {f"head:fleet-{i}" for i in range(3) if sizes[i]}
    per_device = summary["fed"]["devices"]
    assert [d["device_id"] for d in per_device] == model.device_ids
    evaluated = [d["evaluation"]["val_acc"] for d in per_device if d["evaluation"]]
    assert len(evaluated) == summary["fed"]["evaluation"]["devices_evaluated"] == sum(1 for n in sizes if n)
    assert summary["val_acc"] == pytest.approx(sum(evaluated) / len(evaluated))


def test_virtual_devices_that_reach_the_server_as_one_identity_are_refused(server, tiny_llama_dir, tiny_data_file,
                                                                          tmp_path):
    with pytest.raises(ValueError, match="a token each"):
        _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0, partition_ids=[0, 1],
             factory=lambda device_id: _link(server, "one-token"))


def test_a_hello_with_another_k_is_refused(server, tiny_llama_dir, tiny_data_file, tmp_path):
    with pytest.raises(Exception, match="this federation has k = 2"):
        _fit(server, tiny_llama_dir, tiny_data_file, tmp_path, 0, k=4)


# ---- the recipes of recipes/fed/ ------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
FED = REPO / "recipes" / "fed"
#: (arch, width, depth) of the packaged backbones the federation recipes use (their published configurations)
PACKAGED = {"smollm2-135m": ("llama", 576, 30), "gemma3-270m": ("gemma3_text", 640, 18),
            "qwen2.5-coder-0.5b": ("qwen2", 896, 24)}
DEVICE_RECIPES = ["smollm2-135m-bbc.yaml", "gemma3-270m-bbc.yaml", "qwen2.5-coder-0.5b-bbc.yaml"]


def _serve_config(monkeypatch, recipe: Path) -> tuple[str, ServerConfig]:
    """What ``serve --config recipe`` would serve with (the real parser; the server itself is not started)."""
    import lightning_mobillm.server.app as app
    from lightning_mobillm.cli import main

    seen = []
    monkeypatch.setattr(app, "serve", lambda config, role, parent_pid: seen.append((role, config)))
    main(["serve", "--config", str(recipe)])
    (got,) = seen
    return got


def test_the_federation_recipes_agree(monkeypatch):
    role, server = _serve_config(monkeypatch, FED / "server.yaml")
    assert role == "fed" and server.tokens_file and server.tls_cert_file and server.host == "0.0.0.0"
    devices = [yaml.safe_load((FED / name).read_text())["model"]["init_args"] for name in DEVICE_RECIPES]
    types = {BackboneType(d["backbone"]["source"], *PACKAGED[d["backbone"]["source"]]).key for d in devices}
    assert set(server.allowed_backbones) == types and len(types) == 3
    assert server.fed_k == min(depth for _, _, depth in PACKAGED.values()) == 18
    assert shared_width([BackboneType.from_key(t).hidden_size for t in types]) == 640  # d* by default
    assert (server.fed_out_dim, server.fed_target_space) == (16, "device")
    for d in devices:
        assert (d["k"], d["out_dim"], d["target_space"]) == (18, 16, "device")
        assert (d["num_devices"], d["partition_scheme"], d["alpha"], d["partition_seed"]) == (3, "dirichlet", 0.5, 0)
        assert "token" not in d and d["token_env"] and d["tls_ca_file"]
    assert sorted(d["partition_id"] for d in devices) == [0, 1, 2]
    assert len({d["device_id"] for d in devices}) == 3
    role, tiny = _serve_config(monkeypatch, FED / "tiny-server.yaml")
    tiny_device = yaml.safe_load((FED / "tiny-device.yaml").read_text())["model"]["init_args"]
    assert role == "fed" and tiny.fed_k == tiny_device["k"] and tiny.fed_out_dim == tiny_device["out_dim"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in FED.glob("*.yaml")))
def test_every_fed_recipe_key_is_commented(recipe):
    for line in (FED / recipe).read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"{recipe}: a key without a comment: {line!r}"
