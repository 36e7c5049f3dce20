"""``ServerAssistedStrategy`` end to end on a tiny random backbone.

One test keeps the real thing: an embedded server in a separate process over loopback gRPC (its point is
the process boundary). The others run the server's handler in this process behind the in-process link
(frames still encoded, validated and counted), which makes them fast. Every method over the in-process
link (MobiLLM, PAE with its cache, split learning) is in ``test_inprocess.py``. Only public behaviour is
used: Trainer results, ``DeviceMonitor`` summaries, checkpoints, frames through the link and the server's
replies.
"""

from __future__ import annotations

import os

import lightning as L
import psutil
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_mobillm import protocol as P
from lightning_mobillm.callbacks import DeviceMonitor, QuantizedTransfer
from lightning_mobillm.client import INPROCESS
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.strategies import ServerAssistedStrategy
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame

GRPC = None  # an embedded server: a separate process on loopback


# device and server share this process over the in-process link (and the machine's two cores): one
# intra-op thread, or two OpenMP threads spin-wait on each other; Lightning's seed variables are restored
pytestmark = pytest.mark.usefixtures("one_torch_thread", "restore_seed_env")


def _frames(calls: list[tuple[bytes, bytes]]) -> list[tuple[Frame, Frame]]:
    return [(decode_frame(q, P.REQUEST_SCHEMAS), decode_frame(r, P.REPLY_SCHEMAS, require_finite=False))
            for q, r in calls]


def _training(calls: list[tuple[bytes, bytes]]) -> list[tuple[Frame, Frame]]:
    return [(q, r) for q, r in _frames(calls) if q.kind == P.TRAIN]


def _data(tiny_data_file, tiny_llama_dir) -> TextClassificationDataModule:
    return TextClassificationDataModule(
        dataset="json",
        data_files=str(tiny_data_file),
        prompt="Article : {text} Topic :",
        max_length=20,
        batch_size=8,
        eval_batch_size=16,
        val_fraction=0.2,
        tokenizer=str(tiny_llama_dir),
    )


def _model(tiny_llama_dir, num_classes: int) -> SideTuningModule:
    return SideTuningModule(
        backbone=BackboneConfig(source=str(tiny_llama_dir)), num_classes=num_classes, lr=1e-2, dropout=0.0,
        pool="mean",
    )


def _strategy(server: str | None, **kw) -> ServerAssistedStrategy:
    return ServerAssistedStrategy(server=server, embedded=ServerConfig(device="cpu", threads=1), **kw)


def _trainer(tmp_path, max_epochs: int, callbacks=(), *, server: str | None = INPROCESS, depth: int = 1,
             codec: str = "int8", name: str = "run") -> L.Trainer:
    L.seed_everything(0, verbose=False)
    return L.Trainer(
        strategy=_strategy(server, pipeline_depth=depth),
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=[QuantizedTransfer(codec), DeviceMonitor(), *callbacks],
        logger=CSVLogger(tmp_path, name=name),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def _summary(trainer: L.Trainer) -> dict:
    return next(c for c in trainer.callbacks if isinstance(c, DeviceMonitor)).summary


def _weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- over the real gRPC link, between two processes -------------------------------------------------------
class ProcessAudit(L.Callback):
    """While training, look at the server process; at the end of training ask the server (over the link,
    with a get_state frame of the run's session) for its side network and how many bytes it read and wrote."""

    def on_train_start(self, trainer, pl_module):
        pid = trainer.strategy.client.server_pid
        proc = psutil.Process(pid)
        self.server_process = {"pid": pid, "ppid": proc.ppid(), "cmdline": proc.cmdline()}
        self.initial = _weights(pl_module)

    def on_train_end(self, trainer, pl_module):
        client = trainer.strategy.client
        data = client.call(encode_frame(Frame(kind=P.GET_STATE, header=client.session_header())))
        reply = decode_frame(data, P.REPLY_SCHEMAS)
        self.device = client.stats.snapshot()  # this get_state included
        self.server = {"bytes_in": reply.header["bytes_in"], "bytes_out": reply.header["bytes_out"]}
        self.reply_len = len(data)  # the server counts its reply after writing it
        self.server_weights = P.unpack_state(reply.header["skeleton"], reply.tensors["state"])["model"]


def test_fit_runs_on_a_separate_server_process_that_stops_with_the_run(tmp_path, tiny_data_file, tiny_llama_dir):
    data = _data(tiny_data_file, tiny_llama_dir)
    model = _model(tiny_llama_dir, data.num_classes)
    audit = ProcessAudit()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[audit], server=GRPC)
    trainer.fit(model, data)
    s = _summary(trainer)

    # the server was a child process of this one, started for the run through the CLI's serve command ...
    assert s["device_pid"] == os.getpid()
    assert s["server_pid"] == audit.server_process["pid"] != os.getpid()
    assert audit.server_process["ppid"] == os.getpid()
    assert "serve" in audit.server_process["cmdline"]
    # ... and it is gone (stopped and reaped) once fit returns
    with pytest.raises(ProcessLookupError):
        os.kill(s["server_pid"], 0)
    # every byte the device counted on the real link is a byte the server process read or wrote
    assert audit.device["bytes_up"] == audit.server["bytes_in"]
    assert audit.device["bytes_down"] - audit.reply_len == audit.server["bytes_out"]
    assert 0 < s["bytes_up"] < s["link_bytes_up"] and 0 < s["bytes_down"] < s["link_bytes_down"]
    # it learned across the boundary, and the device's copy is now exactly the server process's network
    assert s["val_acc"] > 0.6, s["val_history"]
    assert _same(_weights(model), audit.server_weights) and not _same(audit.server_weights, audit.initial)
    assert (tmp_path / "run" / "version_0" / "summary.json").exists()


