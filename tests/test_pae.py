"""PAE MobiLLM on a tiny random backbone: no labels on the wire, the activation cache, resume, compose."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_mobillm import protocol as P
from lightning_mobillm.callbacks import ActivationCache, DeviceMonitor, QuantizedTransfer
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.modules import AdditiveAdapterModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig, TapSpec
from lightning_mobillm.strategies import ServerAssistedStrategy
from lightning_mobillm.transport.frames import decode_frame
from lightning_mobillm.transport.link import GrpcLink

TEXT_OR_LABEL_FIELDS = {"labels", "label", "input_ids", "attention_mask", "text", "token_ids"}


@pytest.fixture(autouse=True)
def fixed_label_secret(monkeypatch):
    """A fixed device secret: the transform's keyed randomized response is then the same in every run, so
    the accuracy asserted below is deterministic (a fresh random key per run made it vary around 0.5)."""
    monkeypatch.setenv("MOBILLM_LABEL_SECRET", "5e" * 32)


@pytest.fixture
def wire(monkeypatch):
    """Every request frame the device process sends, as bytes."""
    sent: list[bytes] = []
    original = GrpcLink.call

    def tapped(self, request: bytes) -> bytes:
        sent.append(request)
        return original(self, request)

    monkeypatch.setattr(GrpcLink, "call", tapped)
    return sent


def _data(tiny_data_file, tiny_llama_dir):
    return TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file),
                                        prompt="Article : {text} Topic :", max_length=20, batch_size=8,
                                        val_fraction=0.2, tokenizer=str(tiny_llama_dir))


def _model(tiny_llama_dir, num_classes, **kw):
    return AdditiveAdapterModule(backbone=BackboneConfig(source=str(tiny_llama_dir)), num_classes=num_classes,
                                 lr=1e-2, **kw)


def _trainer(tmp_path, epochs, cache, *extra, version=None):
    return L.Trainer(
        strategy=ServerAssistedStrategy(select="loss", embedded=ServerConfig(device="cpu", threads=1)),
        accelerator="cpu", max_epochs=epochs, callbacks=[QuantizedTransfer("fp16"), cache, DeviceMonitor(), *extra],
        logger=CSVLogger(tmp_path, name="pae", version=version), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
    )


def _summary(trainer) -> dict:
    return next(c for c in trainer.callbacks if isinstance(c, DeviceMonitor)).summary


def test_pae_sends_no_labels_and_the_cache_idles_the_device(tmp_path, tiny_data_file, tiny_llama_dir, wire):
    data = _data(tiny_data_file, tiny_llama_dir)
    cache = ActivationCache()
    trainer = _trainer(tmp_path, 3, cache)
    trainer.fit(_model(tiny_llama_dir, data.num_classes), data)

    frames = [decode_frame(b, P.REQUEST_SCHEMAS) for b in wire]
    kinds = {f.kind for f in frames}
    assert P.TRAIN not in kinds and {P.TRAIN_TARGET, P.TRAIN_CACHED} <= kinds
    for f in frames:  # the wire tap: no label, token id or text field anywhere
        assert not (set(f.tensors) & TEXT_OR_LABEL_FIELDS), (f.kind, list(f.tensors))
        assert not (set(f.header) & TEXT_OR_LABEL_FIELDS), (f.kind, list(f.header))
        if f.kind == P.TRAIN_TARGET:
            assert f.tensors["acts.q"].shape[0] == f.tensors["lengths"].numel()  # the loss-token shortcut
            assert f.tensors["targets"].shape[1] == 16  # the secret embedding, not K=3 class scores

    s = _summary(trainer)
    train_batches = trainer.num_training_batches
    val_batches = sum(trainer.num_val_batches)
    # the device forwarded every training sample once, and validation every epoch
    assert s["device_forwards"] == train_batches + 3 * val_batches
    cached = [f for f in frames if f.kind == P.TRAIN_CACHED]
    assert len(cached) == 2 * train_batches and all(not f.tensors for f in cached)
    # (how much device time that saves is measured by benchmarks/pae.py, not asserted here)
    assert set(s["device_busy_s_by_epoch"]) == {"0", "1", "2"}
    assert cache.hits == 2 * s["train_samples"] // 3 and cache.misses == 0
    assert s["val_acc"] > 0.5


def test_cache_survives_restart_and_resume(tmp_path, tiny_data_file, tiny_llama_dir, monkeypatch):
    monkeypatch.delenv("MOBILLM_LABEL_SECRET")  # a key drawn on the device, kept in its checkpoint
    data = _data(tiny_data_file, tiny_llama_dir)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _trainer(tmp_path, 1, ActivationCache(), ckpt)
    first.fit(_model(tiny_llama_dir, data.num_classes), data)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert "pae_transform_key" in saved  # the device's key is in the device's checkpoint ...
    assert "pae_transform_key" not in str(saved["hyper_parameters"])  # ... not in what goes to the server

    cache = ActivationCache()
    second = _trainer(tmp_path, 2, cache)  # a new server process
    second.fit(_model(tiny_llama_dir, data.num_classes), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    s = _summary(second)
    assert second.global_step == 2 * first.global_step
    assert cache.misses == 0 and cache.hits == s["train_samples"]
    assert s["device_forwards"] == sum(second.num_val_batches)  # validation only: no training forward


def test_corrupt_cache_is_detected_and_resent(tmp_path, tiny_data_file, tiny_llama_dir):
    data = _data(tiny_data_file, tiny_llama_dir)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _trainer(tmp_path, 1, ActivationCache(), ckpt)
    first.fit(_model(tiny_llama_dir, data.num_classes), data)
    files = sorted((tmp_path / "pae").rglob("activation-cache-*/*.safetensors"))
    assert files
    raw = bytearray(files[0].read_bytes())
    raw[-64:] = bytes(64)  # flip the tail: entries in that file fail their checksum
    files[0].write_bytes(bytes(raw))

    cache = ActivationCache()
    second = _trainer(tmp_path, 2, cache)
    second.fit(_model(tiny_llama_dir, data.num_classes), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert cache.misses > 0  # never trained on: re-requested from the device
    assert second.global_step == 2 * first.global_step
    assert _summary(second)["device_forwards"] > sum(second.num_val_batches)


def test_composition_equals_the_backbone_when_the_correction_is_zero():
    # without randomized response the transform is exactly invertible
    module = AdditiveAdapterModule(backbone=BackboneConfig(source="unused"), num_classes=5, transform_rr_epsilon=None)
    module.build(TapSpec(layers=[0, 1], hidden_size=8, arch="llama"))
    z = torch.randn(4, 5)
    zero_correction = module.transform.forward(torch.zeros(4, 5))
    torch.testing.assert_close(module.compose(z, zero_correction), torch.softmax(z, -1), atol=1e-5, rtol=0)
    # and the device recovers the exact prediction difference through the server's target space
    labels = torch.tensor([0, 1, 2, 4])
    target = module.device_targets(z, labels)
    assert target.shape == (4, module.num_outputs) == (4, 16)
    torch.testing.assert_close(module.compose(z, target), torch.nn.functional.one_hot(labels, 5).float(),
                               atol=1e-4, rtol=0)


def test_the_default_defence_randomises_labels_with_keyed_stable_coins():
    module = AdditiveAdapterModule(backbone=BackboneConfig(source="unused"), num_classes=5)
    module.build(TapSpec(layers=[0, 1], hidden_size=8, arch="llama"))
    z = torch.randn(256, 5)
    labels = torch.randint(0, 5, (256,))
    ids = torch.randint(5, 60, (256, 6))
    mask = torch.ones_like(ids)
    first = module.device_targets(z, labels, ids, mask)
    torch.testing.assert_close(first, module.device_targets(z, labels, ids, mask))  # same sample, same coin
    with pytest.raises(ValueError, match="input_ids"):
        module.device_targets(z, labels)
