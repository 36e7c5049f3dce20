"""Fed MobiLLM over gRPC between real processes (issue 10): a ``serve --role fed`` process and two device
processes (``python -m lightning_mobillm fit --config recipes/fed/tiny-device.yaml``) with two different tiny
random backbones (a Llama 32 x 4 and a Gemma 3 48 x 6, K = 4), on disjoint Dirichlet partitions of the tiny
data set, each with its own token from a tokens file. Every process writes its stderr to a file; every wait is
bounded by the process finishing (``communicate`` with a timeout); every process is ended at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from lightning_mobillm.client import start_serve, stop_process
from lightning_mobillm.fed.alignment import BackboneType
from lightning_mobillm.fed.client import FedClient
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.transport.security import hash_token, new_token

REPO = Path(__file__).resolve().parents[1]
SERVER_RECIPE = REPO / "recipes" / "fed" / "tiny-server.yaml"
DEVICE_RECIPE = REPO / "recipes" / "fed" / "tiny-device.yaml"
#: tensors an uploaded frame may carry (docs/protocol.md, role fed): the codec's parts and the keyed targets
UPLOAD_TENSORS = {"acts.q", "acts.scale", "acts.d", "acts.oidx", "acts.oval", "targets"}


def _env(tmp_path: Path) -> dict[str, str]:
    """Offline, unbuffered, and the devices' keystores in this test's cache folder (never ~/.cache)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "LIGHTNING_MOBILLM_CACHE": str(tmp_path / "cache")}
    env.pop("MOBILLM_TOKEN", None)
    return env


def _serve(tmp_path: Path, env: dict[str, str], allowed: list[str], *extra: str):
    """``serve`` with the tiny server recipe in ``tmp_path`` (its ``tokens.txt``), these types allowed."""
    return start_serve(["--config", str(SERVER_RECIPE), "--server.allowed_backbones", json.dumps(allowed), *extra],
                       log_path=tmp_path / "server.stderr", cwd=tmp_path, env=env)


