"""Every method over the in-process link: MobiLLM, PAE with its activation cache, and split learning.

The server's handler runs in the test process behind an ``InProcessLink``: frames are encoded, validated
and counted as on the network, only the network is skipped, so a short fit takes seconds. These tests use
public behaviour only: the Trainer's results, ``DeviceMonitor``'s summary, the frames that went through
the link (tapped at ``Link.call``) and the in-process server's ``handle`` and byte counters. The real
gRPC link between two processes is covered by ``test_strategy.py``'s process-boundary tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_mobillm import protocol as P
from lightning_mobillm.baselines import SplitLearningClassifier
from lightning_mobillm.callbacks import ActivationCache, DeviceMonitor, QuantizedTransfer
from lightning_mobillm.client import ServerClient, ServerError
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.modules import AdditiveAdapterModule, SideTuningModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.strategies import ServerAssistedStrategy
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame
from lightning_mobillm.transport.link import InProcessLink, LinkError

TRAIN_KINDS = {P.TRAIN, P.TRAIN_TARGET, P.TRAIN_CACHED, P.SPLIT_TRAIN}
EVAL_KINDS = {P.EVAL, P.SPLIT_EVAL}


@pytest.fixture(autouse=True)
def fixed_label_secret(monkeypatch):
    """PAE's keyed randomized response draws its coins from ``MOBILLM_LABEL_SECRET``: fixed, every run is
    the same."""
    monkeypatch.setenv("MOBILLM_LABEL_SECRET", "5e" * 32)


# device and server share this process (and the machine's two cores): one intra-op thread, or OpenMP's
# spin-waits make a split-learning fit ten times slower; Lightning's seed variables are restored
pytestmark = pytest.mark.usefixtures("one_torch_thread", "restore_seed_env")


@dataclass
class Exchange:
    """One call through the link: the bytes both ways."""

    request: bytes
    reply: bytes


@pytest.fixture
def wire(monkeypatch) -> list[Exchange]:
    """Every call that went through an in-process link, in the order the replies came back."""
    calls: list[Exchange] = []
    original = InProcessLink.call

    def tapped(self, request: bytes) -> bytes:
        reply = original(self, request)
        calls.append(Exchange(request, reply))
        return reply

    monkeypatch.setattr(InProcessLink, "call", tapped)
    return calls


# ---- the three methods --------------------------------------------------------------------------------
def _server() -> ServerConfig:
    return ServerConfig(device="cpu", threads=1)


def _mobillm(src: str, n: int) -> tuple[L.LightningModule, object, list[L.Callback]]:
    module = SideTuningModule(backbone=BackboneConfig(source=src), num_classes=n, lr=1e-2, dropout=0.0, pool="mean")
    return module, ServerAssistedStrategy(server="inprocess", embedded=_server()), [QuantizedTransfer("int8")]


def _pae(src: str, n: int) -> tuple[L.LightningModule, object, list[L.Callback]]:
    module = AdditiveAdapterModule(backbone=BackboneConfig(source=src), num_classes=n, lr=1e-2)
    strategy = ServerAssistedStrategy(server="inprocess", select="loss", embedded=_server())
    return module, strategy, [QuantizedTransfer("fp16"), ActivationCache()]


def _split(src: str, n: int) -> tuple[L.LightningModule, object, list[L.Callback]]:
    module = SplitLearningClassifier(BackboneConfig(source=src), n, lr=1e-2, dropout=0.0, r=4, lora_dropout=0.0,
                                     server="inprocess", embedded=_server(), codec_up="fp32", codec_down="fp32")
    return module, "auto", []  # Lightning's default strategy: the module talks to its server itself


METHODS: dict[str, Callable[[str, int], tuple[L.LightningModule, object, list[L.Callback]]]] = {
    "mobillm": _mobillm, "pae": _pae, "split": _split,
}


def _schemas(method: str) -> tuple[dict, dict]:
    return (P.SPLIT_REQUEST_SCHEMAS, P.SPLIT_REPLY_SCHEMAS) if method == "split" else (P.REQUEST_SCHEMAS,
                                                                                        P.REPLY_SCHEMAS)


def _frames(calls: list[Exchange], method: str) -> list[tuple[Frame, Frame]]:
    """(request, reply) of each call, decoded and validated as the server and the device do."""
    requests, replies = _schemas(method)
    return [(decode_frame(c.request, requests), decode_frame(c.reply, replies, require_finite=False))
            for c in calls]


def _client(trainer: L.Trainer) -> ServerClient:
    """The run's connection: the strategy's (MobiLLM, PAE) or the module's own (split learning)."""
    if isinstance(trainer.strategy, ServerAssistedStrategy):
        return trainer.strategy.client
    return trainer.lightning_module.client


