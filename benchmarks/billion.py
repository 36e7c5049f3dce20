"""Device memory with a billion-parameter backbone (Qwen2.5-Coder-1.5B-Instruct, 1.78B parameters).

Each row runs in a fresh child process on real BBC News batches (8 x 128 tokens by default) and
reports the device process's peak resident memory (VmHWM: the whole run, loading included), and its
peaks while loading and in steady state (``rss.PeakPhases``):

  inference  the frozen backbone forward only, LM head at the last position (the child of
             ``benchmarks/device_memory.py``);
  mobillm    ``python -m lightning_mobillm fit`` with the demo recipe
             (``recipes/demo/qwen2.5-coder-1.5b-mobillm.yaml``): the device process only, the side
             network trains in the embedded server process (shown as ``tree_peak_rss_mb``, device + server);
  lora       on-device LoRA, ``recipes/baselines/lora.yaml`` with the backbone overridden;
  full_ft    on-device full fine-tuning, ``recipes/baselines/full_ft.yaml`` likewise.

The ``fit`` rows run the recipe's own model, data module, strategy and callbacks, with the backbone,
batch size and sequence length overridden on the command line (``--model.init_args.backbone.source``
...) and, in a copy of the recipe, without checkpoints, loggers or validation; their peak comes from
the ``device_peak_rss_mb`` of DeviceMonitor's ``summary.json``.

A watchdog polls the machine's available memory every 50 ms and kills a child (its whole process
group) when less than ``--min-available-gb`` remains, so the machine never hits the OOM killer; such a
row has ``"exceeded": true`` and the largest RSS seen, a lower bound of what the method needs. Before
each row the script waits for the 1-minute load average to fall under ``--max-load``, so measurements
do not overlap other heavy jobs; a row still waiting after ``--load-timeout`` s is skipped (an earlier
measurement of it is kept). Each row also records ``max_load1``, the highest load average while it ran:
the child itself accounts for about 2 on a 2-core machine, more means a job started meanwhile and
inflated the row's step time (its memory is its own either way).

Rows are merged into the existing ``--out`` file (same model, dtype, batch and length), so rows can be
measured at different times; the ratios of every row's peak to the inference and MobiLLM peaks are
recomputed each time. On-device full fine-tuning of the 1.5B model needs by far the most memory: run
it on a quiet machine.

    python benchmarks/billion.py --rows inference,mobillm --steps 3
    python benchmarks/billion.py --rows lora,full_ft --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _children import WatchedRun, run_watched

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Row:
    """One measured configuration.

    Attributes:
        name: the row's key (``--rows``).
        description: what runs on the device.
        recipe: the ``fit`` recipe, relative to the repository root (``None``: the inference child).
    """

    name: str
    description: str
    recipe: str | None = None


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("inference", "frozen forward only (no training)"),
        Row(
            "mobillm",
            "MobiLLM device: frozen forward, int8 activations to the server",
            "recipes/demo/qwen2.5-coder-1.5b-mobillm.yaml",
        ),
        Row("lora", "on-device LoRA fine-tuning", "recipes/baselines/lora.yaml"),
        Row("full_ft", "on-device full fine-tuning", "recipes/baselines/full_ft.yaml"),
    )
}


def _class_name(entry: Any) -> str:
    """The class path of a ``class_path``/``init_args`` entry (or a bare class path string)."""
    return str(entry.get("class_path", "")) if isinstance(entry, dict) else str(entry)


def bench_config(recipe: Path, run_dir: Path) -> Path:
    """A copy of ``recipe`` for measuring: no checkpoints, loggers, validation or progress bar.

    DeviceMonitor (added if the recipe has none) writes ``summary.json`` into ``run_dir``; ``max_epochs``
    is lifted so that ``--trainer.max_steps`` alone decides the length. Returns the copy's path.
    """
    cfg = yaml.safe_load(recipe.read_text())
    trainer = cfg.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    callbacks = [c for c in callbacks if not _class_name(c).endswith("ModelCheckpoint")]
    monitor = next((c for c in callbacks if _class_name(c).endswith("DeviceMonitor")), None)
    if not isinstance(monitor, dict):
        callbacks = [c for c in callbacks if c is not monitor]
        monitor = {"class_path": "lightning_mobillm.callbacks.DeviceMonitor"}
        callbacks.append(monitor)
    monitor.setdefault("init_args", {})["summary_file"] = str(run_dir / "summary.json")
    trainer.update(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        max_epochs=None,
    )
    out = run_dir / f"bench-{recipe.name}"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def inference_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, str(HERE / "device_memory.py"), "--child", "inference",
        "--model", args.model, "--dtype", args.dtype, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
    ]  # fmt: skip


def fit_command(args: argparse.Namespace, config: Path) -> list[str]:
    return [
        sys.executable, "-m", "lightning_mobillm", "fit", "--config", str(config),
        "--model.init_args.backbone.source", args.model,
        "--model.init_args.backbone.dtype", args.dtype,
        "--data.init_args.batch_size", str(args.batch_size),
        "--data.init_args.max_length", str(args.max_length),
        "--trainer.max_steps", str(args.steps),
    ]  # fmt: skip


def wait_for_quiet(max_load: float, timeout_s: float) -> bool:
    """Wait until the 1-minute load average is under ``max_load``; False if it is not after ``timeout_s``."""
    t0 = time.monotonic()
    while (load := os.getloadavg()[0]) > max_load:
        if time.monotonic() - t0 > timeout_s:
            return False
        print(f"load {load:.2f} > {max_load}: waiting for other jobs to finish", flush=True)
        time.sleep(15)
    return True


def measure(row: Row, args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    """Run one row in a watched child and return its JSON row (``None``: skipped, the machine is busy)."""
    run_dir = work / row.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if row.recipe is None:
        cmd = inference_command(args)
    else:
        recipe = ROOT / row.recipe
        if not recipe.is_file():
            return {"description": row.description, "recipe": row.recipe, "error": f"no recipe {recipe}"}
        cmd = fit_command(args, bench_config(recipe, run_dir))
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if not wait_for_quiet(args.max_load, args.load_timeout):
        print(f"[{row.name}] skipped: the load stayed above {args.max_load} for {args.load_timeout:.0f} s")
        return None
    print(f"[{row.name}] {shlex.join(cmd)}", flush=True)
    run: WatchedRun = run_watched(
        cmd, min_available_mb=args.min_available_gb * 1024, env=env, log_prefix=run_dir / "child"
    )
    out: dict[str, Any] = {
        "description": row.description,
        "recipe": row.recipe,
        "command": shlex.join(cmd),
        "logs": str(run_dir),
        "exceeded": run.exceeded,
        "returncode": run.returncode,
        "child_wall_s": round(run.wall_s, 1),
        "sampled_peak_rss_mb": round(run.sampled_peak_rss_mb, 1),
        "tree_peak_rss_mb": round(run.tree_peak_rss_mb, 1),
        "min_available_mb": round(run.min_available_mb, 1),
        "max_load1": round(run.max_load1, 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if run.exceeded:
        out.update(
            peak_rss_mb=out["sampled_peak_rss_mb"], peak_source="watchdog sample (killed: a lower bound)"
        )
        return out
    if run.returncode != 0:
        out["error"] = run.stderr[-3000:]
        return out
    try:
        out.update(_child_numbers(row, run, run_dir))
    except (OSError, KeyError, ValueError) as e:
        out["error"] = f"the child ran but its numbers could not be read: {e!r}"
    return out


def _child_numbers(row: Row, run: WatchedRun, run_dir: Path) -> dict[str, Any]:
    """The peak and step time a successful child reported (RESULT line or summary.json)."""
    if row.recipe is None:
        result = run.result()
        if result is None:
            raise ValueError("no RESULT line in its output")
        peaks = result["peaks_mb"]
        return dict(
            peak_rss_mb=round(result["whole_run_peak_mb"], 1),
            peak_source="VmHWM in the child (the whole run, loading included)",
            load_peak_rss_mb=_round(peaks.get("load")),
            steady_peak_rss_mb=_round(peaks.get("steady")),
            steps=result["steps"],
            s_per_step=round(result["s_per_step"], 2),
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = int(summary["steps"])
    return dict(
        peak_rss_mb=round(summary["device_peak_rss_mb"], 1),
        peak_source="summary.json device_peak_rss_mb (the whole run, loading included)",
        load_peak_rss_mb=_round(summary.get("device_load_peak_rss_mb")),
        steady_peak_rss_mb=_round(summary.get("device_steady_peak_rss_mb")),
        steps=steps,
        s_per_step=round(summary["wall_s"] / max(1, steps), 2),  # fit wall time / steps, warm-up included
        server_pid=summary.get("server_pid"),
        device_pid=summary.get("device_pid"),
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every row's peak over the inference and the MobiLLM peaks (rows that have one), and every row's
    steady-state and whole-run peaks over inference's steady-state peak (the issue's yardstick)."""
    out: dict[str, dict[str, float]] = {}
    inf_steady = rows.get("inference", {}).get("steady_peak_rss_mb")
    if inf_steady:
        for key, name in (("steady_peak_rss_mb", "steady"), ("peak_rss_mb", "whole_run")):
            out[f"{name}_vs_inference_steady"] = {
                row_name: round(row[key] / inf_steady, 3)
                for row_name, row in rows.items()
                if row.get(key) is not None and not row.get("exceeded")
            }
    for ref in ("inference", "mobillm"):
        base = rows.get(ref, {})
        if base.get("peak_rss_mb") is None or base.get("exceeded"):
            continue
        out[f"vs_{ref}"] = {
            name: round(row["peak_rss_mb"] / base["peak_rss_mb"], 3)
            for name, row in rows.items()
            if row.get("peak_rss_mb") is not None
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rows", default="inference,mobillm,lora,full_ft", help=f"comma-separated, of {list(ROWS)}"
    )
    p.add_argument("--steps", type=int, default=3, help="forward (inference) or training steps per row")
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="BackboneConfig.source")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--min-available-gb", type=float, default=1.5, help="kill a child below this much free memory"
    )
    p.add_argument(
        "--max-load", type=float, default=2.5, help="wait for the 1-min load average to fall under this"
    )
    p.add_argument(
        "--load-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for a quiet machine, then skip the row",
    )
    p.add_argument("--out", default="benchmarks/results/billion.json")
    args = p.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    from lightning_mobillm.assets import resolve_source

    t0 = time.perf_counter()
    resolve_source(args.model, dtype=args.dtype)  # assemble and convert once here, not in the measured children
    print(f"backbone ready in {time.perf_counter() - t0:.1f} s", flush=True)

    out_path = Path(args.out)
    setup = {
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
    }
    rows: dict[str, dict[str, Any]] = {}
    if out_path.is_file():
        previous = json.loads(out_path.read_text())
        if all(previous.get(k) == v for k, v in setup.items()):
            rows = previous.get("rows", {})
    work = Path(tempfile.mkdtemp(prefix="billion-"))  # kept: the children's logs and summaries
    print(f"logs under {work}", flush=True)
    for name in names:
        row = measure(ROWS[name], args, work)
        if row is None:  # skipped: keep any earlier measurement of this row
            continue
        rows[name] = row
        print(f"[{name}] " + json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
        _write(out_path, setup, rows, args)  # after every row: an interrupted run keeps the others
    print(json.dumps(_write(out_path, setup, rows, args), indent=2))


def _write(
    path: Path, setup: dict[str, Any], rows: dict[str, dict[str, Any]], args: argparse.Namespace
) -> dict:
    import psutil

    order = [n for n in ROWS if n in rows]
    result = {
        **setup,
        "rows": {n: rows[n] for n in order},
        "ratios": ratios(rows),
        "watchdog_min_available_gb": args.min_available_gb,
        "machine": {
            "cpus": os.cpu_count(),
            "total_memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
