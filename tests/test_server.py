"""The side server against good and malformed frames, and the gRPC link's token check.

Everything goes through the server's public entry point, ``SideServer.handle(bytes) -> bytes``: a session's
state is what a ``get_state`` frame returns (weights, optimizer, scheduler, step) and the stored reply for
retries is what re-sending the last training frame returns.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.server.runtime import SideServer
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig, TapSpec
from lightning_mobillm.transport.frames import Frame, FrameError, decode_frame, encode_frame
from lightning_mobillm.transport.link import GrpcLink, LinkError, serve_link
from lightning_mobillm.transport.security import Credentials

SPEC = TapSpec(layers=[0, 1, 2], hidden_size=16, arch="llama", is_decoder=True)
NUM_CLASSES = 3
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny side networks (see conftest)


def _hello(total_steps: int = 50) -> Frame:
    module = SideTuningModule(backbone=BackboneConfig(source="unused"), num_classes=NUM_CLASSES, lr=1e-2, dropout=0.0, seed=0)
    return Frame(
        kind=P.HELLO,
        header={
            "protocol": P.PROTOCOL_VERSION,
            "device_id": "dev",
            "run_id": "r1",
            "module": "side_tuning",
            "side": module.side_config.to_dict(),
            "hparams": P.json_safe(module.server_hparams()),
            "tap_spec": SPEC.to_dict(),
            "num_outputs": NUM_CLASSES,
            "total_steps": total_steps,
            "codec": "int8",
        },
    )


def _call(server: SideServer, frame: Frame | bytes) -> Frame:
    data = frame if isinstance(frame, bytes) else encode_frame(frame)
    return decode_frame(server.handle(data), P.REPLY_SCHEMAS, require_finite=False)


def _batch(seed: int, batch: int = 6, tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    centroids = torch.randn(NUM_CLASSES, 16, generator=torch.Generator().manual_seed(99)) * 3
    acts = torch.randn(batch * tokens, 3, 16, generator=g)
    acts[:, :, :] += centroids[labels].repeat_interleave(tokens, 0)[:, None, :]
    return acts, torch.full((batch,), tokens), labels


def _train_frame(session: dict, step: int, seed: int, codec: str = "int8", **override) -> Frame:
    acts, lengths, labels = _batch(seed)
    tensors = {**P.pack_acts(acts, lengths, codec), "labels": labels, **override}
    return Frame(kind=P.TRAIN, header={**session, "step": step, "codec": codec}, tensors=tensors)


def _new_session(server: SideServer, hello: Frame | None = None) -> dict:
    reply = _call(server, hello or _hello())
    assert reply.kind == P.OK, reply.header
    return {"session": reply.header["session"], "secret": reply.header["secret"]}


def _get_state(server: SideServer, session: dict) -> dict[str, Any]:
    """The session's full state as the device downloads it."""
    reply = _call(server, Frame(kind=P.GET_STATE, header={**session}))
    assert reply.kind == P.OK, reply.header
    state = P.unpack_state(reply.header["skeleton"], reply.tensors["state"])
    assert state["step"] == reply.header["step"]
    return state