def _data(tiny_data_file, tiny_llama_dir) -> TextClassificationDataModule:
    return TextClassificationDataModule(
        dataset="json", data_files=str(tiny_data_file), prompt="Article : {text} Topic :", max_length=20,
        batch_size=8, eval_batch_size=16, val_fraction=0.2, tokenizer=str(tiny_llama_dir),
    )


class ServerProbe(L.Callback):
    """Keeps the in-process server object (reachable while the run is live) and, when fit ends (the
    moment ``DeviceMonitor`` writes its summary), the server's own byte counts and the calls so far."""

    def __init__(self, wire: list[Exchange]) -> None:
        self.wire = wire
        self.server = None
        self.counts: dict[str, int] = {}

    def on_train_start(self, trainer, pl_module):
        self.server = _client(trainer).in_process_server

    def on_fit_end(self, trainer, pl_module):
        self.counts = {"bytes_in": self.server.bytes_in, "bytes_out": self.server.bytes_out, "calls": len(self.wire)}


def _fit(method: str, wire: list[Exchange], tmp_path, tiny_data_file, tiny_llama_dir, epochs: int,
         *callbacks: L.Callback) -> tuple[L.Trainer, dict, ServerProbe]:
    L.seed_everything(0, verbose=False)
    data = _data(tiny_data_file, tiny_llama_dir)
    module, strategy, method_callbacks = METHODS[method](str(tiny_llama_dir), data.num_classes)
    monitor, probe = DeviceMonitor(), ServerProbe(wire)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", max_epochs=epochs,
        callbacks=[*method_callbacks, monitor, probe, *callbacks], logger=CSVLogger(tmp_path, name=method),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data)
    return trainer, monitor.summary, probe


def _assert_counts_agree(summary: dict, probe: ServerProbe, wire: list[Exchange]) -> None:
    """The device's byte counts are the in-process server's own (the link skips the network, not the
    counting), and both are every byte that went through the link."""
    assert summary["server_pid"] == os.getpid()  # the server object lives in this process
    upto = wire[:probe.counts["calls"]]
    assert summary["calls"] == len(upto)
    assert summary["link_bytes_up"] == probe.counts["bytes_in"] == sum(len(c.request) for c in upto)
    assert summary["link_bytes_down"] == probe.counts["bytes_out"] == sum(len(c.reply) for c in upto)
    # after the run (split learning says goodbye from its teardown hook, after fit ends): still every byte
    assert probe.server.bytes_in == sum(len(c.request) for c in wire)
    assert probe.server.bytes_out == sum(len(c.reply) for c in wire)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ---- a short fit of every method --------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fit_learns_validates_on_the_server_and_counts_every_byte(method, tmp_path, tiny_data_file,
                                                                   tiny_llama_dir, wire):
    epochs = 3
    trainer, s, probe = _fit(method, wire, tmp_path, tiny_data_file, tiny_llama_dir, epochs)
    frames = _frames(wire, method)
    train_batches, val_batches = trainer.num_training_batches, sum(trainer.num_val_batches)

    # every training step went to the server, in order, and was answered for that step
    training = [(i, q, r) for i, (q, r) in enumerate(frames) if q.kind in TRAIN_KINDS]
    assert [q.header["step"] for _, q, _ in training] == list(range(epochs * train_batches))
    assert all(r.kind == P.OK and r.header["step"] == q.header["step"] for _, q, r in training)
    assert trainer.global_step == epochs * train_batches
    # it learns: the server's training loss falls from the first epoch to the last ...
    losses = [r.header["loss"] for _, _, r in training]
    first, last = _mean(losses[:train_batches]), _mean(losses[-train_batches:])
    assert last < 0.8 * first, (first, last)
    # ... and validation, scored from what the server returned every epoch, is well above chance (1/3)
    evals = [r for q, r in frames if q.kind in EVAL_KINDS]
    assert len(evals) == epochs * val_batches
    # (PAE's server answers in the transform's secret space; the device composes class scores from it)
    width = trainer.lightning_module.num_outputs if method == "pae" else trainer.datamodule.num_classes
    assert all(r.kind == P.OK and r.tensors["logits"].shape[1] == width for r in evals)
    assert len(s["val_history"]) == epochs and s["val_acc"] > 0.55, s["val_history"]

    _assert_counts_agree(s, probe, wire)
    # the summary's training figures are exactly the training frames and their replies
    assert s["bytes_up"] == sum(len(wire[i].request) for i, _, _ in training)
    assert s["bytes_down"] == sum(len(wire[i].reply) for i, _, _ in training)
    assert s["train_samples"] == epochs * len(trainer.datamodule.train_dataloader().dataset)


