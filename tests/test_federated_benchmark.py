"""``benchmarks/federated.py``'s pure parts on synthetic uploads (no backbone): every method runner gives the JSON's
fields with sane values, the time to target is null when the target is not reached, and a method that is not
implemented is an honest "not run" entry. Step costs are fixed, so nothing here depends on timing."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_mobillm.fed.clock import FedDeviceProfile
from lightning_mobillm.privacy import make_transform, prediction_difference
from lightning_mobillm.protocol import pack_acts
from lightning_mobillm.simulate import DeviceProfile, Link

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_SPEC = importlib.util.spec_from_file_location("federated_benchmark",
                                               Path(__file__).resolve().parents[1] / "benchmarks" / "federated.py")
fb = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = fb  # dataclasses look their module up there
_SPEC.loader.exec_module(fb)

A, B = "tiny-a/llama/d12-L4", "tiny-b/qwen2/d16-L2"
WIDTH = {A: 12, B: 16}
K, CLASSES, OUT = 2, 3, 6


def _means(key: str) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return torch.randn(CLASSES, K, WIDTH[key], generator=torch.Generator().manual_seed(seed)) * 2.0


def _samples(key: str, n: int, seed: int, classes: list[int] | None = None):
    """Separable taps around a per-type mean of each class; a weak, uninformative backbone prior."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(classes if classes is not None else list(range(CLASSES)))
    labels = pool[torch.randint(0, len(pool), (n,), generator=g)]
    acts = _means(key)[labels] + torch.randn(n, K, WIDTH[key], generator=g)
    return acts, labels, torch.randn(n, CLASSES, generator=g) * 0.1


def _device(i: int, key: str, n: int, speed: float) -> fb.SimDevice:
    transform = make_transform("embed", CLASSES, key=f"device-key-{i}", out_dim=OUT)
    profile = FedDeviceProfile(DeviceProfile(f"p{speed}", speed_vs_this_cpu=speed), Link("l", 100.0))
    dev = fb.SimDevice(f"device-{i}", key, profile, transform, size=n, busy_s=0.5 * n / 10)
    if n:
        acts, labels, logits = _samples(key, n, seed=100 + i, classes=[i % CLASSES, (i + 1) % CLASSES])
        parts = pack_acts(acts, torch.ones(n, dtype=torch.int64), "int8")
        dev.labels, dev.logits = labels.tolist(), logits
        dev.upload = fb.Upload(device=dev.id, backbone_type=key, keys=[f"d{i}-{j}" for j in range(n)],
                               acts={k: v for k, v in parts.items() if k != "lengths"}, codec="int8",
                               targets=transform.forward(prediction_difference(labels, logits)))
    return dev


def _federation(target_acc: float = 0.5, **settings) -> fb.Federation:
    devices = [_device(0, A, 24, 1.0), _device(1, B, 24, 0.5), _device(2, A, 16, 0.25),
               _device(3, B, 0, 1.0)]  # an empty device: no upload, not evaluated
    assert fb.stamp_arrivals(devices, seed=0) == []  # arrivals: busy / speed + the upload's transfer
    evals = {}
    for key in (A, B):
        acts, labels, logits = _samples(key, 30, seed=7)
        evals[key] = fb.EvalSet(acts, logits, labels)
    knobs = dict(batch_size=8, lr=1e-2, arrival_epochs=1, final_replay_epochs=4, evals=4, sync_rounds=3,
                 single_epochs=3, centralized_epochs=4, target_acc=target_acc, seed=0, codec="int8")
    knobs.update(settings)
    return fb.Federation(devices, dict(WIDTH), K, OUT, evals, {A: 0.01, B: 0.02}, fb.Settings(**knobs))


RAN = ("fed_mobillm", "no_replay", "fed_mobillm_sync", "single", "centralized_pae")


@pytest.fixture(scope="module")
def results() -> dict:
    torch.manual_seed(0)
    return fb.run_methods(_federation(), fb.METHODS, fb.PRESETS["smoke"])


