"""Generative fine-tuning (issue 13): MobiLLM side-tuning, its PAE-efficiency mode, on-device LoRA and zero-shot on
BBC headline generation, measured the same way.

    python benchmarks/generative.py --out benchmarks/results/generative.json
    python benchmarks/generative.py --preset smoke --out /tmp/generative_smoke.json   # does everything run

Each method runs in a fresh process (so its peak memory is its own), built from the shipped recipes
(``recipes/sft/smollm2-bbc-headlines.yaml`` and its ``-lora`` baseline) with the preset's shared settings:

* ``zero_shot``: the backbone alone (``OnDeviceCausalLM(trainable="none")``), test only;
* ``mobillm``: :class:`~lightning_mobillm.modules.CausalLMSideModule` over the embedded server (a separate
  process), ``select: answer``, every epoch forwarded on the device;
* ``pae_efficiency``: the same with :class:`~lightning_mobillm.callbacks.ActivationCache`: the server keeps each
  sample's answer taps, so epochs after the first need no device forward (labels are still sent: this is PAE's
  efficiency, not its label privacy);
* ``lora``: on-device LoRA (PEFT, r 8 on q/v), the baseline recipe, with fp32 master weights under Lightning's
  ``bf16-mixed`` (the frozen-backbone methods and zero-shot forward in bf16).

Then every trained method's test split (the first ``test_samples``) is scored with greedy decoding and a fixed
``max_new_tokens`` (ROUGE-1/2/L F-measures, torchmetrics), and generation speed is measured on the device: new
tokens per second at batch 1 and 8, with 256-token test prompts and exactly 32 new tokens, with and without the
side network's hooks (``side_overhead``: how much slower with them). Device peak memory,
busy seconds and bytes per training sample come from ``DeviceMonitor``'s ``summary.json``; ratios are against
LoRA's run in the same script run. Each process's whole peak (``process_peak_rss_mb``: load, fit, test, generation)
is also put against zero-shot's, the inference yardstick (``ratios_vs_inference``). The JSON says which machine ran it and whether anything else ran beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _children import report, run_child  # noqa: E402

SIDE_RECIPE = "recipes/sft/smollm2-bbc-headlines.yaml"
LORA_RECIPE = "recipes/sft/smollm2-bbc-headlines-lora.yaml"
METHODS = ("zero_shot", "mobillm", "pae_efficiency", "lora")


@dataclass(frozen=True)
class Preset:
    source: str = "smollm2-135m"
    limit_train_samples: int | None = 800
    epochs: int = 2
    max_length: int = 256
    batch_size: int = 8
    eval_batch_size: int = 16
    generate_samples: int = 32  # validation subset generated after each epoch
    test_samples: int = 300  # held-out samples scored at the end
    max_new_tokens: int = 24
    speed_runs: tuple[tuple[int, int], ...] = ((1, 8), (8, 32))  # (batch size, prompts) of the speed test
    speed_prompt_tokens: int = 256
    speed_new_tokens: int = 32
    codec: str = "int8o"
    side_lr: float = 1e-3
    lora_lr: float = 5e-4


PRESETS = {
    "small": Preset(),
    "smoke": Preset(limit_train_samples=48, epochs=1, generate_samples=8, test_samples=16,
                    speed_runs=((1, 2), (8, 8)), speed_prompt_tokens=64, speed_new_tokens=8, max_length=128),
}


def derive(method: str, preset: Preset, workdir: Path) -> dict[str, Any]:
    """The config one method runs with: its recipe, with the preset's shared settings and a CSV logger in
    ``workdir/<method>``, no checkpoints."""
    import yaml

    cfg = yaml.safe_load((REPO / (LORA_RECIPE if method in ("lora", "zero_shot") else SIDE_RECIPE)).read_text())
    cfg = copy.deepcopy(cfg)
    data = cfg["data"]["init_args"]
    data.update(max_length=preset.max_length, batch_size=preset.batch_size, eval_batch_size=preset.eval_batch_size,
                limit_train_samples=preset.limit_train_samples, generate_samples=preset.generate_samples)
    model = cfg["model"]["init_args"]
    model["backbone"]["source"] = preset.source
    trainer = cfg["trainer"]
    callbacks = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
    for c in callbacks:
        if c["class_path"].endswith("GenerationEval"):
            c["init_args"].update(max_new_tokens=preset.max_new_tokens, test_samples=preset.test_samples)
            c["init_args"].pop("output", None)
        if c["class_path"].endswith("QuantizedTransfer"):
            c["init_args"]["codec"] = preset.codec
    if method == "pae_efficiency":
        callbacks.insert(1, {"class_path": "lightning_mobillm.callbacks.ActivationCache"})
    if method == "zero_shot":  # frozen, like the side methods' backbone: bf16
        model["trainable"] = "none"
        model["backbone"]["dtype"] = "bfloat16"
    if method == "lora":  # the fair bf16 setting (issue 11): fp32 master weights under Lightning's bf16-mixed
        model["lr"] = preset.lora_lr
        model["backbone"]["dtype"] = "float32"
        trainer["precision"] = "bf16-mixed"
    if method in ("mobillm", "pae_efficiency"):
        model["lr"] = preset.side_lr
        trainer["strategy"]["init_args"]["pipeline_depth"] = 0  # device and server share the cores: one at a time
    trainer.update(max_epochs=preset.epochs, enable_checkpointing=False, enable_progress_bar=False,
                   callbacks=callbacks,
                   logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(workdir), "name": method, "version": 0}})
    return cfg


def child(method: str, config: str) -> None:
    """In a fresh process: fit (unless zero-shot), score the test split, time generation; report the results."""
    import torch

    import lightning_mobillm.cli as cli_module
    from lightning_mobillm.callbacks import DeviceMonitor, GenerationEval

    cli = cli_module.MobiLLMCLI(subclass_mode_model=True, subclass_mode_data=True,
                                trainer_defaults={"strategy": "mobillm"}, save_config_kwargs={"overwrite": True},
                                args=["--config", config], run=False)  # as `python -m lightning_mobillm fit` builds
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    t0 = time.perf_counter()
    if method != "zero_shot":
        trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - t0
    monitor = next((c for c in trainer.callbacks if isinstance(c, DeviceMonitor)), None)
    summary = dict(monitor.summary) if monitor is not None and method != "zero_shot" else {}
    trainer.test(model, datamodule=data, verbose=False)
    gen = next(c for c in trainer.callbacks if isinstance(c, GenerationEval))
    scores = {k: v for k, v in gen.last_test.items() if k not in ("texts", "references")}
    examples = [{"text": t, "reference": r[0]} for t, r in zip(gen.last_test["texts"][:5], gen.last_test["references"])]
    from lightning_mobillm.rss import peak_rss_mb

    process_peak = peak_rss_mb()  # load, fit and test (teacher-forced and generated), before the speed test
    speed = generation_speed(method, model, data, trainer, speed_settings())
    report({"method": method, "fit_s": fit_s, "summary": summary, "test": scores, "examples": examples,
            "generation_speed": speed, "process_peak_rss_mb": process_peak, "torch_threads": torch.get_num_threads()})


def speed_settings() -> dict[str, Any]:
    """The speed test's settings, which the parent hands its children in ``GEN_SPEED``."""
    return json.loads(os.environ["GEN_SPEED"])