def test_pae_epochs_after_the_first_send_only_cached_keys(tmp_path, tiny_data_file, tiny_llama_dir, wire):
    epochs = 3
    trainer, s, _ = _fit("pae", wire, tmp_path, tiny_data_file, tiny_llama_dir, epochs)
    train_batches, val_batches = trainer.num_training_batches, sum(trainer.num_val_batches)
    training = [(c, q, r) for c, (q, r) in zip(wire, _frames(wire, "pae")) if q.kind in TRAIN_KINDS]
    first, later = training[:train_batches], training[train_batches:]

    # epoch 0: activations of the loss token and a device-defined target, never labels; each sample stored
    assert all(q.kind == P.TRAIN_TARGET and "labels" not in q.tensors for _, q, _ in first)
    assert all(q.tensors["acts.q"].shape[0] == q.tensors["lengths"].numel() for _, q, _ in first)
    assert all(r.header.get("cached") for _, _, r in first)
    keys = [k for _, q, _ in first for k in q.header["keys"]]
    assert len(set(keys)) == len(keys) == len(trainer.datamodule.train_dataloader().dataset)
    # later epochs: keys the server already holds, nothing else, and every one found
    assert len(later) == (epochs - 1) * train_batches
    assert all(q.kind == P.TRAIN_CACHED and not q.tensors and set(q.header["keys"]) <= set(keys)
               for _, q, _ in later)
    assert all(r.kind == P.OK and "missing" not in r.header for _, _, r in later)
    # ... and they still train: the loss keeps falling in the cached epochs
    losses = [r.header["loss"] for _, _, r in later]
    assert _mean(losses[-train_batches:]) < _mean(losses[:train_batches])
    # the device forwarded each training batch once, and each validation batch once (later validations
    # are sent from its EvalTapCache)
    assert s["device_forwards"] == train_batches + val_batches
    assert s["eval_cache_hits"] == (epochs - 1) * val_batches
    by_epoch = {int(k): v for k, v in s["train_bytes_up_by_epoch"].items()}
    assert by_epoch[0] == sum(len(c.request) for c, _, _ in first)
    assert by_epoch[1] + by_epoch[2] == sum(len(c.request) for c, _, _ in later) < by_epoch[0] / 2


