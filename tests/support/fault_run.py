"""One training run in its own process, for the fault tests (``tests/test_faults.py``).

``python tests/support/fault_run.py '<json>'`` fits a tiny model with the mobillm strategy and writes, into
the run's ``out`` folder, ``result.json`` (steps, the server's step count, recoveries, replayed steps, the
sample indices of every training batch the device's loop trained on) and ``weights.pt`` (the side network
after ``fit``: the server's, copied back). Faults are placed by the caller through ``MOBILLM_FAULTS``.

The same function runs the uninterrupted reference in the test process (``run(config)`` with
``server: inprocess``): one torch thread, dropout 0 and a fixed data order make the two bit-identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def run(config: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_mobillm.baselines import SplitLearningClassifier
    from lightning_mobillm.callbacks import ActivationCache, QuantizedTransfer
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.modules import AdditiveAdapterModule, SideTuningModule
    from lightning_mobillm.server_config import ServerConfig
    from lightning_mobillm.specs import BackboneConfig
    from lightning_mobillm.strategies import ServerAssistedStrategy

    torch.set_num_threads(1)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    model_dir = config["model"]
    data = TextClassificationDataModule(dataset="json", data_files=config["data"], prompt="Article : {text} Topic :",
                                        max_length=20, batch_size=8, tokenizer=model_dir)
    method = config.get("method", "mobillm")
    pae, split = method == "pae", method == "split"
    backbone = BackboneConfig(source=model_dir)
    embedded = ServerConfig(device="cpu", threads=1, checkpoint_every_n_steps=config.get("server_every", 4),
                            workdir=config.get("workdir"))
    strategy: Any = "auto"
    if split:  # the module talks to its own (split) server; Lightning's default strategy trains its half
        model = SplitLearningClassifier(backbone, data.num_classes, lr=1e-2, dropout=0.0, r=4, lora_dropout=0.0,
                                        server=config.get("server"), embedded=embedded, codec_up="fp32",
                                        codec_down="fp32", reconnect_timeout=120)
    else:
        if pae:
            model = AdditiveAdapterModule(backbone=backbone, num_classes=data.num_classes, lr=1e-2, dropout=0.0)
        else:
            model = SideTuningModule(backbone=backbone, num_classes=data.num_classes, lr=1e-2, dropout=0.0,
                                     pool="mean")
        strategy = ServerAssistedStrategy(
            server=config.get("server"), token_file=config.get("token_file"), device_id=config.get("device_id"),
            pipeline_depth=config.get("depth", 1), select="loss" if pae else "all",
            retries=config.get("retries", 1), connect_timeout=60, reconnect_timeout=120, embedded=embedded)

    class Record(L.Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[int, list[int]]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches.append((trainer.global_step - 1, batch["index"].tolist()))

    record = Record()
    callbacks: list[L.Callback] = [record] if split else [QuantizedTransfer(config.get("codec", "int8")), record]
    if pae:
        callbacks.append(ActivationCache())
    if config.get("device_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=config["device_every"],
                                         save_top_k=-1, save_last=True))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=config["max_steps"], callbacks=callbacks,
                        logger=False, enable_checkpointing=bool(config.get("device_every")),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=out)
    trainer.fit(model, data, ckpt_path=config.get("ckpt_path"))
    cache = next((c for c in callbacks if isinstance(c, ActivationCache)), None)
    stats = model.device_stats if split else strategy.device_stats
    result = {"steps": trainer.global_step, "server_steps": stats.last_train_reply.get("server_steps"),
              "recoveries": (model if split else strategy).recoveries,
              "replayed_steps": None if split else strategy.replayed_steps, "batches": record.batches,
              "server_pid": stats.server_pid, "server_losses": model.server_losses if split else None,
              "cache_hits": cache.hits if cache else None, "cache_misses": cache.misses if cache else None}
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "weights.pt")
    (out / "result.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