def test_every_method_has_the_json_fields(results):
    assert list(results) == list(fb.METHODS)
    for m, entry in results.items():
        assert set(fb.METHOD_FIELDS) <= set(entry), m
        assert entry["wall_s"] >= 0
    json.dumps(results)  # JSON-able as written


def test_the_methods_that_ran_give_sane_values(results):
    for m in RAN:
        e = results[m]
        assert e["status"] == "ran", (m, e.get("reason"))
        assert 0.0 <= e["val_acc_min"] <= e["val_acc"] <= e["val_acc_max"] <= 1.0, m
        assert e["devices_evaluated"] == 3 and e["device_compute_s_per_device"] > 0, m
        assert e["server_busy_s"] >= 0 and e["curve"], m
    # forward once, upload once: device compute = measured busy / speed, averaged over the devices with data
    assert results["fed_mobillm"]["device_compute_s_per_device"] == pytest.approx((1.2 + 1.2 / 0.5 + 0.8 / 0.25) / 3)
    assert results["fed_mobillm"]["bytes_up_per_device"] > 0 and results["fed_mobillm"]["bytes_down_per_device"] > 0
    assert results["single"]["bytes_up_per_device"] == 0 == results["single"]["bytes_down_per_device"]
    assert results["single"]["device_compute_s_per_device"] > results["fed_mobillm"]["device_compute_s_per_device"]
    assert results["fed_mobillm_sync"]["rounds"] == 3 and results["fed_mobillm"]["rounds"] is None
    steps = results["fed_mobillm"]["steps"]
    assert steps["replay_steps"] > 0 and results["no_replay"]["steps"]["replay_steps"] == 0
    # a separable task (each device holds two of the three classes): the shared model beats the noise prior
    zero_shot = results["fed_mobillm"]["zero_shot_val_acc_by_type"]
    assert results["fed_mobillm"]["val_acc"] > max(zero_shot.values()) + 0.1
    ts = [row["t"] for row in results["fed_mobillm"]["curve"]]
    last = 0.8 / 0.25  # device 2's forward on the clock; its upload lands a little later
    assert ts == sorted(ts) and ts[-1] > last
    # the sync variant waits for the slowest device before its first step; the async one starts at the first
    assert results["fed_mobillm_sync"]["curve"][0]["t"] > last
    assert results["fed_mobillm"]["steps"]["arrival_steps"] == 3 + 3 + 2  # optimizer steps of 8 samples


def test_the_timeline_counts_arrivals_and_each_class_share_of_training(results):
    tl = results["fed_mobillm"]["timeline"]
    bins = len(tl["arrivals"])
    assert len(tl["bin_edges_s"]) == bins + 1 and tl["bin_edges_s"][-1] == pytest.approx(
        results["fed_mobillm"]["end_s"])
    assert sum(tl["arrivals"]) == 3 and sum(tl["arrived_samples"]) == 24 + 24 + 16
    steps = results["fed_mobillm"]["steps"]
    assert sum(tl["sample_steps"]) >= steps["steps"]  # every step trained on at least one sample
    for share, n in zip(tl["class_share"], tl["sample_steps"], strict=True):
        assert sum(share) == pytest.approx(1.0) if n else sum(share) == 0
    # the first device to land holds classes 0 and 1 only: until the second lands, class 2 is never trained
    first = next(i for i, n in enumerate(tl["sample_steps"]) if n)
    assert tl["class_share"][first][2] == 0.0
    assert sum(tl["pooled_class_share"]) == pytest.approx(1.0)


def test_time_to_target_is_reached_and_placed_on_the_curve(results):
    e = results["fed_mobillm"]
    assert e["sim_time_to_target_s"] is not None
    first = next(r for r in e["curve"] if r["val_acc"] >= 0.5)
    assert e["sim_time_to_target_s"] == first["t"]
    assert results["centralized_pae"]["sim_time_to_target_s"] is None  # no clock: said in its note
    assert "note" in results["centralized_pae"]