class CacheProbe(L.Callback):
    """The device's tap cache's size after each validation or test batch."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_validation_batch_end(self, trainer, *args) -> None:
        self.sizes.append(len(trainer.strategy.eval_cache))

    on_test_batch_end = on_validation_batch_end


# ---- validation from the device's tap cache ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mobillm", "pae"])
def test_validation_batches_seen_before_are_sent_without_a_forward_and_score_the_same(
        method, tmp_path, tiny_data_file, tiny_llama_dir, wire, monkeypatch):
    epochs = 3

    def run(eval_cache_mb: float) -> tuple[L.Trainer, dict, list[Frame]]:
        wire.clear()
        original = METHODS[method]

        def with_limit(src: str, n: int):
            module, strategy, callbacks = original(src, n)
            strategy.eval_cache = type(strategy.eval_cache)(eval_cache_mb)
            return module, strategy, callbacks

        monkeypatch.setitem(METHODS, method, with_limit)
        trainer, s, _ = _fit(method, wire, tmp_path / str(eval_cache_mb), tiny_data_file, tiny_llama_dir, epochs)
        return trainer, s, [q for q, _ in _frames(wire, method) if q.kind in EVAL_KINDS]

    fresh_trainer, fresh, fresh_evals = run(0.0)
    trainer, cached, cached_evals = run(16.0)
    train_batches, val_batches = trainer.num_training_batches, sum(trainer.num_val_batches)
    forwards_in_training = fresh["device_forwards"] - epochs * val_batches
    # without the cache every validation forwards every batch; with it only the first does
    assert fresh["eval_cache_hits"] == 0
    assert cached["eval_cache_hits"] == (epochs - 1) * val_batches
    assert cached["device_forwards"] == forwards_in_training + val_batches
    assert forwards_in_training >= train_batches  # (PAE forwards its training batches in the first epoch only)
    # the server was sent the same taps, and every validation scored the same
    assert len(cached_evals) == len(fresh_evals) == epochs * val_batches
    for a, b in zip(cached_evals, fresh_evals, strict=True):
        assert a.tensors.keys() == b.tensors.keys()
        for name in a.tensors:
            torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=0)
    assert [(h["val_acc"], h["val_f1"]) for h in cached["val_history"]] == [
        (h["val_acc"], h["val_f1"]) for h in fresh["val_history"]]
    # only fit caches: validate() and test() after it forward every batch and leave the cache empty
    for run_stage in (trainer.validate, trainer.test):
        probe = CacheProbe()
        trainer.callbacks.append(probe)
        before = trainer.strategy.device_stats.device_forwards
        run_stage(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)
        trainer.callbacks.remove(probe)
        assert trainer.strategy.device_stats.device_forwards - before == len(probe.sizes) > 0
        assert set(probe.sizes) == {0}, run_stage


def test_the_tap_cache_keeps_to_its_bound_and_keys_by_batch_codec_and_selection():
    from lightning_mobillm.backbone import BackboneOutput
    from lightning_mobillm.strategies.eval_cache import EvalTapCache

    batch = {"input_ids": torch.arange(12).view(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    other = {**batch, "input_ids": batch["input_ids"].flip(0)}
    keys = {EvalTapCache.key(b, codec=c, select=s) for b in (batch, other) for c in ("int8", "fp16")
            for s in ("loss", "all")}
    assert len(keys) == 8
    assert EvalTapCache.key(dict(batch), codec="int8", select="loss") == EvalTapCache.key(
        {k: v.clone() for k, v in batch.items()}, codec="int8", select="loss")

    tensors = {"acts.q": torch.zeros(3, 2, 1000, dtype=torch.int8)}  # 6000 bytes
    out = BackboneOutput(acts=None, lengths=torch.ones(3, dtype=torch.long), logits=torch.zeros(3, 5))
    cache = EvalTapCache(limit_mb=10_000 / 2**20)  # room for one such batch, not two
    assert cache.put("a", tensors, out) and len(cache) == 1
    assert not cache.put("b", tensors, out) and len(cache) == 1 and cache.bytes == 6000 + 24 + 60
    assert cache.get("b") is None
    kept_tensors, kept = cache.get("a")
    assert kept_tensors is tensors and kept.acts is None and kept.sink is None
    # a tensor both in the frame and in the outputs (the lengths, usually) is counted once
    shared = EvalTapCache(limit_mb=1)
    assert shared.put("a", {**tensors, "lengths": out.lengths}, out) and shared.bytes == 6000 + 24 + 60
    assert not EvalTapCache(0).put("a", tensors, out) and not EvalTapCache(0).enabled
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="eval_cache_mb must be >= 0"):
        ServerAssistedStrategy(server="inprocess", eval_cache_mb=-1)


# ---- select: auto --------------------------------------------------------------------------------------------
def _last_token_trainer(select: str, wire: list[Exchange], tmp_path, tiny_data_file, tiny_llama_dir,
                        validate: bool = False, codec: str = "fp32") -> L.Trainer:
    """One epoch of MobiLLM with a head pooling the last token, sent exactly (fp32) by default, fitted."""
    wire.clear()
    L.seed_everything(0, verbose=False)
    data = _data(tiny_data_file, tiny_llama_dir)
    module = SideTuningModule(backbone=BackboneConfig(source=str(tiny_llama_dir)), num_classes=data.num_classes,
                              lr=1e-2, dropout=0.0, pool="last")
    monitor = DeviceMonitor()
    trainer = L.Trainer(
        strategy=ServerAssistedStrategy(server="inprocess", select=select, embedded=_server()), accelerator="cpu",
        max_epochs=1, callbacks=[QuantizedTransfer(codec), monitor], logger=CSVLogger(tmp_path, name=select),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
        limit_val_batches=1.0 if validate else 0,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def _fit_last_token_head(select: str, wire: list[Exchange], tmp_path, tiny_data_file,
                         tiny_llama_dir) -> tuple[list[float], int, dict, list[Frame]]:
    """:func:`_last_token_trainer`'s fit: the server's losses, the training frames' bytes, the device's summary
    and the training frames."""
    trainer = _last_token_trainer(select, wire, tmp_path, tiny_data_file, tiny_llama_dir)
    monitor = next(c for c in trainer.callbacks if isinstance(c, DeviceMonitor))
    training = [(c, q, r) for c, (q, r) in zip(wire, _frames(wire, "mobillm")) if q.kind in TRAIN_KINDS]
    assert len(training) == trainer.num_training_batches > 1
    return ([r.header["loss"] for _, _, r in training], sum(len(c.request) for c, _, _ in training),
            monitor.summary, [q for _, q, _ in training])


def test_select_auto_sends_only_the_last_token_for_a_last_token_head_and_trains_the_same(
        tmp_path, tiny_data_file, tiny_llama_dir, wire):
    every, bytes_every, s_every, frames_every = _fit_last_token_head("all", wire, tmp_path, tiny_data_file,
                                                                     tiny_llama_dir)
    auto, bytes_auto, s_auto, frames_auto = _fit_last_token_head("auto", wire, tmp_path, tiny_data_file,
                                                                 tiny_llama_dir)
    # auto resolved to the loss token: one token per sample on the wire, where all sends every non-pad token
    assert (s_auto["select"], s_every["select"]) == ("loss", "all")
    assert all(bool((q.tensors["lengths"] == 1).all()) for q in frames_auto)
    assert all(int(q.tensors["lengths"].min()) > 1 for q in frames_every)
    assert bytes_auto < bytes_every / 4
    # the side network is token-wise and the head pools the last token: the same losses, step for step
    torch.testing.assert_close(torch.tensor(auto), torch.tensor(every), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_select_all_evaluates_with_the_tokens_that_reach_the_prediction_and_scores_the_same(
        codec, tmp_path, tiny_data_file, tiny_llama_dir, wire, monkeypatch):
    trainer = _last_token_trainer("all", wire, tmp_path, tiny_data_file, tiny_llama_dir, validate=True, codec=codec)
    strategy = trainer.strategy
    assert (strategy.token_select, strategy.eval_select) == ("all", "loss")
    monitor = next(c for c in trainer.callbacks if isinstance(c, DeviceMonitor))
    assert (monitor.summary["select"], monitor.summary["eval_select"]) == ("all", "loss")
    frames = _frames(wire, "mobillm")
    evals = [q for q, _ in frames if q.kind in EVAL_KINDS]
    assert min(int(q.tensors["lengths"].min()) for q, _ in frames if q.kind in TRAIN_KINDS) > 1
    assert evals and all(bool((q.tensors["lengths"] == 1).all()) for q in evals)

    def replies(run) -> list[tuple[Frame, Frame]]:
        wire.clear()
        run(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)
        return [(q, r) for q, r in _frames(wire, "mobillm") if q.kind in EVAL_KINDS]

    last, last_test = replies(trainer.validate), replies(trainer.test)
    assert all(bool((q.tensors["lengths"] == 1).all()) for q, _ in last + last_test)
    monkeypatch.setattr(type(strategy), "eval_select", property(lambda self: self.token_select))
    # the same trained side network, evaluated on every token as training sent them
    every, every_test = replies(trainer.validate), replies(trainer.test)
    assert len(last) == len(every) > 1 and len(last_test) == len(every_test) > 1
    assert all(int(q.tensors["lengths"].min()) > 1 for q, _ in every + every_test)
    for (_, a), (_, b) in zip(last + last_test, every + every_test, strict=True):
        torch.testing.assert_close(a.tensors["logits"], b.tensors["logits"], rtol=1e-5, atol=1e-6)


def test_evaluation_narrows_only_select_all_and_only_with_a_codec_that_encodes_tokens_alone():
    def eval_select(select: str, auto: str, codec: str) -> str:
        strategy = ServerAssistedStrategy(server="inprocess", select=select)
        strategy._auto_select, strategy.transfer = auto, QuantizedTransfer(codec)
        return strategy.eval_select

    assert eval_select("all", "loss", "int8") == "loss"
    assert eval_select("all", "all", "int8") == "all"  # a head pooling every token needs them all
    assert eval_select("loss", "all", "int8") == "loss"  # evaluation never sends more than training
    # outlier-aware codecs pick their fp16 channels over the frame's tokens: fewer tokens, other bytes
    assert eval_select("all", "loss", "int8o") == eval_select("all", "loss", "int4o") == "all"
    assert eval_select("auto", "loss", "int8o") == "loss"


def test_select_auto_resolves_from_the_module_pooling_and_the_backbone_kind():
    def module(pool: str) -> SideTuningModule:
        return SideTuningModule(num_classes=3, pool=pool)

    assert module("last").token_selection(is_decoder=True) == "loss"
    assert module("mean").token_selection(is_decoder=True) == "all"
    # an encoder's loss token is its first ([CLS]): a last-token head there needs every token
    assert module("last").token_selection(is_decoder=False) == "all"
    assert module("first").token_selection(is_decoder=False) == "loss"
    with pytest.raises(ValueError, match="select must be 'auto', 'all', 'loss' or 'answer'"):
        ServerAssistedStrategy(server="inprocess", select="some")


# ---- a malformed frame in the middle of a run -------------------------------------------------------------
#: what the server's error message names for each malformed frame below
REFUSALS = {
    "not a frame": "version", "unknown session": "unknown session",
    "label out of range": "labels", "activations of the wrong width": "shape", "lengths that do not sum": "lengths",
    "labels on a label-free session": "label-free", "target of the wrong width": "targets shape",
    "no keys to train on": "keys",
}


def _bad_frames(last_train: Frame, step: int, num_classes: int) -> dict[str, bytes]:
    """A real training frame of the run, for the step the server expects next, made wrong in one way each
    (named as in :data:`REFUSALS`): any of them, applied, would move the server's weights."""
    h = {k: v for k, v in last_train.header.items() if k != "kind"} | {"step": step}
    t, kind = dict(last_train.tensors), last_train.kind
    bad = {"not a frame": b"MLLM" + bytes(range(256)) * 4}
    if kind == P.TRAIN_TARGET:  # PAE: a label-free session
        labels = torch.zeros(t["lengths"].numel(), dtype=torch.int64)
        no_target = {k: v for k, v in t.items() if k != "targets"}
        bad["labels on a label-free session"] = Frame(P.TRAIN, {k: v for k, v in h.items() if k != "keys"},
                                                      {**no_target, "labels": labels})
        bad["target of the wrong width"] = Frame(kind, h, {**t, "targets": t["targets"][:, :-1].contiguous()})
        bad["no keys to train on"] = Frame(P.TRAIN_CACHED, {**h, "keys": []})
    else:  # MobiLLM (train) and split learning (split_train)
        bad["label out of range"] = Frame(kind, h, {**t, "labels": torch.full_like(t["labels"], num_classes + 3)})
        bad["activations of the wrong width"] = Frame(kind, h, {**t, "acts.q": t["acts.q"][..., :-1].contiguous()})
        bad["lengths that do not sum"] = Frame(kind, h, {**t, "lengths": t["lengths"] + 1})
    bad["unknown session"] = Frame(kind, {**h, "session": "nobody/nothing"}, t)
    return {name: f if isinstance(f, bytes) else encode_frame(f) for name, f in bad.items()}


