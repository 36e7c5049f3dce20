"""Tuning the generative side network (issue 13): teacher-forced validation loss of the PAE-efficiency run of
``benchmarks/generative.py`` (the same data, steps and codec; the server's cache makes epochs after the first free
on the device) under a few settings of the side network, one fresh ``fit`` each, one at a time.

    python benchmarks/generative_sweep.py --out benchmarks/results/generative_sweep.json
    python benchmarks/generative_sweep.py --runs rms_lr1e-3,none_lr1e-3 --out /tmp/sweep.json

Each run is the ``small`` preset's ``pae_efficiency`` config with the run's overrides of the module's
``init_args`` (``lr``, ``residual_scale``, ``reduction``), of the codec or of the number of epochs; generation is
scored once, after the last epoch, on the preset's 32 validation prompts. The JSON keeps every epoch's
validation metrics per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import generative  # noqa: E402

#: name -> overrides: module init_args, plus ``epochs`` and ``codec``
RUNS: dict[str, dict[str, Any]] = {
    "none_lr1e-3": {"residual_scale": "none", "lr": 1e-3},
    "none_lr3e-3": {"residual_scale": "none", "lr": 3e-3},
    "none_lr1e-2": {"residual_scale": "none", "lr": 1e-2},
    "rms_lr3e-4": {"residual_scale": "rms", "lr": 3e-4},
    "rms_lr1e-3": {"residual_scale": "rms", "lr": 1e-3},
    "rms_lr3e-3": {"residual_scale": "rms", "lr": 3e-3},
    "rms_lr1e-3_reduction2": {"residual_scale": "rms", "lr": 1e-3, "reduction": 2},
    "rms_lr1e-3_4epochs": {"residual_scale": "rms", "lr": 1e-3, "epochs": 4},
    "rms_lr1e-3_fp16": {"residual_scale": "rms", "lr": 1e-3, "codec": "fp16"},
}


def config(name: str, workdir: Path) -> dict[str, Any]:
    """The ``small`` preset's PAE-efficiency config with run ``name``'s overrides."""
    overrides = dict(RUNS[name])
    epochs = int(overrides.pop("epochs", generative.PRESETS["small"].epochs))
    codec = overrides.pop("codec", None)
    cfg = generative.derive("pae_efficiency", replace(generative.PRESETS["small"], epochs=epochs), workdir)
    cfg["model"]["init_args"].update(overrides)
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("GenerationEval"):
            c["init_args"]["every_n_epochs"] = epochs  # generate once, at the end
        if codec and c["class_path"].endswith("QuantizedTransfer"):
            c["init_args"]["codec"] = codec
    return cfg


def run(name: str, workdir: Path) -> dict[str, Any]:
    import yaml

    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config(name, workdir / name), sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lightning_mobillm", "fit", "--config", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    rows = list(csv.DictReader(open(next((workdir / name).rglob("metrics.csv")))))
    val = [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v and (k == "epoch" or
            k.startswith("val/"))} for row in rows if any(k.startswith("val/") and v for k, v in row.items())]
    return {"overrides": RUNS[name], "val": val, "final_val_loss": val[-1]["val/loss"],
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/generative_sweep.json")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    import tempfile

    names = [n for n in args.runs.split(",") if n]
    if unknown := sorted(set(names) - set(RUNS)):
        p.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mobillm-generative-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "preset": "small (pae_efficiency)",
                           "runs": {}}
    for name in names:
        out["runs"][name] = run(name, workdir)
        print(name, json.dumps(out["runs"][name]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