def test_time_to_target_is_null_when_the_target_is_not_reached():
    fed = _federation(target_acc=1.01)
    for runner in (fb.run_fed_mobillm, fb.run_fed_sync, fb.run_single):
        entry = runner(fed)
        assert entry["status"] == "ran" and entry["sim_time_to_target_s"] is None
        assert entry["best_val_acc"] < 1.01
    assert fb.time_to_target([{"t": 1.0, "val_acc": 0.2}, {"t": 2.0, "val_acc": None}], 0.5) is None
    assert fb.time_to_target([{"t": 1.0, "val_acc": 0.2}, {"t": 2.0, "val_acc": 0.6}], 0.5) == 2.0


def test_fedavg_lora_without_real_backbones_is_an_honest_todo(results):
    e = results["fedavg_lora"]
    assert e["status"] == "not run" and "TODO" in e["reason"]
    assert all(e[f] is None for f in fb.METHOD_FIELDS)


def test_a_device_without_a_download_counts_with_its_zero_shot_accuracy():
    fed = _federation()
    out = fb.evaluate_devices(fed, lambda dev: None)
    assert out["devices_with_download"] == 0 and out["devices_evaluated"] == 3
    expected = {A: fed.eval_sets[A].zero_shot_acc, B: fed.eval_sets[B].zero_shot_acc}
    assert out["val_acc_by_type"] == pytest.approx(expected)
    assert out["val_acc"] == pytest.approx((2 * expected[A] + expected[B]) / 3)


def test_helpers_deal_types_evenly_and_measure_positive_step_costs():
    dealt = fb.deal_types(7, ["a", "b"], seed=3)
    assert sorted(dealt) == ["a"] * 4 + ["b"] * 3 and dealt == fb.deal_types(7, ["a", "b"], seed=3)
    costs = fb.measure_step_costs(WIDTH, K, OUT, batch_size=4, steps=2)
    assert set(costs) == {A, B} and all(c > 0 and math.isfinite(c) for c in costs.values())
    assert set(fb.PRESETS) == {"smoke", "small", "medium", "full"}


def test_fedavg_batches_pad_right_and_keep_the_order():
    from lightning_mobillm.fed.lora import padded_batches

    batches = list(padded_batches([[1, 2, 3], [4], [5, 6]], [0, 2, 1], 2, pad_id=9, order=[2, 0, 1]))
    assert len(batches) == 2
    x, mask, y = batches[0]
    assert x.tolist() == [[5, 6, 9], [1, 2, 3]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]] and y.tolist() == [1, 0]
    assert batches[1][0].tolist() == [[4]] and batches[1][2].tolist() == [2]


def test_the_fedavg_lora_device_model_trains_travels_in_float16_and_loads_strictly(tiny_llama_dir):
    """FedAvg-LoRA's device model (shared by this benchmark and the Flower cross-check): only adapters and head
    travel, rounded to float16; local training moves them; a state of another shape or name is refused."""
    from lightning_mobillm.fed.lora import LoraClassifier

    lora = LoraClassifier(str(tiny_llama_dir), 3, r=2, seed=0)
    names = set(lora.params)
    assert names and all(n.startswith(("lora.", "head.")) for n in names)
    assert any("lora_A" in n for n in names) and not any("embed" in n for n in names)
    before = lora.state()
    assert all(torch.equal(t, t.half().float()) for t in before.values())  # float16-representable
    assert lora.nbytes == sum(t.numel() * 2 for t in before.values())
    ids, ys = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]] * 4, [0, 1, 2] * 4
    busy = lora.train_local(ids, ys, epochs=2, batch_size=4, lr=1e-2, order_seed="t")
    assert busy > 0 and any(not torch.equal(before[n], t) for n, t in lora.state().items())
    assert 0.0 <= lora.evaluate(ids, ys) <= 1.0
    lora.load_state(before)
    assert all(torch.equal(before[n], t) for n, t in lora.state().items())
    with pytest.raises(ValueError, match="missing"):
        lora.load_state({n: t for n, t in before.items() if not n.startswith("head.")})
    bad = dict(before)
    first = next(iter(bad))
    bad[first] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        lora.load_state(bad)


