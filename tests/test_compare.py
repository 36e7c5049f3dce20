"""benchmarks/compare.py, benchmarks/plot.py and lightning_mobillm.simulate, without running any model.

Every summary below is a SYNTHETIC test input with made-up numbers, chosen so the expected results can be
computed by hand; none of it is a measurement.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mobillm.simulate import (
    PROFILES,
    DeviceProfile,
    Link,
    measure_cpu_gflops,
    parse_link,
    parse_profile,
    simulate_epoch_time,
    simulated_curve,
    time_to_accuracy,
)

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    """A script of benchmarks/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compare = _load("compare")
plot = _load("plot")

NO_LATENCY = Link("test", 10.0, latency_ms=0.0)


# --------------------------------------------------------------------------- simulated time


def test_sequential_epoch_adds_device_link_latency_and_server():
    # device 100 s / factor 2 = 50 s; 1.25e6 B up at 10 Mbit/s = 1 s; 10 steps x 20 ms = 0.2 s; server 5 s
    t = simulate_epoch_time(100.0, 1.25e6, 0, 5.0, 10, 2.0, Link("10", 10.0, latency_ms=20.0), overlap=False)
    assert t == pytest.approx(50 + 1.0 + 0.2 + 5)


def test_overlapped_epoch_is_the_slowest_stage_plus_one_step_of_the_others():
    link = Link("10", 10.0, latency_ms=20.0)
    # device-bound: max(50, 1.2, 5) + (1.2 + 5) / 10
    assert simulate_epoch_time(100.0, 1.25e6, 0, 5.0, 10, 2.0, link, overlap=True) == pytest.approx(50.62)
    # link-bound: 12.5e6 B at 10 Mbit/s = 10 s + 10 x 20 ms = 10.2 s; then (device 1 + server 2) / 10
    assert simulate_epoch_time(1.0, 12.5e6, 0, 2.0, 10, 1.0, link, overlap=True) == pytest.approx(10.5)


def test_on_device_epoch_is_device_time_only():
    for overlap in (False, True):
        assert simulate_epoch_time(30.0, 0, 0, 7.0, 10, 0.5, Link("1", 1.0), overlap) == pytest.approx(60.0)


def test_link_directions_and_validation():
    asym = Link("asym", 10.0, latency_ms=0.0, down_mbit_per_s=40.0)
    assert asym.transfer_s(1.25e6, 5e6) == pytest.approx(1.0 + 1.0)
    assert NO_LATENCY.transfer_s(1.25e6, 1.25e6) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="profile_factor"):
        simulate_epoch_time(1.0, 1, 0, 0, 1, 0.0, NO_LATENCY, overlap=False)
    with pytest.raises(ValueError, match="steps"):
        simulate_epoch_time(1.0, 1, 0, 0, 0, 1.0, NO_LATENCY, overlap=True)


def test_profile_factors_and_command_line_specs():
    assert PROFILES["this_cpu"].factor(None) == 1.0
    assert DeviceProfile("x", achievable_gflops=400.0).factor(100.0) == pytest.approx(4.0)
    assert DeviceProfile("x", speed_vs_this_cpu=0.5, achievable_gflops=400.0).factor(100.0) == 0.5
    with pytest.raises(ValueError, match="needs"):
        DeviceProfile("x", achievable_gflops=400.0).factor(None)
    for name in ("jetson_xavier_nx", "phone"):
        assert PROFILES[name].achievable_gflops > 0 and PROFILES[name].source
    assert parse_profile("fast=3").factor(None) == 3.0
    assert parse_profile("gpu=1000gflops").factor(250.0) == pytest.approx(4.0)
    assert parse_link("lte=20/50@40") == Link("lte", 20.0, latency_ms=40.0, down_mbit_per_s=50.0)
    assert parse_link("wifi=100") == Link("wifi", 100.0)
    with pytest.raises(ValueError):
        parse_link("100")


def test_measure_cpu_gflops_is_positive():
    assert measure_cpu_gflops("float32", n=64, window_s=0.01, windows=1) > 0


