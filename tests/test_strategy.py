"""End to end on a tiny random backbone: a real spawned server process over loopback gRPC."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_mobillm import protocol as P
from lightning_mobillm.callbacks import DeviceMonitor, QuantizedTransfer
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.strategies import ServerAssistedStrategy
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame


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


class LinkAudit(L.Callback):
    """At the end of training, ask the server how many bytes it read and wrote, and compare."""

    def on_train_end(self, trainer, pl_module):
        s = trainer.strategy
        up_before = s.client.stats.bytes_up
        data = s.client.call(encode_frame(Frame(kind=P.GET_STATE, header={"session": s.session})))
        header = decode_frame(data, P.REPLY_SCHEMAS).header
        self.device = s.client.stats.snapshot()
        self.server = {"bytes_in": header["bytes_in"], "bytes_out": header["bytes_out"]}
        self.reply_len = len(data)
        self.up_before = up_before
        self.grads = [p.grad for p in pl_module.parameters()]
        self.trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        self.optimizer_state = [o.state_dict() for o in trainer.optimizers]


def _trainer(tmp_path, max_epochs: int, callbacks=(), depth: int = 1, codec: str = "int8") -> L.Trainer:
    return L.Trainer(
        strategy=ServerAssistedStrategy(pipeline_depth=depth, embedded=ServerConfig(device="cpu", threads=1)),
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=[QuantizedTransfer(codec), DeviceMonitor(), *callbacks],
        logger=CSVLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )


def test_fit_runs_on_a_separate_server_process(tmp_path, tiny_data_file, tiny_llama_dir):
    data = _data(tiny_data_file, tiny_llama_dir)
    model = _model(tiny_llama_dir, data.num_classes)
    audit = LinkAudit()
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[audit])
    trainer.fit(model, data)
    summary = next(c for c in trainer.callbacks if isinstance(c, DeviceMonitor)).summary

    # two processes
    assert summary["device_pid"] == os.getpid()
    assert summary["server_pid"] and summary["server_pid"] != os.getpid()
    # every byte counted on the device is a byte the server read or wrote
    assert audit.device["bytes_up"] == audit.server["bytes_in"]
    assert audit.device["bytes_down"] - audit.reply_len == audit.server["bytes_out"]
    assert summary["bytes_up"] > 0 and summary["steps"] == trainer.global_step > 0
    # the per-sample figures count training traffic only: validation frames are on the link, not in them
    assert summary["bytes_up"] == sum(summary["train_bytes_up_by_epoch"].values())
    assert summary["bytes_up"] == sum(e["bytes_up"] for e in summary["by_epoch"])
    assert summary["bytes_up"] < summary["link_bytes_up"] and 0 < summary["bytes_down"] < summary["link_bytes_down"]
    assert summary["overlap"] is True
    # the device never held side-network gradients or optimizer state
    assert all(g is None for g in audit.grads) and audit.trainable == []
    assert audit.optimizer_state == [{}]
    # it learned something on a learnable task; the device's copy is the trained one
    assert summary["val_acc"] > 0.6, summary
    assert (tmp_path / "run" / "version_0" / "summary.json").exists()
    # the embedded server is gone after fit
    with pytest.raises(ProcessLookupError):
        os.kill(summary["server_pid"], 0)


def test_local_and_server_inference_agree(tmp_path, tiny_data_file, tiny_llama_dir):
    data = _data(tiny_data_file, tiny_llama_dir)
    model = _model(tiny_llama_dir, data.num_classes)
    trainer = _trainer(tmp_path, max_epochs=1, depth=0, codec="fp32")
    trainer.fit(model, data)
    preds = {}
    for where in ("server", "local"):
        t = L.Trainer(
            strategy=ServerAssistedStrategy(inference=where, embedded=ServerConfig(device="cpu", threads=1)),
            accelerator="cpu",
            callbacks=[QuantizedTransfer("fp32")],
            logger=False,
            enable_progress_bar=False,
        )
        out = t.predict(model, data)
        preds[where] = torch.cat([o["logits"] for o in out])
    torch.testing.assert_close(preds["server"], preds["local"], rtol=1e-4, atol=1e-4)


def test_resume_continues_step_count_and_server_state(tmp_path, tiny_data_file, tiny_llama_dir):
    data = _data(tiny_data_file, tiny_llama_dir)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _trainer(tmp_path, max_epochs=1, callbacks=[ckpt])
    first.fit(_model(tiny_llama_dir, data.num_classes), data)
    steps_one_epoch = first.global_step
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["mobillm_server"]["step"] == steps_one_epoch
    assert saved["mobillm_server"]["optimizer"]["state"]

    second = _trainer(tmp_path, max_epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    second.fit(_model(tiny_llama_dir, data.num_classes), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.global_step == 2 * steps_one_epoch
    # the server continued from the restored step rather than restarting at 0
    assert second.strategy.device_stats.last_train_reply["server_steps"] == 2 * steps_one_epoch