def _ran(**figures) -> dict:
    return {"status": "ran", "curve": [{"t": 1.0, "val_acc": 0.5}, {"t": 90.0, "val_acc": 0.6}], **figures}


def test_targets_name_each_threshold_and_say_when_fedavg_never_reached_it():
    fed = _ran(val_acc=0.86, device_compute_s_per_device=2.0, bytes_up_per_device=1e5, bytes_down_per_device=9e5,
               sim_time_to_target_s=10.0)
    methods = {"fed_mobillm": fed, "centralized_pae": _ran(val_acc=0.87), "single": _ran(val_acc=0.80),
               "fedavg_lora": _ran(val_acc=0.7, device_compute_s_per_device=100.0, bytes_up_per_device=1e7,
                                   bytes_down_per_device=1e7, sim_time_to_target_s=None, rounds=20,
                                   best_val_acc=0.7)}
    t = fb.targets(methods, 0.85)
    assert t["accuracy_within_2_points_of_centralized_pae"]["met"] is True
    assert t["shared_above_single_by_3_points"]["value"] == pytest.approx(0.06)
    assert t["device_compute_95_percent_below_fedavg_lora"]["value"] == pytest.approx(0.98)
    assert t["bytes_90_percent_below_fedavg_lora"]["value"] == pytest.approx(0.95)
    time = t["time_to_target_5x_faster_than_fedavg_lora"]
    assert time["bound"] == "at least" and time["value"] == pytest.approx(9.0) and "not reach" in time["reason"]
    methods["fedavg_lora"]["sim_time_to_target_s"] = 40.0
    assert fb.targets(methods, 0.85)["time_to_target_5x_faster_than_fedavg_lora"] | {} == {
        "threshold": 5.0, "target_acc": 0.85, "value": 4.0, "bound": "exact", "met": False}
    methods["centralized_pae"] = {"status": "not run"}
    assert "accuracy_within_2_points_of_centralized_pae" not in fb.targets(methods, 0.85)


def test_the_federated_figures_are_written(results, tmp_path):
    spec = importlib.util.spec_from_file_location("plot", Path(__file__).resolve().parents[1] / "benchmarks" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    report = {"preset": "smoke", "devices": 4, "partition": {"alpha": 0.5}, "target_acc": 0.5,
              "class_names": ["a", "b", "c"], "methods": json.loads(json.dumps(results))}
    paths = plot.plot(report, tmp_path / "img")
    assert [p.name for p in paths] == ["federated_smoke_accuracy.png", "federated_smoke_arrivals.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_target_spaces_trade_accuracy_for_label_privacy():
    """Same uploads, three target spaces: the plain residual gives its labels away to argmax; a key per device
    leaves the server no better than far less; each space still learns."""
    torch.manual_seed(0)
    fed = _federation(rr_epsilon=None)
    rows = fb.run_target_spaces(fed)
    assert list(rows) == ["device", "federation", "plain"]
    assert rows["plain"]["out_dim"] == CLASSES and rows["device"]["out_dim"] == OUT
    assert rows["plain"]["label_attacks"]["attack_acc"] == 1.0  # argmax(onehot(y) - p) = y
    assert rows["plain"]["label_attacks"]["attacked"] == "all devices pooled"
    assert rows["device"]["label_attacks"]["groups"] == 3  # one group per device with data
    for space, row in rows.items():
        la = row["label_attacks"]
        assert la["samples"] == 24 + 24 + 16 and la["label_advantage"] == pytest.approx(
            la["attack_acc"] - la["reference_acc"])
        assert row["val_acc"] > max(fed.eval_sets[k].zero_shot_acc for k in fed.eval_sets) + 0.1, space
    assert rows["device"]["label_attacks"]["attack_acc"] < 1.0