# SYNTHETIC: two on-device epochs of 10 steps; epoch 0 takes 10 s, epoch 1 20 s at factor 1.
TWO_EPOCHS = {
    "by_epoch": [
        {
            "epoch": 1,
            "steps": 10,
            "samples": 80,
            "device_busy_s": 20.0,
            "server_busy_s": 0.0,
            "bytes_up": 0,
            "bytes_down": 0,
            "wall_s": 20.0,
        },
        {
            "epoch": 0,
            "steps": 10,
            "samples": 80,
            "device_busy_s": 10.0,
            "server_busy_s": 0.0,
            "bytes_up": 0,
            "bytes_down": 0,
            "wall_s": 10.0,
        },
    ],
    "val_history": [
        {"elapsed_s": 1.0, "step": 5, "epoch": 0, "val_acc": 0.5, "val_f1": 0.4},
        {"elapsed_s": 2.0, "step": 10, "epoch": 0, "val_acc": 0.7, "val_f1": 0.6},
        {"elapsed_s": 3.0, "step": 15, "epoch": 1, "val_acc": 0.85, "val_f1": 0.8},
        {"elapsed_s": 4.0, "step": 20, "epoch": 1, "val_acc": 0.9, "val_f1": 0.9},
    ],
}


def test_validation_points_are_placed_linearly_within_their_epoch():
    curve = simulated_curve(TWO_EPOCHS, 1.0, NO_LATENCY, overlap=False)
    assert [x for point in curve for x in point] == pytest.approx(
        [5.0, 0.5, 10.0, 0.7, 20.0, 0.85, 30.0, 0.9]
    )
    assert time_to_accuracy(TWO_EPOCHS, 1.0, NO_LATENCY, False, 0.8) == pytest.approx(
        20.0
    )  # 10 + 10/20 of 20
    assert time_to_accuracy(TWO_EPOCHS, 2.0, NO_LATENCY, False, 0.8) == pytest.approx(10.0)
    assert time_to_accuracy(TWO_EPOCHS, 1.0, NO_LATENCY, False, 0.5) == pytest.approx(5.0)
    assert time_to_accuracy(TWO_EPOCHS, 1.0, NO_LATENCY, False, 0.95) is None


def test_an_accuracy_logged_in_float32_reaches_a_target_it_equals():
    # 108 of 120 documents is 90%, but torchmetrics logs it in float32: 0.8999999761581421
    logged = float(torch.tensor(108 / 120, dtype=torch.float32))
    assert logged < 0.9
    history = [{**p, "val_acc": logged if p["step"] == 10 else p["val_acc"]} for p in TWO_EPOCHS["val_history"]]
    assert time_to_accuracy({**TWO_EPOCHS, "val_history": history}, 1.0, NO_LATENCY, False, 0.9) == pytest.approx(10.0)
    # one document short of it (107 of 120) does not
    short = [{**p, "val_acc": 107 / 120} for p in TWO_EPOCHS["val_history"]]
    assert time_to_accuracy({**TWO_EPOCHS, "val_history": short}, 1.0, NO_LATENCY, False, 0.9) is None


# --------------------------------------------------------------------------- derived configs


@pytest.fixture
def recipes(tmp_path) -> dict[str, Path]:
    """Each method's recipe; one that does not exist yet is stood in for by a copy of the quickstart."""
    out = {}
    for method, rel in compare.METHODS.items():
        out[method] = REPO / rel
        if not out[method].exists():
            out[method] = tmp_path / f"{method}.yaml"
            shutil.copy(REPO / "recipes/quickstart.yaml", out[method])
    return out


def trainer_precision(cfg: dict) -> str:
    return cfg["trainer"]["precision"]


