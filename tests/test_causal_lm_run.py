"""Generative side-tuning end to end over the in-process link on a tiny random Llama: only the answer positions'
taps cross, with the next tokens as labels; the server reads the output layer itself (allow-list, digest);
step 0 is the backbone's own loss; training lowers it."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_dataset
from lightning.pytorch.loggers import CSVLogger

from lightning_mobillm import protocol as P
from lightning_mobillm.callbacks import DeviceMonitor, GenerationEval, QuantizedTransfer
from lightning_mobillm.client import INPROCESS, ServerError
from lightning_mobillm.data.instruction import IGNORE_INDEX, InstructionDataModule
from lightning_mobillm.modules.causal_lm import CausalLMSideModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.strategies import ServerAssistedStrategy
from lightning_mobillm.transport.frames import decode_frame

pytestmark = [pytest.mark.usefixtures("one_torch_thread", "restore_seed_env"), pytest.mark.timeout(300)]


@pytest.fixture
def answers_file(tmp_path):
    """The tiny topic data as prompt/answer pairs: the answer is the topic's name (its own token)."""
    rows = [json.loads(line) for line in write_tiny_dataset(tmp_path / "tiny.jsonl", n=120).read_text().splitlines()]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["text"], "answer": r["label"]}) + "\n" for r in rows))
    return path


def _run(tmp_path, answers_file, tiny_llama_dir, allowed, epochs=6, codec="fp32", layers=(1, 3), callbacks=(),
         test_fraction=0.0, select="auto", dtype="float32", **data_kw):
    L.seed_everything(0, verbose=False)
    data = InstructionDataModule(dataset=str(answers_file), template="Article : {text} Topic :", max_length=24,
                                 batch_size=8, eval_batch_size=16, val_fraction=0.2, test_fraction=test_fraction,
                                 tokenizer=str(tiny_llama_dir), generate_samples=12, **data_kw)
    module = CausalLMSideModule(backbone=BackboneConfig(source=str(tiny_llama_dir), layers=list(layers), dtype=dtype),
                                lr=3e-2, reduction=4, chunk_tokens=5)
    trainer = L.Trainer(
        strategy=ServerAssistedStrategy(server=INPROCESS, select=select,
                                        embedded=ServerConfig(device="cpu", threads=1, allowed_backbones=allowed)),
        accelerator="cpu", max_epochs=epochs, callbacks=[QuantizedTransfer(codec), DeviceMonitor(), *callbacks],
        logger=CSVLogger(tmp_path, name="run"), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, enable_checkpointing=False, default_root_dir=tmp_path)
    return trainer, module, data


def test_answer_taps_and_next_tokens_cross_and_training_lowers_the_backbones_loss(tmp_path, answers_file,
                                                                                  tiny_llama_dir, wire):
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)])
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    # step 0: the backbone's own teacher-forced loss on the answer tokens
    backbone = trainer.strategy.backbone
    losses, counts = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            losses.append(float(loss))
            counts.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    assert before["val/loss"] == pytest.approx(sum(losses) / sum(counts), rel=1e-4)
    wire.clear()
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics
    assert float(after["val/loss"]) < before["val/loss"] - 0.5  # 4.16 -> 3.61 here
    assert float(after["val/token_acc"]) > before["val/token_acc"] + 0.5  # the topic's name and EOS, mostly right
    assert float(after["val/ppl"]) == pytest.approx(torch.exp(after["val/loss"]).item(), rel=1e-4)
    train = [decode_frame(q, P.REQUEST_SCHEMAS) for q, _ in wire]
    train = [f for f in train if f.kind == P.TRAIN]
    first = next(iter(data.train_dataloader()))
    frame = train[0]
    positions = (first["labels"][:, 1:] != IGNORE_INDEX)
    assert frame.tensors["lengths"].tolist() == positions.sum(1).tolist()  # 2 per sample: the topic, then EOS
    assert frame.tensors["labels"].tolist() == first["labels"][:, 1:][positions].tolist()
    assert frame.tensors["acts.q"].shape[0] == int(positions.sum())  # no prompt token's taps crossed
    assert sum(f.tensors["acts.q"].shape[0] for f in train) < 0.2 * sum(
        int(b["attention_mask"].sum()) for b in data.train_dataloader()) * 6


