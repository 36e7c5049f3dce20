"""Fed MobiLLM's shared-model trainer: accepting and refusing uploads, training on arrivals, replaying the cache,
statistics, state round trips, learning a separable task from three backbone types, the virtual-clock driver,
and the issue's equivalence check (one synchronous round, no replay = centralised training)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math

import pytest
import torch

from lightning_mobillm.engine import TrainingEngine
from lightning_mobillm.fed.model import FedSideModule
from lightning_mobillm.fed.trainer import FedTrainer, UploadRefused, simulate_async
from lightning_mobillm.fed.upload import Upload
from lightning_mobillm.privacy import make_transform, prediction_difference
from lightning_mobillm.protocol import pack_acts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (see conftest)

A, B, C = "tiny-a/llama/d12-L4", "tiny-b/qwen2/d16-L6", "tiny-c/gemma3_text/d20-L3"
WIDTH = {A: 12, B: 16, C: 20}
K, CLASSES, EMBED = 2, 3, 6


def _out_dim(space: str) -> int:
    return CLASSES if space == "plain" else EMBED


def _transform(space: str, device: str):
    """The device's target transform: its own key (``device``), one federation key, or none (``plain``)."""
    if space == "plain":
        return make_transform("identity", CLASSES)
    return make_transform("embed", CLASSES, key=f"key-{device if space == 'device' else 'federation'}",
                          out_dim=EMBED)


def _samples(backbone_type: str, n: int, seed: int):
    """A separable task: taps around a fixed per-type mean of each class; the backbone's prior is weak noise."""
    type_seed = int.from_bytes(hashlib.sha256(backbone_type.encode()).digest()[:4], "little")
    means = torch.randn(CLASSES, K, WIDTH[backbone_type], generator=torch.Generator().manual_seed(type_seed)) * 1.5
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    acts = means[labels] + torch.randn(n, K, WIDTH[backbone_type], generator=g)
    logits = torch.randn(n, CLASSES, generator=g) * 0.5
    return acts, labels, logits


def make_upload(device: str, backbone_type: str, n: int = 24, seed: int = 0, *, space: str = "device",
                codec: str = "int8", arrival_s: float = 0.0, acts: torch.Tensor | None = None) -> Upload:
    """A device's upload as a device worker makes it: taps packed with a codec, ``T_d(onehot(y) - softmax(z_b))``."""
    sample_acts, labels, logits = _samples(backbone_type, n, seed)
    acts = sample_acts if acts is None else acts
    parts = pack_acts(acts, torch.ones(acts.shape[0], dtype=torch.int64), codec)
    targets = _transform(space, device).forward(prediction_difference(labels, logits))
    return Upload(device=device, backbone_type=backbone_type, keys=[f"s{seed}-{i}" for i in range(acts.shape[0])],
                  acts={k: v for k, v in parts.items() if k != "lengths"}, codec=codec, targets=targets,
                  target_space=space, arrival_s=arrival_s)


def make_trainer(space: str = "device", **kwargs) -> FedTrainer:
    module = FedSideModule({A: 12, B: 16}, K, _out_dim(space), target_space=space, reduction=4,
                           lr=kwargs.pop("lr", 1e-2))
    return FedTrainer(module, batch_size=kwargs.pop("batch_size", 8), **kwargs)


def _snapshot(trainer: FedTrainer):
    return (trainer.statistics(), trainer.num_samples, list(trainer.module.components),
            {k: v.clone() for k, v in trainer.module.state_dict().items()},
            [len(g["params"]) for g in trainer.engine.optimizer.param_groups], trainer.engine.step)


def _same(a, b) -> bool:
    return a[:3] == b[:3] and a[4:] == b[4:] and a[3].keys() == b[3].keys() and all(
        torch.equal(a[3][k], b[3][k]) for k in a[3])


