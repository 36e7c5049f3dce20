"""PAE MobiLLM on SmolLM2-135M and BBC News: what the shortcut and the activation cache save, and accuracy.

Runs, each in a fresh device process with its own embedded server, on the same split and seed:
  pae_cache      PAE (additive adapter, secret target transform), loss-token shortcut, ActivationCache
  pae_nocache    the same without the cache (the device forwards every sample every epoch)
  mobillm_cache  the MobiLLM side network trained on labels (cross-entropy), shortcut + cache
  pae_fullseq    PAE sending every token's activations (select: all), a few steps: bytes only
and writes one JSON with, per run: bytes up per sample (epoch 1), device forwards, device busy seconds per
epoch, validation accuracy/F1, and the targets of the issue checked from those numbers.

    python benchmarks/pae.py --epochs 3 --out benchmarks/results/pae.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _children import report, run_child

RUNS = ("pae_cache", "pae_nocache", "mobillm_cache", "pae_fullseq")


def child(args) -> dict:
    import lightning as L

    from lightning_mobillm.callbacks import ActivationCache, DeviceMonitor, QuantizedTransfer
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.modules import AdditiveAdapterModule, SideTuningModule
    from lightning_mobillm.server_config import ServerConfig
    from lightning_mobillm.specs import BackboneConfig
    from lightning_mobillm.strategies import ServerAssistedStrategy

    run = args.child
    L.seed_everything(args.seed)
    dm = TextClassificationDataModule(dataset="bbc_news", max_length=args.max_length, batch_size=args.batch_size,
                                      eval_batch_size=32, seed=args.seed)
    backbone = BackboneConfig(source=args.model, dtype=args.dtype, layers=args.layers)
    common = dict(backbone=backbone, num_classes=dm.num_classes, lr=args.lr, seed=args.seed)
    model = SideTuningModule(**common) if run == "mobillm_cache" else AdditiveAdapterModule(**common)
    monitor = DeviceMonitor()
    callbacks = [QuantizedTransfer(args.codec), monitor]
    if run.endswith("_cache"):
        callbacks.append(ActivationCache())
    trainer = L.Trainer(
        strategy=ServerAssistedStrategy(select="all" if run == "pae_fullseq" else "loss",
                                        embedded=ServerConfig(device="cpu", threads=1)),
        accelerator="cpu",
        max_epochs=1 if run == "pae_fullseq" else args.epochs,
        limit_train_batches=args.fullseq_steps if run == "pae_fullseq" else None,
        limit_val_batches=0 if run == "pae_fullseq" else None,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="mobillm-pae-"),
    )
    trainer.fit(model, dm)
    s = monitor.summary
    epochs = 1 if run == "pae_fullseq" else args.epochs
    return {
        "run": run,
        "epochs": epochs,
        "steps": s["steps"],
        "train_samples_per_epoch": s["train_samples"] // epochs if s["train_samples"] else None,
        "bytes_up": s["bytes_up"],
        "device_forwards": s["device_forwards"],
        # validation batches forwarded: every one the first time, then only those the tap cache did not hold
        "val_forwards": epochs * sum(trainer.num_val_batches) - s["eval_cache_hits"] if run != "pae_fullseq" else 0,
        "eval_cache_hits": s["eval_cache_hits"],
        "val_forwards_first": sum(trainer.num_val_batches) if run != "pae_fullseq" else 0,
        "train_batches_per_epoch": trainer.num_training_batches,
        "device_busy_s_by_epoch": s["device_busy_s_by_epoch"],
        "val_acc": s["val_acc"],
        "val_f1": s["val_f1"],
        "wall_s": s["wall_s"],
        "first_epoch_bytes_up_per_sample": s["train_bytes_up_by_epoch"]["0"] / max(1, s["train_samples"] // epochs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", default="all", help='"all" or a JSON list of block indices')
    p.add_argument("--codec", default="int8")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fullseq-steps", type=int, default=10)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--out", default="benchmarks/results/pae.json")
    p.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layers != "all":
        args.layers = json.loads(args.layers)
    if args.child:
        report(child(args))
        return

    from lightning_mobillm.assets import resolve_source
    from lightning_mobillm.transport import codecs

    resolve_source(args.model, dtype=args.dtype)
    rows = {}
    for run in args.runs.split(","):
        rows[run] = run_child(__file__, run, sys.argv[1:])

    out: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "out")}, "runs": rows}
    checks = {}
    if "pae_cache" in rows:
        r = rows["pae_cache"]
        busy = {int(k): v for k, v in r["device_busy_s_by_epoch"].items()}
        checks["cache_device_forwards_equal_train_plus_val"] = (
            r["device_forwards"] == r["train_batches_per_epoch"] + r["val_forwards"])
        # the device's tap cache: each validation batch forwarded once in the whole run
        checks["val_batches_forwarded_once"] = r["val_forwards"] == r["val_forwards_first"]
        checks["cache_later_epochs_busy_ratio"] = max(busy[e] for e in busy if e > 0) / busy[0] if len(busy) > 1 else None
        raw = 30 * 576 * codecs.bytes_per_value(args.codec)
        checks["shortcut_bytes_per_sample_over_raw"] = r["first_epoch_bytes_up_per_sample"] / raw
    if "pae_nocache" in rows:
        busy = {int(k): v for k, v in rows["pae_nocache"]["device_busy_s_by_epoch"].items()}
        checks["nocache_later_epochs_busy_ratio"] = max(busy[e] for e in busy if e > 0) / busy[0] if len(busy) > 1 else None
    if "pae_fullseq" in rows and "pae_cache" in rows:
        checks["fullseq_over_shortcut_bytes"] = (rows["pae_fullseq"]["first_epoch_bytes_up_per_sample"]
                                                 / rows["pae_cache"]["first_epoch_bytes_up_per_sample"])
    if "pae_cache" in rows and "mobillm_cache" in rows:
        checks["pae_minus_mobillm_val_acc_points"] = 100 * (rows["pae_cache"]["val_acc"] - rows["mobillm_cache"]["val_acc"])
    out["checks"] = checks
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(checks, indent=2))


if __name__ == "__main__":
    main()
