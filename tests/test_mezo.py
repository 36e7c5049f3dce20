"""MeZO on a tiny random decoder: the two-point estimate is the directional derivative, a step moves the
weights along the regenerated direction only, no gradient or activation for backward is kept, step 0 is
the backbone's zero-shot verbalizer prediction, a run is reproducible from its seed and checkpoint, and the
optimizer minimises a least-squares problem from loss values alone (a tiny random LM learns too slowly
under zeroth-order steps for a test; real models are the benchmark's)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForCausalLM

from lightning_mobillm.baselines import MeZO, MeZOClassifier
from lightning_mobillm.callbacks import DeviceMonitor
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.specs import BackboneConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["money", "sport", "tech"]  # the tiny tokenizer's class words (tests/conftest.py)


def _module(tiny_llama_dir, word_tokenizer, **kwargs) -> MeZOClassifier:
    kwargs = {"lr": 1e-2, "eps": 1e-3, "r": 4, **kwargs}
    module = MeZOClassifier(BackboneConfig(source=str(tiny_llama_dir)), 3, **kwargs)
    torch.manual_seed(0)  # PEFT draws LoRA's A from the global generator: the same adapters in every order
    module.configure_model()
    module.set_verbalizer(word_tokenizer, WORDS)
    return module


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[:3, :2] = 0  # left padding on half the batch
    return {"input_ids": torch.randint(3, 40, (6, 9), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 3, (6,), generator=g)}


def _params(module) -> list[torch.Tensor]:
    return [p for _, p in module.trainable_parameters()]


def _z(params, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def test_step_zero_is_the_backbones_zero_shot_verbalizer_prediction(tiny_llama_dir, word_tokenizer):
    module = _module(tiny_llama_dir, word_tokenizer)
    batch = _batch()
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = word_tokenizer(WORDS, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
        ours = module(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, full[:, [i[0] for i in ids]], rtol=1e-4, atol=1e-4)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in module.trainable_parameters()} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_the_two_point_estimate_is_the_directional_derivative(tiny_llama_dir, word_tokenizer, trainable):
    module = _module(tiny_llama_dir, word_tokenizer, trainable=trainable, eps=1e-3)
    params = _params(module)
    gen = torch.Generator().manual_seed(0)  # the same point whatever ran before in this process
    with torch.no_grad():  # B starts at zero: move it so that every adapter matrix has a gradient
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = _batch()
    before = [p.detach().clone() for p in params]
    optimizer = module.configure_optimizers()
    closure = lambda: module._loss(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])  # noqa: E731
    g, loss = optimizer.projected_gradient(closure, optimizer.param_groups[0], seed=5)
    for p, b in zip(params, before):  # + eps z - 2 eps z + eps z: back where it was
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
    with torch.enable_grad():
        module.zero_grad()
        closure().backward()
    exact = sum(float((p.grad * z).sum()) for p, z in zip(params, _z(params, 5)))
    assert abs(exact) > 1e-3  # the trainable weights are on the path to the loss
    assert g == pytest.approx(exact, rel=0.02, abs=1e-4)
    with torch.no_grad():
        assert loss == pytest.approx(float(closure()), rel=1e-3)


def test_a_step_moves_the_weights_by_lr_g_z_and_keeps_no_state(tiny_llama_dir, word_tokenizer):
    module = _module(tiny_llama_dir, word_tokenizer, lr=0.5)
    params = _params(module)
    batch = _batch()
    optimizer = module.configure_optimizers()
    closure = lambda: module._loss(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])  # noqa: E731
    before = [p.detach().clone() for p in params]
    seed = optimizer._direction_seed(optimizer.param_groups[0])
    optimizer.step(closure)
    g = optimizer.param_groups[0]["projected_grad"]
    assert g != 0 and optimizer.param_groups[0]["step"] == 1
    for p, b, z in zip(params, before, _z(params, seed)):
        torch.testing.assert_close(p.detach() - b, -0.5 * g * z, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in module.parameters()) and not optimizer.state  # nothing per parameter
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()
    with pytest.raises(ValueError, match="eps > 0"):
        MeZO(params, eps=0)


def _data(tiny_data_file, tiny_llama_dir, seed: int = 0) -> TextClassificationDataModule:
    return TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), prompt="{text}",
                                        max_length=16, batch_size=16, eval_batch_size=32, val_fraction=0.2,
                                        tokenizer=str(tiny_llama_dir), seed=seed)


def _fit(tiny_llama_dir, tiny_data_file, tmp_path, max_steps: int, seed: int = 0, ckpt: str | None = None,
         **kwargs) -> tuple[MeZOClassifier, L.Trainer]:
    data = _data(tiny_data_file, tiny_llama_dir, seed)
    module = MeZOClassifier(BackboneConfig(source=str(tiny_llama_dir)), data.num_classes, lr=2e-2, eps=1e-2, r=4,
                            seed=seed, **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path, name="run"),
                        callbacks=[DeviceMonitor()], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, enable_checkpointing=True, default_root_dir=tmp_path,
                        val_check_interval=max_steps, check_val_every_n_epoch=None, log_every_n_steps=1)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return module, trainer


def test_a_run_through_lightning_is_reproducible_and_resumes_with_the_same_directions(
        tiny_llama_dir, tiny_data_file, tmp_path):
    straight, trainer = _fit(tiny_llama_dir, tiny_data_file, tmp_path / "a", max_steps=6)
    assert trainer.global_step == 6
    summary = json.loads((tmp_path / "a" / "run" / "version_0" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_acc"] is not None and summary["bytes_up"] == 0
    again, _ = _fit(tiny_llama_dir, tiny_data_file, tmp_path / "b", max_steps=6)
    other, _ = _fit(tiny_llama_dir, tiny_data_file, tmp_path / "c", max_steps=6, seed=1)
    a, b, c = (dict(m.trainable_parameters()) for m in (straight, again, other))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)  # another seed, other directions

    _fit(tiny_llama_dir, tiny_data_file, tmp_path / "d", max_steps=3)
    (ckpt,) = (tmp_path / "d" / "run" / "version_0" / "checkpoints").glob("*step=3.ckpt")  # what a stop leaves
    resumed, trainer = _fit(tiny_llama_dir, tiny_data_file, tmp_path / "e", max_steps=6, ckpt=str(ckpt))
    assert trainer.global_step == 6
    r = dict(resumed.trainable_parameters())
    assert all(torch.allclose(a[n], r[n], atol=1e-6) for n in a)


def test_mezo_minimises_with_loss_evaluations_only():
    """On a least-squares problem the MeZO optimizer, given only loss values, gets close to the minimum."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 10, generator=g), torch.randn(40, generator=g)
    theta = torch.nn.Parameter(torch.zeros(10))
    best = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    loss = lambda: ((a @ theta - b) ** 2).mean()  # noqa: E731
    optimizer = MeZO([theta], lr=0.02, eps=1e-3)
    start, floor = float(loss()), float(((a @ best - b) ** 2).mean())
    for _ in range(1500):
        optimizer.step(loss)
    assert float(loss()) - floor < 0.05 * (start - floor)
    assert theta.grad is None


def test_the_verbalizer_comes_from_the_data_modules_words(tiny_llama_dir, tiny_data_file, tmp_path):
    data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), tokenizer=str(tiny_llama_dir),
                                        verbalizers={"money": "tech", "sport": "money", "tech": "sport"})
    module = MeZOClassifier(BackboneConfig(source=str(tiny_llama_dir)), data.num_classes)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    tokenizer = data.tokenizer
    assert module.label_token_ids == [tokenizer.convert_tokens_to_ids(w) for w in ("tech", "money", "sport")]


def test_bad_settings_are_named(tiny_llama_dir, word_tokenizer):
    with pytest.raises(ValueError, match="eps"):
        MeZOClassifier(BackboneConfig(source=str(tiny_llama_dir)), 3, eps=0)
    with pytest.raises(ValueError, match="trainable"):
        MeZOClassifier(BackboneConfig(source=str(tiny_llama_dir)), 3, trainable="some")
    module = _module(tiny_llama_dir, word_tokenizer)
    with pytest.raises(ValueError, match="2 words for 3 classes"):
        module.set_verbalizer(word_tokenizer, WORDS[:2])
