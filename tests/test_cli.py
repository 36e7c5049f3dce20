"""The command line: ``python -m lightning_mobillm fit`` on a tiny backbone, bad keys, and ``serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from lightning_mobillm import faults
from lightning_mobillm.callbacks import DeviceMonitor
from lightning_mobillm.client import ServerError, start_serve, stop_process
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.strategies import ServerAssistedStrategy
from lightning_mobillm.transport.link import LinkError

RECIPE = """
seed_everything: 0
model:
  class_path: lightning_mobillm.modules.SideTuningModule
  init_args:
    backbone: {{source: {model}}}
    pool: mean
    lr: 0.01
data:
  class_path: lightning_mobillm.data.TextClassificationDataModule
  init_args:
    dataset: json
    data_files: {data}
    prompt: "Article : {{text}} Topic :"
    max_length: 20
    batch_size: 8
trainer:
  max_epochs: 1
  strategy:
    class_path: lightning_mobillm.strategies.ServerAssistedStrategy
    init_args:
      embedded: {{device: cpu, threads: 1}}
  callbacks:
    - class_path: lightning_mobillm.callbacks.QuantizedTransfer
      init_args: {{codec: int4}}
    - class_path: lightning_mobillm.callbacks.DeviceMonitor
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: cli}}
  enable_checkpointing: false
  enable_progress_bar: false
  num_sanity_val_steps: 0
"""


def _cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "lightning_mobillm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_fit_from_a_recipe(tmp_path, tiny_llama_dir, tiny_data_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_llama_dir, data=tiny_data_file, out=tmp_path / "runs"))
    proc = _cli(["fit", "--config", str(recipe)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "cli" / "version_0" / "summary.json").read_text())
    for key in ("device_pid", "server_pid", "bytes_up", "bytes_down", "device_peak_rss_mb", "steps", "val_acc",
                "val_f1", "codec", "device_load_peak_rss_mb", "device_steady_peak_rss_mb"):
        assert summary[key] is not None, key
    assert summary["device_steady_peak_rss_mb"] <= summary["device_peak_rss_mb"]
    assert summary["device_load_peak_rss_mb"] <= summary["device_peak_rss_mb"]
    assert summary["codec"] == "int4" and summary["device_pid"] != summary["server_pid"]
    assert (tmp_path / "runs" / "cli" / "version_0" / "server.log").read_text().count("session") >= 1
    assert "provide both args and command line arguments" not in proc.stderr


def test_help_lists_every_subcommand(tmp_path):
    proc = _cli(["--help"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m lightning_mobillm {fit,validate,test,predict,serve,token}")
    for sub in ("fit", "validate", "test", "predict", "serve"):
        assert f"\n  {sub} " in proc.stdout, sub
    fit_help = _cli(["fit", "--help"], cwd=tmp_path, timeout=120)
    assert fit_help.returncode == 0 and fit_help.stdout.startswith("usage: python -m lightning_mobillm")
    assert "__main__.py" not in fit_help.stdout


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("    lr: 0.01", "    lr: 0.01\n    reductoin: 4", "reductoin"),  # an unknown key
        ("batch_size: 8", "batch_size: eight", "batch_size"),  # an ill-typed value
    ],
    ids=["unknown-key", "ill-typed-key"],
)
def test_bad_key_is_named(tmp_path, tiny_llama_dir, tiny_data_file, old, new, named):
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(model=tiny_llama_dir, data=tiny_data_file, out=tmp_path / "runs")
    recipe.write_text(text.replace(old, new))
    proc = _cli(["fit", "--config", str(recipe)], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr


@pytest.fixture
def standalone_server(tmp_path):
    """``python -m lightning_mobillm serve`` as a user would start it on a server machine."""
    config = tmp_path / "server.yaml"
    (tmp_path / "server-token").write_text("s3cret\n")
    config.write_text(f"server:\n  host: 127.0.0.1\n  port: 0\n  token_file: {tmp_path / 'server-token'}\n"
                      "  device: cpu\n  threads: 1\n")
    proc, ready = start_serve(["--config", str(config)], log_path=tmp_path / "server.stderr")
    try:
        yield f"127.0.0.1:{ready['port']}", proc
    finally:
        stop_process(proc, 60)


def _fit_against(address: str, token: str, tiny_llama_dir, tiny_data_file, tmp_path) -> DeviceMonitor:
    data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), max_length=20,
                                        prompt="Article : {text} Topic :", tokenizer=str(tiny_llama_dir))
    model = SideTuningModule(backbone=BackboneConfig(source=str(tiny_llama_dir)), num_classes=data.num_classes,
                             pool="mean")
    monitor = DeviceMonitor()
    token_file = tmp_path / f"token-{token}"
    token_file.write_text(token)
    trainer = L.Trainer(
        strategy=ServerAssistedStrategy(server=address, token_file=str(token_file), connect_timeout=5, retries=0),
        accelerator="cpu", max_steps=3, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=1, default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    return monitor


def test_device_trains_against_a_standalone_server(standalone_server, tiny_llama_dir, tiny_data_file, tmp_path):
    address, proc = standalone_server
    monitor = _fit_against(address, "s3cret", tiny_llama_dir, tiny_data_file, tmp_path)
    assert monitor.summary["steps"] == 3 and monitor.summary["server_pid"] == proc.pid
    # a device with the wrong token is refused, and the server keeps serving the right one
    with pytest.raises((LinkError, ServerError), match="UNAUTHENTICATED"):
        _fit_against(address, "wrong", tiny_llama_dir, tiny_data_file, tmp_path)
    assert proc.poll() is None
    assert _fit_against(address, "s3cret", tiny_llama_dir, tiny_data_file, tmp_path).summary["steps"] == 3


def test_unreachable_server_is_named(tiny_llama_dir, tiny_data_file, tmp_path):
    with pytest.raises(LinkError, match="127.0.0.1:9 is unreachable"):
        _fit_against("127.0.0.1:9", "x", tiny_llama_dir, tiny_data_file, tmp_path)


def _default_sigint() -> None:
    """Run in a spawned child before exec: a test suite started as a background job inherits SIGINT as
    ignored, and Python then never installs its KeyboardInterrupt handler in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: how long a device may take from its Ctrl-C to its exit, its embedded server stopped and reaped
