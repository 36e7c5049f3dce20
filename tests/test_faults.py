"""Faults: a server or a device killed mid-run, and the run still ends with what an uninterrupted run trains.

Faults are placed only through the named fault points of :mod:`lightning_mobillm.faults` (``MOBILLM_FAULTS``),
never by timing: no sleep, no wall-time race; every child process has a timeout and the suite a per-test
limit. The runs are real processes (``tests/support/fault_run.py``: the device, and its embedded server
started by the device or a standalone ``serve``); the uninterrupted reference runs here, over the in-process
link. One torch thread, dropout 0 and the seeded data order make the two bit-identical, so "every sample
entered the final optimizer history exactly once" is checked as: the final side network EQUALS the
reference's (``torch.equal`` on every tensor), the server's step count is the planned one, and the device's
loop trained on the reference's batches in the reference's order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support.fault_run import run as fault_run

from lightning_mobillm import faults
from lightning_mobillm.client import start_serve, stop_process
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.data.text_classification import ResumableDataLoader

SUPPORT = Path(__file__).parent / "support"
SECRET = "5e" * 32  # PAE's transform key: the same in the reference and in the child processes
STEPS = 12  # < one epoch of the tiny data set (17 batches of 8)


# ---- the hook itself ---------------------------------------------------------------------------------------
def test_fault_points_fire_only_where_and_when_named(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("device:after_hello")  # unset: nothing
    monkeypatch.setenv(faults.ENV, "device:during_validation@2=ready, server:after_train_step@5=raise")
    for _ in range(3):
        faults.fault_point("device:during_validation", batch_idx=0)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{faults.MARKER} device:during_validation action=ready")
    faults.fault_point("server:after_train_step", step=4)  # @N is the step when the point reports one
    with pytest.raises(faults.FaultInjected, match="server:after_train_step@5"):
        faults.fault_point("server:after_train_step", step=5)
    # with a fault folder, an entry fires once over every process that shares it (a restarted server)
    monkeypatch.setenv(faults.ENV_DIR, str(tmp_path))
    with pytest.raises(faults.FaultInjected):
        faults.fault_point("server:after_train_step", step=5)
    faults.fault_point("server:after_train_step", step=5)
    assert (tmp_path / "server-after_train_step@5.fired").exists()
    for bad in ("after_hello=sigint", "device:after_hello=explode", "device:after_hello@x=kill", "device:x"):
        with pytest.raises(ValueError, match="MOBILLM_FAULTS"):
            faults.parse_faults(bad)


# ---- a resumable training loader ---------------------------------------------------------------------------
class _Indices(L.LightningModule):
    """Trains nothing that matters; records the sample indices of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return (self.w * batch["labels"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _indices_fit(data, tmp_path, max_steps: int, ckpt_path=None, callbacks=()) -> list[list[int]]:
    module = _Indices()
    L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
              enable_checkpointing=bool(callbacks), default_root_dir=tmp_path).fit(module, data, ckpt_path=ckpt_path)
    return module.seen


def test_the_training_loader_resumes_mid_epoch_where_it_was(tmp_path, tiny_llama_dir, tiny_data_file,
                                                            restore_seed_env):
    data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), max_length=20,
                                        prompt="Article : {text} Topic :", tokenizer=str(tiny_llama_dir))
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and len(loader) == 17
    # the same order as the plain shuffled loader it replaces (recorded results stay reproducible)
    plain = torch.utils.data.DataLoader(data.split_dataset("train"), batch_size=8, shuffle=True,
                                        generator=torch.Generator().manual_seed(0), collate_fn=loader.collate_fn)
    for _ in range(2):
        assert [b["index"].tolist() for b in plain] == [b["index"].tolist() for b in loader]

    full = _indices_fit(data, tmp_path, max_steps=40)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    _indices_fit(data, tmp_path, max_steps=21, callbacks=[every])
    # mid-epoch 0, the end of epoch 0 (the checkpoint of its last batch), mid-epoch 1
    for step in (5, 17, 20):
        ckpt = next((tmp_path / "ckpt").glob(f"*-step={step}.ckpt"))
        state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        # the position saved is the batches trained on (Lightning does not prefetch a loader with a length)
        assert (state["epoch"], state["batches"]) == ((step // 17, step % 17) if step != 17 else (1, 0))
        assert _indices_fit(data, tmp_path, max_steps=40, ckpt_path=ckpt) == full[step:], step


# ---- kills in real processes ---------------------------------------------------------------------------------
def _env(tmp_path: Path, fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "MOBILLM_LABEL_SECRET": SECRET,
           faults.ENV_DIR: str(tmp_path / "faults-fired")}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return env


def _child(config: dict, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUPPORT / "fault_run.py"), json.dumps(config)], env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _result(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / "result.json").read_text()), torch.load(out / "weights.pt", weights_only=True)


def _assert_equal_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"weights differ from the uninterrupted run's: {different}"


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_llama_dir, tiny_data_file):
    """The uninterrupted runs (in this process, over the in-process link), computed once per method."""
    cache: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}

    def reference(method: str, max_steps: int, **config) -> tuple[dict, dict[str, torch.Tensor]]:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"reference-{method}")
            saved_env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "MOBILLM_LABEL_SECRET")}
            threads = torch.get_num_threads()
            os.environ["MOBILLM_LABEL_SECRET"] = SECRET
            try:
                fault_run({"out": str(out), "model": str(tiny_llama_dir), "data": str(tiny_data_file),
                           "server": "inprocess", "method": method, "max_steps": max_steps,
                           "workdir": str(out / "server"), **config})
            finally:
                torch.set_num_threads(threads)
                for key, value in saved_env.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            cache[method] = _result(out)
        return cache[method]

    return reference


