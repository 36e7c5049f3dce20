"""Device/server overlap measured, not simulated: the device and the server pinned to separate cores.

A ``python -m lightning_mobillm serve`` process runs pinned to one core (``taskset``), and a MobiLLM
device process pinned to another trains against it over gRPC on 127.0.0.1, once pipelined
(``pipeline_depth`` 1: the device forwards batch k+1 while the server trains batch k) and once
synchronous (``pipeline_depth`` 0). Per training step the device records its own step time (batch end to
batch end), its compute (``last_device_step_s``: forward, quantise, frame) and the server's
(``server_step_s`` in each reply). After ``--warmup`` steps, the medians give

    pipelined step / max(device step, server step)    (1.0 = perfect overlap; target <= 1.15)
    synchronous step / (device step + server step)     (what no overlap costs, for reference)

The server's step is made non-negligible with ``--select all`` (the paper's every token) and a wide side
network (``--reduction``). Both modes share the same server process, data and seed.

    python benchmarks/overlap.py --out benchmarks/results/overlap.json
    python benchmarks/overlap.py --steps 30 --select auto   # the default token set: a tiny server step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _children import PREFIX, report

MODES = {"pipelined": 1, "synchronous": 0}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def child_device(args) -> dict:
    import lightning as L
    import torch

    from lightning_mobillm.callbacks import DeviceMonitor, QuantizedTransfer
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.modules import SideTuningModule
    from lightning_mobillm.specs import BackboneConfig
    from lightning_mobillm.strategies import ServerAssistedStrategy

    torch.set_num_threads(1)  # the one core this process is pinned to

    class StepTimes(L.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []
            self._last = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self._last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            stats = trainer.strategy.device_stats
            self.rows.append({"step_s": now - self._last, "device_s": stats.last_device_step_s,
                              "server_s": stats.last_server_step_s})
            self._last = now

    dm = TextClassificationDataModule(dataset="bbc_news", max_length=args.max_length, batch_size=args.batch_size,
                                      prompt="Article: {text}\nTopic:")
    model = SideTuningModule(backbone=BackboneConfig(source=args.model, dtype=args.dtype),
                             num_classes=dm.num_classes, reduction=args.reduction)
    times = StepTimes()
    monitor = DeviceMonitor()
    trainer = L.Trainer(
        strategy=ServerAssistedStrategy(server=args.address, token_file=args.token_file, pipeline_depth=args.depth,
                                        select=args.select, retries=0),
        accelerator="cpu", max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[QuantizedTransfer(args.codec), monitor, times], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="mobillm-overlap-"),
    )
    trainer.fit(model, dm)
    rows = times.rows[args.warmup:]
    # a reply names the server step of the batch it answers, which with pipelining is the previous one:
    # medians over many steps do not care which step a time belongs to
    return {
        "steps": len(times.rows),
        "measured_steps": len(rows),
        "step_s": _median([r["step_s"] for r in rows]),
        "device_step_s": _median([r["device_s"] for r in rows]),
        "server_step_s": _median([r["server_s"] for r in rows if r["server_s"] > 0]),
        "bytes_up_per_sample": monitor.summary["bytes_up_per_sample"],
        "affinity": sorted(os.sched_getaffinity(0)),
        "server_pid": monitor.summary["server_pid"],
    }


def _run_device(args, depth: int, address: str, token_file: Path, core: int) -> dict:
    argv = ["taskset", "-c", str(core), sys.executable, __file__, "--child", "device", "--depth", str(depth),
            "--address", address, "--token-file", str(token_file), "--model", args.model, "--dtype", args.dtype,
            "--codec", args.codec, "--select", args.select, "--reduction", str(args.reduction),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length)]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"the device (pipeline_depth {depth}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(PREFIX):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--codec", default="int8")
    p.add_argument("--select", default="all", choices=["auto", "all", "loss"])
    p.add_argument("--reduction", type=int, default=2, help="side-network bottleneck = hidden / reduction")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device-core", type=int, default=0)
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per device run")
    p.add_argument("--out", default="benchmarks/results/overlap.json")
    p.add_argument("--child", choices=["device"], help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--token-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        report(child_device(args))
        return
    if shutil.which("taskset") is None:
        sys.exit("taskset (util-linux) is needed to pin the device and the server to separate cores")
    if len({args.device_core, args.server_core} & os.sched_getaffinity(0)) < 2:
        sys.exit(f"cores {args.device_core} and {args.server_core} must both be available "
                 f"(this process may use {sorted(os.sched_getaffinity(0))})")

    from lightning_mobillm.assets import resolve_source
    from lightning_mobillm.client import start_serve, stop_process
    from lightning_mobillm.transport.security import new_token

    resolve_source(args.model, dtype=args.dtype)  # convert once, outside the measured runs
    work = Path(tempfile.mkdtemp(prefix="mobillm-overlap-"))
    token_file = work / "token"
    token_file.write_text(new_token() + "\n")
    server_argv = ["--server.host", "127.0.0.1", "--server.port", "0", "--server.token_file", str(token_file),
                   "--server.device", "cpu", "--server.threads", "1", "--server.workdir", str(work / "server")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # taskset's affinity is inherited by the interpreter start_serve launches through it
    os.sched_setaffinity(0, {args.server_core})
    try:
        server, ready = start_serve(server_argv, log_path=work / "server.log", env=env)
    finally:
        os.sched_setaffinity(0, {args.device_core, args.server_core})
    try:
        server_affinity = sorted(os.sched_getaffinity(server.pid))
        address = f"127.0.0.1:{ready['port']}"
        results = {}
        for mode, depth in MODES.items():
            t0 = time.perf_counter()
            results[mode] = _run_device(args, depth, address, token_file, args.device_core)
            results[mode]["wall_s"] = time.perf_counter() - t0
            print(mode, json.dumps(results[mode]), flush=True)
    finally:
        stop_process(server, 30)
    pipe, sync = results["pipelined"], results["synchronous"]
    bound = max(pipe["device_step_s"], pipe["server_step_s"])
    out = {
        "model": args.model, "dtype": args.dtype, "codec": args.codec, "select": args.select,
        "reduction": args.reduction, "batch_size": args.batch_size, "max_length": args.max_length,
        "steps": args.steps, "warmup": args.warmup,
        "cores": {"device": args.device_core, "server": args.server_core, "server_affinity": server_affinity},
        "modes": results,
        "pipelined_over_max": pipe["step_s"] / bound,
        "synchronous_over_sum": sync["step_s"] / (sync["device_step_s"] + sync["server_step_s"]),
        "pipelined_speedup": sync["step_s"] / pipe["step_s"],
        "server_over_device": pipe["server_step_s"] / pipe["device_step_s"],
        "target": {"pipelined_over_max_max": 1.15, "met": pipe["step_s"] / bound <= 1.15},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("pipelined_over_max", "synchronous_over_sum", "pipelined_speedup",
                                          "server_over_device", "target")}, indent=2))


if __name__ == "__main__":
    main()