@pytest.mark.parametrize("preset_name", sorted(compare.PRESETS))
def test_derived_config_applies_the_preset_logger_and_callback_rules(recipes, tmp_path, preset_name):
    preset = compare.PRESETS[preset_name]
    for method, path in recipes.items():
        recipe = yaml.safe_load(path.read_text())
        before = json.dumps(recipe, sort_keys=True)
        cfg = yaml.safe_load(yaml.safe_dump(compare.derive_config(recipe, method, preset, tmp_path)))
        assert json.dumps(recipe, sort_keys=True) == before  # the recipe itself is left alone
        assert cfg["seed_everything"] == preset.seed
        data = cfg["data"]["init_args"]
        assert (data["max_length"], data["batch_size"], data["eval_batch_size"], data["seed"]) == (
            preset.max_length,
            preset.batch_size,
            preset.eval_batch_size,
            preset.seed,
        )
        assert "limit_train_samples" in data and data["limit_train_samples"] == preset.limit_train_samples
        backbone = cfg["model"]["init_args"]["backbone"]
        assert (backbone["source"], backbone["dtype"]) == (preset.source, preset.backbone_dtype(method))
        if method in compare.TRAINS_BACKBONE:  # float32 weights, trained in the preset's precision
            assert trainer_precision(cfg) == preset.trained_precision
            assert backbone["dtype"] == ("float32" if preset.trained_precision != "32" else preset.dtype)
        else:  # a frozen backbone forwards in the preset's dtype, with no autocast
            assert trainer_precision(cfg) == "32" and backbone["dtype"] == preset.dtype
        trainer = cfg["trainer"]
        assert trainer["max_epochs"] == preset.epochs(method)
        assert trainer["val_check_interval"] == preset.val_every(method)
        if method in preset.steps_by_method:  # a step budget, validated by steps
            steps = preset.steps_by_method[method]
            assert trainer["max_epochs"] is None and trainer["max_steps"] == steps
            assert trainer["check_val_every_n_epoch"] is None
            assert isinstance(trainer["val_check_interval"], int) and trainer["val_check_interval"] >= 1
            assert steps // trainer["val_check_interval"] >= preset.val_points
        else:
            assert trainer["max_steps"] == -1 and trainer["check_val_every_n_epoch"] == 1
        assert trainer["enable_checkpointing"] is False
        paths = [cb["class_path"] for cb in trainer["callbacks"]]
        assert not any(p.endswith("ModelCheckpoint") for p in paths)
        assert sum(p.endswith(".DeviceMonitor") for p in paths) == 1
        assert trainer["logger"] == {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path), "name": method, "version": 0},
        }
        # CSVLogger.log_dir = save_dir/name/version_<int version>: where DeviceMonitor writes summary.json
        assert compare.summary_path(tmp_path, method) == tmp_path / method / "version_0" / "summary.json"
        strategy = trainer["strategy"]
        if isinstance(strategy, dict) and strategy["class_path"].endswith("ServerAssistedStrategy"):
            # measured synchronously (device and server share the cores); the simulation overlaps them
            assert strategy["init_args"]["pipeline_depth"] == 0


def test_the_mezo_preset_budgets_mezo_in_steps_and_defaults_to_its_own_methods():
    mezo = compare.PRESETS["mezo"]
    assert mezo.methods == ("lora", "mobillm", "mezo") and set(mezo.methods) <= set(compare.METHODS)
    assert mezo.epochs("mezo") is None and mezo.steps("mezo") == 2000 and mezo.val_every("mezo") == 200
    assert mezo.epochs("lora") == 1 and mezo.steps("lora") == -1 and mezo.val_every("lora") == 0.2
    assert compare.PRESETS["small"].methods == compare.DEFAULT_METHODS and "mezo" not in compare.DEFAULT_METHODS
    assert all(set(p.steps_by_method) <= set(compare.METHODS) for p in compare.PRESETS.values())


def test_the_bf16_preset_is_small_in_bf16_with_mixed_precision_for_trained_weights():
    small, bf16 = compare.PRESETS["small"], compare.PRESETS["bf16"]
    assert (bf16.dtype, bf16.trained_precision) == ("bfloat16", "bf16-mixed")
    same = ("seed", "source", "max_length", "batch_size", "eval_batch_size", "limit_train_samples", "max_epochs")
    assert all(getattr(bf16, k) == getattr(small, k) for k in same) and bf16.epochs("pae") == small.epochs("pae")
    assert (bf16.backbone_dtype("lora"), bf16.precision("lora")) == ("float32", "bf16-mixed")
    assert (bf16.backbone_dtype("mobillm"), bf16.precision("mobillm")) == ("bfloat16", "32")
    assert (small.backbone_dtype("lora"), small.precision("lora")) == ("float32", "32")
    # small validates on a fixed subset of 120 documents; bf16 (and mezo) on all 178, as their results were run
    assert (small.limit_eval_samples, bf16.limit_eval_samples, compare.PRESETS["mezo"].limit_eval_samples) == (
        120, None, None)


def test_every_method_of_a_preset_validates_on_the_same_documents(tmp_path):
    for name in ("small", "bf16"):
        preset = compare.PRESETS[name]
        for method in compare.METHODS:
            recipe = yaml.safe_load((compare.REPO / compare.METHODS[method]).read_text())
            recipe["data"]["init_args"]["limit_eval_samples"] = 7  # a recipe's own subset does not survive
            data = compare.derive_config(recipe, method, preset, tmp_path)["data"]["init_args"]
            assert data["limit_eval_samples"] == preset.limit_eval_samples, (name, method)