def test_a_fed_server_and_two_devices_with_different_backbones(tmp_path, tiny_llama_dir, tiny_gemma_dir,
                                                                tiny_data_file):
    backbones = {"phone-llama": tiny_llama_dir, "phone-gemma": tiny_gemma_dir}
    types = {name: BackboneType.of(BackboneConfig(source=str(folder))).key
             for name, folder in backbones.items()}
    assert len(set(types.values())) == 2
    tokens = {name: new_token() for name in [*backbones, "observer"]}
    (tmp_path / "tokens.txt").write_text("".join(f"{name} {hash_token(tok)}\n" for name, tok in tokens.items()))
    env = _env(tmp_path)
    procs: list[subprocess.Popen] = []
    try:
        # the server: the tiny recipe, with the two types allowed and checkpoints rare, so that the upload log
        # (what the server keeps of every upload) is still there to be read when the devices are done
        server, ready = _serve(tmp_path, env, sorted(types.values()), "--server.checkpoint_every_n_steps", "1000000")
        procs.append(server)
        address, server_pid = f"127.0.0.1:{ready['port']}", int(ready["pid"])
        assert server_pid == server.pid

        # two devices at once, each in its own folder, each with its own token (from its environment)
        devices = {}
        for partition_id, (name, folder) in enumerate(backbones.items()):
            cwd = tmp_path / name
            cwd.mkdir()
            args = [sys.executable, "-m", "lightning_mobillm", "fit", "--config", str(DEVICE_RECIPE),
                    "--model.init_args.backbone.source", str(folder), "--model.init_args.server", address,
                    "--model.init_args.partition_id", str(partition_id), "--model.init_args.device_id", name,
                    "--data.init_args.data_files", str(tiny_data_file)]
            with (cwd / "stdout").open("w") as out, (cwd / "stderr").open("w") as err:
                proc = subprocess.Popen(args, cwd=cwd, env={**env, "MOBILLM_TOKEN": tokens[name]},
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            procs.append(proc)
            devices[name] = (proc, cwd)
        for name, (proc, cwd) in devices.items():
            proc.communicate(timeout=150)
            assert proc.returncode == 0, f"{name}: {(cwd / 'stderr').read_text()[-4000:]}"

        summaries = {name: json.loads((cwd / "runs" / "fed-tiny" / "version_0" / "summary.json").read_text())
                     for name, (_, cwd) in devices.items()}
        pids = {s["device_pid"] for s in summaries.values()}
        assert len(pids) == 2 and server_pid not in pids
        assert pids == {proc.pid for proc, _ in devices.values()}
        sizes = summaries["phone-llama"]["partition"]["sizes"]
        for partition_id, (name, summary) in enumerate(summaries.items()):
            assert summary["server_pid"] == server_pid
            assert summary["partition"] == summaries["phone-llama"]["partition"]  # the same partition on both
            assert summary["samples_uploaded"] == sizes[partition_id] >= 10
            assert summary["fed"]["backbone_type"] == types[name]
            assert summary["val_acc"] is not None and 0.0 <= summary["val_acc"] <= 1.0
            assert summary["fed"]["evaluation"]["val_samples"] > 0
            assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
            assert summary["fed"]["download_bytes"] > 0
            assert summary["link_bytes_up"] >= summary["bytes_up"] and summary["device_busy_s"] > 0
            assert summary["fed"]["federation"]["k"] == 4 and summary["fed"]["federation"]["d_star"] == 32
            assert summary["fed"]["server_stats"]["device"]["samples"] == sizes[partition_id]
            assert summary["fed"]["server_stats"]["totals"]["devices"] == 2
            metrics = (devices[name][1] / "runs" / "fed-tiny" / "version_0" / "metrics.csv").read_text()
            assert "val/acc" in metrics.splitlines()[0]  # logged through Lightning's logger

        # the federation's totals, asked over gRPC by a third identity: both devices' samples, two types
        observer = FedClient.connect(address, tokens["observer"], device_id="observer", run_id="watch",
                                     backbone_type=types["phone-llama"], k=4, width=32, out_dim=16,
                                     connect_timeout=30)
        with observer:
            observer.hello()
            totals = observer.stats()["totals"]
        assert totals["samples"] == sum(sizes) and totals["devices"] == 2 and totals["types"] == 2
        assert totals["arrival_steps"] >= 2

        # what crossed: the server's upload log holds, per upload, the codec's parts and the keyed targets, keyed
        # by opaque sample keys; no labels, token ids or texts (the frame schemas have no place for them)
        logged = sorted((tmp_path / "fed-server" / "fed" / "uploads").glob("upload-*.safetensors"))
        assert logged
        owners, samples = set(), 0
        for path in logged:
            with safe_open(str(path), "pt") as f:
                assert set(f.keys()) <= UPLOAD_TENSORS and "targets" in f.keys()
                assert f.get_slice("targets").get_shape()[1] == 16  # keyed targets, not [N] labels
                entry = json.loads(f.metadata()["entry"])
            assert set(entry) == {"index", "device", "backbone_type", "keys", "codec", "session", "seq",
                                  "digest", "reply"}
            owners.add(entry["device"])
            samples += len(entry["keys"])
        assert owners == set(backbones) and samples == sum(sizes)
        texts = [json.loads(line)["text"] for line in tiny_data_file.read_text().splitlines()]
        server_log = (tmp_path / "server.stderr").read_text()
        assert "fed session" in server_log and "upload 0 accepted" in server_log
        assert not any(text in server_log for text in texts)
        for word in ("labels", "input_ids"):
            assert word not in server_log
    finally:
        for proc in procs:
            stop_process(proc, 30)


def test_virtual_devices_in_one_process_over_grpc(tmp_path, tiny_llama_dir, tiny_data_file):
    """One ``fit`` process runs two virtual devices (``partition_ids``) of one tiny backbone on one copy of its
    weights: the server (tokens file) sees two devices with their own identities, tokens (``token_file`` with
    ``{device_id}``), samples and heads."""
    names = ["fleet-0", "fleet-1"]
    tokens = {name: new_token() for name in names}
    (tmp_path / "tokens.txt").write_text("".join(f"{n} {hash_token(t)}\n" for n, t in tokens.items()))
    (tmp_path / "device").mkdir()
    for name, token in tokens.items():
        (tmp_path / "device" / f"{name}.token").write_text(token + "\n")
    kind = BackboneType.of(BackboneConfig(source=str(tiny_llama_dir))).key
    env = _env(tmp_path)
    procs: list[subprocess.Popen] = []
    try:
        server, ready = _serve(tmp_path, env, [kind])
        procs.append(server)
        cwd = tmp_path / "device"
        args = [sys.executable, "-m", "lightning_mobillm", "fit", "--config", str(DEVICE_RECIPE),
                "--model.init_args.backbone.source", str(tiny_llama_dir),
                "--model.init_args.server", f"127.0.0.1:{ready['port']}",
                "--model.init_args.partition_ids", "[0, 1]", "--model.init_args.device_id", "fleet",
                "--model.init_args.token_file", str(cwd / "{device_id}.token"),
                "--data.init_args.data_files", str(tiny_data_file)]
        with (cwd / "stdout").open("w") as out, (cwd / "stderr").open("w") as err:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        procs.append(proc)
        proc.communicate(timeout=150)
        assert proc.returncode == 0, (cwd / "stderr").read_text()[-4000:]
        summary = json.loads((cwd / "runs" / "fed-tiny" / "version_0" / "summary.json").read_text())
        sizes = summary["partition"]["sizes"]
        assert summary["partition_id"] == [0, 1] and summary["samples_uploaded"] == sum(sizes)
        per_device = {d["device_id"]: d for d in summary["fed"]["devices"]}
        assert set(per_device) == set(names)
        for i, name in enumerate(names):
            assert per_device[name]["samples_uploaded"] == sizes[i] >= 10
            assert per_device[name]["evaluation"]["val_samples"] > 0
        assert summary["fed"]["server_stats"]["totals"]["devices"] == 2
        assert summary["fed"]["evaluation"]["devices_evaluated"] == 2
    finally:
        for p in procs:
            stop_process(p, 30)