# ---------------------------------------------------------------------------------------------- accepting
def test_accept_caches_decoded_and_new_devices_and_types_join_the_optimizer():
    trainer = make_trainer()
    groups = len(trainer.engine.optimizer.param_groups)
    assert trainer.accept(make_upload("d0", A, 10)) == 10
    assert [g["name"] for g in trainer.engine.optimizer.param_groups][groups:] == ["head:d0", "head:d0/no_decay"]
    trainer.accept(make_upload("d1", C, 6))  # a type the federation did not start with
    names = [g["name"] for g in trainer.engine.optimizer.param_groups][groups + 2:]
    assert names == [f"type:{C}", f"type:{C}/no_decay", "head:d1", "head:d1/no_decay"]
    trainer.accept(make_upload("d0", A, 5, seed=1))  # a device's second upload: no new component
    assert len(trainer.engine.optimizer.param_groups) == groups + 6
    assert trainer.num_samples == 21
    stats = trainer.statistics()
    assert stats["devices"]["d0"] == {"backbone_type": A, "uploads": 2, "samples": 15, "steps": 0, "sample_steps": 0}
    assert stats["types"][C] == {"devices": 1, "uploads": 1, "samples": 6, "steps": 0, "sample_steps": 0}
    assert stats["totals"]["samples"] == 21 and stats["totals"]["types"] == 2
    cached = trainer.batch(trainer.rows_of(make_upload("d1", C, 6))).parts[0]
    expected = make_upload("d1", C, 6).decoded()
    torch.testing.assert_close(cached.acts, expected)  # decoded once, as the codec decodes
    with pytest.raises(ValueError, match="not accepted"):
        trainer.rows_of(make_upload("d2", A, 3))


def _nan_acts():
    acts, _, _ = _samples(A, 4, 0)
    acts[1, 0, 3] = math.nan
    return acts