def test_presets_epochs():
    small, full = compare.PRESETS["small"], compare.PRESETS["full"]
    cached = ("pae", "pae_names", "pae_no_rr", "mobillm_cache")  # later epochs cost the device nothing
    assert {small.epochs(m) for m in cached} == {3} and {small.epochs(m) for m in compare.METHODS
                                                         if m not in cached} == {1}
    assert compare.PRESETS["smoke"].epochs("pae_names") == 2
    assert {full.epochs(m) for m in compare.METHODS} == {3} and compare.PRESETS["smoke"].epochs("pae") == 2
    assert (small.limit_train_samples, full.limit_train_samples, full.max_length) == (800, None, 256)


def test_derived_config_adds_a_device_monitor_when_missing(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())
    recipe["trainer"]["callbacks"] = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
    cfg = compare.derive_config(recipe, "lora", compare.PRESETS["small"], tmp_path)
    assert cfg["trainer"]["callbacks"] == [{"class_path": "lightning_mobillm.callbacks.DeviceMonitor"}]
    del recipe["model"]["init_args"]["backbone"]
    with pytest.raises(ValueError, match="backbone"):
        compare.derive_config(recipe, "lora", compare.PRESETS["small"], tmp_path)


def test_dry_run_writes_configs_and_prints_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", ["compare.py", "--dry-run", "--methods", "mobillm,pae", "--workdir", str(tmp_path)]
    )
    compare.main()
    out = capsys.readouterr().out
    for method in ("mobillm", "pae"):
        config = tmp_path / method / "config.yaml"
        assert config.exists() and f"--config {config}" in out
    assert yaml.safe_load((tmp_path / "pae" / "config.yaml").read_text())["trainer"]["max_epochs"] == 3


# --------------------------------------------------------------------------- the report


def _epoch(epoch, steps, samples, device, server, up, down):
    return {
        "epoch": epoch,
        "steps": steps,
        "samples": samples,
        "device_busy_s": device,
        "server_busy_s": server,
        "bytes_up": up,
        "bytes_down": down,
        "wall_s": device + server,
    }


def _summary(by_epoch, accs, peak_mb, **extra):
    """A SYNTHETIC summary.json: totals summed from ``by_epoch``, two validation points per epoch."""
    steps = sum(e["steps"] for e in by_epoch)
    history, done = [], 0
    for e, (mid, end) in zip(by_epoch, accs):
        history += [
            {
                "elapsed_s": 0.0,
                "step": done + e["steps"] // 2,
                "epoch": e["epoch"],
                "val_acc": mid,
                "val_f1": mid,
            },
            {"elapsed_s": 0.0, "step": done + e["steps"], "epoch": e["epoch"], "val_acc": end, "val_f1": end},
        ]
        done += e["steps"]
    total = {
        k: sum(e[k] for e in by_epoch)
        for k in ("samples", "device_busy_s", "server_busy_s", "bytes_up", "bytes_down", "wall_s")
    }
    return {
        "steps": steps,
        "epochs": len(by_epoch),
        "train_samples": total["samples"],
        "bytes_up": total["bytes_up"],
        "bytes_down": total["bytes_down"],
        "device_peak_rss_mb": peak_mb,
        "device_busy_s": total["device_busy_s"],
        "server_busy_s": total["server_busy_s"],
        "wall_s": total["wall_s"],
        "val_acc": history[-1]["val_acc"],
        "val_f1": history[-1]["val_f1"],
        "val_history": history,
        "by_epoch": by_epoch,
        **extra,
    }


# SYNTHETIC test inputs (made-up numbers): 100 steps x 8 samples per epoch.
SUMMARIES = {
    "full_ft": {"error": "exit code 1; synthetic failure"},
    "lora": _summary([_epoch(0, 100, 800, 400.0, 0.0, 0, 0)], [(0.88, 0.925)], 4000.0),
    "split": _summary([_epoch(0, 100, 800, 200.0, 100.0, 4.8e8, 4.8e8)], [(0.8, 0.9)], 2000.0),
    "mobillm": _summary([_epoch(0, 100, 800, 100.0, 40.0, 1.6e9, 8e4)], [(0.85, 0.92)], 1300.0, overlap=True),
    "pae": _summary(
        [
            _epoch(0, 100, 800, 100.0, 10.0, 1.4e7, 8e4),
            _epoch(1, 100, 800, 0.1, 10.0, 2e6, 8e4),
            _epoch(2, 100, 800, 0.1, 10.0, 2e6, 8e4),
        ],
        [(0.7, 0.8), (0.85, 0.88), (0.89, 0.9)],
        1350.0,
    ),
}
MACHINE = {
    "cpu_count": 2,
    "cpu_model": "synthetic",
    "torch": "0",
    "cpu_gflops": {"float32": 100.0, "bfloat16": 150.0},
}


