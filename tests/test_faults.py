"""Faults: a server or a device killed mid-run, and the run still ends with what an uninterrupted run trains.

Faults are placed only through the named fault points of :mod:`lightning_mobillm.faults` (``MOBILLM_FAULTS``),
never by timing: no sleep, no wall-time race; every child process has a timeout and the suite a per-test
limit. The runs are real processes (``tests/support/fault_run.py``: the device, and its embedded server
started by the device or a standalone ``serve``); the uninterrupted reference runs here, over the in-process
link. One torch thread, dropout 0 and the seeded data order make the two bit-identical, so "every sample
entered the final optimizer history exactly once" is checked as: the final side network EQUALS the
reference's (``torch.equal`` on every tensor), the server's step count is the planned one, and the device's
loop trained on the reference's batches in the reference's order.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mobillm import faults
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.data.text_classification import ResumableDataLoader


# ---- the hook itself ---------------------------------------------------------------------------------------
def test_fault_points_fire_only_where_and_when_named(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("device:after_hello")  # unset: nothing
    monkeypatch.setenv(faults.ENV, "device:during_validation@2=ready, server:after_train_step@5=raise")
    for _ in range(3):
        faults.fault_point("device:during_validation", batch_idx=0)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{faults.MARKER} device:during_validation action=ready")
    faults.fault_point("server:after_train_step", step=4)  # @N is the step when the point reports one
    with pytest.raises(faults.FaultInjected, match="server:after_train_step@5"):
        faults.fault_point("server:after_train_step", step=5)
    # with a fault folder, an entry fires once over every process that shares it (a restarted server)
    monkeypatch.setenv(faults.ENV_DIR, str(tmp_path))
    with pytest.raises(faults.FaultInjected):
        faults.fault_point("server:after_train_step", step=5)
    faults.fault_point("server:after_train_step", step=5)
    assert (tmp_path / "server-after_train_step@5.fired").exists()
    for bad in ("after_hello=sigint", "device:after_hello=explode", "device:after_hello@x=kill", "device:x"):
        with pytest.raises(ValueError, match="MOBILLM_FAULTS"):
            faults.parse_faults(bad)


# ---- a resumable training loader ---------------------------------------------------------------------------
class _Indices(L.LightningModule):
    """Trains nothing that matters; records the sample indices of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return (self.w * batch["labels"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _indices_fit(data, tmp_path, max_steps: int, ckpt_path=None, callbacks=()) -> list[list[int]]:
    module = _Indices()
    L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
              enable_checkpointing=bool(callbacks), default_root_dir=tmp_path).fit(module, data, ckpt_path=ckpt_path)
    return module.seen


def test_the_training_loader_resumes_mid_epoch_where_it_was(tmp_path, tiny_llama_dir, tiny_data_file,
                                                            restore_seed_env):
    data = TextClassificationDataModule(dataset="json", data_files=str(tiny_data_file), max_length=20,
                                        prompt="Article : {text} Topic :", tokenizer=str(tiny_llama_dir))
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and len(loader) == 17
    # the same order as the plain shuffled loader it replaces (recorded results stay reproducible)
    plain = torch.utils.data.DataLoader(data.split_dataset("train"), batch_size=8, shuffle=True,
                                        generator=torch.Generator().manual_seed(0), collate_fn=loader.collate_fn)
    for _ in range(2):
        assert [b["index"].tolist() for b in plain] == [b["index"].tolist() for b in loader]

    full = _indices_fit(data, tmp_path, max_steps=40)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    _indices_fit(data, tmp_path, max_steps=21, callbacks=[every])
    # mid-epoch 0, the end of epoch 0 (the checkpoint of its last batch), mid-epoch 1
    for step in (5, 17, 20):
        ckpt = next((tmp_path / "ckpt").glob(f"*-step={step}.ckpt"))
        state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        # the position saved is the batches trained on (Lightning does not prefetch a loader with a length)
        assert (state["epoch"], state["batches"]) == ((step // 17, step % 17) if step != 17 else (1, 0))
        assert _indices_fit(data, tmp_path, max_steps=40, ckpt_path=ckpt) == full[step:], step
