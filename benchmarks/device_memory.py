"""Device memory of MobiLLM fine-tuning against plain inference of the same backbone.

Runs, each in a fresh device process, on real BBC News batches of 8 x 128 tokens:
  (a) forward-only inference of the backbone (the Hugging Face model, LM head at the last position, no taps),
      loaded the same way as MobiLLM's;
  (b) MobiLLM ``fit`` steps through the ServerAssistedStrategy (the side network trains in a separate
      server process, whose memory is not the device's).
Each child's peak resident memory is taken per phase (``lightning_mobillm.rss.PeakPhases``): ``load``
(process start to the first step: imports, loading the backbone, the data), ``first_step`` and ``steady``
(every later step). The yardstick is inference's steady-state peak: ``steady_ratio`` (``ratio``) is
MobiLLM's steady-state peak over it, ``whole_run_ratio`` MobiLLM's whole-run peak (loading included)
over it. A third child (``imports``) records the resident memory each group of the device's imports adds. The converted backbone is put into the cache first, so neither child pays for the conversion.

    python benchmarks/device_memory.py --steps 20 --dtype float32 --out benchmarks/results/device_memory.json
    python benchmarks/device_memory.py --steps 20 --dtype float32 --select all  # the paper's every token
    python benchmarks/device_memory.py --steps 20 --dtype bfloat16 --out benchmarks/results/device_memory_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _children import report, run_child


def _data(batch_size: int, max_length: int, tokenizer):
    from lightning_mobillm.data import TextClassificationDataModule

    dm = TextClassificationDataModule(dataset="bbc_news", max_length=max_length, batch_size=batch_size)
    dm.set_tokenizer(tokenizer)
    return dm


def child_inference(args) -> dict:
    import torch

    # not the callbacks package (DeviceMonitor's): importing Lightning alone would raise the peak measured
    from lightning_mobillm.backbone import FrozenBackbone
    from lightning_mobillm.rss import PeakPhases, rss_breakdown_mb
    from lightning_mobillm.specs import BackboneConfig

    phases = PeakPhases()
    bb = FrozenBackbone(BackboneConfig(source=args.model, dtype=args.dtype))
    dm = _data(args.batch_size, args.max_length, bb.tokenizer)
    dm.setup("fit")
    phases.mark("load")
    t0 = time.perf_counter()
    steps = 0
    head = bb.model.get_output_embeddings()
    with torch.inference_mode():
        for batch in dm.train_dataloader():
            # the LM head at the last position only, as generation does (full-vocab logits for every
            # position, ``[B, T, V]``, would flatter the ratio). Not ``model(..., logits_to_keep=1)``:
            # its ``[B, 1, d]`` slice is not contiguous, and torch's CPU matmul then expands the head's
            # weight to ``[B, d, V]`` and copies it. A ``[B, d]`` input is a plain matmul.
            hidden = bb.base_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state
            head(hidden[:, -1])
            steps += 1
            if steps == 1:
                phases.mark("first_step")
            if steps >= args.steps:
                break
    phases.mark("steady")
    return {"peaks_mb": phases.peaks_mb, "rss_now_mb": rss_breakdown_mb(), "whole_run_peak_mb": phases.whole_run_mb, "separated": phases.separated,
            "steps": steps, "s_per_step": (time.perf_counter() - t0) / steps}


def child_imports(args) -> dict:
    """Where MobiLLM's device process spends resident memory before any model is loaded: RSS after each
    group of imports, in the order the device process makes them, and which optional packages Lightning
    and torchmetrics pulled in (scipy and matplotlib when installed: the ``bench``/``test`` extras). Both
    measured children import Lightning (the inference child for the data module), so this is what any
    Lightning-based device pays, not a difference between them."""
    import importlib
    import sys

    import psutil

    proc = psutil.Process()
    steps = [("python", []), ("torch + transformers", ["torch", "transformers", "transformers.models.auto"]),
             ("lightning + torchmetrics", ["lightning.pytorch", "torchmetrics"]),
             ("data module", ["lightning_mobillm.data"]),
             ("grpc", ["grpc"]),
             ("lightning_mobillm (device side)", ["lightning_mobillm.strategies", "lightning_mobillm.callbacks",
                                                  "lightning_mobillm.modules"])]
    rows, last = [], proc.memory_info().rss / 2**20
    for name, modules in steps:
        for m in modules:
            importlib.import_module(m)
        rss = proc.memory_info().rss / 2**20
        rows.append({"imports": name, "rss_mb": rss, "delta_mb": rss - last})
        last = rss
    pulled = {m: m in sys.modules for m in ("scipy", "matplotlib", "sympy", "torch._dynamo", "pandas", "pyarrow")}
    return {"rows": rows, "pulled": pulled}


def child_mobillm(args) -> dict:
    import lightning as L

    from lightning_mobillm.callbacks import DeviceMonitor, QuantizedTransfer
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.modules import SideTuningModule
    from lightning_mobillm.server_config import ServerConfig
    from lightning_mobillm.specs import BackboneConfig
    from lightning_mobillm.strategies import ServerAssistedStrategy

    dm = TextClassificationDataModule(dataset="bbc_news", max_length=args.max_length, batch_size=args.batch_size)
    model = SideTuningModule(backbone=BackboneConfig(source=args.model, dtype=args.dtype), num_classes=dm.num_classes)
    monitor = DeviceMonitor()
    trainer = L.Trainer(
        strategy=ServerAssistedStrategy(pipeline_depth=1, select=args.select,
                                        embedded=ServerConfig(device="cpu", threads=1)),
        accelerator="cpu",
        max_steps=args.steps,
        limit_val_batches=0,
        callbacks=[QuantizedTransfer(args.codec), monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="mobillm-bench-"),  # summary.json goes there, not the cwd
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    summary = monitor.summary
    from lightning_mobillm.rss import rss_breakdown_mb

    return {
        "rss_now_mb": rss_breakdown_mb(),
        "peaks_mb": {"load": summary["device_load_peak_rss_mb"], "first_step": summary["device_first_step_peak_rss_mb"],
                     "steady": summary["device_steady_peak_rss_mb"]},
        "whole_run_peak_mb": summary["device_peak_rss_mb"],
        "separated": summary["device_rss_phases_separated"],
        "steps": trainer.global_step,
        "s_per_step": (time.perf_counter() - t0) / max(1, trainer.global_step),
        "server_pid": monitor.summary["server_pid"],
        "device_pid": os.getpid(),
        "bytes_up": monitor.summary["bytes_up"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--codec", default="int8")
    p.add_argument("--select", default="auto", choices=["auto", "all", "loss"],
                   help="the strategy's token selection (auto: the last token, for the side network's pool: last)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/device_memory.json")
    p.add_argument("--child", choices=["inference", "mobillm", "imports"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        fn = {"inference": child_inference, "mobillm": child_mobillm, "imports": child_imports}[args.child]
        report(fn(args))
        return

    from lightning_mobillm.assets import resolve_source

    resolve_source(args.model, dtype=args.dtype)  # convert once here, not in the measured children
    results = {}
    for mode in ("inference", "mobillm", "imports"):
        results[mode] = run_child(__file__, mode, sys.argv[1:])
    inf, mob = results["inference"], results["mobillm"]
    steady_ratio = mob["peaks_mb"]["steady"] / inf["peaks_mb"]["steady"]
    out = {
        "model": args.model,
        "dtype": args.dtype,
        "codec": args.codec,
        "select": args.select,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "inference_peak_rss_mb": inf["peaks_mb"]["steady"],
        "mobillm_device_peak_rss_mb": mob["peaks_mb"]["steady"],
        "ratio": steady_ratio,
        "steady_ratio": steady_ratio,
        "whole_run_ratio": mob["whole_run_peak_mb"] / inf["peaks_mb"]["steady"],
        "inference_whole_run_ratio": inf["whole_run_peak_mb"] / inf["peaks_mb"]["steady"],
        "target": {"ratio_max": 1.10, "steady_met": steady_ratio <= 1.10,
                   "whole_run_met": mob["whole_run_peak_mb"] / inf["peaks_mb"]["steady"] <= 1.10},
        "phases_mb": {"inference": {**inf["peaks_mb"], "whole_run": inf["whole_run_peak_mb"]},
                      "mobillm": {**mob["peaks_mb"], "whole_run": mob["whole_run_peak_mb"]}},
        "phases_separated": inf["separated"] and mob["separated"],
        "rss_at_end_mb": {"inference": inf.get("rss_now_mb"), "mobillm": mob.get("rss_now_mb")},
        "imports": results["imports"],
        "inference_s_per_step": results["inference"]["s_per_step"],
        "mobillm_device_s_per_step": results["mobillm"]["s_per_step"],
        "device_and_server_pids_differ": results["mobillm"]["device_pid"] != results["mobillm"]["server_pid"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