def _leaves(obj: Any, path: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _leaves(value, f"{path}/{key}").items()} or {path: {}}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in _leaves(value, f"{path}[{i}]").items()} or {path: []}
    return {path: obj}


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Every tensor (dtype, shape, bits) and every number or string of two states, one by one."""
    a, b = _leaves(before), _leaves(after)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for path, x in a.items():
        y = b[path]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), path
        else:
            assert type(x) is type(y) and x == y, (path, x, y)


def _set_state_frame(session: dict, state: Any) -> Frame:
    skeleton, blob = P.pack_state(state)
    return Frame(kind=P.SET_STATE, header={**session, "skeleton": skeleton}, tensors={"state": blob})


STEPS = 3  # training steps before the malformed frames: AdamW then has real moments and a step count


@dataclass
class Trained:
    server: SideServer
    session: dict
    last_frame: bytes  # the training frame of step STEPS - 1 ...
    last_reply: bytes  # ... and the server's reply to it


def _train(server: SideServer, session: dict, steps: range) -> tuple[bytes, bytes]:
    for step in steps:
        data = encode_frame(_train_frame(session, step, seed=step))
        reply = server.handle(data)
        assert decode_frame(reply, P.REPLY_SCHEMAS).kind == P.OK
    return data, reply


@pytest.fixture
def trained() -> Trained:
    server = SideServer(ServerConfig(device="cpu"))
    session = _new_session(server)
    data, reply = _train(server, session, range(STEPS))
    return Trained(server, session, data, reply)


@pytest.fixture(scope="module")
def next_step_reference() -> dict[str, Any]:
    """The reply header of step STEPS on a session that never saw a malformed frame (with one thread, as the
    tests that compare with it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        server = SideServer(ServerConfig(device="cpu"))
        session = _new_session(server)
        _train(server, session, range(STEPS))
        return _call(server, _train_frame(session, STEPS, seed=STEPS)).header
    finally:
        torch.set_num_threads(threads)


def test_trained_session_state_is_real(trained):
    """What the malformed-frame tests compare is not trivially equal: Adam moments, scheduler, step."""
    state = _get_state(trained.server, trained.session)
    assert state["step"] == STEPS and state["scheduler"]["last_epoch"] == STEPS
    moments = [v for p in state["optimizer"]["state"].values() for k, v in p.items() if k.startswith("exp_avg")]
    assert len(moments) == 2 * len(state["model"]) and all(bool(m.abs().sum() > 0) for m in moments)


def test_training_frames_reduce_the_loss():
    server = SideServer(ServerConfig(device="cpu"))
    session = _new_session(server)
    losses = []
    for step in range(40):
        reply = _call(server, _train_frame(session, step, seed=step))
        assert reply.kind == P.OK, reply.header
        assert reply.header["step"] == step
        losses.append(reply.header["loss"])
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert _get_state(server, session)["step"] == 40


def test_retried_frame_is_not_applied_twice(trained):
    before = _get_state(trained.server, trained.session)
    assert trained.server.handle(trained.last_frame) == trained.last_reply
    _assert_same_state(before, _get_state(trained.server, trained.session))


def _perturbed(state: dict[str, Any], **override: Any) -> dict[str, Any]:
    """``state`` with different weights, Adam moments and scheduler position (so that a partial load shows)."""
    bad = copy.deepcopy(state)
    bad["model"] = {k: v + 1.0 for k, v in bad["model"].items()}
    for p in bad["optimizer"]["state"].values():
        p["exp_avg"] = p["exp_avg"] * 2.0
    bad["scheduler"]["last_epoch"] += 5
    bad.update(override)
    return bad


def _malformed(session: dict, state: dict[str, Any]) -> dict[str, bytes | Frame]:
    """Frames the server must refuse, for a session that has applied STEPS steps (``state`` is its state)."""
    step = STEPS  # the step the session expects next
    acts, lengths, labels = _batch(step)
    nan_acts = acts.clone()
    nan_acts[0, 0, 0] = float("nan")
    overflow = P.pack_acts(acts, lengths, "int8")
    overflow["acts.scale"] = torch.full_like(overflow["acts.scale"], 3e38)  # finite, but q * scale is not
    good = encode_frame(_train_frame(session, step, seed=step))
    wrong_moment = copy.deepcopy(state)
    first = next(iter(wrong_moment["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3)
    bad_hello = _hello()
    bad_hello.header["tap_spec"] = {"layers": "all"}
    foreign_hello = _hello()
    foreign_hello.header["module"] = "os:system"
    return {
        "random bytes": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
        "truncated": good[: len(good) // 2],
        "wrong width": _train_frame(session, step, step, **P.pack_acts(torch.randn(18, 3, 8), lengths, "int8")),
        "wrong layer count": _train_frame(session, step, step, **P.pack_acts(torch.randn(18, 2, 16), lengths, "int8")),
        "wrong dtype": _train_frame(session, step, step, **{"acts.q": torch.zeros(18, 3, 16, dtype=torch.int32)}),
        "nan in fp32 acts": _train_frame(session, step, step, codec="fp32", **P.pack_acts(nan_acts, lengths, "fp32")),
        "int8 scale decoding to inf": _train_frame(session, step, step, **overflow),
        "lengths do not sum": _train_frame(session, step, step, lengths=torch.full((6,), 2)),
        "a sample of no tokens": _train_frame(session, step, step, lengths=torch.tensor([0, 3, 3, 3, 3, 6])),
        "label out of range": _train_frame(session, step, step, labels=torch.full((6,), 7)),
        "negative label": _train_frame(session, step, step, labels=torch.tensor([0, 1, -1, 0, 1, 2])),
        "fewer labels than samples": _train_frame(session, step, step, labels=labels[:5]),
        "forbidden field": _train_frame(session, step, step, input_ids=torch.zeros(6, 3, dtype=torch.int64)),
        "unknown session": _train_frame({**session, "session": "device:nobody/x"}, step, step),
        "the right session with a wrong secret": _train_frame({**session, "secret": "0" * 32}, step, step),
        "a header key no schema names": Frame(kind=P.TRAIN, header={**session, "step": step, "codec": "int8",
                                                                     "text": "a private sentence"},
                                              tensors={**P.pack_acts(acts, lengths, "int8"), "labels": labels}),
        "another step's content under an applied step": _train_frame(session, step - 1, seed=step + 7),
        "step ahead": _train_frame(session, step + 2, step),
        "stale step": _train_frame(session, step - 2, step),
        "unknown kind": Frame(kind="exec", header={**session}),
        "targets on a labelled session": Frame(kind=P.TRAIN_TARGET, header={**session, "step": step, "codec": "int8"},
                                                tensors={**P.pack_acts(acts, lengths, "int8"), "targets": torch.randn(6, 3)}),
        "cached step without a cache": Frame(kind=P.TRAIN_CACHED, header={**session, "step": step, "keys": ["k"]}),
        "eval of the wrong width": Frame(kind=P.EVAL, header={**session, "codec": "int8"},
                                         tensors=P.pack_acts(torch.randn(18, 3, 8), lengths, "int8")),
        "hello with a bad tap spec": bad_hello,
        "hello for an unregistered module": foreign_hello,
        "state: weights of the wrong shape": _set_state_frame(
            session, {**state, "model": {k: torch.zeros(2, 2) for k in state["model"]}}),
        "state: an unknown weight": _set_state_frame(
            session, _perturbed(state, model={**_perturbed(state)["model"], "side.extra": torch.zeros(2)})),
        "state: Adam moment of the wrong shape": _set_state_frame(session, {**_perturbed(state), "optimizer": wrong_moment["optimizer"]}),
        "state: negative step": _set_state_frame(session, _perturbed(state, step=-1)),
        # a scheduler's load_state_dict takes any dict into its __dict__; these were accepted once, and every
        # later training step then moved the weights (optimizer.step) before failing in scheduler.step
        "state: scheduler step count not a number": _set_state_frame(
            session, _perturbed(state, scheduler={**state["scheduler"], "last_epoch": "three"})),
        "state: scheduler with a foreign key": _set_state_frame(
            session, _perturbed(state, scheduler={**state["scheduler"], "optimizer": 5})),
        "state: schedule length not a number": _set_state_frame(session, _perturbed(state, scheduler={
            **state["scheduler"], "lr_lambdas": [{**f, "total_steps": "x"} for f in state["scheduler"]["lr_lambdas"]]})),
        "state: no weights": _set_state_frame(session, {"step": step}),
        "state: blob is not safetensors": Frame(kind=P.SET_STATE, header={**session, "skeleton": {"root": {}}},
                                                tensors={"state": torch.frombuffer(bytearray(b"garbage!"), dtype=torch.uint8)}),
        "state: skeleton names a missing tensor": Frame(
            kind=P.SET_STATE, header={**session, "skeleton": {"root": {"__tensor__": "t99"}}},
            tensors={"state": P.pack_state({})[1]}),
        "state: skeleton nested 200 deep": Frame(kind=P.SET_STATE, header={**session, "skeleton": {"root": _deep(200)}},
                                                 tensors={"state": P.pack_state({})[1]}),
        "state: a dict key that is a list": Frame(
            kind=P.SET_STATE, header={**session, "skeleton": {"root": {"__items__": [[[1], 2]]}}},
            tensors={"state": P.pack_state({})[1]}),
    }


def _deep(depth: int) -> list:
    root: list = []
    for _ in range(depth):
        root = [root]
    return root


@pytest.mark.parametrize("root", [_deep(200), {"__items__": [[[1], 2]]}, {"__tensor__": ["t0"]}])
def test_a_malformed_skeleton_is_a_frame_error(root):
    """Refused as a bad frame by the parser, not by the server's catch-all (RecursionError, TypeError)."""
    with pytest.raises(FrameError, match="state skeleton"):
        P.unpack_state({"root": root}, P.pack_state({})[1])


MALFORMED = list(_malformed({"session": "s", "secret": "s"}, {"model": {"w": torch.zeros(1)}, "optimizer": {"state": {"0": {"exp_avg": torch.zeros(1)}}},
                                  "scheduler": {"last_epoch": 0, "lr_lambdas": [{}]}, "step": 0}))


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_frames_are_refused_and_change_nothing(trained, next_step_reference, case):
    server, session = trained.server, trained.session
    if case.startswith("state:"):
        # a state is only taken right after a hello: reconnect (same session, a new secret) so that the
        # malformed state is refused for what it holds, not for coming late
        session = _new_session(server)
        assert session["session"] == trained.session["session"] and session["secret"] != trained.session["secret"]
    before = _get_state(server, session)
    reply = _call(server, _malformed(session, before)[case])
    assert reply.kind == P.ERROR and reply.header["message"]
    # weights, optimizer moments, scheduler and step, tensor by tensor
    _assert_same_state(before, _get_state(server, session))
    # the stored reply for retries: the last training frame (under the current secret) gets the very same bytes
    assert server.handle(encode_frame(_train_frame(session, STEPS - 1, seed=STEPS - 1))) == trained.last_reply
    # ... and the next step trains exactly as on a session that never saw the malformed frame
    after = _call(server, _train_frame(session, STEPS, seed=STEPS))
    assert after.kind == P.OK, after.header
    for key in ("step", "loss", "lr", "grad_norm", "acc"):
        assert after.header[key] == next_step_reference[key], key


def test_oversized_frame_is_refused():
    server = SideServer(ServerConfig(device="cpu", max_frame_mb=1))
    session = _new_session(server)
    big = _train_frame(session, 0, 1, codec="fp32", **P.pack_acts(torch.randn(6 * 3000, 3, 16), torch.full((6,), 3000), "fp32"))
    reply = _call(server, big)
    assert reply.kind == P.ERROR and "bytes" in reply.header["message"]


def test_a_reply_over_max_reply_mb_is_refused_with_the_key():
    """A side network's whole state can outgrow the request bound (199 MB on Qwen2.5-1.5B against max_frame_mb
    128); replies have their own bound, and a reply over it becomes an error that names the key."""
    wide = TapSpec(layers=[0, 1, 2, 3], hidden_size=1024, arch="llama", is_decoder=True)  # 4 MB of adapters
    hello = _hello()
    hello.header["tap_spec"] = wide.to_dict()
    small = SideServer(ServerConfig(device="cpu", max_frame_mb=1, max_reply_mb=1))
    session = _new_session(small, copy.deepcopy(hello))
    reply = _call(small, Frame(kind=P.GET_STATE, header={**session}))
    assert reply.kind == P.ERROR and "max_reply_mb=1" in reply.header["message"]
    assert session["session"] in small.sessions  # the session is still there
    large = SideServer(ServerConfig(device="cpu", max_frame_mb=1, max_reply_mb=8))
    state = _get_state(large, _new_session(large, hello))  # over max_frame_mb, under max_reply_mb
    assert sum(t.numel() * t.element_size() for t in _leaves(state).values() if isinstance(t, torch.Tensor)) > 2**20


def test_get_state_model_only_is_the_same_model_without_the_optimizer(trained):
    server, session = trained.server, trained.session
    full = _get_state(server, session)
    reply = _call(server, Frame(kind=P.GET_STATE, header={**session, "model_only": True}))
    assert reply.kind == P.OK
    state = P.unpack_state(reply.header["skeleton"], reply.tensors["state"])
    assert set(state) == {"model", "step"} and state["step"] == full["step"]
    _assert_same_state(state["model"], full["model"])
    assert len(reply.tensors["state"]) < 0.5 * len(encode_frame(Frame(kind=P.OK, tensors={"state": P.pack_state(full)[1]})))


def test_grpc_replies_and_requests_have_their_own_bounds():
    size = {"reply": 3 * 2**20}

    def handler(data: bytes, identity: str) -> bytes:
        return b"r" * size["reply"]

    server, port = serve_link(handler, host="127.0.0.1", port=0, max_message_bytes=2**20, max_reply_bytes=4 * 2**20)
    try:
        link = GrpcLink(f"127.0.0.1:{port}", connect_timeout=10, max_message_bytes=2**20, max_reply_bytes=4 * 2**20)
        assert len(link.call(b"x")) == 3 * 2**20  # a reply over the request bound
        with pytest.raises(LinkError, match="RESOURCE_EXHAUSTED"):
            link.call(b"x" * (2 * 2**20))  # a request over it
        size["reply"] = 5 * 2**20
        with pytest.raises(LinkError, match="RESOURCE_EXHAUSTED"):
            link.call(b"x")  # a reply over the reply bound
        size["reply"] = 10
        assert link.call(b"x") == b"r" * 10  # still serving
        link.close()
    finally:
        server.stop(0)


def test_hello_refuses_unregistered_module():
    server = SideServer(ServerConfig(device="cpu"))
    hello = _hello()
    hello.header["module"] = "os:system"
    reply = _call(server, hello)
    assert reply.kind == P.ERROR and "unknown module" in reply.header["message"]
    # no session was opened under that device and run
    reply = _call(server, Frame(kind=P.GET_STATE, header={"session": "device:dev/r1", "secret": "0" * 32}))
    assert reply.kind == P.ERROR and "unknown session" in reply.header["message"]


def test_state_round_trip(trained):
    server, session = trained.server, trained.session
    state = _get_state(server, session)
    # a fresh session restored from that state continues where the first left off
    other = SideServer(ServerConfig(device="cpu"))
    s2 = _new_session(other)
    assert _call(other, _set_state_frame(s2, state)).kind == P.OK
    _assert_same_state(state, _get_state(other, s2))
    r1 = _call(server, _train_frame(session, STEPS, seed=STEPS)).header
    r2 = _call(other, _train_frame(s2, STEPS, seed=STEPS)).header
    assert (r1["loss"], r1["lr"], r1["grad_norm"]) == (r2["loss"], r2["lr"], r2["grad_norm"])
    _assert_same_state(_get_state(server, session), _get_state(other, s2))


def test_link_refuses_wrong_token_before_decoding():
    seen: list[int] = []

    def handler(data: bytes, identity: str) -> bytes:
        seen.append(len(data))
        return b"reply:" + data

    server, port = serve_link(handler, host="127.0.0.1", port=0, credentials=Credentials.shared("s3cret"))
    try:
        good = GrpcLink(f"127.0.0.1:{port}", "s3cret", connect_timeout=10)
        assert good.call(b"abc") == b"reply:abc"
        assert good.stats.snapshot() == {"bytes_up": 3, "bytes_down": 9, "calls": 1}
        bad = GrpcLink(f"127.0.0.1:{port}", "wrong", connect_timeout=10)
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            bad.call(b"xyz")
        assert seen == [3]  # the refused call never reached the handler
        assert good.submit(b"later").result() == b"reply:later"  # still serving
        good.close()
        bad.close()
    finally:
        server.stop(0)


def test_unreachable_server_names_the_address():
    with pytest.raises(LinkError, match="127.0.0.1:9"):
        GrpcLink("127.0.0.1:9", connect_timeout=1.0)


def _pae_session(server: SideServer) -> dict:
    from lightning_mobillm.modules import AdditiveAdapterModule

    module = AdditiveAdapterModule(backbone=BackboneConfig(source="unused"), num_classes=NUM_CLASSES, seed=0)
    hello = _hello()
    hello.header.update(module="additive_adapter", hparams=P.json_safe(module.hparams_dict()), num_outputs=16,
                        num_classes=NUM_CLASSES)
    return _new_session(server, hello)


def _target_frame(session: dict, step: int, **extra) -> Frame:
    acts, lengths, _ = _batch(step, tokens=1)
    tensors = {**P.pack_acts(acts, lengths, "int8"), "targets": torch.randn(6, 16), **extra}
    return Frame(kind=P.TRAIN_TARGET, header={**session, "step": step, "codec": "int8"}, tensors=tensors)


def test_label_free_session_refuses_labels():
    server = SideServer(ServerConfig(device="cpu"))
    session = _pae_session(server)
    before = _get_state(server, session)
    # a labelled frame kind, and a target frame smuggling a labels tensor, are both refused
    reply = _call(server, _train_frame(session, 0, seed=0))
    assert reply.kind == P.ERROR and "label-free" in reply.header["message"]
    reply = _call(server, _target_frame(session, 0, labels=torch.zeros(6, dtype=torch.int64)))
    assert reply.kind == P.ERROR and "labels" in reply.header["message"]
    _assert_same_state(before, _get_state(server, session))
    reply = _call(server, _target_frame(session, 0))
    assert reply.kind == P.OK and "acc" not in reply.header  # the server cannot score what it cannot see


class _WatchedGate(threading.BoundedSemaphore):
    """The server's compute gate, telling when a thread has started waiting for it."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.waiting = threading.Event()

    def acquire(self, *args, **kwargs):
        if not super().acquire(blocking=False):
            self.waiting.set()
            return super().acquire(*args, **kwargs)
        return True

    __enter__ = acquire


def test_steps_of_different_sessions_take_turns_at_the_compute_gate(monkeypatch):
    """``max_concurrent_steps=1``: while one session's training step computes, another session's frame waits
    at the gate (it does not compute alongside, which would hold two steps' transient memory), and runs
    when the first is done. Frames that do not compute (get_state) pass the gate by."""
    server = SideServer(ServerConfig(device="cpu", checkpoint_every_n_steps=0, max_concurrent_steps=1))
    gate = server._compute = _WatchedGate(1)
    alice = _new_session(server)
    bob = _new_session(server, Frame(kind=P.HELLO, header={**_hello().header, "run_id": "r2"}))
    inside, release, peak, lock = [0], threading.Event(), [0], threading.Lock()
    entered = threading.Event()
    step = server.policy.train

    def watched(*args, **kwargs):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        entered.set()
        if not release.is_set():
            release.wait(timeout=60)  # the first step holds the gate until the second is seen waiting
        try:
            return step(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(server.policy, "train", watched)
    replies: dict[str, Frame] = {}
    first = threading.Thread(target=lambda: replies.__setitem__("alice", _call(server, _train_frame(alice, 0, 1))))
    second = threading.Thread(target=lambda: replies.__setitem__("bob", _call(server, _train_frame(bob, 0, 2))))
    first.start()
    try:
        assert entered.wait(timeout=60)  # alice's step holds the gate
        assert _call(server, Frame(kind=P.GET_STATE, header={**bob})).kind == P.OK  # not behind the gate
        second.start()
        assert gate.waiting.wait(timeout=60)
        assert inside[0] == 1
    finally:
        release.set()
        first.join(timeout=60)
        second.join(timeout=60)
    assert replies["alice"].kind == replies["bob"].kind == P.OK, (replies["alice"].header, replies["bob"].header)
    assert peak[0] == 1


@pytest.mark.parametrize("key,value", [("max_workers", 0), ("max_concurrent_steps", -1), ("max_frame_mb", "big"),
                                       ("max_calls_per_identity", True), ("cache_disk_mb", -5),
                                       ("fed_download_dtype", "int8"), ("fed_target_space", "mine")])
def test_a_server_limit_out_of_range_names_its_key(key, value):
    with pytest.raises(ValueError, match=f"server.{key} must be"):
        ServerConfig(**{key: value})
