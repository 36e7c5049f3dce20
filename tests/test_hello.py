"""What a device tells a server about itself: the protocol version, the side network's settings, the taps
and the backbone's identity; never the device's paths, seeds or secrets."""

from __future__ import annotations

import json

import lightning as L
import pytest

from lightning_mobillm import protocol as P
from lightning_mobillm.callbacks import ActivationCache, QuantizedTransfer
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.modules import AdditiveAdapterModule, SideTuningModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.strategies import ServerAssistedStrategy
from lightning_mobillm.transport.frames import decode_frame
from lightning_mobillm.transport.link import InProcessLink


@pytest.fixture
def hellos(monkeypatch):
    sent: list[dict] = []
    call = InProcessLink.call

    def tapped(self, request: bytes) -> bytes:
        frame = decode_frame(request, P.REQUEST_SCHEMAS)
        if frame.kind == P.HELLO:
            sent.append(frame.header)
        return call(self, request)

    monkeypatch.setattr(InProcessLink, "call", tapped)
    return sent


@pytest.mark.parametrize("method", ["mobillm", "pae"])
def test_the_hello_names_the_backbone_without_device_paths_or_secrets(method, hellos, tiny_llama_dir,
                                                                      tiny_data_file, tmp_path, monkeypatch):
    secret = "ab" * 32
    monkeypatch.setenv("MOBILLM_LABEL_SECRET", secret)
    data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), max_length=16,
                                        batch_size=8, prompt="Article : {text} Topic :", tokenizer=str(tiny_llama_dir))
    backbone = BackboneConfig(source=str(tiny_llama_dir))
    if method == "pae":
        model = AdditiveAdapterModule(backbone=backbone, num_classes=data.num_classes, seed=7)
        callbacks, select = [QuantizedTransfer("fp16"), ActivationCache()], "loss"
    else:
        model = SideTuningModule(backbone=backbone, num_classes=data.num_classes, seed=7)
        callbacks, select = [QuantizedTransfer("int8")], "all"
    trainer = L.Trainer(strategy=ServerAssistedStrategy(server="inprocess", select=select,
                                                        embedded=ServerConfig(device="cpu", workdir=str(tmp_path))),
                        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    (hello,) = hellos
    assert hello["protocol"] == P.PROTOCOL_VERSION
    identity = hello["backbone"]
    assert identity["name"] == tiny_llama_dir.name and identity["arch"] == "llama"
    assert identity["hidden_size"] == hello["tap_spec"]["hidden_size"] and len(identity["digest"]) == 64
    text = json.dumps(hello)
    assert str(tiny_llama_dir) not in text and str(tiny_data_file) not in text  # no local path
    assert secret not in text and "secret_env" not in text and "MOBILLM_LABEL_SECRET" not in text
    assert "seed" not in hello["hparams"] and "backbone" not in hello["hparams"]
    assert hello["side"] == {"trunk": "parallel_adapters", "head": "pooled_linear", "reduction": 8,
                             "normalize_taps": True, "activation": "gelu", "final_norm": "layernorm",
                             "pool": "last", "dropout": 0.1}
    assert not set(hello["side"]) & set(hello["hparams"])  # each setting travels once
    if method == "pae":
        assert not {"transform", "transform_dim", "transform_rr_epsilon"} & set(hello["hparams"])