@pytest.fixture
def report():
    return compare.build_report("small", SUMMARIES, MACHINE, 0.9, process_s={"lora": 60.0})


def test_report_schema_and_rows(report):
    assert set(report) == {"preset", "settings", "machine", "rows", "time_to_accuracy", "curves", "targets"}
    s = report["settings"]
    assert s["epochs_by_method"] == {"full_ft": 1, "lora": 1, "split": 1, "mobillm": 1, "pae": 3}
    assert (s["max_length"], s["batch_size"], s["limit_train_samples"], s["target_acc"]) == (128, 8, 800, 0.9)
    assert s["profiles"]["this_cpu"]["factor"] == 1.0
    assert s["profiles"]["phone"]["factor"] == pytest.approx(PROFILES["phone"].achievable_gflops / 100.0)
    rows = report["rows"]
    assert rows["full_ft"] == {"error": "exit code 1; synthetic failure"}
    lora, mob, pae = rows["lora"], rows["mobillm"], rows["pae"]
    assert lora["process_wall_s"] == 60.0
    assert lora["device_busy_s_per_sample"] == pytest.approx(0.5)
    assert mob["bytes_up_per_sample"] == pytest.approx(2e6)
    assert mob["bytes_down_per_sample"] == pytest.approx(100)
    assert pae["device_busy_s_per_sample"] == pytest.approx(100.2 / 2400)
    overlap = {m: r["overlap"] for m, r in rows.items() if "error" not in r}
    assert overlap == {"lora": False, "split": False, "mobillm": True, "pae": True}
    assert lora["ratios_vs_mobillm"] == pytest.approx(
        {
            "device_peak_rss_mb": 4000 / 1300,
            "device_busy_s_per_sample": 4.0,
            "bytes_up_per_sample": 0.0,
            "bytes_total_per_sample": 0.0,
            "val_acc_diff_points": 0.5,
        }
    )
    assert mob["ratios_vs_mobillm"]["device_peak_rss_mb"] == 1.0
    assert "ratios_vs_mobillm" not in rows["full_ft"]
    json.loads(json.dumps(report))


def test_targets_met_not_met_and_not_measured(report):
    t = report["targets"]
    assert t["mobillm_peak_memory_vs_full_ft"]["measured"] is False
    assert t["mobillm_peak_memory_vs_full_ft"]["met"] is False
    assert "full_ft" in t["mobillm_peak_memory_vs_full_ft"]["not_measured"]
    assert t["mobillm_peak_memory_vs_lora"]["value"] == pytest.approx(1300 / 4000)
    assert t["mobillm_peak_memory_vs_lora"]["met"] is True  # 0.325 <= 1 / 2.2
    assert t["mobillm_device_busy_vs_lora"]["value"] == pytest.approx(0.25)
    assert t["mobillm_device_busy_vs_lora"]["met"] is True
    assert t["pae_device_busy_vs_lora"]["value"] == pytest.approx(100.2 / 2400 / 0.5)
    assert t["pae_device_busy_vs_lora"]["met"] is True  # 0.0835 <= 0.13
    assert t["split_bytes_vs_pae_bytes_up"]["value"] == pytest.approx(1.2e6 / (1.8e7 / 2400))
    assert t["split_bytes_vs_pae_bytes_up"]["met"] is True  # 160 >= 50
    assert t["mobillm_val_acc_gap_vs_lora_points"]["value"] == pytest.approx(0.5)
    assert t["mobillm_val_acc_gap_vs_lora_points"]["met"] is True
    assert t["pae_val_acc_gap_vs_lora_points"]["value"] == pytest.approx(2.5)
    assert t["pae_val_acc_gap_vs_lora_points"]["met"] is False
    better = {**report["rows"], "mobillm": {**report["rows"]["mobillm"], "val_acc": 0.99}}
    gap = compare.check_targets(better)["mobillm_val_acc_gap_vs_lora_points"]
    assert gap["value"] == pytest.approx(-6.5) and gap["met"] is True  # better than LoRA counts as within
    assert all(v["measured"] for k, v in t.items() if k not in ("mobillm_peak_memory_vs_full_ft", "methods_minutes"))
    # the preset's run time: measured when every default method ran and has its process time
    assert "full_ft" in t["methods_minutes"]["not_measured"]
    timed = {m: {**report["rows"]["lora"], "process_wall_s": 300.0} for m in compare.DEFAULT_METHODS}
    minutes = compare.check_targets(timed)["methods_minutes"]
    assert minutes["value"] == pytest.approx(300 * len(compare.DEFAULT_METHODS) / 60) and minutes["met"] is True
    timed["lst"] = {**timed["lst"], "process_wall_s": 2000.0}
    assert compare.check_targets(timed)["methods_minutes"]["met"] is False
    del timed["lst"]["process_wall_s"]
    assert compare.check_targets(timed)["methods_minutes"]["measured"] is False