def test_the_server_reads_only_output_layers_it_allows(tmp_path, answers_file, tiny_llama_dir):
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, ["smollm2-135m"], epochs=1)
    with pytest.raises(ServerError, match="does not load the output layer of backbone"):
        trainer.fit(module, datamodule=data)


def test_the_server_refuses_a_declared_digest_its_checkpoint_does_not_have(tmp_path, answers_file, tiny_llama_dir,
                                                                          monkeypatch):
    from lightning_mobillm.backbone import FrozenBackbone

    original = FrozenBackbone.identity
    monkeypatch.setattr(FrozenBackbone, "identity", lambda self: {**original(self), "digest": "0" * 64})
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=1)
    with pytest.raises(ServerError, match="does not match the digest the device declared"):
        trainer.fit(module, datamodule=data)


def test_a_bf16_backbone_declares_the_digest_the_server_reads(tmp_path, answers_file, tiny_llama_dir):
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=1,
                                 dtype="bfloat16", codec="int8o")
    trainer.fit(module, datamodule=data)
    assert module.hparams["output_dtype"] == "bfloat16"
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_left_padding_and_training_on_the_prompt_send_every_real_position_but_the_last(tmp_path, answers_file,
                                                                                      tiny_llama_dir, wire):
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=1,
                                 padding_side="left", train_on_prompt=True)
    trainer.fit(module, datamodule=data)
    frames = [decode_frame(q, P.REQUEST_SCHEMAS) for q, _ in wire]
    frames = [f for f in frames if f.kind == P.TRAIN]
    first = next(iter(data.train_dataloader()))
    real = first["attention_mask"].sum(1)
    assert frames[0].tensors["lengths"].tolist() == (real - 1).tolist()
    assert frames[0].tensors["labels"].tolist() == [t for row, n in zip(first["input_ids"], real)
                                                    for t in row[-int(n) + 1:].tolist()]


def test_a_generative_module_needs_select_answer(tmp_path, answers_file, tiny_llama_dir):
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=1,
                                 select="all")
    with pytest.raises(ValueError, match="trains on answer tokens: use select: answer"):
        trainer.fit(module, datamodule=data)


def test_the_last_block_must_be_tapped(tmp_path, answers_file, tiny_llama_dir):
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=1,
                                 layers=(0, 2))
    with pytest.raises(ValueError, match="needs the last block \\(3\\) tapped last"):
        trainer.fit(module, datamodule=data)