class Injector(L.Callback):
    """After the first epoch's validation (no training frame in flight), through the run's own link:
    replay the run's last eval frame, send malformed frames, and replay the eval frame again.

    The frames are sent from a thread of their own, as the link's sender thread sends training frames:
    Lightning runs validation hooks under ``inference_mode``, which a handler called from this thread
    would inherit (and a wrongly applied step would then fail for that reason instead of showing)."""

    def __init__(self, method: str, wire: list[Exchange]) -> None:
        self.method, self.wire = method, wire
        self.replies: dict[str, Frame] = {}
        self.logits: list[torch.Tensor] = []
        self.span: tuple[int, int] | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.current_epoch != 0 or self.span is not None:
            return
        frames = _frames(self.wire, self.method)
        last_train = next(q for q, _ in reversed(frames) if q.kind in TRAIN_KINDS)
        probe = next(c.request for c, (q, _) in zip(reversed(self.wire), reversed(frames)) if q.kind in EVAL_KINDS)
        client = _client(trainer)
        _, replies = _schemas(self.method)
        start = len(self.wire)
        with ThreadPoolExecutor(max_workers=1) as sender:

            def send(data: bytes) -> bytes:
                return sender.submit(client.call, data).result()

            self.logits.append(client.decode_reply(send(probe)).tensors["logits"])
            for name, data in _bad_frames(last_train, trainer.global_step, trainer.datamodule.num_classes).items():
                self.replies[name] = decode_frame(send(data), replies, require_finite=False)
            self.logits.append(client.decode_reply(send(probe)).tensors["logits"])
        self.span = (start, len(self.wire))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_malformed_frame_gets_an_error_reply_and_training_continues(method, tmp_path, tiny_data_file,
                                                                      tiny_llama_dir, wire):
    epochs = 2
    injector = Injector(method, wire)
    trainer, s, probe = _fit(method, wire, tmp_path, tiny_data_file, tiny_llama_dir, epochs, injector)

    refused = {name: (r.kind, r.header.get("message", "")) for name, r in injector.replies.items()}
    assert len(refused) == 5, refused
    for name, (kind, message) in refused.items():  # each refused, for its own reason
        assert kind == P.ERROR and REFUSALS[name] in message, (name, kind, message)
    # none of them moved the server's model: the same eval frame gets the same logits before and after
    torch.testing.assert_close(injector.logits[0], injector.logits[1], rtol=0, atol=0)
    # and training went on: every later step accepted, in order, up to the planned count
    start, end = injector.span
    run = wire[:start] + wire[end:]
    training = [(c, q, r) for c, (q, r) in zip(run, _frames(run, method)) if q.kind in TRAIN_KINDS]
    assert [q.header["step"] for _, q, _ in training] == list(range(epochs * trainer.num_training_batches))
    assert all(r.kind == P.OK for _, _, r in training)
    assert trainer.global_step == epochs * trainer.num_training_batches
    losses, per_epoch = [r.header["loss"] for _, _, r in training], trainer.num_training_batches
    assert _mean(losses[per_epoch:]) < _mean(losses[:per_epoch])  # and it still learns
    # the refused frames were counted on both sides of the link, and not as training traffic
    _assert_counts_agree(s, probe, wire)
    assert s["bytes_up"] == sum(len(c.request) for c, _, _ in training)


# ---- the link's own limit ---------------------------------------------------------------------------------
def test_in_process_link_refuses_a_frame_above_max_frame_mb():
    client = ServerClient("inprocess", None, embedded=ServerConfig(device="cpu", threads=1, max_frame_mb=1)).open()
    try:
        server = client.in_process_server
        with pytest.raises(LinkError, match="RESOURCE_EXHAUSTED"):
            client.call(b"\0" * (3 * 2**20))
        # refused by the link itself: the server never saw it, and neither side counted it
        assert (server.bytes_in, server.bytes_out) == (0, 0)
        assert client.stats.snapshot() == {"bytes_up": 0, "bytes_down": 0, "calls": 0}
        # a frame under the limit reaches the server, which answers it (here: with an error)
        small = b"\0" * 2**19
        with pytest.raises(ServerError):
            client.decode_reply(client.call(small))
        assert server.bytes_in == client.stats.bytes_up == len(small)
        assert server.bytes_out == client.stats.bytes_down > 0
    finally:
        client.close()