def _config(tmp_path, tiny_llama_dir, tiny_data_file, name: str, **config) -> dict:
    return {"out": str(tmp_path / name), "model": str(tiny_llama_dir), "data": str(tiny_data_file),
            "workdir": str(tmp_path / name / "server"), **config}


def test_a_server_killed_mid_fit_is_restarted_and_the_lost_steps_replayed_exactly(
        tmp_path, tiny_llama_dir, tiny_data_file, references):
    ref, ref_weights = references("mobillm", STEPS)
    # the embedded server checkpoints every 4 steps and is SIGKILLed after applying step 6, before replying:
    # it restarts from its checkpoint at 4, and the device sends steps 4, 5 and the one in flight again
    config = _config(tmp_path, tiny_llama_dir, tiny_data_file, "run", max_steps=STEPS, server_every=4)
    proc = _child(config, _env(tmp_path, "server:after_train_step@6=kill"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "faults-fired" / "server-after_train_step@6.fired").exists()
    result, weights = _result(tmp_path / "run")
    assert "resumed from the server's checkpoint at step 4" in proc.stderr
    assert result["recoveries"] == 1 and result["replayed_steps"] >= 2
    assert result["steps"] == result["server_steps"] == STEPS == ref["server_steps"]
    assert result["batches"] == ref["batches"]
    _assert_equal_weights(weights, ref_weights)


@pytest.fixture
def standalone_server(tmp_path):
    """``python -m lightning_mobillm serve`` with a shared token: it outlives the device processes."""
    (tmp_path / "token").write_text("s3cret\n")
    config = tmp_path / "server.yaml"
    config.write_text(f"server:\n  host: 127.0.0.1\n  port: 0\n  token_file: {tmp_path / 'token'}\n  device: cpu\n"
                      f"  threads: 1\n  workdir: {tmp_path / 'server'}\n  checkpoint_every_n_steps: 4\n")
    log = tmp_path / "server.stderr"
    proc, ready = start_serve(["--config", str(config)], log_path=log, env=_env(tmp_path))
    try:
        yield f"127.0.0.1:{ready['port']}", log
    finally:
        stop_process(proc, 60)


def test_a_device_killed_mid_fit_resumes_from_its_checkpoint_on_the_session_the_server_kept(
        tmp_path, tiny_llama_dir, tiny_data_file, references, standalone_server):
    ref, ref_weights = references("mobillm", STEPS)
    address, server_log = standalone_server
    common = {"server": address, "token_file": str(tmp_path / "token"), "device_id": "phone", "max_steps": STEPS,
              "device_every": 4}
    first = _config(tmp_path, tiny_llama_dir, tiny_data_file, "first", **common)
    # SIGKILL of the device after step 6: its last checkpoint is at step 4; the server goes on holding the session
    proc = _child(first, _env(tmp_path, "device:after_train_step@6=kill"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = tmp_path / "first" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    second = _config(tmp_path, tiny_llama_dir, tiny_data_file, "second", ckpt_path=str(ckpt), **common)
    proc = _child(second, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, weights = _result(tmp_path / "second")
    # the same run's session, reconnected and rolled back to the checkpoint's step 4 ...
    log = server_log.read_text()
    assert "reconnected at step" in log and "restored at step 4" in log
    # ... then exactly the reference's batches 4..11 (the loader resumed mid-epoch), and its weights
    assert result["batches"] == ref["batches"][4:]
    assert result["steps"] == result["server_steps"] == STEPS
    _assert_equal_weights(weights, ref_weights)


def test_pae_with_its_activation_cache_survives_two_server_kills(tmp_path, tiny_llama_dir, tiny_data_file, references):
    steps = 34  # two epochs: the second trains from the server's activation cache
    ref, ref_weights = references("pae", steps)
    config = _config(tmp_path, tiny_llama_dir, tiny_data_file, "run", method="pae", max_steps=steps, server_every=4)
    # a kill in the first epoch (frames that fill the cache) and one in the second (frames of cache keys only)
    proc = _child(config, _env(tmp_path, "server:after_train_step@6=kill,server:after_train_step@22=kill"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, weights = _result(tmp_path / "run")
    assert result["recoveries"] == 2
    assert result["steps"] == result["server_steps"] == steps
    assert result["batches"] == ref["batches"]
    _assert_equal_weights(weights, ref_weights)
    # the first restarted server's cache held what its checkpoint at step 4 flushed: the 8 samples of step 4,
    # acknowledged after it, were forgotten and forwarded again (step 5 was in flight, never acknowledged);
    # the second restarted server still held the whole first epoch's cache
    assert result["cache_misses"] == 8 and ref["cache_misses"] == 0
    assert result["cache_hits"] >= ref["cache_hits"] > 0


def test_split_learning_survives_a_server_kill(tmp_path, tiny_llama_dir, tiny_data_file, references):
    steps = 6
    ref, ref_weights = references("split", steps, server_every=1)
    config = _config(tmp_path, tiny_llama_dir, tiny_data_file, "run", method="split", max_steps=steps,
                     server_every=1)
    # killed after applying (and checkpointing) step 3, before its gradient reached the device: the restarted
    # server answers the device's retry of that step with the stored reply
    proc = _child(config, _env(tmp_path, "server:after_train_step@3=kill"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, weights = _result(tmp_path / "run")
    assert result["recoveries"] == 1 and result["steps"] == steps
    assert result["server_losses"] == ref["server_losses"]
    _assert_equal_weights(weights, ref_weights)  # the device's half (LoRA on its blocks) too
