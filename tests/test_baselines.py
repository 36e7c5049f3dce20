"""The on-device baselines train on a tiny random backbone: their loss goes down, the right weights move."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_mobillm import protocol as P
from lightning_mobillm.baselines import (
    FullFineTuneClassifier,
    LadderSideNetwork,
    LadderSideTuningClassifier,
    LoRAClassifier,
    SplitLearningClassifier,
)
from lightning_mobillm.callbacks import DeviceMonitor
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.server.split import SplitServer
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig


def _data(tiny_data_file, tiny_llama_dir) -> TextClassificationDataModule:
    return TextClassificationDataModule(
        dataset="json", data_files=str(tiny_data_file), prompt="Article : {text} Topic :", max_length=20,
        batch_size=8, eval_batch_size=16, val_fraction=0.2, tokenizer=str(tiny_llama_dir),
    )


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(module: L.LightningModule, data, tmp_path, epochs: int = 4) -> tuple[LossLog, DeviceMonitor, L.Trainer]:
    log, monitor = LossLog(), DeviceMonitor()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=[log, monitor], logger=CSVLogger(tmp_path, name="run"),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data)
    return log, monitor, trainer


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


BASELINES = {
    "full_ft": lambda src, n: FullFineTuneClassifier(BackboneConfig(source=src), n, lr=1e-3, dropout=0.0),
    "lora": lambda src, n: LoRAClassifier(BackboneConfig(source=src), n, lr=1e-2, dropout=0.0, r=4),
    "lst": lambda src, n: LadderSideTuningClassifier(BackboneConfig(source=src), n, lr=3e-3, dropout=0.0,
                                                     reduction=2, num_heads=2),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_loss_goes_down_and_summary_is_written(name, tmp_path, tiny_data_file, tiny_llama_dir):
    data = _data(tiny_data_file, tiny_llama_dir)
    torch.manual_seed(0)
    module = BASELINES[name](str(tiny_llama_dir), data.num_classes)
    log, monitor, trainer = _fit(module, data, tmp_path)
    per_epoch = len(log.losses) // 4
    first, last = _mean(log.losses[:per_epoch]), _mean(log.losses[-per_epoch:])
    assert last < 0.8 * first, (name, first, last)
    summary = json.loads((tmp_path / "run" / "version_0" / "summary.json").read_text())
    assert summary["steps"] == trainer.global_step == len(log.losses)
    assert summary["bytes_up"] == summary["bytes_down"] == 0 and summary["overlap"] is False
    assert summary["train_samples"] == 4 * len(data.train_dataloader().dataset)
    assert summary["device_busy_s"] > 0 and summary["device_busy_s_per_sample"] > 0
    assert [e["epoch"] for e in summary["by_epoch"]] == [0, 1, 2, 3]
    assert sum(e["steps"] for e in summary["by_epoch"]) == summary["steps"]
    assert len(summary["val_history"]) == 4 and summary["val_acc"] is not None


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def _snapshot(named) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in named}


def _few_steps(module: L.LightningModule, steps: int = 3) -> None:
    """A few optimizer steps through Lightning on random token batches of the tiny vocabulary."""
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 50, (4, 6), generator=g), "attention_mask": torch.ones(4, 6, dtype=torch.long),
                "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(steps)]
    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(
        module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {n for n in before if not torch.equal(before[n], after[n])}


# no weight decay: a weight that changed was moved by a gradient step
KW = dict(lr=1e-2, dropout=0.0, weight_decay=0.0)


@pytest.mark.usefixtures("one_torch_thread")
def test_full_fine_tuning_moves_every_weight(tiny_llama_dir):
    full = FullFineTuneClassifier(BackboneConfig(source=str(tiny_llama_dir)), 3, **KW)
    full.configure_model()
    before = _snapshot(full.named_parameters())
    _few_steps(full)
    assert _changed(before, _snapshot(full.named_parameters())) == set(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_moves_only_the_adapters_and_the_head(tiny_llama_dir):
    lora = LoRAClassifier(BackboneConfig(source=str(tiny_llama_dir)), 3, r=4, lora_dropout=0.0, **KW)
    lora.configure_model()
    before = _snapshot(lora.named_parameters())
    _few_steps(lora)
    changed = _changed(before, _snapshot(lora.named_parameters()))
    adapters = {n for n in before if "lora_" in n}
    # every LoRA matrix (B leaves zero at the first step, A follows once B is non-zero) and the head moved ...
    head = {n for n in before if n.startswith("head.")}
    assert head and changed == adapters | head, sorted(changed ^ (adapters | head))
    # ... on q_proj and v_proj of every block only; every pretrained weight is bit-identical
    blocks = lora.encoder.config.num_hidden_layers
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters} == {"q_proj", "v_proj"}
    assert len(adapters) == blocks * 2 * 2


@pytest.mark.usefixtures("one_torch_thread")
def test_lst_moves_the_ladder_and_never_the_backbone(tiny_llama_dir):
    lst = LadderSideTuningClassifier(BackboneConfig(source=str(tiny_llama_dir)), 3, reduction=2, num_heads=2, **KW)
    lst.configure_model()
    assert all(n.startswith(("ladder.", "head.")) for n, _ in lst.named_parameters())  # backbone: not in state dict
    backbone = _snapshot(lst.backbone.model.named_parameters())
    before = _snapshot(lst.named_parameters())
    _few_steps(lst)
    assert _changed(backbone, _snapshot(lst.backbone.model.named_parameters())) == set()
    assert _changed(before, _snapshot(lst.named_parameters())) == set(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_lst_ladder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    ladder = LadderSideNetwork(num_taps=3, hidden_size=16, reduction=2, num_heads=2, dropout=0.0).eval()
    taps = torch.randn(2, 5, 3, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = ladder(taps, mask)
    changed = taps.clone()
    changed[:, 3:] += 5.0  # later tokens (and the pads of sample 1) change
    out2 = ladder(changed, mask)
    torch.testing.assert_close(out[:, :3], out2[:, :3])  # earlier positions do not see later ones
    assert not torch.allclose(out[0, 3:], out2[0, 3:])
    # an encoder's ladder sees the whole sample but never its padding
    torch.manual_seed(0)
    both = LadderSideNetwork(num_taps=3, hidden_size=16, reduction=2, num_heads=2, dropout=0.0, causal=False).eval()
    pads_changed = taps.clone()
    pads_changed[1, 3:] += 5.0
    torch.testing.assert_close(both(taps, mask)[1, :3], both(pads_changed, mask)[1, :3])
    later_changed = taps.clone()
    later_changed[1, 2] += 5.0
    assert not torch.allclose(both(taps, mask)[1, :2], both(later_changed, mask)[1, :2])


def test_bad_settings_are_named(tiny_llama_dir):
    with pytest.raises(ValueError, match="num_heads"):
        LadderSideNetwork(num_taps=2, hidden_size=16, reduction=2, num_heads=3)
    with pytest.raises(ValueError, match="r must be"):
        LoRAClassifier(BackboneConfig(source=str(tiny_llama_dir)), 5, r=0)
    bad = LoRAClassifier(BackboneConfig(source=str(tiny_llama_dir)), 5, target_modules=["nope_proj"])
    with pytest.raises(ValueError, match="nope_proj"):
        bad.configure_model()


def _split_module(tiny_llama_dir, n, **kw) -> SplitLearningClassifier:
    return SplitLearningClassifier(BackboneConfig(source=str(tiny_llama_dir)), n, lr=1e-2, dropout=0.0, r=4,
                                   embedded=ServerConfig(device="cpu", threads=1), **kw)


def test_split_learning_trains_over_the_link(tmp_path, tiny_data_file, tiny_llama_dir):
    data = _data(tiny_data_file, tiny_llama_dir)
    module = _split_module(tiny_llama_dir, data.num_classes, codec_up="fp32", codec_down="fp32")
    _, monitor, trainer = _fit(module, data, tmp_path)
    losses = module.server_losses
    per_epoch = len(losses) // 4
    assert _mean(losses[-per_epoch:]) < 0.8 * _mean(losses[:per_epoch])
    s = monitor.summary
    assert s["server_pid"] and s["server_pid"] != os.getpid() and s["overlap"] is False
    # activations up, gradients down: both directions carry about one [tokens, d] tensor per step
    assert s["bytes_up"] > 0 and 0.5 < s["bytes_down"] / s["bytes_up"] < 1.5
    assert 0 < s["device_busy_s"] < s["wall_s"]
    trainable = _trainable(module)
    assert trainable and all("lora_" in n for n in trainable)  # the head lives on the server
    assert module.client is None  # teardown closed the link and stopped the server


def test_split_server_refuses_bad_frames(tiny_llama_dir):
    from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame

    server = SplitServer(ServerConfig(device="cpu", allowed_backbones=[str(tiny_llama_dir)]))
    hello = {"protocol": P.PROTOCOL_VERSION, "device_id": "d", "run_id": "r", "split_layer": 2, "num_classes": 5, "total_steps": 10,
             "hparams": {"lr": 1e-3, "r": 4, "alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]}}

    def ask(kind, header, tensors=None):
        return decode_frame(server.handle(encode_frame(Frame(kind, header, tensors or {}))),
                            P.SPLIT_REPLY_SCHEMAS, require_finite=False)

    refused = ask("split_hello", {**hello, "backbone": {"source": "/etc"}})
    assert refused.kind == "error" and "does not load backbone" in refused.header["message"]
    ok = ask("split_hello", {**hello, "backbone": {"source": str(tiny_llama_dir)}})
    session, secret = ok.header["session"], ok.header["secret"]
    wrong_width = P.pack_acts(torch.randn(4, 1, 7), torch.tensor([4]), "fp32")
    bad = ask("split_train", {"session": session, "secret": secret, "step": 0, "codec": "fp32", "codec_down": "fp32"},
              {**wrong_width, "labels": torch.tensor([1])})
    assert bad.kind == "error" and "states shape" in bad.header["message"]
    good = P.pack_acts(torch.randn(4, 1, 32), torch.tensor([4]), "fp32")
    bad_label = ask("split_train", {"session": session, "secret": secret, "step": 0, "codec": "fp32", "codec_down": "fp32"},
                    {**good, "labels": torch.tensor([9])})
    assert bad_label.kind == "error" and "labels" in bad_label.header["message"]
    assert server.sessions[session].step == 0  # nothing was applied
    reply = ask("split_train", {"session": session, "secret": secret, "step": 0, "codec": "fp32", "codec_down": "fp32"},
                {**good, "labels": torch.tensor([1])})
    grad, lengths = P.unpack_acts(reply.tensors, reply.header["codec"])
    assert reply.kind == "ok" and grad.shape == (4, 1, 32) and lengths.tolist() == [4]
    assert server.sessions[session].step == 1