def test_generation_on_the_device_learns_the_answers_and_predict_writes_them(tmp_path, answers_file, tiny_llama_dir):
    gen = GenerationEval(metric="exact_match", max_new_tokens=3, output=str(tmp_path / "texts.jsonl"))
    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)], callbacks=[gen],
                                 test_fraction=0.1)
    zero_shot = trainer.validate(module, datamodule=data, verbose=False)[0]["val/exact_match"]
    trainer.fit(module, datamodule=data)
    trained = float(trainer.callback_metrics["val/exact_match"])
    assert len(gen.last["texts"]) == 12 and gen.last["exact_match"] == pytest.approx(trained)
    assert zero_shot < 0.2 and trained > 0.6  # the topic's name, then EOS stops the generation
    trainer.predict(module, datamodule=data, return_predictions=False)
    rows = [json.loads(line) for line in (tmp_path / "texts.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(data.split_dataset("test"))))
    names = {r.answer for r in data.records("test")}
    assert sum(r["text"] in names for r in rows) > 0.6 * len(rows)


def test_generate_picks_the_servers_teacher_forced_argmax_after_training(tmp_path, answers_file, tiny_llama_dir):
    """No train/serve skew: the tokens the device generates greedily with the trained side network's hooks are,
    on the same prefixes, the argmax of the server's teacher-forced prediction (its side network, through the
    device's head: ``val/token_acc`` is 1 on the generated tokens)."""
    from lightning_mobillm.data.instruction import InstructionCollator
    from lightning_mobillm.generation import SideGeneration

    trainer, module, data = _run(tmp_path, answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=3)
    trainer.fit(module, datamodule=data)
    backbone = trainer.strategy.backbone
    items = []
    with torch.inference_mode(), SideGeneration(backbone.model, backbone.layers, module.side.trunk, module.side.head,
                                                last_only=True):
        for i, sample in enumerate(data.split_dataset("validation")):
            if i == 8:
                break
            prompt = sample["input_ids"][:sample["prompt_length"]]
            ids = torch.tensor([prompt])  # one prompt at a time: no padding, the same positions as teacher forcing
            new = backbone.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                          pad_token_id=0)[0, len(prompt):].tolist()
            items.append({"input_ids": [*prompt, *new], "labels": [IGNORE_INDEX] * len(prompt) + new,
                          "prompt_length": len(prompt), "index": i})
    with torch.inference_mode():  # the backbone alone writes something else: the side network is in the tokens
        plain = [backbone.model.generate(torch.tensor([it["input_ids"][:it["prompt_length"]]]), max_new_tokens=4,
                                         do_sample=False, pad_token_id=0)[0, it["prompt_length"]:]
                 .tolist() for it in items]
    assert sum(p != it["input_ids"][it["prompt_length"]:] for p, it in zip(plain, items)) >= 4
    loader = torch.utils.data.DataLoader(items, batch_size=4, collate_fn=InstructionCollator(0))
    scores = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    assert scores["val/token_acc"] == 1.0


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_on_device_baselines_train_the_same_answer_loss(tmp_path, answers_file, tiny_llama_dir, trainable):
    from lightning_mobillm.baselines import OnDeviceCausalLM

    L.seed_everything(0, verbose=False)
    data = InstructionDataModule(dataset=str(answers_file), template="Article : {text} Topic :", max_length=24,
                                 batch_size=8, eval_batch_size=16, val_fraction=0.2, test_fraction=0.0,
                                 generate_samples=12)
    gen = GenerationEval(metric="exact_match", max_new_tokens=3)
    module = OnDeviceCausalLM(backbone=BackboneConfig(source=str(tiny_llama_dir), dtype="float32"),
                              trainable=trainable, lr=3e-2 if trainable == "lora" else 3e-3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, callbacks=[gen], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    zero = OnDeviceCausalLM(backbone=BackboneConfig(source=str(tiny_llama_dir), dtype="float32"), trainable="none")
    assert L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        zero, datamodule=data, verbose=False)[0]["val/loss"] == pytest.approx(before["val/loss"], rel=1e-5)
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics
    # LoRA r 8 on q/v of a 32-wide random model moves slowly (4.16 -> 3.73 here); full fine-tuning fits it (0.54)
    assert float(after["val/loss"]) < before["val/loss"] - 0.3
    assert float(after["val/token_acc"]) > before["val/token_acc"] + 0.3
    assert float(after["val/exact_match"]) > before["val/exact_match"]


def test_the_activation_cache_serves_answer_tokens_and_later_epochs_need_no_forward(tmp_path, answers_file,
                                                                                    tiny_llama_dir, wire):
    from lightning_mobillm.callbacks import ActivationCache

    trainer, module, data = _run(tmp_path / "plain", answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=3)
    trainer.fit(module, datamodule=data)
    plain = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    wire.clear()
    trainer, module, data = _run(tmp_path / "cached", answers_file, tiny_llama_dir, [str(tiny_llama_dir)], epochs=3,
                                 callbacks=[ActivationCache()])
    trainer.fit(module, datamodule=data)
    cached = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert cached == pytest.approx(plain, rel=1e-5)  # fp32 taps are stored as they came: the same training
    kinds = [decode_frame(q, P.REQUEST_SCHEMAS).kind for q, _ in wire]
    steps = len(data.train_dataloader())
    assert kinds.count(P.TRAIN) == steps and kinds.count(P.TRAIN_CACHED) == 2 * steps
    # training batches in epoch 1 only, validation batches in the first validation only (the device's tap cache)
    assert trainer.strategy.device_stats.device_forwards == steps + len(data.val_dataloader())