def test_time_to_accuracy_block(report):
    tta = report["time_to_accuracy"]
    assert set(tta) == set(PROFILES) and all(set(v) == {"10mbit", "50mbit", "200mbit"} for v in tta.values())
    cpu = tta["this_cpu"]["50mbit"]
    assert set(cpu) == {"lora", "split", "mobillm", "pae"}  # a failed method has no time
    assert cpu["lora"] == pytest.approx(400.0)  # on device: 0.925 >= 0.9 only at the end of its epoch
    # mobillm overlapped, link-bound: 1.60008e9 B at 50 Mbit/s = 256.0128 s + 100 x 20 ms = 258.0128 s
    assert cpu["mobillm"] == pytest.approx(258.0128 + (100 + 40) / 100)
    assert tta["phone"]["50mbit"]["lora"] == pytest.approx(
        400.0 * 100.0 / PROFILES["phone"].achievable_gflops
    )
    curve = report["curves"]["this_cpu"]["50mbit"]["lora"]
    assert [x for point in curve for x in point] == pytest.approx([200.0, 0.88, 400.0, 0.925])


def test_tables_and_atomic_json(report, tmp_path):
    text = compare.format_tables(report)
    for needle in ("| mobillm |", "failed: exit code 1", "not measured", "| this_cpu | 50mbit |"):
        assert needle in text
    out = tmp_path / "results" / "compare.json"
    compare.write_json(out, report)
    assert json.loads(out.read_text())["targets"] == report["targets"]
    assert [p.name for p in out.parent.iterdir()] == ["compare.json"]


