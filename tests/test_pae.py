"""PAE MobiLLM on a tiny random backbone: no labels on the wire, the activation cache, resume, compose."""

from __future__ import annotations

import json
import re

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
from lightning_mobillm.transport.frames import Frame, decode_frame
from lightning_mobillm.transport.link import Link

SECRET = "5e" * 32
#: a key naming any of these (in any case, anywhere in a name) is refused on the wire ...
SUSPECT = ("label", "token", "text", "input_ids", "attention_mask", "prompt", "verbal", "class_name", "word")
#: ... except these, which name numbers (a hyperparameter), not labels or text
ALLOWED_KEYS = {"label_smoothing"}


@pytest.fixture(autouse=True)
def fixed_label_secret(monkeypatch):
    """A fixed device secret: the transform's keyed randomized response is then the same in every run, so
    the accuracy asserted below is deterministic (a fresh random key per run made it vary around 0.5)."""
    monkeypatch.setenv("MOBILLM_LABEL_SECRET", SECRET)


@pytest.fixture
def wire(monkeypatch):
    """Every request frame the device process sends, as bytes (on any link: gRPC or in-process)."""
    sent: list[bytes] = []
    original = Link.call

    def tapped(self, request: bytes) -> bytes:
        sent.append(bytes(request))
        return original(self, request)

    monkeypatch.setattr(Link, "call", tapped)
    return sent


def _keys_and_strings(obj, where: str = ""):
    """Every key and every string value in a nested header or state, with where it is. The keys of a packed
    state are the first elements of its ``__items__`` pairs."""
    if isinstance(obj, dict):
        items = [tuple(pair) for pair in obj["__items__"]] if set(obj) == {"__items__"} else obj.items()
        for key, value in items:
            yield "key", str(key), where
            yield from _keys_and_strings(value, f"{where}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _keys_and_strings(value, f"{where}[{i}]")
    elif isinstance(obj, str):
        yield "value", obj, where


def _suspect(name: str) -> bool:
    return any(seg not in ALLOWED_KEYS and any(s in seg for s in SUSPECT) for seg in re.split(r"[./]", name.lower()))


def _assert_no_text_labels_or_secret(raw: bytes, frame: Frame, texts: list[str], class_names: list[str]) -> None:
    """The wire tap: walks every header value, nested dicts and lists, every tensor name and, for a state
    upload, the state inside the blob (its keys and strings too)."""
    found = list(_keys_and_strings(frame.header, frame.kind))
    found += [("key", name, f"{frame.kind} tensors") for name in frame.tensors]
    if frame.kind == P.SET_STATE:
        found += list(_keys_and_strings(P.unpack_state(frame.header["skeleton"], frame.tensors["state"]), "state"))
    assert found
    for what, item, where in found:
        if what == "key":
            assert not _suspect(item), (where, item)
        else:
            assert item.lower() not in class_names, (where, item)
            assert not any(t in item for t in texts), (where, item)
            assert SECRET not in item.lower(), where
    # and nowhere in the bytes either: not the key, not its hex, not a text
    assert bytes.fromhex(SECRET) not in raw and SECRET.encode() not in raw
    assert not any(t.encode() in raw for t in texts)
    assert not any(json.dumps(name).encode() in raw for name in class_names), frame.kind


def test_the_wire_tap_refuses_what_it_should():
    texts, names = ["goal team coach"], ["sport", "tech"]
    ok = Frame(P.TRAIN_TARGET, {"session": "s", "step": 0, "hparams": {"label_smoothing": 0.1}}, {"acts.q": torch.zeros(1)})
    _assert_no_text_labels_or_secret(b"", ok, texts, names)
    bad = [
        Frame(P.TRAIN_TARGET, {"session": "s"}, {"labels": torch.zeros(1)}),
        Frame(P.HELLO, {"hparams": {"nested": [{"Class_Names": 3}]}}),
        Frame(P.HELLO, {"hparams": {"nested": [{"prompt.template": 3}]}}),
        Frame(P.HELLO, {"extra": {"__items__": [["token_ids", 1]]}}),
        Frame(P.HELLO, {"extra": ["x", {"y": "sport"}]}),
        Frame(P.HELLO, {"extra": {"a": "Article : goal team coach Topic :"}}),
        Frame(P.HELLO, {"extra": {"a": SECRET.upper()}}),
        Frame(P.SET_STATE, {"skeleton": P.pack_state({"model": {"side.label_embedding": torch.zeros(1)}})[0]},
              {"state": P.pack_state({"model": {"side.label_embedding": torch.zeros(1)}})[1]}),
    ]
    for frame in bad:
        with pytest.raises(AssertionError):
            _assert_no_text_labels_or_secret(b"", frame, texts, names)
    with pytest.raises(AssertionError):
        _assert_no_text_labels_or_secret(b"...\x5e" + bytes.fromhex(SECRET), ok, texts, names)


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
    assert P.TRAIN not in kinds and {P.HELLO, P.SET_STATE, P.TRAIN_TARGET, P.TRAIN_CACHED, P.EVAL} <= kinds
    texts = [json.loads(line)["text"] for line in tiny_data_file.read_text().splitlines()]
    for raw, f in zip(wire, frames):  # the wire tap: no label, token id, text or secret anywhere
        _assert_no_text_labels_or_secret(raw, f, texts, data.class_names)
        if f.kind == P.TRAIN_TARGET:
            assert f.tensors["acts.q"].shape[0] == f.tensors["lengths"].numel()  # the loss-token shortcut
            assert f.tensors["targets"].shape[1] == 16  # the secret embedding, not K=3 class scores

    s = _summary(trainer)
    train_batches = trainer.num_training_batches
    val_batches = sum(trainer.num_val_batches)
    # the device forwarded every training sample once, and every validation sample once (the later
    # validations are sent from its tap cache)
    assert s["device_forwards"] == train_batches + val_batches
    assert s["eval_cache_hits"] == 2 * val_batches
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


def test_the_prior_reads_the_data_modules_verbalizer_words(tiny_llama_dir, tiny_data_file):
    from lightning_mobillm.backbone import FrozenBackbone

    backbone = FrozenBackbone(BackboneConfig(source=str(tiny_llama_dir)))
    module = AdditiveAdapterModule(backbone=BackboneConfig(source=str(tiny_llama_dir)), num_classes=3)
    ids = {}
    for verbalizers in (None, ["tech", "money", "sport"]):
        data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), verbalizers=verbalizers)
        module.device_setup(backbone, data)
        ids[verbalizers is None] = module.backbone_label_token_ids
    vocab = backbone.tokenizer.convert_tokens_to_ids
    assert ids[True] == [vocab(w) for w in ("money", "sport", "tech")]  # the class names, sorted
    assert ids[False] == [vocab(w) for w in ("tech", "money", "sport")]