def fixed_prompts(data: Any, count: int, tokens: int) -> list[list[int]]:
    """The first ``count`` test prompts that have at least ``tokens`` tokens, each cut to its last ``tokens``
    (which keep the template's turn to the assistant), read from a copy of the data module whose ``max_length``
    leaves the prompts long enough."""
    import inspect

    accepted = inspect.signature(type(data)).parameters
    args = {k: v for k, v in data.hparams.items() if k in accepted}  # not LightningCLI's `_class_path`
    long = type(data)(**{**args, "max_length": 2 * tokens + 64, "eval_batch_size": 64})
    long.set_tokenizer(data._tokenizer)
    long.setup("test")
    out: list[list[int]] = []
    for batch in long.generation_dataloader("test"):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            row = ids[mask.bool()].tolist()
            if len(row) >= tokens:
                out.append(row[-tokens:])
            if len(out) == count:
                return out
    raise RuntimeError(f"only {len(out)} test prompts have {tokens} tokens")


def prompt_batches(prompts: list[list[int]], batch_size: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` equal-length ``prompts`` as unpadded batches of ``batch_size`` for ``generate_texts``."""
    import torch

    rows = prompts[:count]
    return [{"input_ids": torch.tensor(rows[i:i + batch_size]),
             "attention_mask": torch.ones(len(rows[i:i + batch_size]), len(rows[0]), dtype=torch.long),
             "index": torch.arange(i, i + len(rows[i:i + batch_size]))} for i in range(0, len(rows), batch_size)]


def timed(run: Any, batches: list[dict[str, Any]]) -> tuple[Any, float]:
    """``run(batches)`` after one untimed batch (warm-up): its result and its seconds."""
    run(batches[:1])
    t = time.perf_counter()
    produced = run(batches)
    return produced, time.perf_counter() - t


def generation_speed(method: str, model: Any, data: Any, trainer: Any, speed: dict[str, Any]) -> dict[str, Any]:
    """New tokens per second of greedy generation on the device, at each ``(batch size, prompts)`` of
    ``speed["runs"]``, ``speed["prompt_tokens"]``-token prompts and exactly ``speed["new_tokens"]`` new tokens;
    with and without the side network for the side methods. One batch of each setting runs first, untimed."""
    from lightning_mobillm.generation import generate_texts

    new_tokens = int(speed["new_tokens"])
    prompts = fixed_prompts(data, max(n for _, n in speed["runs"]), int(speed["prompt_tokens"]))
    side = method in ("mobillm", "pae_efficiency")
    out: dict[str, Any] = {}
    for batch_size, count in speed["runs"]:
        batches = prompt_batches(prompts, batch_size, count)
        for name in (("with_side", "without_side") if side else ("model",)):
            if name == "without_side":
                backbone = trainer.strategy.backbone

                def run(b: list, backbone: Any = backbone) -> Any:
                    return generate_texts(backbone.model, backbone.tokenizer, b, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens)
            else:
                def run(b: list) -> Any:
                    return model.generate_texts(b, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            produced, seconds = timed(run, batches)
            tokens = len(produced) * new_tokens
            out.setdefault(f"batch_{batch_size}", {})[name] = {
                "prompts": len(produced), "prompt_tokens": len(prompts[0]), "new_tokens": tokens,
                "seconds": seconds, "tokens_per_s": tokens / seconds}
        if side:
            runs = out[f"batch_{batch_size}"]
            runs["side_overhead"] = runs["without_side"]["tokens_per_s"] / runs["with_side"]["tokens_per_s"] - 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/generative.json")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        child(args.child, rest[0])
        return
    import tempfile

    import yaml

    preset = PRESETS[args.preset]
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mobillm-generative-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", GEN_SPEED=json.dumps(
        {"runs": preset.speed_runs, "prompt_tokens": preset.speed_prompt_tokens, "new_tokens": preset.speed_new_tokens}))
    results: dict[str, Any] = {}
    out: dict[str, Any] = {"preset": args.preset, "settings": asdict(preset), "methods": results,
                           "command": " ".join(["python", *sys.argv]), "machine": {
                               "cpu_count": os.cpu_count(), "platform": platform.platform(),
                               "python": platform.python_version()},
                           "note": "each method in a fresh process, one at a time; ratios against LoRA's run in "
                                   "this script run"}
    for method in methods:
        config = workdir / f"{method}.yaml"
        config.write_text(yaml.safe_dump(derive(method, preset, workdir), sort_keys=False))
        t0 = time.perf_counter()
        results[method] = run_child(__file__, method, [str(config)])
        results[method]["wall_s"] = time.perf_counter() - t0
        out["ratios_vs_lora"] = ratios(results)
        out["ratios_vs_inference"] = vs_inference(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({m: {"test": r["test"], "speed": r["generation_speed"]} for m, r in results.items()}, indent=1))
    print(f"wrote {args.out}")


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each trained method's device peak memory, busy seconds and bytes per sample over LoRA's."""
    lora = results.get("lora", {}).get("summary", {})
    out: dict[str, dict[str, float | None]] = {}
    for method, r in results.items():
        s = r.get("summary", {})
        if not s or method == "lora" or not lora:
            continue
        out[method] = {key: (s.get(key) / lora[key] if s.get(key) is not None and lora.get(key) else None)
                       for key in ("device_peak_rss_mb", "device_steady_peak_rss_mb", "device_busy_s_per_sample")}
    return out


def vs_inference(results: dict[str, Any]) -> dict[str, float]:
    """Each method's whole-process peak (load, training, the test split's teacher-forced pass and generation;
    not the speed test)
    over zero-shot's: the same backbone, loaded the same way, doing the same evaluation and generation without
    training, i.e. inference."""
    base = results.get("zero_shot", {}).get("process_peak_rss_mb")
    return {m: r["process_peak_rss_mb"] / base for m, r in results.items()
            if base and m != "zero_shot" and r.get("process_peak_rss_mb")}


if __name__ == "__main__":
    main()