# ---- over the in-process link -----------------------------------------------------------------------------
class WeightsDuringTraining(L.Callback):
    """The device's copy of the side network before training and in the middle of the first epoch."""

    def on_train_start(self, trainer, pl_module):
        self.initial = _weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 5:
            self.mid_epoch = _weights(pl_module)


def test_pipelined_and_synchronous_runs_train_the_same_side_network(tmp_path, tiny_data_file, tiny_llama_dir, wire):
    data = _data(tiny_data_file, tiny_llama_dir)
    runs = {}
    for depth in (0, 2):
        start = len(wire)
        watch = WeightsDuringTraining()
        model = _model(tiny_llama_dir, data.num_classes)
        trainer = _trainer(tmp_path, max_epochs=2, callbacks=[watch], depth=depth, name=f"depth{depth}")
        trainer.fit(model, data)
        training = _training(wire[start:])
        runs[depth] = {"weights": _weights(model), "watch": watch, "summary": _summary(trainer),
                       "steps": [q.header["step"] for q, _ in training],
                       "losses": [r.header["loss"] for _, r in training], "global_step": trainer.global_step}

    sync, pipelined = runs[0], runs[2]
    # frames in flight while the device forwards the next batch change nothing the server computes:
    # the same steps in the same order, the same losses and the same trained side network
    assert pipelined["steps"] == sync["steps"] == list(range(sync["global_step"]))
    assert pipelined["losses"] == sync["losses"]
    assert _same(pipelined["weights"], sync["weights"])
    assert pipelined["summary"]["bytes_up"] == sync["summary"]["bytes_up"]
    assert pipelined["summary"]["val_acc"] == sync["summary"]["val_acc"] > 0.6
    for run in runs.values():
        # the device never steps the side network itself: mid-epoch its copy is still the initial one ...
        assert _same(run["watch"].mid_epoch, run["watch"].initial)
        # ... and after fit it holds the server's trained weights
        assert not _same(run["weights"], run["watch"].initial)
        assert all(torch.isfinite(w).all() for w in run["weights"].values())


def test_local_and_server_inference_agree(tmp_path, tiny_data_file, tiny_llama_dir, wire):
    data = _data(tiny_data_file, tiny_llama_dir)
    model = _model(tiny_llama_dir, data.num_classes)
    trainer = _trainer(tmp_path, max_epochs=1, depth=0, codec="fp32")
    trainer.fit(model, data)
    preds, evals = {}, {}
    untrained = _model(tiny_llama_dir, data.num_classes)  # built with the same seed: the initial weights
    for name, module, inference in (("server", model, "server"), ("local", model, "local"),
                                    ("untrained", untrained, "server")):
        start = len(wire)
        t = L.Trainer(strategy=_strategy(INPROCESS, inference=inference), accelerator="cpu",
                      callbacks=[QuantizedTransfer("fp32")], logger=False, enable_progress_bar=False)
        out = t.predict(module, data)
        preds[name] = torch.cat([o["logits"] for o in out])
        evals[name] = sum(q.kind == P.EVAL for q, _ in _frames(wire[start:]))

    # the side network run on the device gives the server's logits ...
    torch.testing.assert_close(preds["server"], preds["local"], rtol=1e-4, atol=1e-4)
    # ... without asking the server for any (only the server run sent eval frames) ...
    assert evals["local"] == 0 and evals["server"] == evals["untrained"] > 0
    # ... and they are the trained network's, not a fresh one's
    assert not torch.allclose(preds["server"], preds["untrained"], atol=1e-3)


class ServerStateAtStart(L.Callback):
    """The server's session state (pulled over the link) before the first training step of a run."""

    def on_train_start(self, trainer, pl_module):
        self.state = trainer.strategy.client.pull_state()


def _adam(state: dict) -> list[dict]:
    return [state["optimizer"]["state"][k] for k in sorted(state["optimizer"]["state"])]


def test_resume_continues_step_count_and_server_state(tmp_path, tiny_data_file, tiny_llama_dir, wire):
    data = _data(tiny_data_file, tiny_llama_dir)
    first = _trainer(tmp_path, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                     name="first")
    first.fit(_model(tiny_llama_dir, data.num_classes), data)
    steps = first.global_step
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    server = saved["mobillm_server"]
    # the checkpoint holds the server's step, optimizer and scheduler, all one epoch in
    assert server["step"] == steps > 0
    assert _adam(server) and all(int(s["step"]) == steps for s in _adam(server))
    assert server["scheduler"]["last_epoch"] == steps

    start = len(wire)
    at_start = ServerStateAtStart()
    second = _trainer(tmp_path, max_epochs=2, name="second",
                      callbacks=[at_start, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    second.fit(_model(tiny_llama_dir, data.num_classes), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    # a new server was given the checkpoint's weights, optimizer moments and step before training resumed
    restored = at_start.state
    assert restored["step"] == steps
    assert _same(restored["model"], saved["state_dict"])
    for got, want in zip(_adam(restored), _adam(server), strict=True):
        assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])
    # the second run trained only the second epoch, and the server numbered its steps on from there
    training = _training(wire[start:])
    assert [q.header["step"] for q, _ in training] == list(range(steps, 2 * steps))
    assert [r.header["server_steps"] for _, r in training] == list(range(steps + 1, 2 * steps + 1))
    assert second.global_step == 2 * steps
    # and what it saved at the end continues the same optimizer and schedule (not a restart at 0)
    final = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["mobillm_server"]
    assert final["step"] == 2 * steps and final["scheduler"]["last_epoch"] == 2 * steps
    assert all(int(s["step"]) == 2 * steps for s in _adam(final))
