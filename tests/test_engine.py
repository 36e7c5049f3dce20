"""The server's training engine on Lightning Fabric: setup, backward and clipping through Fabric, all-or-
nothing steps and state loads, atomic checkpoints of its own."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.wrappers import _FabricModule, _FabricOptimizer

from lightning_mobillm import protocol as P
from lightning_mobillm.engine import TrainingEngine
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.server.runtime import SideServer
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig, TapSpec
from lightning_mobillm.transport.frames import Frame, FrameError, decode_frame, encode_frame

SPEC = TapSpec(layers=[0, 1], hidden_size=8, arch="llama", is_decoder=True)


def _module(total_steps: int = 10) -> SideTuningModule:
    module = SideTuningModule(backbone=BackboneConfig(source="unused"), num_classes=3, lr=1e-2, dropout=0.0)
    module.build(SPEC)
    module.total_steps = total_steps
    return module


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"acts": torch.randn(8, 2, 8, generator=g), "lengths": torch.full((4,), 2),
            "labels": torch.randint(0, 3, (4,), generator=g)}


def _hello() -> Frame:
    module = SideTuningModule(backbone=BackboneConfig(source="unused"), num_classes=3)
    return Frame(kind=P.HELLO, header={"protocol": P.PROTOCOL_VERSION, "device_id": "d", "run_id": "r",
                                       "module": "side_tuning", "side": module.side_config.to_dict(),
                                       "hparams": P.json_safe(module.server_hparams()),
                                       "tap_spec": SPEC.to_dict(), "num_outputs": 3, "total_steps": 5,
                                       "codec": "fp32"})


@pytest.fixture
def engine() -> TrainingEngine:
    return TrainingEngine.for_module(Fabric(accelerator="cpu", devices=1), _module(), grad_clip=1.0)


def _copy(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copy(v) for v in state]
    return state


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_the_side_server_trains_through_fabric(monkeypatch):
    calls = {"backward": 0, "clip": 0}
    backward, clip = Fabric.backward, Fabric.clip_gradients

    def counted_backward(self, *args, **kwargs):
        calls["backward"] += 1
        return backward(self, *args, **kwargs)

    def counted_clip(self, *args, **kwargs):
        calls["clip"] += 1
        return clip(self, *args, **kwargs)

    monkeypatch.setattr(Fabric, "backward", counted_backward)
    monkeypatch.setattr(Fabric, "clip_gradients", counted_clip)
    server = SideServer(ServerConfig(device="cpu", checkpoint_every_n_steps=0))
    hello = _hello()
    ok = decode_frame(server.handle(encode_frame(hello)), P.REPLY_SCHEMAS)
    session = server.sessions[ok.header["session"]]
    assert isinstance(session.model.model, _FabricModule) and isinstance(session.model.optimizer, _FabricOptimizer)
    for step in range(2):
        b = _batch(step)
        tensors = {**P.pack_acts(b["acts"], b["lengths"], "fp32"), "labels": b["labels"]}
        header = {"session": session.key, "secret": ok.header["secret"], "step": step, "codec": "fp32"}
        server.handle(encode_frame(Frame(kind=P.TRAIN, header=header, tensors=tensors)))
    assert calls == {"backward": 2, "clip": 2} and session.step == 2


def test_a_non_finite_step_changes_nothing(engine):
    engine.train_step(lambda: engine.model.compute_loss(_batch(0)))
    before = _copy(engine.state_dict())
    bad = _batch(1)
    bad["acts"][0, 0, 0] = float("nan")
    with pytest.raises(FrameError, match="non-finite (loss|gradient)"):
        engine.train_step(lambda: engine.model.compute_loss(bad))
    assert _equal(engine.state_dict(), before) and engine.step == 1


def _fail_after_first_param(engine, monkeypatch):
    """Make the optimizer's step update one parameter and its moments, then raise (as torch's single-tensor
    AdamW does on a bad state)."""
    raw = engine.optimizer.optimizer
    step = type(raw).step

    def half_step(self, closure=None):
        params = self.param_groups[0]["params"]
        with torch.no_grad():
            params[0].add_(1.0)
        self.state[params[0]]["exp_avg"] = torch.full_like(params[0], 7.0)  # replaced, not in place
        raise RuntimeError("boom half-way")

    monkeypatch.setattr(raw, "step", half_step.__get__(raw))
    return step


@pytest.mark.parametrize("trained_before", [True, False])
def test_an_optimizer_step_that_fails_half_way_is_undone(engine, monkeypatch, trained_before):
    if trained_before:
        engine.train_step(lambda: engine.model.compute_loss(_batch(0)))
    before = _copy(engine.state_dict())
    _fail_after_first_param(engine, monkeypatch)
    with pytest.raises(FrameError, match="optimizer step failed and was undone.*boom"):
        engine.train_step(lambda: engine.model.compute_loss(_batch(1)))
    assert _equal(engine.state_dict(), before) and engine.step == int(trained_before)
    monkeypatch.undo()
    engine.train_step(lambda: engine.model.compute_loss(_batch(1)))  # and it trains on
    assert engine.step == int(trained_before) + 1


def test_a_step_that_makes_a_weight_non_finite_is_undone(engine):
    engine.train_step(lambda: engine.model.compute_loss(_batch(0)))
    before = _copy(engine.state_dict())
    first = engine.optimizer.param_groups[0]["params"][0]
    engine.optimizer.state[first]["exp_avg"].fill_(3e38)  # finite, but the update overflows
    engine.optimizer.state[first]["exp_avg_sq"].zero_()
    before["optimizer"] = _copy(engine.optimizer.state_dict())
    with pytest.raises(FrameError, match="non-finite"):
        engine.train_step(lambda: engine.model.compute_loss(_batch(1)))
    assert _equal(engine.state_dict(), before)


def test_the_state_check_knows_adamw_from_a_probe(engine):
    probe, nonnegative = engine._probe_state()
    assert set(probe) == {"step", "exp_avg", "exp_avg_sq"} and nonnegative == {"step", "exp_avg_sq"}


def test_steps_change_weights_and_follow_the_schedule(engine):
    before = _copy(engine.state_dict())
    lrs = [engine.train_step(lambda s=s: engine.model.compute_loss(_batch(s))).lr for s in range(3)]
    after = engine.state_dict()
    changed = [k for k in before["model"] if not torch.equal(before["model"][k], after["model"][k])]
    assert changed and after["step"] == 3
    assert lrs[0] != lrs[2]  # the warmup/cosine schedule moved


def test_a_state_that_does_not_fit_leaves_the_engine_as_it_was(engine):
    engine.train_step(lambda: engine.model.compute_loss(_batch(0)))
    before = _copy(engine.state_dict())
    bad = _copy(before)
    name = next(iter(bad["model"]))
    bad["model"][name] = torch.zeros(1)
    with pytest.raises(ValueError):
        engine.load_state_dict(bad)
    assert _equal(engine.state_dict(), before)


def test_checkpoints_round_trip_atomically(engine, tmp_path):
    for s in range(2):
        engine.train_step(lambda s=s: engine.model.compute_loss(_batch(s)))
    path = tmp_path / "ckpt" / "session.ckpt"
    engine.save(path, extra={"session": "d/r"})
    assert [p.name for p in path.parent.iterdir()] == ["session.ckpt"]  # no temp file left behind
    fresh = TrainingEngine.for_module(Fabric(accelerator="cpu", devices=1), _module(), grad_clip=1.0)
    assert fresh.load(path) == {"session": "d/r"}
    assert _equal(fresh.state_dict(), engine.state_dict()) and fresh.step == 2


def test_the_server_trains_whatever_autograd_mode_its_caller_is_in():
    """In-process, a frame may arrive from a thread inside Lightning's inference_mode (a validation hook)."""
    server = SideServer(ServerConfig(device="cpu", checkpoint_every_n_steps=0))
    hello = _hello()
    ok = decode_frame(server.handle(encode_frame(hello)), P.REPLY_SCHEMAS).header
    b = _batch(0)
    tensors = {**P.pack_acts(b["acts"], b["lengths"], "fp32"), "labels": b["labels"]}
    header = {"session": ok["session"], "secret": ok["secret"], "step": 0, "codec": "fp32"}
    frame = Frame(kind=P.TRAIN, header=header, tensors=tensors)
    with torch.inference_mode():
        reply = server.handle(encode_frame(frame))
    assert decode_frame(reply, P.REPLY_SCHEMAS, require_finite=False).kind == P.OK
    assert server.sessions[ok["session"]].step == 1