REFUSALS = {
    "wrong width": (lambda: make_upload("d0", A, 4, acts=torch.randn(4, K, 10), codec="fp32"), "must be \\[4, 2, 12\\]"),
    "wrong K": (lambda: make_upload("d0", A, 4, acts=torch.randn(4, 1, 12), codec="fp32"), "must be \\[4, 2, 12\\]"),
    "more rows than keys": (lambda: dataclasses.replace(make_upload("d0", A, 8, seed=3, codec="fp32"),
                                                        keys=["a", "b"], targets=torch.zeros(2, EMBED)),
                            "no larger than \\[2, 2, 12\\]"),
    "non-finite acts": (lambda: make_upload("d0", A, 4, acts=_nan_acts(), codec="fp32"), "non-finite"),
    "non-finite targets": (lambda: dataclasses.replace(make_upload("d0", A, 4),
                                                       targets=torch.full((4, EMBED), math.inf)), "non-finite"),
    "target width": (lambda: dataclasses.replace(make_upload("d0", A, 4), targets=torch.zeros(4, 5)),
                     "targets must be floating \\[4, 6\\]"),
    "disallowed type": (lambda: make_upload("d0", C, 4), "not in the allow-list"),
    "too shallow": (lambda: dataclasses.replace(make_upload("d0", A, 4), backbone_type="tiny-a/llama/d12-L1"),
                    "fewer than the federation's K"),
    "not a type key": (lambda: dataclasses.replace(make_upload("d0", A, 4), backbone_type="smollm2"), "looks like"),
    "over quota": (lambda: make_upload("d9", A, 8, seed=5), "exceed its quota of 12"),
    "duplicate key, earlier upload": (lambda: make_upload("d9", A, 2), "uploaded before"),
    "duplicate key, same upload": (lambda: dataclasses.replace(make_upload("d0", A, 2), keys=["x", "x"]), "repeats"),
    "malformed key": (lambda: dataclasses.replace(make_upload("d0", A, 1), keys=["../etc"]), "is not of the form"),
    "no samples": (lambda: dataclasses.replace(make_upload("d0", A, 1), keys=[]), "non-empty"),
    "bad codec parts": (lambda: dataclasses.replace(make_upload("d0", A, 4), codec="int4"), "do not decode"),
    "another target space": (lambda: make_upload("d0", A, 4, space="plain"), "target space 'plain'"),
    "another type than before": (lambda: make_upload("d9", B, 2, seed=7), "uploaded with backbone type"),
    "bad device id": (lambda: dataclasses.replace(make_upload("d0", A, 2), device="../d0"), "device id"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_uploads_change_nothing(case):
    # the allow-list names two malformed keys too: admitted by name, still refused for their shape
    trainer = make_trainer(allowed_types=[A, B, "smollm2", "tiny-a/llama/d12-L1"], max_samples_per_device=12)
    trainer.accept(make_upload("d9", A, 6))  # a device with 6 of its 12 samples
    trainer.train_on(make_upload("d9", A, 6))
    before = _snapshot(trainer)
    make, match = REFUSALS[case]
    with pytest.raises(UploadRefused, match=match):
        trainer.accept(make())
    assert _same(before, _snapshot(trainer))


# ---------------------------------------------------------------------------------------------- training
def test_train_on_steps_through_an_arrival_in_mini_batches_and_counts_who_took_part():
    trainer = make_trainer(batch_size=4, arrival_epochs=2)
    for upload in (make_upload("d0", A, 10), make_upload("d1", B, 3)):
        trainer.accept(upload)
    losses = trainer.train_on(make_upload("d0", A, 10))
    assert len(losses) == 2 * 3 and all(math.isfinite(x) for x in losses)  # 4 + 4 + 2, twice
    trainer.train_on(make_upload("d1", B, 3))
    stats = trainer.statistics()
    assert stats["devices"]["d0"]["steps"] == 6 and stats["devices"]["d0"]["sample_steps"] == 20
    assert stats["devices"]["d1"]["steps"] == 2 and stats["devices"]["d1"]["sample_steps"] == 6
    assert stats["types"][A]["steps"] == 6 and stats["types"][B]["sample_steps"] == 6
    assert stats["totals"]["steps"] == stats["totals"]["arrival_steps"] == 8 == trainer.engine.step
    assert json.loads(json.dumps(stats)) == stats


def test_replay_visits_every_cached_sample_once_per_epoch():
    trainer = make_trainer(batch_size=4)
    for upload in (make_upload("d0", A, 6), make_upload("d1", B, 5), make_upload("d2", A, 3, seed=2)):
        trainer.accept(upload)
    seen: list[list[int]] = []
    trainer._step = lambda rows, kind: seen.append(list(rows)) or 0.0  # record which samples each step takes
    for _ in range(4):  # 14 samples: 4 + 4 + 4 + 2
        trainer.replay_step()
    assert [len(s) for s in seen] == [4, 4, 4, 2]
    assert sorted(i for s in seen for i in s) == list(range(14))
    trainer.accept(make_upload("d3", C, 2))  # cached mid-epoch... (C is allowed: no allow-list)
    seen.clear()
    for _ in range(4):  # ...joins the next epoch: 16 samples
        trainer.replay_step()
    assert sorted(i for s in seen for i in s) == list(range(16))
    assert trainer.statistics()["totals"]["replay_epochs"] == 2
    # an epoch's order is shuffled, and seeded
    other = make_trainer(batch_size=16, seed=1)
    for upload in (make_upload("d0", A, 6), make_upload("d1", B, 5), make_upload("d2", A, 3, seed=2),
                   make_upload("d3", C, 2)):
        other.accept(upload)
    rows = []
    other._step = lambda r, kind: rows.append(list(r)) or 0.0
    other.replay_step()
    assert rows[0] != list(range(16)) and rows[0] != seen[0] + seen[1] + seen[2] + seen[3]
    assert make_trainer().replay_step() is None  # nothing cached yet


def test_replay_steps_count_for_the_devices_whose_samples_they_drew():
    trainer = make_trainer(batch_size=5)
    for upload in (make_upload("d0", A, 6), make_upload("d1", B, 4)):
        trainer.accept(upload)
    for _ in range(2):
        assert math.isfinite(trainer.replay_step())
    stats = trainer.statistics()
    assert stats["devices"]["d0"]["sample_steps"] == 6 and stats["devices"]["d1"]["sample_steps"] == 4
    assert stats["totals"]["replay_steps"] == 2 and stats["types"][A]["sample_steps"] == 6


@pytest.mark.parametrize("space", ["device", "federation", "plain"])
def test_the_shared_model_learns_and_each_device_classifies_with_its_download(space):
    """Four devices of three backbone types (one type joins late); each device then evaluates held-out samples
    with its downloaded parts and its own transform's inverse."""
    trainer = make_trainer(space, batch_size=16, lr=1e-2)
    devices = [("d0", A, 0), ("d1", A, 1), ("d2", B, 2), ("d3", C, 3)]
    uploads = [make_upload(d, t, 48, seed=s, space=space) for d, t, s in devices]
    first = []
    for upload in uploads:
        trainer.accept(upload)
        first += trainer.train_on(upload)
    replayed = [trainer.replay_step() for _ in range(120)]
    assert sum(replayed[-12:]) / 12 < 0.5 * sum(first[:3]) / 3
    for device, backbone_type, seed in devices:
        download = trainer.download(device)
        if space == "device":  # its own head, nobody else's
            own = trainer.module.heads[device].proj.weight.half()  # downloads are float16 by default
            assert torch.equal(download.state["head.proj.weight"], own)
            assert not any(torch.equal(download.state["head.proj.weight"], trainer.module.heads[o].proj.weight.half())
                           for o, _, _ in devices if o != device)
        acts, labels, logits = _samples(backbone_type, 60, seed + 100)
        scores = download.build().scores(acts, logits, _transform(space, device))
        zero_shot = (logits.argmax(-1) == labels).float().mean()
        accuracy = (scores.argmax(-1) == labels).float().mean()
        assert accuracy >= 0.85 > zero_shot + 0.2, (device, float(accuracy), float(zero_shot))


def test_a_device_decoding_with_another_devices_key_does_not_classify():
    trainer = make_trainer(batch_size=16)
    uploads = [make_upload(d, A, 48, seed=s) for d, s in (("d0", 0), ("d1", 1))]
    for upload in uploads:
        trainer.accept(upload)
        trainer.train_on(upload)
    for _ in range(80):
        trainer.replay_step()
    acts, labels, logits = _samples(A, 60, 200)
    d0 = trainer.download("d0").build()
    own = (d0.scores(acts, logits, _transform("device", "d0")).argmax(-1) == labels).float().mean()
    wrong = (d0.scores(acts, logits, _transform("device", "d1")).argmax(-1) == labels).float().mean()
    assert own >= 0.85 and wrong < own - 0.2



def test_downloads_come_in_the_configured_dtype_and_classify_alike():
    """float16 (default) halves the bytes of float32; the device model computes in fp32 from either, and the
    two give the same predictions up to the rounding of the weights."""
    full = make_trainer(batch_size=16, download_dtype="float32")
    upload = make_upload("d0", A, 48, seed=0)
    full.accept(upload)
    full.train_on(upload)
    exact = full.download("d0")
    full.download_dtype = "float16"
    rounded = full.download("d0")
    assert all(t.dtype == torch.float32 for t in exact.state.values())
    assert all(t.dtype == torch.float16 for t in rounded.state.values())
    assert rounded.nbytes * 2 == exact.nbytes
    assert torch.equal(exact.state["head.proj.weight"], full.module.heads["d0"].proj.weight)
    acts, labels, logits = _samples(A, 60, 300)
    a = exact.build().scores(acts, logits, _transform("device", "d0"))
    b = rounded.build().scores(acts, logits, _transform("device", "d0"))
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="download_dtype"):
        make_trainer(download_dtype="int8")


# ---------------------------------------------------------------------------------------------- state
def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trip_restores_types_heads_cache_statistics_and_replay():
    trainer = make_trainer(batch_size=4)
    for upload in (make_upload("d0", A, 6), make_upload("d1", C, 5), make_upload("d2", B, 3)):
        trainer.accept(upload)
        trainer.train_on(upload)
    for _ in range(2):
        trainer.replay_step()  # mid-epoch
    state = _roundtrip(trainer.state_dict())
    restored = make_trainer(batch_size=4)  # knows A and B only, no devices
    restored.load_state_dict(state)
    assert restored.module.components == trainer.module.components
    assert restored.statistics() == trainer.statistics()
    assert restored.engine.step == trainer.engine.step
    a, b = trainer.module.state_dict(), restored.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # continuing gives the same steps, and a restored device's next upload is refused as a duplicate
    assert [trainer.replay_step() for _ in range(5)] == [restored.replay_step() for _ in range(5)]
    trainer.accept(make_upload("d3", A, 4, seed=9))
    restored.accept(make_upload("d3", A, 4, seed=9))
    assert trainer.train_on(make_upload("d3", A, 4, seed=9)) == restored.train_on(make_upload("d3", A, 4, seed=9))
    with pytest.raises(UploadRefused, match="uploaded before"):
        restored.accept(make_upload("d0", A, 6))


@pytest.mark.parametrize("tamper", ["acts shape", "unknown head", "optimizer", "replay", "config", "stats"])
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(tamper):
    source = make_trainer(batch_size=4)
    for upload in (make_upload("d0", A, 6), make_upload("d1", C, 5)):
        source.accept(upload)
        source.train_on(upload)
    state = _roundtrip(source.state_dict())
    if tamper == "acts shape":
        state["cache"][0]["acts"] = state["cache"][0]["acts"][:, :, :8]
    elif tamper == "unknown head":
        state["cache"][1]["device"] = "d7"
    elif tamper == "optimizer":
        state["engine"]["optimizer"]["param_groups"].pop()
    elif tamper == "replay":
        state["replay"] = {"perm": [0, 0], "pos": 0}
    elif tamper == "config":
        state["module"]["config"]["out_dim"] = 7
    else:
        state["stats"]["devices"]["d0"]["steps"] = -1
    target = make_trainer(batch_size=4)
    target.accept(make_upload("d5", B, 3))
    before = _snapshot(target)
    with pytest.raises(ValueError):
        target.load_state_dict(state)
    assert _same(before, _snapshot(target))


# ---------------------------------------------------------------------------------------------- the equivalence check
def _centralised_losses(uploads, batch_size: int, grad_clip: float = 1.0) -> list[float]:
    """Plain torch: the same model built from scratch, AdamW, every upload's decoded samples pooled in the
    round's order, consecutive mini-batches, MSE of each sample's output against its target."""
    model = FedSideModule({A: 12, B: 16}, K, EMBED, reduction=4, lr=1e-2)
    order = sorted(uploads, key=lambda u: u.device)
    for upload in order:
        model.add_type(upload.backbone_type, WIDTH[upload.backbone_type])
        model.add_device(upload.device)
    optimizer = model.configure_optimizers()
    samples = [(u.backbone_type, u.device, acts, target)
               for u in order for acts, target in zip(u.decoded(), u.targets)]
    losses = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        optimizer.zero_grad(set_to_none=True)
        squared = sum(((model(acts[None], t, d)[0] - target) ** 2).sum() for t, d, acts, target in batch)
        loss = squared / (len(batch) * EMBED)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_one_synchronous_round_without_replay_equals_centralised_training():
    """Issue 10's equivalence check: the same losses, to float tolerance, through the cache, the routing, a
    type and three heads joining the running optimizer."""
    uploads = [make_upload("d2", B, 9, seed=2), make_upload("d0", A, 7, seed=0), make_upload("d3", C, 5, seed=3),
               make_upload("d1", A, 6, seed=1)]
    trainer = make_trainer(batch_size=5)
    for upload in uploads:  # accepted in arrival order; trained in the round's fixed order
        trainer.accept(upload)
    losses = trainer.train_round(uploads)
    expected = _centralised_losses(uploads, batch_size=5)
    assert len(losses) == len(expected) == math.ceil(27 / 5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    # heads start at zero: the first batch's loss is its targets' mean square (d0's 5 of 7 samples)
    first = trainer.round_order(uploads)[0]
    assert losses[0] == pytest.approx(float((first.targets[:5] ** 2).mean()), rel=1e-5)


def test_the_round_order_does_not_depend_on_arrival_order():
    uploads = [make_upload("d1", A, 5, seed=1), make_upload("d0", B, 4, seed=0)]
    results = []
    for order in (uploads, uploads[::-1]):
        trainer = make_trainer(batch_size=3)
        for upload in order:
            trainer.accept(upload)
        results.append(trainer.train_round(order))
    assert results[0] == results[1]


def test_the_default_engine_undoes_a_step_that_makes_a_parameter_non_finite():
    trainer = make_trainer()
    trainer.accept(make_upload("d0", A, 4))
    before = _snapshot(trainer)
    trainer.engine.optimizer.param_groups[0]["lr"] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        trainer.train_on(make_upload("d0", A, 4))
    trainer.engine.optimizer.param_groups[0]["lr"] = 1e-2
    assert _same(before, _snapshot(trainer))
    assert isinstance(trainer.engine, TrainingEngine)


# ---------------------------------------------------------------------------------------------- on the virtual clock
def test_simulate_async_trains_on_arrival_replays_in_between_and_reports_a_curve():
    uploads = [make_upload("d0", A, 16, seed=0, arrival_s=1.0), make_upload("d1", B, 16, seed=1, arrival_s=5.0),
               make_upload("d2", C, 16, seed=2, arrival_s=5.0),
               dataclasses.replace(make_upload("d3", A, 4, seed=3, arrival_s=6.0), targets=torch.zeros(4, 2))]
    trainer = make_trainer(batch_size=8, allowed_types=[A, B, C])
    held_out = {d: _samples(t, 30, 50 + i) for i, (d, t) in enumerate((("d0", A), ("d1", B), ("d2", C)))}

    def evaluate(tr: FedTrainer) -> dict[str, float]:
        correct = 0
        for device, (acts, labels, logits) in held_out.items():
            if device in tr.statistics()["devices"]:
                scores = tr.download(device).build().scores(acts, logits, _transform("device", device))
                correct += int((scores.argmax(-1) == labels).sum())
        return {"acc": correct / 90}

    def step_cost(kind, batch):
        return 0.5 if kind == "replay" else 0.1 * sum(len(u) for u in batch)

    result = simulate_async(trainer, uploads, step_cost, evaluate=evaluate, eval_every_s=2.0,
                            final_replay_steps=20, record_samples=True)
    kinds = [s["kind"] for s in result.steps]
    # what each step trained on: d0's 16 samples in their order, then replays of what had arrived by then
    assert trainer.sample_ids(result.steps[0]["rows"]) == [("d0", k) for k in uploads[0].keys]
    assert all({d for d, _ in trainer.sample_ids(s["rows"])} == {"d0"} for s in result.steps[1:6])
    assert {d for s in result.steps[9:] for d, _ in trainer.sample_ids(s["rows"])} == {"d0", "d1", "d2"}
    assert trainer.trained_rows is None
    # d0 trains 1.0-2.6; five replays (the last ends at 5.1, after d1 and d2 landed at 5.0); d1 5.1-6.7, d2
    # 6.7-8.3, d3 (refused) 8.3-8.7; then the 20 final replays
    assert kinds == ["arrival"] + ["replay"] * 5 + ["arrival"] * 3 + ["replay"] * 20
    assert result.run.count("replay") == 25 and result.run.end_s == pytest.approx(8.7 + 20 * 0.5)
    assert set(result.refused) == {"d3"} and "targets" in result.refused["d3"]
    assert result.steps[0]["t"] == pytest.approx(1.0 + 1.6) and result.steps[0]["samples"] == 16
    assert [row["t"] for row in result.curve] == sorted(row["t"] for row in result.curve)
    assert result.curve[-1]["t"] == result.run.end_s and result.curve[-1]["acc"] > result.curve[0]["acc"]
    assert result.curve[-1]["acc"] >= 0.8
    stats = trainer.statistics()
    assert stats["totals"]["devices"] == 3 and stats["totals"]["replay_steps"] == result.run.count("replay")