def test_plots_are_written(report, tmp_path):
    paths = plot.plot(json.loads(json.dumps(report)), tmp_path / "img", link="50mbit")
    assert [p.name for p in paths] == [
        "compare_memory.png",
        "compare_bytes.png",
        "compare_time_to_accuracy.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(ValueError, match="no link"):
        plot.plot(report, tmp_path / "img", link="nope")
    bf16 = {**json.loads(json.dumps(report)), "preset": "bf16"}  # another preset does not overwrite small's
    assert plot.plot(bf16, tmp_path / "img")[0].name == "compare_bf16_memory.png"


def test_a_seed_changes_the_training_seed_not_the_split(tmp_path):
    recipe = yaml.safe_load((compare.REPO / compare.METHODS["mobillm"]).read_text())
    preset = replace(compare.PRESETS["small"], train_seed=7)
    cfg = compare.derive_config(recipe, "mobillm", preset, tmp_path)
    assert cfg["seed_everything"] == 7 and cfg["data"]["init_args"]["seed"] == compare.PRESETS["small"].seed
    # the report of a seeded preset is still named after its preset, and records the seed
    seeded = compare.build_report(preset, SUMMARIES, MACHINE, 0.9)
    assert seeded["settings"]["preset"] == "small" and seeded["settings"]["train_seed"] == 7


def test_seed_means_average_runs_that_differ_only_in_their_seed(report):
    def run(seed, accs):
        r = json.loads(json.dumps(report))
        r["settings"]["train_seed"] = seed
        for m, acc in accs.items():
            r["rows"][m]["val_acc"] = acc
        return r

    runs = [run(0, {"lora": 0.90, "mobillm": 0.90, "pae": 0.87}), run(1, {"lora": 0.92, "mobillm": 0.91, "pae": 0.90}),
            run(2, {"lora": 0.91, "mobillm": 0.91, "pae": 0.88})]
    means = compare.seed_means(runs)
    assert means["seeds"] == [0, 1, 2]
    lora, mob, pae = (means["methods"][m] for m in ("lora", "mobillm", "pae"))
    assert lora["mean"] == pytest.approx(0.91) and lora["std"] == pytest.approx(0.01)
    assert mob["points_vs_lora"] == pytest.approx(-1.0 / 3) and mob["within_1_point_of_lora"] is True
    assert pae["points_vs_lora"] == pytest.approx(-8.0 / 3) and pae["within_1_point_of_lora"] is False
    assert "full_ft" not in means["methods"]  # it failed in every run
    runs[1]["settings"]["profiles"]["phone"]["factor"] *= 1.5  # measured per run: not a difference
    runs[2]["settings"]["merged_from"] = [{"file": "seed2.json", "preset": "small", "methods": ["lora"]}]  # nor this
    runs[0]["settings"]["train_seed"] = None  # run without --seed: the preset's seed
    assert compare.seed_means(runs)["seeds"] == [compare.PRESETS["small"].seed, 1, 2]
    other = run(3, {"lora": 0.9})
    other["settings"]["max_length"] = 256
    with pytest.raises(ValueError, match="max_length"):
        compare.seed_means([runs[0], other])


def test_pae_no_rr_is_pae_with_randomized_response_off_and_nothing_else(tmp_path):
    recipe = yaml.safe_load((compare.REPO / compare.METHODS["pae"]).read_text())
    assert recipe["model"]["init_args"]["transform_rr_epsilon"] == 4.0  # the default it is measured against
    pae, off = (compare.derive_config(recipe, m, compare.PRESETS["bf16"], tmp_path) for m in ("pae", "pae_no_rr"))
    assert off["model"]["init_args"].pop("transform_rr_epsilon") is None
    pae["model"]["init_args"].pop("transform_rr_epsilon")
    assert compare.base_method("pae_no_rr") == "pae" and "pae_no_rr" in compare.OVERLAPPED
    # the rest is the same but for the run's name (its logger and folder)
    renamed = json.dumps(pae, sort_keys=True).replace('"pae"', '"pae_no_rr"').replace("/pae/", "/pae_no_rr/")
    assert renamed == json.dumps(off, sort_keys=True)


def test_the_harder_task_preset_replaces_the_data_and_pae_names_keeps_the_class_names(tmp_path):
    preset = compare.PRESETS["multiemo"]
    assert preset.dataset.startswith("bigbench:") and preset.target_acc < 0.9 and preset.zero_shot
    assert preset.epochs("pae_names") == preset.epochs("pae") == 3  # the same PAE, other words, same budget
    for method in preset.methods:
        recipe = yaml.safe_load((compare.REPO / compare.METHODS[method]).read_text())
        data = compare.derive_config(recipe, method, preset, tmp_path)["data"]["init_args"]
        assert (data["dataset"], data["prompt"], data["limit_eval_samples"]) == (
            preset.dataset, preset.prompt, preset.limit_eval_samples), method
        expected = None if method == "pae_names" else preset.verbalizers
        assert data["verbalizers"] == expected, method
    # a BBC preset leaves the recipes' data alone
    recipe = yaml.safe_load((compare.REPO / compare.METHODS["pae"]).read_text())
    data = compare.derive_config(recipe, "pae", compare.PRESETS["small"], tmp_path)["data"]["init_args"]
    assert data["dataset"] == "bbc_news" and "verbalizers" not in data


def test_zero_shot_rows_come_first_in_the_table(report):
    with_zero_shot = {**report, "zero_shot": {"verbalizers": {"words": ["mixed", "bad"], "val_acc": 0.41,
                                                              "val_samples": 10}, "seconds": 3.0}}
    table = compare.format_tables(with_zero_shot)
    first_row = table.splitlines()[2]
    assert first_row.startswith("| zero-shot (verbalizers: mixed, bad) | 0 |") and "| 41.0 |" in first_row


def test_merged_rows_rebuild_the_same_report_and_refuse_another_preset(report):
    earlier = json.loads(json.dumps(report))  # as read back from its JSON
    rows = compare.merged_rows(earlier, "small", ["pae"])
    assert "pae" not in rows and set(rows) == set(SUMMARIES) - {"pae"}
    rebuilt = compare.build_report("small", {**rows, "pae": SUMMARIES["pae"]}, MACHINE, 0.9,
                                   process_s={"lora": 60.0})
    for m in SUMMARIES:
        assert rebuilt["rows"][m] == earlier["rows"][m], m
    assert rebuilt["time_to_accuracy"] == earlier["time_to_accuracy"]
    assert rebuilt["targets"] == earlier["targets"]
    assert compare.order_methods(["pae", "x", "lora"], ["lora", "mobillm", "pae"]) == ["lora", "pae", "x"]
    with pytest.raises(SystemExit, match="bf16"):
        compare.merged_rows(earlier, "bf16", [])


def test_another_presets_rows_merge_only_where_the_method_ran_with_the_same_config(report):
    small = json.loads(json.dumps(report))
    small["rows"]["mezo"] = small["rows"]["lora"]  # a row the mezo preset would run differently (steps)
    mezo = compare.PRESETS["mezo"]
    # small validates on 120 documents today, mezo on all 178: none of today's small rows stands for mezo's ...
    with pytest.raises(SystemExit, match="'mezo'"):
        compare.merged_rows(small, "mezo", ["mezo"])
    small["settings"]["limit_eval_samples"] = None  # ... a small report of all 178 (as small ran before) does
    # mezo is small with MeZO's step budget: small's LoRA and MobiLLM ran exactly as they would there; PAE
    # ran 3 epochs in small and 1 in mezo, and small's full_ft is not one of mezo's methods
    rows = compare.merged_rows(small, "mezo", ["mezo"])
    assert set(rows) == {"lora", "mobillm"} and rows["lora"] == small["rows"]["lora"]
    # a method run now is not taken from the report
    assert set(compare.merged_rows(small, "mezo", ["mezo", "lora"])) == {"mobillm"}
    # a seed is part of the run: small at seed 0 does not stand for mezo at seed 1, nor for small at seed 1
    with pytest.raises(SystemExit, match="'mezo'"):
        compare.merged_rows(small, replace(mezo, train_seed=1), [])
    with pytest.raises(SystemExit, match="train_seed"):
        compare.merged_rows(small, replace(compare.PRESETS["small"], train_seed=1), ["pae"])
    seeded = {**small, "settings": {**small["settings"], "train_seed": 1}}
    assert set(compare.merged_rows(seeded, replace(mezo, train_seed=1), [])) == {"lora", "mobillm"}
    # what a report recorded counts, not what its preset's name means today: a small run of 256 tokens
    # stands for nothing here, and is refused as a small report
    longer = {**small, "settings": {**small["settings"], "max_length": 256}}
    with pytest.raises(SystemExit, match="'mezo'"):
        compare.merged_rows(longer, "mezo", [])
    with pytest.raises(SystemExit, match="max_length"):
        compare.merged_rows(longer, "small", [])
    # a failed row of another preset is not taken
    failed = json.loads(json.dumps(small))
    failed["rows"]["lora"] = {"error": "exit code 1"}
    assert set(compare.merged_rows(failed, "mezo", [])) == {"mobillm"}
    # bf16 differs from mezo in every method's dtype: nothing to take
    bf16 = {**small, "preset": "bf16", "settings": {**small["settings"], "dtype": "bfloat16",
                                                    "trained_precision": "bf16-mixed"}}
    with pytest.raises(SystemExit, match="'bf16'"):
        compare.merged_rows(bf16, "mezo", [])
    # two reports giving the same method are refused, naming both; disjoint ones combine
    only_mezo = json.loads(json.dumps(compare.build_report("mezo", {"mezo": SUMMARIES["lora"]}, MACHINE, 0.9)))
    rows, origin = compare.merged_reports([("small.json", small), ("mezo.json", only_mezo)], mezo, [])
    assert set(rows) == {"lora", "mobillm", "mezo"} and origin["mezo"] == "mezo.json"
    with pytest.raises(SystemExit, match="lora is in both small.json and again.json"):
        compare.merged_reports([("small.json", small), ("again.json", small)], mezo, [])


def test_mobillm_with_the_activation_cache_is_the_quickstart_plus_the_callback_for_three_epochs(tmp_path, monkeypatch):
    recipe = yaml.safe_load((compare.REPO / compare.METHODS["mobillm_cache"]).read_text())
    small = compare.PRESETS["small"]
    cfg = compare.derive_config(recipe, "mobillm_cache", small, tmp_path)
    plain = compare.derive_config(recipe, "mobillm", small, tmp_path)
    paths = [compare._class_path(cb) for cb in cfg["trainer"]["callbacks"]]
    assert paths.count("lightning_mobillm.callbacks.ActivationCache") == 1
    assert paths[:-1] == [compare._class_path(cb) for cb in plain["trainer"]["callbacks"]]
    assert "lightning_mobillm.callbacks.ActivationCache" not in map(compare._class_path, recipe["trainer"]["callbacks"])
    assert cfg["trainer"]["max_epochs"] == small.epochs("pae") == 3 and plain["trainer"]["max_epochs"] == 1
    assert compare.base_method("mobillm_cache") == "mobillm" and "mobillm_cache" in compare.OVERLAPPED
    # an append needs a list there
    monkeypatch.setitem(compare.OVERRIDES, "mobillm_cache", {"data.init_args+": [1]})
    with pytest.raises(ValueError, match="no list at data.init_args to append to"):
        compare.derive_config(recipe, "mobillm_cache", small, tmp_path)