CTRL_C_BOUND_S = 30.0


@pytest.mark.parametrize("point", [
    "device:after_hello",  # the session is open, nothing trained yet
    "device:frame_in_flight@3",  # a training frame is on its way to the server, its reply not read
    "device:during_validation",  # a validation batch was forwarded and scored by the server
    "device:during_checkpoint",  # inside the strategy's checkpoint save (the server's state fetched)
], ids=["after-hello", "frames-in-flight", "during-validation", "during-checkpoint"])
def test_ctrl_c_stops_the_run_and_its_embedded_server(tmp_path, tiny_llama_dir, tiny_data_file, point):
    """Ctrl-C (SIGINT, sent by the device to itself at a named fault point: no timing) stops the run within a
    bound, and the device stops its embedded server (its own process group, so the Ctrl-C does not reach it)
    and reaps it before it exits."""
    recipe = tmp_path / "recipe.yaml"
    checkpoint = ("    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                  f"      init_args: {{dirpath: {tmp_path / 'ckpt'}, every_n_train_steps: 2}}\n")
    recipe.write_text(RECIPE.format(model=tiny_llama_dir, data=tiny_data_file, out=tmp_path / "runs")
                      .replace("max_epochs: 1", "max_epochs: 1000\n  val_check_interval: 3")
                      .replace("enable_checkpointing: false", "enable_checkpointing: true")
                      .replace("    - class_path: lightning_mobillm.callbacks.DeviceMonitor\n",
                               "    - class_path: lightning_mobillm.callbacks.DeviceMonitor\n" + checkpoint))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", faults.ENV: f"{point}=sigint"}
    stderr_path = tmp_path / "device.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "lightning_mobillm", "fit", "--config", str(recipe)],
                                cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, preexec_fn=_default_sigint)
    try:
        reached = ""
        for line in proc.stdout:  # blocks until the fault point is reached (the suite's timeout bounds it)
            if line.startswith(faults.MARKER):
                reached = line
                break
        assert reached, f"the run ended before {point}: {stderr_path.read_text()[-2000:]}"
        t0 = time.monotonic()
        proc.communicate(timeout=CTRL_C_BOUND_S)  # drains stdout; raises if the device outlives the bound
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr_path.read_text()[-2000:]  # Lightning's exit after a KeyboardInterrupt
    assert "Detected KeyboardInterrupt" in stderr_path.read_text()
    # the device waited for its server (its child) to exit, so the server is gone now, not eventually
    server_pid = int(reached.split("server_pid=", 1)[1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)
    log = (tmp_path / "runs" / "cli" / "version_0" / "server.log").read_text()
    assert "stopped" in log  # it shut down through its own handler (SIGTERM), not killed
    print(f"{point}: the device exited {stopped_in:.1f} s after its Ctrl-C")
